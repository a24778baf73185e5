//! llm-meter: an Envoy proxy-wasm filter that meters LLM API traffic per model.
//!
//! Everything that does not need the proxy-wasm host lives in plain modules (scanners, usage
//! parsers, configuration, labels, pricing, metric naming, error classification) and is tested
//! natively and on wasm32 through wasm-bindgen-test. The [`filter`] module drives one HTTP
//! exchange through a small [`filter::Host`] trait, so the whole request lifecycle is tested with
//! a fake host; `wasm` (compiled only for `wasm32-wasip1`) adapts proxy-wasm callbacks to it.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing))]

pub mod body;
pub mod classify;
pub mod config;
pub mod decode;
pub mod enforce;
pub mod filter;
pub mod global;
pub mod header_map;
pub mod hold;
pub mod inject;
pub mod json_scan;
pub mod labels;
pub mod limiter;
pub mod memory;
pub mod metrics;
pub mod operation;
pub mod pricing;
pub mod rls;
pub mod sse;
pub mod upstream;
pub mod usage;

#[cfg(target_os = "wasi")]
mod wasm;
#[cfg(target_os = "wasi")]
mod wasm_abi;
