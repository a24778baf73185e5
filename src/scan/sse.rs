//! Incremental Server-Sent Events scanner.
//!
//! Streaming LLM responses (`text/event-stream`) carry their usage in one of the events, often
//! the last. Envoy hands the filter the stream chunk by chunk, and lines and events are split
//! anywhere. [`SseScanner`] follows the WHATWG event-stream parsing rules and streams each
//! event's data straight to an [`SseSink`] (typically a per-event
//! [`JsonScanner`](crate::scan::json_scan::JsonScanner)), so nothing of the body is buffered.
//!
//! Rules (WHATWG "event stream interpretation"): lines end with CRLF, LF or CR (a CR ending one
//! chunk and an LF starting the next are one line end); a leading UTF-8 BOM is skipped; a line
//! starting with `:` is a comment; the field name runs up to the first `:` and one leading
//! space of the value is stripped; a line without a colon is a field with an empty value; only
//! `data` and `event` are used (`id`, `retry` and unknown fields are ignored); a blank line
//! dispatches the event.
//!
//! Deliberate deviation: at the end of the stream ([`SseScanner::finish`]) an event that has
//! data but no terminating blank line is still dispatched (the browser algorithm discards it),
//! because a final usage event must not be lost for metering.
//!
//! Bounds: data values are never buffered, whatever their length. Only a field name (up to 16
//! bytes; longer names are unknown fields and are not kept) and the `event` value (truncated
//! to 64 bytes) are held between chunks, so [`SseScanner::carry_len`] never exceeds 64.

use memchr::{memchr2, memchr3};

/// Receives the events of an SSE stream as they are parsed.
pub trait SseSink {
    /// The `event:` field of the current event, once its line is complete (value truncated to
    /// 64 bytes). Applies to the current event only: forget it on [`SseSink::dispatch`].
    fn event_type(&mut self, _name: &[u8]) {}
    /// Next bytes of the current event's data: the concatenation of its `data:` field values
    /// with lines joined by b"\n" (the sink sees the b"\n" between two data lines, never a
    /// trailing one). May be called many times per event with pieces split anywhere.
    fn data(&mut self, bytes: &[u8]);
    /// End of the current event (blank line). `has_data` is false when the event had no data
    /// line.
    fn dispatch(&mut self, has_data: bool);
}

/// Longest field name kept; longer names cannot be `data` or `event`.
const MAX_NAME: usize = 16;
/// Longest `event` value passed to the sink; the rest is dropped.
const MAX_EVENT: usize = 64;
const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Matched this many bytes of a leading UTF-8 byte order mark.
    Bom(u8),
    /// At the start of a line.
    LineStart,
    /// Reading a field name.
    Name,
    /// Just after `data:` (one space to strip).
    DataStart,
    /// Inside a data value.
    Data,
    /// Just after `event:` (one space to strip).
    EventStart,
    /// Inside an event value.
    Event,
    /// Inside a comment or an ignored field.
    Ignore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Data,
    Event,
    Other,
}

/// Incremental SSE parser with bounded state.
#[derive(Debug, Clone)]
pub struct SseScanner {
    state: State,
    /// The previous line ended with CR: an LF right after it belongs to the same line end.
    after_cr: bool,
    /// The current event has a data line.
    has_data: bool,
    name: [u8; MAX_NAME],
    name_len: usize,
    /// The field name is longer than `MAX_NAME`.
    name_long: bool,
    event: [u8; MAX_EVENT],
    event_len: usize,
}

impl Default for SseScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl SseScanner {
    /// A scanner at the start of a stream.
    pub fn new() -> Self {
        Self {
            state: State::Bom(0),
            after_cr: false,
            has_data: false,
            name: [0; MAX_NAME],
            name_len: 0,
            name_long: false,
            event: [0; MAX_EVENT],
            event_len: 0,
        }
    }

    /// Bytes held between chunks, for bound tests (a field name or an event type: at most 64
    /// whatever the input).
    pub fn carry_len(&self) -> usize {
        let bom = match self.state {
            State::Bom(n) => usize::from(n),
            _ => 0,
        };
        bom + self.name_len + self.event_len
    }

