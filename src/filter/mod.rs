//! The exchange: one HTTP request and its response through the filter, independent of
//! proxy-wasm, and the per-worker state exchanges share.
//!
//! [`Exchange`] ([`exchange`]) receives the same events as a proxy-wasm `HttpContext`, in the
//! order Envoy calls them (request headers, request body chunks, rate limit service answers,
//! response headers, response body chunks, log), and talks to Envoy only through the [`Host`]
//! trait ([`host`]). [`Worker`] ([`worker`]) is what one Envoy worker's exchanges share:
//! configuration, label registries, stat ids, the report queue. The glue in [`crate::host`]
//! implements [`Host`] with hostcalls; `tests` implements it in memory, so the whole
//! lifecycle, every metric included, is tested natively. [`hold`] watches requests held for
//! their model; `exchange/route.rs` holds the steps that route a request past an open circuit
//! (see [`crate::resilience`]).
//!
//! What the filter changes, and only then: a streaming chat/completions request without
//! `stream_options.include_usage` gets it added (`inject_stream_usage`), its `accept-encoding`
//! removed (the usage chunk is cut from an uncompressed stream) and `content-length` fixed, and
//! the usage-only chunk it asked for is cut from the client's stream; a request the limits
//! refuse is answered by the filter itself (429, 413, or 503 under `failure_mode: deny`); an
//! admitted request's response gets `x-ratelimit-*` headers. Otherwise the bytes pass
//! untouched.
//!
//! Requests are delayed only to read what decisions need: request headers are held until the
//! model is found (or the whole body, when limits or injection need it), bounded by
//! `request.model_lookahead_bytes` (see [`Flow::Hold`] and [`hold`]), and while a rate limit
//! service answers. Responses are never held. Every failure inside the filter is counted and
//! ignored (fail-open).
//!
//! Accounting happens once, in [`Exchange::on_log`], which Envoy calls for every stream however
//! it ended (completed, reset upstream, cancelled by the client). That is what keeps
//! `active_requests` balanced and makes interrupted streams still count the usage seen so far.
//!
//! Within the folder, [`host`] is below [`worker`], which is below [`exchange`]; the folder uses
//! [`crate::limit`] and everything below it.

pub mod exchange;
pub mod hold;
pub mod host;
pub mod worker;

#[cfg(test)]
mod tests;

pub use exchange::{Exchange, Flow};
pub use host::{Host, InternalError, MetricKind};
pub use worker::Worker;
