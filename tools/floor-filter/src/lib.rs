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
//! setup `b` (metrics), `{"limits": 2}` those of setup `c` (metrics and two limit rules), and
//! `{"limits": 0, "global": {"cluster": "rate_limit_service", "domain": "llm", "rule": "rpm",
//! "requests_per_minute": 1000000000, "timeout_ms": 1000, "keys": 8}}` those of setup `g`
//! (metrics and one `scope: global` request rule: bench setup `fg`, in the global-limit
//! workloads). The sequence per exchange, as Envoy 1.40 calls the filter for the bench's requests (each body in
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
//! | log | `record_metric` ×2 (tokens per request, input and output); (c): `get_shared_data` + `set_shared_data` of the tpm bucket (reconciliation, as of the response's end: no clock read), and of the model's output estimate for the first response in a flush interval (later ones wait for the timer, which updates it once); `record_metric` (duration), for streams ×2 more (time to first token, per output token); `set_property` (the record: 470 bytes, streams 514) | `on_log`, `record`, `enforce::release`, `Worker::learn_output` (`estimate::Pending`; the timer: `Worker::flush_estimates`), `publish_record` |
//!
//! With the global rule (g), the request body's end instead makes, after the body read,
//! `proxy_grpc_call` (a serialized `GrpcService` naming the cluster, 22 bytes for
//! `rate_limit_service`; `envoy.service.ratelimit.v3.RateLimitService`, `ShouldRateLimit`; no
//! metadata; a `RateLimitRequest` of 73 bytes: domain, one descriptor `rule`=`rpm`, `key`=32 hex
//! characters, the limit override, `hits_addend` 1; timeout 1000 ms), through the SDK's
//! `dispatch_grpc_call` (`global::charges`, whose window is taken at the request's arrival, no
//! clock read; `Exchange::check_global`, `Worker::call_service`, `WasmHost::grpc_call`), and returns `Pause`.
//! The answer arrives in one VM entry, `proxy_on_grpc_receive` into the root context, where the SDK
//! makes the context that asked effective (`set_effective_context`) and calls it: `get_buffer_bytes`
//! of the gRPC receive buffer (the answer, ~32 bytes, copied into the VM: the glue's
//! `grpc_response`), the clock (`Exchange::on_global_answer`), `continue_stream` (the glue's
//! `resume_http_request`). The answer is not decoded. The response headers then get the rule's
//! three `x-ratelimit-*-requests` headers in the one `set_header_map_pairs` (`global::seen`,
//! `limit_response_headers`); the log callback makes (b)'s calls. The timer runs every
//! 100 ms, as llm-meter's with a global rule (its `REPORT_EVERY_MS`), flushing every 2 ticks. The
//! descriptor's key is one of `keys` fixed stand-ins, taken in turn, for llm-meter's hashes of
//! the x-api-key values; a failed call is counted in `floor_global_failures_total` (never, in a
//! bench run: the bench checks) and the request goes on.
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