    /// Scans the next chunk of the stream, calling `sink` as fields and events complete.
    pub fn feed<S: SseSink>(&mut self, chunk: &[u8], sink: &mut S) {
        let mut i = 0;
        while let Some(&b) = chunk.get(i) {
            match self.state {
                State::Bom(n) => {
                    if BOM.get(usize::from(n)) == Some(&b) {
                        i += 1;
                        self.state = if n >= 2 { State::LineStart } else { State::Bom(n + 1) };
                    } else {
                        // Not a BOM after all: the bytes matched so far are ordinary input.
                        self.state = State::LineStart;
                        self.feed(BOM.get(..usize::from(n)).unwrap_or_default(), sink);
                    }
                }
                State::LineStart => {
                    if self.after_cr {
                        self.after_cr = false;
                        if b == b'\n' {
                            i += 1;
                            continue;
                        }
                    } else {
                        let next = self.whole_lines(chunk, i, sink);
                        if next != i {
                            i = next;
                            continue;
                        }
                    }
                    match b {
                        b'\n' | b'\r' => {
                            i += 1;
                            self.after_cr = b == b'\r';
                            sink.dispatch(self.has_data);
                            self.has_data = false;
                        }
                        b':' => {
                            i += 1;
                            self.state = State::Ignore;
                        }
                        // Fast path: a whole `data:` or `event:` field name in this chunk.
                        b'd' if chunk.get(i..i + 5) == Some(b"data:") => {
                            i += 5;
                            self.state = State::DataStart;
                        }
                        b'e' if chunk.get(i..i + 6) == Some(b"event:") => {
                            i += 6;
                            self.state = State::EventStart;
                        }
                        _ => {
                            self.name_len = 0;
                            self.name_long = false;
                            self.state = State::Name;
                        }
                    }
                }
                State::Name => {
                    let rest = chunk.get(i..).unwrap_or_default();
                    match memchr3(b':', b'\r', b'\n', rest) {
                        Some(p) => {
                            self.push_name(rest.get(..p).unwrap_or_default());
                            i += p + 1;
                            let field = self.field();
                            self.name_len = 0;
                            match rest.get(p).copied() {
                                Some(b':') => {
                                    self.state = match field {
                                        Field::Data => State::DataStart,
                                        Field::Event => State::EventStart,
                                        Field::Other => State::Ignore,
                                    }
                                }
                                end => {
                                    // A line without a colon: the field with an empty value.
                                    self.empty_field(field, sink);
                                    self.end_line(end);
                                }
                            }
                        }
                        None => {
                            self.push_name(rest);
                            i = chunk.len();
                        }
                    }
                }
                State::DataStart => {
                    self.begin_data_line(sink);
                    if b == b' ' {
                        i += 1;
                    }
                    self.state = State::Data;
                }
                State::Data => {
                    let rest = chunk.get(i..).unwrap_or_default();
                    let end = memchr2(b'\n', b'\r', rest).unwrap_or(rest.len());
                    let value = rest.get(..end).unwrap_or_default();
                    if !value.is_empty() {
                        sink.data(value);
                    }
                    i += end;
                    if let Some(&c) = rest.get(end) {
                        i += 1;
                        self.end_line(Some(c));
                    }
                }
                State::EventStart => {
                    if b == b' ' {
                        i += 1;
                    }
                    self.event_len = 0;
                    self.state = State::Event;
                }
                State::Event => {
                    let rest = chunk.get(i..).unwrap_or_default();
                    let end = memchr2(b'\n', b'\r', rest).unwrap_or(rest.len());
                    self.push_event(rest.get(..end).unwrap_or_default());
                    i += end;
                    if let Some(&c) = rest.get(end) {
                        i += 1;
                        self.emit_event_type(sink);
                        self.end_line(Some(c));
                    }
                }
                State::Ignore => {
                    let rest = chunk.get(i..).unwrap_or_default();
                    match memchr2(b'\n', b'\r', rest) {
                        Some(p) => {
                            i += p + 1;
                            self.end_line(rest.get(p).copied());
                        }
                        None => i = chunk.len(),
                    }
                }
            }
        }
    }

