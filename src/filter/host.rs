//! What the exchange needs from Envoy ([`Host`]), and the few helpers every part of the
//! exchange shares: counter increments and the internal errors the filter survives.

use crate::meter::labels::SharedStore;
pub use crate::meter::metrics::Kind as MetricKind;

/// What the filter needs from Envoy. Header values are bytes: clients can send any bytes, and
/// the filter must not fail on a value that is not UTF-8.
///
/// Every method is one hostcall in the wasm glue, and a hostcall (a VM exit, often a copy into
/// the VM) costs about as much as a page of the filter's own code, so the exchange asks for
/// little: response headers come in one call, and metrics are defined once per name and then
/// updated by id.
pub trait Host: SharedStore {
    /// A request header (`:path` included), if present.
    fn request_header(&self, name: &str) -> Option<Vec<u8>>;
    /// The first value of each request header in `names` (lower case), in the order asked.
    /// The glue reads the header map once when more than one name is asked for: one hostcall
    /// instead of one per name.
    fn request_headers(&self, names: &[String]) -> Vec<Option<Vec<u8>>> {
        names.iter().map(|name| self.request_header(name)).collect()
    }
    /// Every response header (`:status` included), names in lower case as Envoy keeps them.
    fn response_headers(&self) -> Vec<(String, Vec<u8>)>;
    /// Wall-clock time in nanoseconds.
    fn now_nanos(&self) -> u64;
    /// Envoy's `response.code` property (0 or `None` when no response was sent).
    fn response_code(&self) -> Option<u16>;
    /// Envoy's `response.flags` property.
    fn response_flags(&self) -> Option<u64>;
    /// The id of the metric `name`, defining it (at 0) if it does not exist yet. The same name
    /// always gives the same id; `None` when the host refused (counted by the host).
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32>;
    /// Adds `delta` to a counter (only positive deltas) or a gauge.
    fn metric_add(&mut self, id: u32, delta: i64);
    /// Sets a gauge, or records a histogram value.
    fn metric_record(&mut self, id: u32, value: u64);
    /// Logs a warning.
    fn log_warn(&self, message: &str);
    /// The client's address (`source.address`: `ip:port`).
    fn client_address(&self) -> Option<Vec<u8>>;
    /// Sends a local reply instead of forwarding the request.
    fn send_response(&mut self, status: u16, headers: &[(String, String)], body: &[u8]);
    /// Sets (replaces) a response header.
    fn set_response_header(&mut self, name: &str, value: &str);
    /// Sets (replaces) several response headers; `current` is every response header as
    /// [`Host::response_headers`] returned it in this callback. The glue writes the whole map
    /// in one hostcall when there is more than one to set, instead of one call per header.
    fn set_response_headers(&mut self, current: &[(String, Vec<u8>)], set: &[(&str, &str)]) {
        let _ = current;
        for (name, value) in set {
            self.set_response_header(name, value);
        }
    }
    /// Starts a unary gRPC call of `method` of `service` on the Envoy cluster `grpc_service`
    /// describes (a serialized `GrpcService`); returns the call's token (`None`: the call could
    /// not be started, counted by the host). The answer comes back
    /// through the glue ([`Exchange::on_global_answer`], or the root context for reports).
    fn grpc_call(
        &mut self,
        grpc_service: &[u8],
        service: &str,
        method: &str,
        message: &[u8],
        timeout_ms: u64,
    ) -> Option<u32>;
    /// Removes a response header.
    fn remove_response_header(&mut self, name: &str);
    /// Sets (replaces) a request header; only effective while the request is held.
    fn set_request_header(&mut self, name: &str, value: &str);
    /// Removes a request header; only effective while the request is held.
    fn remove_request_header(&mut self, name: &str);
    /// The whole request body buffered so far (while the request is held).
    fn request_body(&self) -> Option<Vec<u8>>;
    /// Replaces the buffered request body (while the request is held).
    fn set_request_body(&mut self, body: &[u8]);
    /// Publishes the exchange's record as filter state `wasm.<name>` for the access log (see
    /// [`crate::record`]): the glue encodes it as the property was declared.
    fn publish_record(&mut self, name: &str, record: &crate::record::Record);

    /// Adds to a counter by name, defining it on first use (adding 0 only defines it: Envoy
    /// rejects increments that are not positive).
    fn counter_add(&mut self, name: &str, value: u64) {
        if let Some(id) = self.define_metric(MetricKind::Counter, name) {
            add_to_counter(self, id, value);
        }
    }
}

/// Adds `value` to counter `id`; 0 is not sent (Envoy rejects it, and the counter exists).
/// Values are bounded where they are read (token counts by `usage::MAX_TOKENS`), so every one
/// fits Envoy's `i64`; one that did not would be dropped, never clamped into the counter.
pub(crate) fn add_to_counter<H: Host + ?Sized>(host: &mut H, id: u32, value: u64) {
    if let Ok(delta) = i64::try_from(value) {
        if delta > 0 {
            host.metric_add(id, delta);
        }
    }
}

/// Internal failures the filter survived, for `meter_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InternalError {
    /// The shared label registry could not be updated; the value was labelled `other`.
    SharedData,
    /// A proxy-wasm hostcall failed (counted by the glue).
    Hostcall,
    /// A held request saw no body in time and was released (see [`crate::filter::hold`]).
    HoldStalled,
    /// The rate limiter could not check or release a request (see `failure_mode`).
    RateLimit,
}

impl InternalError {
    /// The `kind` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            InternalError::SharedData => "shared_data",
            InternalError::Hostcall => "hostcall",
            InternalError::HoldStalled => "hold_stalled",
            InternalError::RateLimit => "ratelimit",
        }
    }
}
