//! The hostcalls, declared as llm-meter declares them (`src/host/wasm_abi.rs`): buffers the host
//! returns are allocated through the SDK's `proxy_on_memory_allocate` and taken over as a `Vec`,
//! as there. Statuses are ignored: a failed call costs what a call costs, and the SDK's wrappers
//! would panic instead. The one call not here is the gRPC callout of the global rule: as in
//! llm-meter, only the SDK's `dispatch_grpc_call` registers the call's token, which routes the
//! answer to the context that asked (`filter::Global::dispatch`).

use proxy_wasm::types::{BufferType, LogLevel, MapType, MetricType};

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_log(level: u32, message: *const u8, size: usize) -> u32;
    fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
    fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
    fn proxy_get_buffer_bytes(kind: u32, start: usize, max: usize, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_get_header_map_pairs(map: u32, data: *mut *mut u8, size: *mut usize) -> u32;
    fn proxy_set_header_map_pairs(map: u32, data: *const u8, size: usize) -> u32;
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
    fn proxy_define_metric(kind: u32, name: *const u8, name_size: usize, id: *mut u32) -> u32;
    fn proxy_increment_metric(id: u32, delta: i64) -> u32;
    fn proxy_record_metric(id: u32, value: u64) -> u32;
    fn proxy_continue_stream(stream: u32) -> u32;
}

/// Runs a hostcall that returns a buffer, and takes the buffer (`None` when the call failed).
fn returned(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Option<Vec<u8>> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    if call(&mut data, &mut size) != 0 || data.is_null() {
        return None;
    }
    // SAFETY: the call succeeded, so `data` holds `size` bytes the host allocated through the
    // SDK's `proxy_on_memory_allocate` (a boxed slice of exactly `size`), now ours.
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

pub fn log(level: LogLevel, message: &str) {
    // SAFETY: a valid slice for the duration of the call.
    unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) };
}

pub fn now_nanos() -> u64 {
    let mut now = 0u64;
    // SAFETY: a valid pointer for the duration of the call.
    unsafe { proxy_get_current_time_nanoseconds(&mut now) };
    now
}

pub fn set_tick_period_ms(ms: u32) {
    // SAFETY: no pointers.
    unsafe { proxy_set_tick_period_milliseconds(ms) };
}

/// Up to `max` bytes of a buffer from `start`.
pub fn buffer(kind: BufferType, start: usize, max: usize) -> Option<Vec<u8>> {
    // SAFETY: the out-pointers are valid for the call.
    returned(|data, size| unsafe { proxy_get_buffer_bytes(kind as u32, start, max, data, size) })
}

/// A header map, serialized (not parsed).
pub fn header_map(map: MapType) -> Option<Vec<u8>> {
    // SAFETY: the out-pointers are valid for the call.
    returned(|data, size| unsafe { proxy_get_header_map_pairs(map as u32, data, size) })
}

/// Replaces a header map with a serialized one.
pub fn set_header_map(map: MapType, serialized: &[u8]) {
    // SAFETY: a valid slice for the duration of the call.
    unsafe { proxy_set_header_map_pairs(map as u32, serialized.as_ptr(), serialized.len()) };
}

pub fn set_property(name: &str, value: &[u8]) {
    // SAFETY: both slices are valid for the call.
    unsafe { proxy_set_property(name.as_ptr(), name.len(), value.as_ptr(), value.len()) };
}

/// Calls a foreign function of the host (`declare_property`); its result is dropped.
pub fn call_foreign_function(name: &str, args: &[u8]) {
    // SAFETY: the slices and the out-pointers are valid for the call.
    returned(|data, size| unsafe {
        proxy_call_foreign_function(name.as_ptr(), name.len(), args.as_ptr(), args.len(), data, size)
    });
}

/// A shared-data value and its CAS token (0 when the key was never written).
pub fn shared_data(key: &str) -> (Option<Vec<u8>>, u32) {
    let mut cas = 0u32;
    // SAFETY: the key slice and the out-pointers are valid for the call.
    let value = returned(|data, size| unsafe { proxy_get_shared_data(key.as_ptr(), key.len(), data, size, &mut cas) });
    (value, cas)
}

/// Writes a shared-data value if its CAS token is still `cas` (0: unconditionally).
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) {
    // SAFETY: valid slices for the duration of the call.
    unsafe { proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) };
}

pub fn define_metric(kind: MetricType, name: &str) -> u32 {
    let mut id = 0u32;
    // SAFETY: the name slice and the out-pointer are valid for the call.
    unsafe { proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id) };
    id
}

pub fn increment_metric(id: u32, delta: i64) {
    // SAFETY: no pointers.
    unsafe { proxy_increment_metric(id, delta) };
}

pub fn record_metric(id: u32, value: u64) {
    // SAFETY: no pointers.
    unsafe { proxy_record_metric(id, value) };
}

/// Resumes the paused request (`proxy_continue_stream`, as llm-meter's `resume_http_request`).
pub fn resume_request() {
    // SAFETY: no pointers.
    unsafe { proxy_continue_stream(0) };
}