    /// End of stream: an event still open (data seen but no blank line yet) is dispatched,
    /// because for metering a final usage event without the trailing blank line must not be
    /// lost. This deliberately deviates from the browser algorithm, which discards it. An
    /// unterminated last line counts as complete. The scanner is then ready for a new stream.
    pub fn finish<S: SseSink>(&mut self, sink: &mut S) {
        match self.state {
            State::Name => {
                let field = self.field();
                self.empty_field(field, sink);
            }
            State::DataStart => self.begin_data_line(sink),
            State::EventStart => sink.event_type(b""),
            State::Event => self.emit_event_type(sink),
            State::Bom(_) | State::LineStart | State::Data | State::Ignore => {}
        }
        if self.has_data {
            sink.dispatch(true);
        }
        *self = Self::new();
    }

    /// Fast path for the usual stream at the start of a line (no CR just before): complete
    /// `data:` and `event:` lines and blank lines in `chunk[i..]`, as many as follow each other,
    /// without the byte-level states (an `event` value goes to the sink straight from the chunk).
    /// Stops at anything else, or at a line that goes on past the chunk, and returns where, in
    /// `State::LineStart`; the states take it from there.
    #[inline]
    fn whole_lines<S: SseSink>(&mut self, chunk: &[u8], mut i: usize, sink: &mut S) -> usize {
        loop {
            match chunk.get(i) {
                Some(b'\n') => {
                    i += 1;
                    sink.dispatch(self.has_data);
                    self.has_data = false;
                }
                Some(b'd') if chunk.get(i..i + 5) == Some(b"data:") => {
                    let mut start = i + 5;
                    match chunk.get(start) {
                        Some(b' ') => start += 1,
                        Some(_) => {}
                        // The space to strip may come in the next chunk.
                        None => return i,
                    }
                    let rest = chunk.get(start..).unwrap_or_default();
                    // A line that goes on past the chunk is left to the states.
                    let Some(end) = memchr2(b'\n', b'\r', rest) else { return i };
                    self.begin_data_line(sink);
                    let value = rest.get(..end).unwrap_or_default();
                    if !value.is_empty() {
                        sink.data(value);
                    }
                    i = start + end + 1;
                    if rest.get(end) == Some(&b'\r') {
                        self.after_cr = true;
                        return i;
                    }
                }
                Some(b'e') if chunk.get(i..i + 6) == Some(b"event:") => {
                    let mut start = i + 6;
                    match chunk.get(start) {
                        Some(b' ') => start += 1,
                        Some(_) => {}
                        None => return i,
                    }
                    let rest = chunk.get(start..).unwrap_or_default();
                    let Some(end) = memchr2(b'\n', b'\r', rest) else { return i };
                    // Straight from the chunk: nothing to keep.
                    sink.event_type(rest.get(..end.min(MAX_EVENT)).unwrap_or_default());
                    i = start + end + 1;
                    if rest.get(end) == Some(&b'\r') {
                        self.after_cr = true;
                        return i;
                    }
                }
                _ => return i,
            }
        }
    }

    fn end_line(&mut self, end: Option<u8>) {
        self.after_cr = end == Some(b'\r');
        self.state = State::LineStart;
    }

    fn push_name(&mut self, bytes: &[u8]) {
        if self.name_long || bytes.is_empty() {
            return;
        }
        if self.name_len + bytes.len() > MAX_NAME {
            self.name_long = true;
            self.name_len = 0;
            return;
        }
        for (slot, &b) in self.name.iter_mut().skip(self.name_len).zip(bytes) {
            *slot = b;
        }
        self.name_len += bytes.len();
    }

    fn field(&self) -> Field {
        if self.name_long {
            return Field::Other;
        }
        match self.name.get(..self.name_len) {
            Some(b"data") => Field::Data,
            Some(b"event") => Field::Event,
            _ => Field::Other,
        }
    }

    fn empty_field<S: SseSink>(&mut self, field: Field, sink: &mut S) {
        match field {
            Field::Data => self.begin_data_line(sink),
            Field::Event => sink.event_type(b""),
            Field::Other => {}
        }
    }

    /// A data line starts: join it to the previous one.
    fn begin_data_line<S: SseSink>(&mut self, sink: &mut S) {
        if self.has_data {
            sink.data(b"\n");
        }
        self.has_data = true;
    }

    fn push_event(&mut self, bytes: &[u8]) {
        let room = MAX_EVENT.saturating_sub(self.event_len);
        let take = bytes.len().min(room);
        if let (Some(slots), Some(src)) = (self.event.get_mut(self.event_len..self.event_len + take), bytes.get(..take))
        {
            slots.copy_from_slice(src);
            self.event_len += take;
        }
    }

