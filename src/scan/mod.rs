//! Reading bodies as they stream past: the lowest layer, plain Rust with no host and no
//! configuration.
//!
//! Open this folder for "why is this token count wrong?": [`usage`] turns each API's usage
//! object into one shape (read by [`flat_json`] without building it when it is plain), [`body`]
//! finds it (and the `model`) in request and response bodies chunk by chunk, over [`json_scan`]
//! (incremental JSON path capture) and [`sse`] (event streams), skipping the JSON scan of stream
//! events that provably scan like one already scanned ([`template`]); [`decode`] decodes a copy
//! of compressed bodies for them; [`inject`] adds `include_usage` to streaming requests and cuts
//! the usage chunk the client did not ask for; [`operation`] tells the API from the request path.
//!
//! Dependencies point down only: these modules use each other and [`crate::memory`] (the
//! per-stream budget their allocations are charged to), nothing above.

pub mod body;
pub mod decode;
pub mod flat_json;
pub mod inject;
pub mod json_scan;
pub mod operation;
pub mod sse;
pub mod template;
#[cfg(test)]
pub(crate) mod test_rng;
pub mod usage;
