//! The proxy-wasm hostcalls the filter makes, without the SDK's wrappers.
//!
//! The SDK's `hostcalls::*` functions `panic!` on any status they do not expect, and a panic
//! aborts the VM: every later request on that Envoy worker then passes unmetered and unlimited.
//! Envoy does return such statuses in reachable situations (`BadArgument` for a read of request
//! headers after they were forwarded was one, found by the tests). Here every call returns the
//! host's status as an error, for the glue to count and log.
//!
//! Buffers the host returns are allocated through this module's `proxy_on_memory_allocate`
//! export (the SDK's allocator: a `Vec` of exactly the requested capacity), and taken over as a
//! `Vec` the way the SDK does.

use crate::host::header_map;
use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType, Status};

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message: *const u8, size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(kind: u32, start: usize, max: usize, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_set_buffer_bytes(kind: u32, start: usize, size: usize, data: *const u8, data_size: usize) -> u32;
    fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_set_header_map_pairs(map: u32, data: *const u8, size: usize) -> u32;
    fn proxy_get_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *mut *mut u8,
        value_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32;
    fn proxy_get_property(path: *const u8, path_size: usize, value: *mut *mut u8, value_size: *mut usize) -> u32;
    fn proxy_set_property(path: *const u8, path_size: usize, value: *const u8, value_size: usize) -> u32;
    fn proxy_call_foreign_function(
        name: *const u8,
        name_size: usize,
        args: *const u8,
        args_size: usize,
        results: *mut *mut u8,
        results_size: *mut usize,
    ) -> u32;
    fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        value: *mut *mut u8,
        value_size: *mut usize,
        cas: *mut u32,
    ) -> u32;
    fn proxy_set_shared_data(key: *const u8, key_size: usize, value: *const u8, value_size: usize, cas: u32) -> u32;
    fn proxy_continue_stream(stream: u32) -> u32;
    fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    fn proxy_set_effective_context(context: u32) -> u32;
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, delta: i64) -> u32;
    fn proxy_record_metric(id: u32, value: u64) -> u32;
}

/// proxy-wasm's `StreamType::HttpRequest`.
const STREAM_HTTP_REQUEST: u32 = 0;

fn status(code: u32) -> Result<(), Status> {
    match code {
        0 => Ok(()),
        1 => Err(Status::NotFound),
        2 => Err(Status::BadArgument),
        3 => Err(Status::SerializationFailure),
        4 => Err(Status::ParseFailure),
        7 => Err(Status::Empty),
        8 => Err(Status::CasMismatch),
        _ => Err(Status::InternalFailure),
    }
}

/// `Ok(None)` for `NotFound`, the usual answer for an absent header, property or key.
fn found<T>(result: Result<T, Status>) -> Result<Option<T>, Status> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(Status::NotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Takes ownership of a buffer the host returned.
///
/// # Safety
/// `data` is null or points to `size` bytes the host allocated through this module's
/// `proxy_on_memory_allocate`, which then belong to the caller.
unsafe fn take(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        // SAFETY: as documented above; the SDK's allocator allocates a `Vec` of capacity `size`.
        unsafe { Vec::from_raw_parts(data, size, size) }
    }
}

/// Runs a hostcall that returns a buffer, and takes the buffer.
fn returned(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Result<Vec<u8>, Status> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    status(call(&mut data, &mut size))?;
    // SAFETY: the hostcall succeeded, so `data`/`size` describe a buffer it returned.
    Ok(unsafe { take(data, size) })
}

pub fn log(level: LogLevel, message: &str) -> Result<(), Status> {
    // SAFETY: a valid slice for the duration of the call.
    status(unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) })
}

pub fn now_nanos() -> Result<u64, Status> {
    let mut now = 0u64;
    // SAFETY: a valid pointer for the duration of the call.
    status(unsafe { proxy_get_current_time_nanoseconds(&mut now) })?;
    Ok(now)
}

pub fn set_tick_period_ms(ms: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    status(unsafe { proxy_set_tick_period_milliseconds(ms) })
}

/// Up to `max` bytes of a buffer from `start`; `Ok(None)` when there is none.
pub fn get_buffer(kind: BufferType, start: usize, max: usize) -> Result<Option<Vec<u8>>, Status> {
    // SAFETY: the out-pointers are valid for the call.
    found(returned(|data, size| unsafe { proxy_get_buffer_bytes(kind as u32, start, max, data, size) }))
}

/// Replaces `size` bytes of a buffer from `start` with `data`.
pub fn set_buffer(kind: BufferType, start: usize, size: usize, data: &[u8]) -> Result<(), Status> {
    // SAFETY: a valid slice for the duration of the call.
    status(unsafe { proxy_set_buffer_bytes(kind as u32, start, size, data.as_ptr(), data.len()) })
}

/// Every header of `map`.
pub fn header_pairs(map: MapType) -> Result<Vec<(String, Vec<u8>)>, Status> {
    // SAFETY: the out-pointers are valid for the call.
    let bytes = returned(|data, size| unsafe { proxy_get_header_map_pairs(map as u32, data, size) })?;
    header_map::parse(&bytes).ok_or(Status::ParseFailure)
}