    fn emit_event_type<S: SseSink>(&mut self, sink: &mut S) {
        sink.event_type(self.event.get(..self.event_len).unwrap_or_default());
        self.event_len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::json_scan::{Found, JsonScanner};
    use crate::scan::test_rng::Rng;

    static PATHS: &[&[&str]] = &[&["usage"], &["message", "usage"]];

    /// One dispatched event as a sink saw it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Event {
        ty: Option<Vec<u8>>,
        data: Vec<u8>,
        has_data: bool,
        /// What a per-event JSON scanner found: `(path, raw)`; raw `None` for TooLarge.
        found: Vec<(usize, Option<Vec<u8>>)>,
        malformed: bool,
    }

    /// Records events and runs a JSON scanner over each event's data (reset on dispatch), as
    /// the filter does.
    struct Recorder {
        json: JsonScanner,
        current: Event,
        events: Vec<Event>,
        keep_data: bool,
    }

    impl Recorder {
        fn new() -> Self {
            let current = Event { ty: None, data: Vec::new(), has_data: false, found: Vec::new(), malformed: false };
            Self { json: JsonScanner::new(PATHS, 4096), current, events: Vec::new(), keep_data: true }
        }
    }

    impl SseSink for Recorder {
        fn event_type(&mut self, name: &[u8]) {
            self.current.ty = Some(name.to_vec());
        }

        fn data(&mut self, bytes: &[u8]) {
            assert!(!bytes.is_empty());
            if self.keep_data {
                self.current.data.extend_from_slice(bytes);
            } else {
                self.current.data.truncate(0);
            }
            let found = &mut self.current.found;
            self.json.feed(bytes, |f| match f {
                Found::Value { path, raw } => found.push((path, Some(raw.to_vec()))),
                Found::TooLarge { path } => found.push((path, None)),
            });
        }

        fn dispatch(&mut self, has_data: bool) {
            let mut event = std::mem::replace(&mut self.current, Recorder::new().current);
            event.has_data = has_data;
            event.malformed = self.json.is_malformed();
            self.events.push(event);
            self.json.reset();
        }
    }

    /// Feeds the chunks then finishes; asserts the carry stays tiny.
    fn run(chunks: &[&[u8]]) -> Vec<Event> {
        let mut sse = SseScanner::new();
        let mut rec = Recorder::new();
        for c in chunks {
            sse.feed(c, &mut rec);
            assert!(sse.carry_len() <= MAX_EVENT, "carry {}", sse.carry_len());
        }
        sse.finish(&mut rec);
        assert_eq!(sse.carry_len(), 0);
        rec.events
    }

    fn events(stream: &str) -> Vec<Event> {
        run(&[stream.as_bytes()])
    }

    fn data_of(events: &[Event]) -> Vec<&str> {
        events.iter().filter(|e| e.has_data).map(|e| std::str::from_utf8(&e.data).unwrap()).collect()
    }

    /// Asserts every split in two, byte by byte, and small chunks give the same events.
    fn assert_split_invariant(stream: &[u8]) -> Vec<Event> {
        let whole = run(&[stream]);
        for i in 0..=stream.len() {
            let (a, b) = stream.split_at(i);
            assert_eq!(run(&[a, b]), whole, "split at {i}");
        }
        for n in [1, 2, 5] {
            let chunks: Vec<&[u8]> = stream.chunks(n).collect();
            assert_eq!(run(&chunks), whole, "chunks of {n}");
        }
        whole
    }

    const OPENAI_STREAM: &str = concat!(
        "data: {\"id\":\"chatcmpl-AbC\",\"object\":\"chat.completion.chunk\",\"created\":1727000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-AbC\",\"object\":\"chat.completion.chunk\",\"created\":1727000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello \\\"usage\\\": {\\\"total_tokens\\\": 1}\\n\\n\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-AbC\",\"object\":\"chat.completion.chunk\",\"created\":1727000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-AbC\",\"object\":\"chat.completion.chunk\",\"created\":1727000000,\"model\":\"gpt-4o-mini-2024-07-18\",\"system_fingerprint\":\"fp_0ba0d124f1\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3,\"total_tokens\":12,\"prompt_tokens_details\":{\"cached_tokens\":0,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0}}}\n\n",
        "data: [DONE]\n\n",
    );

