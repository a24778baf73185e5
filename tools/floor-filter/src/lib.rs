//! The hostcall floor: a proxy-wasm filter that makes exactly the hostcalls llm-meter makes per
//! exchange, and does nothing else. A benchmark tool, not a product: it meters nothing (its
//! metrics and its record hold fixed values) and limits nothing.
//!
//! What it is for: `scripts/bench.py --floor` runs it in llm-meter's place (setups `f` and `fc`)
//! to measure the least a filter with llm-meter's features costs on this Envoy. Such a filter
//! has to read the request and response headers and bodies into the VM, read the clock, record
//! the histograms and publish the record, and with rate limits update shared data and write the
//! `x-ratelimit-*` headers; the empty filter of setup `n` does none of that, llm-meter does it
//! plus its own work (parsing, labels, the limiter's logic). So the throughput of `f` over plain
//! Envoy bounds what llm-meter (`b`) could ever reach, and `fc` bounds `c`; what llm-meter costs
//! beyond them is its own code.
//!
//! The configuration selects the mode: `{"limits": 0}` (or `{}`) makes the hostcalls of bench
//! setup `b` (metrics), `{"limits": 2}` those of setup `c` (metrics and two limit rules). The
//! sequence per exchange, as Envoy 1.40 calls the filter for the bench's requests (each body in
//! one callback, then an empty one that ends it; `tools/floor-filter/trace.py` prints both
//! filters' hostcalls from Envoy's trace log and compares them), and where llm-meter makes each
//! call:
//!
//! | callback | hostcalls (in order) | llm-meter |
//! |---|---|---|
//! | request headers | `get_header_map_pairs` (request); the clock. Returns `Pause` | `Exchange::on_request_headers`: `:path`, app and kept headers in one map read, `started_nanos`; holds for the model |
//! | request body, not the end | `get_buffer_bytes` (the bytes not read yet). Returns `Pause`: Envoy buffers | `on_http_request_body` reads the chunk, `on_request_body` holds |
//! | request body, the end | `get_buffer_bytes` if new bytes came; (c): per rule `get_shared_data` + `set_shared_data` (compare-and-swap), rpm then tpm. `Continue` | `check_limits` → `enforce::check` → `Limiter::acquire` |
//! | response headers | `get_header_map_pairs` (response); (c): `set_header_map_pairs` with the six `x-ratelimit-*` headers added | `on_response_headers`: `host.response_headers()`, `set_response_headers` |
//! | response body | `get_buffer_bytes` (the chunk); the clock in the first chunk of a stream (time to first token) and at the end | `on_response_body`, the clock read once per callback |
//! | log | `record_metric` ×2 (tokens per request, input and output); (c): the clock, `get_shared_data` + `set_shared_data` of the tpm bucket (reconciliation) and of the model's output estimate; `record_metric` (duration), for streams ×2 more (time to first token, per output token); `set_property` (the record: 470 bytes, streams 514) | `on_log`, `record`, `enforce::release`, `estimate::update`, `publish_record` |
//!
//! Counters and the active-requests gauge are held in the VM and sent with `increment_metric`, one
//! call per changed stat, when a request ends at least 250 ms after the last flush and on the
//! root context's 250 ms timer, which also reads the clock once per tick: llm-meter's batching
//! (`src/meter/deltas.rs`, the glue's `MetricIds` and `on_tick` in `src/host/wasm.rs`).
#![deny(clippy::unwrap_used, clippy::panic)]

#[cfg(target_os = "wasi")]
mod abi;
#[cfg(target_os = "wasi")]
mod filter;
