//! Configuration parsing: any bytes give a configuration or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let _ = llm_meter::config::Config::parse(input);
});
