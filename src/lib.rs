//! llm-meter: an Envoy proxy-wasm filter that meters and rate-limits LLM API traffic per model.
//!
//! The crate is layered; each folder's doc says what it is for, and dependencies point down
//! only (a module never uses a folder above its own):
//!
//! - [`host`] is the proxy-wasm glue (compiled for `wasm32-wasip1`): Envoy's callbacks in,
//!   hostcalls out. Open it for "what does Envoy see?".
//! - [`filter`] is one HTTP exchange through a small [`filter::Host`] trait ([`filter::Exchange`],
//!   in the order Envoy calls it) and the per-worker state ([`filter::Worker`]). Open it for
//!   "what happens to a request, step by step?".
//! - [`limit`] is admission: "why was this request rejected?"
//! - [`resilience`] is the per-model circuit breaker and fallback chains: "why did this request
//!   go to another model?"
//! - [`config`] is the filter configuration, validated with the field named.
//! - [`meter`] holds metric names, labels, prices, error classes: "why this series, this cost?"
//! - [`scan`] reads bodies as they stream: "why is this token count wrong?" (`scan::usage`)
//! - [`memory`] is the per-VM budget every stream's allocations are charged to.
//! - [`record`] is the per-request record published for Envoy's access log: "which request
//!   cost what?"
//!
//! Everything below [`host`] is plain Rust, tested natively and built for wasm32-wasip1 inside
//! node's V8 (`just unit-wasm`); the exchange is tested with a fake host.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

pub mod config;
pub mod filter;
pub mod host;
pub mod limit;
pub mod memory;
pub mod meter;
pub mod record;
pub mod resilience;
pub mod scan;

/// The VM's allocator: small freed blocks are reused from a bounded cache before the C
/// allocator sees them (see [`memory::small_blocks`]). Only on wasm32 (one thread per VM); the
/// native build and its benches keep the system allocator.
#[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
#[global_allocator]
static ALLOCATOR: memory::small_blocks::SmallBlocks<std::alloc::System> =
    memory::small_blocks::SmallBlocks::new(std::alloc::System);
