//! The SSE parser: never panics, keeps at most 80 bytes between chunks, and parses the same
//! events however the stream is cut.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llm_meter::scan::sse::{SseScanner, SseSink};

mod common;

#[derive(Default, PartialEq, Debug)]
struct Events(Vec<(Vec<u8>, Vec<u8>, bool)>, Vec<u8>, Vec<u8>);

impl SseSink for Events {
    fn event_type(&mut self, name: &[u8]) {
        self.1 = name.to_vec();
    }
    fn data(&mut self, bytes: &[u8]) {
        self.2.extend_from_slice(bytes);
    }
    fn dispatch(&mut self, has_data: bool) {
        let (name, data) = (std::mem::take(&mut self.1), std::mem::take(&mut self.2));
        self.0.push((name, data, has_data));
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&seed, body)) = input.split_first() else { return };
    let mut whole = Events::default();
    let mut s = SseScanner::new();
    s.feed(body, &mut whole);
    s.finish(&mut whole);

    let mut split = Events::default();
    let mut s = SseScanner::new();
    for chunk in common::chunks(seed, body) {
        s.feed(chunk, &mut split);
        assert!(s.carry_len() <= 80, "carry {}", s.carry_len());
    }
    s.finish(&mut split);
    assert_eq!(whole, split);
});