    const USAGE_RAW: &[u8] = b"{\"prompt_tokens\":9,\"completion_tokens\":3,\"total_tokens\":12,\"prompt_tokens_details\":{\"cached_tokens\":0,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0}}";

    const SHORT_STREAM: &str =
        "data: {\"usage\":null}\r\n\r\n: ping\r\nevent: x\r\ndata: {\"choices\":[],\r\ndata: \"usage\":{\"total_tokens\":2}}\r\n\r\ndata: [DONE]\r\n\r\n";

    const ANTHROPIC_STREAM: &str = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-20250514\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\n",
        "data: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi \\\"usage\\\":{\\\"output_tokens\\\":99}\"}}\n\n",
        "event: content_block_stop\n",
        "data: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );

    fn usages(events: &[Event]) -> Vec<(usize, Vec<u8>)> {
        events.iter().flat_map(|e| e.found.iter().map(|(p, raw)| (*p, raw.clone().unwrap()))).collect()
    }

    #[test]
    fn openai_stream_with_include_usage() {
        let events = events(OPENAI_STREAM);
        assert_eq!(events.len(), 5);
        assert!(events.iter().all(|e| e.has_data && e.ty.is_none()));
        let found = usages(&events);
        assert_eq!(
            found,
            vec![(0, b"null".to_vec()), (0, b"null".to_vec()), (0, b"null".to_vec()), (0, USAGE_RAW.to_vec())]
        );
        assert_eq!(events[4].data, b"[DONE]");
        assert!(events[4].malformed && events[4].found.is_empty());
        assert!(events[..4].iter().all(|e| !e.malformed));
    }

    #[test]
    fn openai_stream_every_split() {
        let whole = assert_split_invariant(OPENAI_STREAM.as_bytes());
        assert_eq!(usages(&whole).last(), Some(&(0, USAGE_RAW.to_vec())));
    }

    #[test]
    fn short_stream_every_three_way_split() {
        let stream = SHORT_STREAM.as_bytes();
        let whole = run(&[stream]);
        assert_eq!(
            data_of(&whole),
            ["{\"usage\":null}", "{\"choices\":[],\n\"usage\":{\"total_tokens\":2}}", "[DONE]"]
        );
        assert_eq!(usages(&whole), vec![(0, b"null".to_vec()), (0, b"{\"total_tokens\":2}".to_vec())]);
        assert_eq!(whole[1].ty.as_deref(), Some(&b"x"[..]));
        for i in 0..=stream.len() {
            for j in i..=stream.len() {
                let (ab, c) = stream.split_at(j);
                let (a, b) = ab.split_at(i);
                assert_eq!(run(&[a, b, c]), whole, "split at {i}, {j}");
            }
        }
    }

    #[test]
    fn anthropic_stream_with_event_types() {
        let events = assert_split_invariant(ANTHROPIC_STREAM.as_bytes());
        let types: Vec<&[u8]> = events.iter().map(|e| e.ty.as_deref().unwrap()).collect();
        assert_eq!(
            types,
            [
                &b"message_start"[..],
                b"content_block_start",
                b"ping",
                b"content_block_delta",
                b"content_block_stop",
                b"message_delta",
                b"message_stop"
            ]
        );
        assert_eq!(
            usages(&events),
            vec![
                (1, b"{\"input_tokens\":25,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":1}".to_vec()),
                (0, b"{\"output_tokens\":15}".to_vec())
            ]
        );
    }