/// The first value of each header of `map` named in `names` (lower case), read in one hostcall.
pub fn header_values<S: AsRef<str>>(map: MapType, names: &[S]) -> Result<Vec<Option<Vec<u8>>>, Status> {
    // SAFETY: the out-pointers are valid for the call.
    let bytes = returned(|data, size| unsafe { proxy_get_header_map_pairs(map as u32, data, size) })?;
    header_map::values_of(&bytes, names).ok_or(Status::ParseFailure)
}

/// Replaces every header of `map` with `serialized` (a map in [`header_map`]'s format).
pub fn set_header_pairs(map: MapType, serialized: &[u8]) -> Result<(), Status> {
    // SAFETY: a valid slice for the duration of the call.
    status(unsafe { proxy_set_header_map_pairs(map as u32, serialized.as_ptr(), serialized.len()) })
}

/// One header's value; `Ok(None)` when absent.
pub fn header(map: MapType, name: &str) -> Result<Option<Vec<u8>>, Status> {
    // SAFETY: the key slice and the out-pointers are valid for the call.
    found(returned(|data, size| unsafe {
        proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), data, size)
    }))
}

/// Sets (replaces) a header.
pub fn set_header(map: MapType, name: &str, value: &[u8]) -> Result<(), Status> {
    // SAFETY: valid slices for the duration of the call.
    status(unsafe {
        proxy_replace_header_map_value(map as u32, name.as_ptr(), name.len(), value.as_ptr(), value.len())
    })
}

/// Removes a header.
pub fn remove_header(map: MapType, name: &str) -> Result<(), Status> {
    // SAFETY: a valid slice for the duration of the call.
    status(unsafe { proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len()) })
}

/// A property (`["response", "code"]`); `Ok(None)` when Envoy has none.
pub fn property(path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
    let path = path.join("\0");
    // SAFETY: the path slice and the out-pointers are valid for the call.
    found(returned(|data, size| unsafe { proxy_get_property(path.as_ptr(), path.len(), data, size) }))
}

/// Sets a property: Envoy keeps it as filter state `wasm.<name>` (see [`crate::record`]).
pub fn set_property(name: &str, value: &[u8]) -> Result<(), Status> {
    // SAFETY: both slices are valid for the call.
    status(unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) })
}

/// Calls one of the host's foreign functions (`declare_property`); its result is dropped.
pub fn call_foreign_function(name: &str, args: &[u8]) -> Result<(), Status> {
    // SAFETY: the slices and the out-pointers are valid for the call.
    returned(|data, size| unsafe {
        proxy_call_foreign_function(name.as_ptr(), name.len(), args.as_ptr(), args.len(), data, size)
    })
    .map(drop)
}

/// A shared-data value and its CAS token; `Ok(None)` when the key was never written.
pub fn shared_data(key: &str) -> Result<Option<(Vec<u8>, u32)>, Status> {
    let mut cas = 0u32;
    // SAFETY: the key slice and the out-pointers are valid for the call.
    let value =
        found(returned(|data, size| unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), data, size, &mut cas) }))?;
    // A value without a CAS token is taken as absent, as the SDK does.
    Ok(value.filter(|_| cas != 0).map(|v| (v, cas)))
}

/// Writes a shared-data value if its CAS token is still `cas` (0: unconditionally).
pub fn set_shared_data(key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Status> {
    // SAFETY: valid slices for the duration of the call.
    status(unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas.unwrap_or(0)) })
}

/// Resumes a paused request.
pub fn resume_http_request() -> Result<(), Status> {
    // SAFETY: no pointers.
    status(unsafe { proxy_continue_stream(STREAM_HTTP_REQUEST) })
}

/// Sends a local reply.
pub fn send_http_response(code: u16, headers: &[(String, String)], body: &[u8]) -> Result<(), Status> {
    let pairs: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes())).collect();
    let headers = header_map::serialize(&pairs);
    // SAFETY: valid slices for the duration of the call.
    status(unsafe {
        proxy_send_local_response(
            u32::from(code),
            std::ptr::null(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    })
}

/// Makes later hostcalls act on another context (the timer releasing a held request).
pub fn set_effective_context(context: u32) -> Result<(), Status> {
    // SAFETY: no pointers.
    status(unsafe { proxy_set_effective_context(context) })
}

pub fn define_metric(kind: MetricType, name: &str) -> Result<u32, Status> {
    let mut id = 0u32;
    // SAFETY: the name slice and the out-pointer are valid for the call.
    status(unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn increment_metric(id: u32, delta: i64) -> Result<(), Status> {
    // SAFETY: no pointers.
    status(unsafe { proxy_increment_metric(id, delta) })
}

pub fn record_metric(id: u32, value: u64) -> Result<(), Status> {
    // SAFETY: no pointers.
    status(unsafe { proxy_record_metric(id, value) })
}
