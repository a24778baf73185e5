//! Everything that touches proxy-wasm: the glue that adapts Envoy's callbacks to
//! [`crate::filter`] (`wasm`), the raw hostcalls that return the host's status instead of
//! panicking (`wasm_abi`), and the serialization of header maps those hostcalls exchange
//! ([`header_map`], host-independent and tested natively).
//!
//! The top of the crate: it depends on the exchange and everything below, nothing depends on
//! it. `wasm` and `wasm_abi` are compiled only for the filter target (`wasm32-wasip1`).

pub mod header_map;
#[cfg(target_os = "wasi")]
mod wasm;
#[cfg(target_os = "wasi")]
mod wasm_abi;