    #[test]
    fn line_endings_lf_crlf_cr() {
        let lf = ANTHROPIC_STREAM.to_string();
        let want = events(&lf);
        for ending in ["\r\n", "\r"] {
            let stream = lf.replace('\n', ending);
            assert_eq!(assert_split_invariant(stream.as_bytes()), want, "{ending:?}");
        }
        // Mixed endings; a CR at the end of one chunk and an LF at the start of the next are one.
        assert_eq!(data_of(&events("data: a\r\ndata: b\rdata: c\n\r\n")), ["a\nb\nc"]);
        assert_eq!(data_of(&run(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"])), ["a\nb"]);
        // CR CR is a line end then a blank line; LF CR too.
        assert_eq!(data_of(&events("data: a\r\rdata: b\n\rdata: c\n\n")), ["a", "b", "c"]);
        // Each blank line dispatches, with or without data.
        let e = events("\n\r\n\rdata: x\n\n");
        assert_eq!(e.iter().map(|e| e.has_data).collect::<Vec<_>>(), [false, false, false, true]);
    }

    #[test]
    fn comments_and_ignored_fields() {
        let stream = ": keep-alive\n\n:\ndata: a\n: comment: with colon\nid: 7\nretry: 1000\nfoo: bar\ndataa: no\n data: no\ndata : no\nDATA: no\nverylongfieldnamethatisnotdata: no\ndata: b\n\n";
        let e = events(stream);
        assert_eq!(e.len(), 2);
        assert!(!e[0].has_data && e[0].data.is_empty());
        assert_eq!(data_of(&e), ["a\nb"]);
        assert_split_invariant(stream.as_bytes());
    }

    #[test]
    fn multi_line_data_is_joined_with_lf() {
        assert_eq!(data_of(&events("data: a\ndata: b\ndata: c\n\n")), ["a\nb\nc"]);
        assert_eq!(data_of(&events("data: a\ndata:\ndata: c\n\n")), ["a\n\nc"]);
        assert_eq!(data_of(&events("data:\n\n")), [""]);
        assert_eq!(data_of(&events("data: \n\n")), [""]);
        assert_eq!(data_of(&events("data:\ndata:\n\n")), ["\n"]);
        // JSON split across data lines still parses (the LF is whitespace).
        let e = events("data: {\"usage\":\ndata: {\"total_tokens\":5}}\n\n");
        assert_eq!(usages(&e), vec![(0, b"{\"total_tokens\":5}".to_vec())]);
    }

    #[test]
    fn colon_and_space_rules() {
        assert_eq!(data_of(&events("data:x\n\n")), ["x"]);
        assert_eq!(data_of(&events("data:  x\n\n")), [" x"]);
        assert_eq!(data_of(&events("data: x: y \n\n")), ["x: y "]);
        assert_eq!(data_of(&events("data:\tx\n\n")), ["\tx"]);
        // A field without a colon has an empty value.
        assert_eq!(data_of(&events("data\n\n")), [""]);
        assert_eq!(data_of(&events("data\ndata\n\n")), ["\n"]);
        let e = events("event\ndata: x\n\n");
        assert_eq!(e[0].ty.as_deref(), Some(&b""[..]));
        let e = events("event:message_start\nevent:  two\ndata\n\n");
        assert_eq!(e[0].ty.as_deref(), Some(&b" two"[..]));
        // The space to strip may arrive in the next chunk.
        assert_eq!(data_of(&run(&[b"data:", b" x", b"\n\n"])), ["x"]);
        assert_eq!(data_of(&run(&[b"data:", b" ", b" x\n\n"])), [" x"]);
        let e = run(&[b"event:", b" t", b"\ndata: 1\n\n"]);
        assert_eq!(e[0].ty.as_deref(), Some(&b"t"[..]));
    }

    #[test]
    fn event_type_is_truncated() {
        let long = "e".repeat(1000);
        let e = events(&format!("event: {long}\ndata: x\n\n"));
        assert_eq!(e[0].ty.as_deref(), Some(&long.as_bytes()[..MAX_EVENT]));
    }

    #[test]
    fn finish_dispatches_an_open_event() {
        let e = events("data: {\"usage\":{\"total_tokens\":3}}");
        assert_eq!(e.len(), 1);
        assert!(e[0].has_data);
        assert_eq!(usages(&e), vec![(0, b"{\"total_tokens\":3}".to_vec())]);
        assert_eq!(data_of(&events("data: a\ndata: b\n")), ["a\nb"]);
        assert_eq!(data_of(&events("data: a\r")), ["a"]);
        assert_eq!(data_of(&events("data:")), [""]);
        assert_eq!(data_of(&events("data")), [""]);
        assert_eq!(data_of(&events("data: a\ndata")), ["a\n"]);
        // Nothing open: nothing dispatched.
        assert!(events("").is_empty());
        assert!(events("data: a\n\n").len() == 1);
        assert!(events("event: x").is_empty());
        assert!(events(": comment").is_empty());
        assert!(events("id: 1\n").is_empty());
        // The scanner is ready for a new stream after finish.
        let mut sse = SseScanner::new();
        let mut rec = Recorder::new();
        sse.feed(b"data: a", &mut rec);
        sse.finish(&mut rec);
        sse.feed(b"\xEF\xBB\xBFdata: b\n\n", &mut rec);
        sse.finish(&mut rec);
        assert_eq!(data_of(&rec.events), ["a", "b"]);
    }

    #[test]
    fn byte_order_mark() {
        let e = assert_split_invariant(b"\xEF\xBB\xBFdata: x\n\n");
        assert_eq!(data_of(&e), ["x"]);
        // An incomplete BOM is part of the first field name, so that line is an unknown field.
        assert_eq!(data_of(&events("\u{FEFF}\u{FEFF}data: x\n\ndata: y\n\n")), ["y"]);
        assert_eq!(data_of(&assert_split_invariant(b"\xEF\xBBdata: x\n\ndata: y\n\n")), ["y"]);
        assert_eq!(data_of(&assert_split_invariant(b"\xEFdata: x\n\ndata: y\n\n")), ["y"]);
        assert_eq!(data_of(&assert_split_invariant(b"\xEF\n:\xEF\xBB\xBF\ndata: y\n\n")), ["y"]);
        // Only at the start.
        assert_eq!(data_of(&events("data: x\n\n\u{FEFF}data: y\n\n")), ["x"]);
    }

    #[test]
    fn huge_lines_are_streamed_not_buffered() {
        let mb = 1 << 20;
        let mut sse = SseScanner::new();
        let mut rec = Recorder::new();
        rec.json = JsonScanner::new(PATHS, 1024);
        let mut max_carry = 0;
        let mut feed = |bytes: &[u8], sse: &mut SseScanner, rec: &mut Recorder| {
            for c in bytes.chunks(4093) {
                sse.feed(c, rec);
                max_carry = max_carry.max(sse.carry_len()).max(rec.json.carry_len());
            }
        };
        let body = format!("data: {{\"content\":\"{}\",\"usage\":{{\"total_tokens\":1}}}}\n\n", "a".repeat(mb));
        feed(body.as_bytes(), &mut sse, &mut rec);
        let long_fields = format!(
            ": {}\n{}: x\nevent: {}\nid: {}\n\n",
            "c".repeat(mb),
            "n".repeat(mb),
            "e".repeat(mb),
            "i".repeat(mb)
        );
        feed(long_fields.as_bytes(), &mut sse, &mut rec);
        sse.finish(&mut rec);
        assert!(max_carry <= MAX_EVENT, "carry {max_carry}");
        assert_eq!(rec.events.len(), 2);
        assert_eq!(rec.events[0].data.len(), body.len() - "data: \n\n".len());
        assert_eq!(usages(&rec.events), vec![(0, b"{\"total_tokens\":1}".to_vec())]);
        assert!(!rec.events[1].has_data);
        assert_eq!(rec.events[1].ty.as_ref().map(Vec::len), Some(MAX_EVENT));
    }

    #[test]
    fn random_garbage_never_panics_and_ignores_chunking() {
        const TOKENS: &[&[u8]] = &[
            b"data",
            b"event",
            b"id",
            b":",
            b" ",
            b"\r",
            b"\n",
            b"\r\n",
            b"x",
            b"{",
            b"\"usage\"",
            b"1}",
            b"\xEF\xBB\xBF",
            b"\xff",
            b"data: ",
            b"\n\n",
        ];
        let mut rng = Rng(0x1234_5678_9ABC_DEF1);
        for _ in 0..4000 {
            let mut stream = Vec::new();
            for _ in 0..rng.below(40) {
                if rng.below(8) == 0 {
                    stream.push(rng.next() as u8);
                } else {
                    stream.extend_from_slice(TOKENS[rng.below(TOKENS.len())]);
                }
            }
            let whole = run(&[&stream]);
            let cut = rng.below(stream.len() + 1);
            let (a, b) = stream.split_at(cut);
            assert_eq!(run(&[a, b]), whole, "{stream:?} at {cut}");
            let bytes: Vec<&[u8]> = stream.chunks(1).collect();
            assert_eq!(run(&bytes), whole, "{stream:?}");
            for e in &whole {
                assert!(e.has_data || e.data.is_empty());
                assert!(e.ty.as_ref().is_none_or(|t| t.len() <= MAX_EVENT));
            }
        }
    }
}
