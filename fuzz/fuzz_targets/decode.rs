//! The decoders as the filter uses them (a copy decoded chunk by chunk): never panic, and
//! decode the same bytes (or fail) however the body is cut.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llm_meter::scan::decode::{Decoder, Encoding};

mod common;

fuzz_target!(|input: &[u8]| {
    let Some((&seed, body)) = input.split_first() else { return };
    let encoding = [Encoding::Gzip, Encoding::Deflate, Encoding::Brotli][usize::from(seed) % 3];
    let decode = |chunks: Vec<&[u8]>| {
        let mut d = Decoder::new(encoding);
        let mut out = Vec::new();
        for chunk in chunks {
            if d.feed(chunk, &mut |b| out.extend_from_slice(b)).is_err() {
                return None;
            }
        }
        d.finish(&mut |b| out.extend_from_slice(b)).ok().map(|()| out)
    };
    assert_eq!(decode(vec![body]), decode(common::chunks(seed, body)));
});
