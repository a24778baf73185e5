//! `stream_options.include_usage` injection.
//!
//! An OpenAI-style streaming chat/completions response carries usage only when the request asked
//! for it (`"stream_options": {"include_usage": true}`); many clients do not, which would make
//! every such stream a metering blind spot. So the filter adds the option to streaming requests
//! that lack it ([`rewrite_request`]), and removes the extra usage-only chunk (`"choices": []`
//! with a `usage` object) from the stream the client receives ([`UsageChunkStripper`]), so the
//! client gets exactly the stream it asked for while the meter reads the usage.

use serde_json::Value;

/// Longest event the stripper waits to see whole; a longer one is passed on as it comes (a usage
/// chunk is a few hundred bytes).
pub const MAX_PENDING_EVENT: usize = 64 * 1024;

/// Why a request was left as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unchanged {
    /// Not a streaming request, or it asks for usage already.
    NotNeeded,
    /// Not a JSON object (the upstream will reject it; nothing to add).
    NotJson,
}

/// The request body with `stream_options.include_usage: true` added, when it is a streaming
/// request (`"stream": true`) that does not ask for usage.
///
/// Without `stream_options` the option is spliced in after the opening brace, so every other byte
/// is kept; an existing `stream_options` object is rewritten through a JSON round trip.
pub fn rewrite_request(body: &[u8]) -> Result<Vec<u8>, Unchanged> {
    let value: Value = serde_json::from_slice(body).map_err(|_| Unchanged::NotJson)?;
    let Value::Object(mut obj) = value else { return Err(Unchanged::NotJson) };
    if obj.get("stream") != Some(&Value::Bool(true)) {
        return Err(Unchanged::NotNeeded);
    }
    if !obj.contains_key("stream_options") {
        let brace = body.iter().position(|&b| b == b'{').ok_or(Unchanged::NotJson)?;
        let (head, tail) = body.split_at(brace + 1);
        let mut out = Vec::with_capacity(body.len() + 40);
        out.extend_from_slice(head);
        out.extend_from_slice(br#""stream_options":{"include_usage":true},"#);
        out.extend_from_slice(tail);
        return Ok(out);
    }
    match obj.get_mut("stream_options") {
        None => Err(Unchanged::NotJson),
        Some(Value::Object(options)) => {
            if options.get("include_usage") == Some(&Value::Bool(true)) {
                return Err(Unchanged::NotNeeded);
            }
            options.insert("include_usage".into(), Value::Bool(true));
            serde_json::to_vec(&obj).map_err(|_| Unchanged::NotJson)
        }
        Some(other) => {
            // `null` or a non-object: replace it.
            *other = serde_json::json!({"include_usage": true});
            serde_json::to_vec(&obj).map_err(|_| Unchanged::NotJson)
        }
    }
}

/// Removes usage-only chunks from an SSE stream, chunk by chunk. Complete events pass at once;
/// only an incomplete trailing event waits for its end (a client cannot act on half an event
/// anyway), bounded by [`MAX_PENDING_EVENT`].
#[derive(Debug, Default)]
pub struct UsageChunkStripper {
    pending: Vec<u8>,
    /// The pending event outgrew the bound: pass it through until it ends.
    passing: bool,
    removed: u32,
}

impl UsageChunkStripper {
    /// The bytes to forward for `chunk` (`end`: the last chunk of the body).
    pub fn process(&mut self, chunk: &[u8], end: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(chunk.len());
        let mut rest = chunk;
        if self.passing {
            match event_end(rest) {
                Some(n) => {
                    let (done, tail) = rest.split_at(n);
                    out.extend_from_slice(done);
                    rest = tail;
                    self.passing = false;
                }
                None => {
                    out.extend_from_slice(rest);
                    return out;
                }
            }
        }
        self.pending.extend_from_slice(rest);
        let mut start = 0;
        while let Some(n) = event_end(self.pending.get(start..).unwrap_or_default()) {
            let event = self.pending.get(start..start + n).unwrap_or_default();
            if is_usage_only(event) {
                self.removed += 1;
            } else {
                out.extend_from_slice(event);
            }
            start += n;
        }
        self.pending.drain(..start);
        if end || self.pending.len() > MAX_PENDING_EVENT {
            self.passing = !end;
            out.append(&mut self.pending);
        }
        out
    }

    /// Usage-only chunks removed so far.
    pub fn removed(&self) -> u32 {
        self.removed
    }
}

/// Length up to and including the blank line ending the first event in `bytes`
/// (`\n\n`, `\r\n\r\n`, `\r\r` or mixed), if complete.
fn event_end(bytes: &[u8]) -> Option<usize> {
    let mut i = 0;
    let mut line_empty = true;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'\r' | b'\n' => {
                let len = if b == b'\r' && bytes.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                if b == b'\r' && bytes.get(i + 1).is_none() {
                    // A lone CR at the end might be the start of CRLF: wait for more.
                    return None;
                }
                if line_empty && i > 0 {
                    return Some(i + len);
                }
                line_empty = true;
                i += len;
            }
            _ => {
                line_empty = false;
                i += 1;
            }
        }
    }
    None
}

/// True for an event whose data is a chunk with no choices and a usage object.
fn is_usage_only(event: &[u8]) -> bool {
    if memchr::memmem::find(event, b"usage").is_none() {
        return false;
    }
    let mut data = Vec::new();
    for line in event.split(|&b| b == b'\n' || b == b'\r') {
        if let Some(d) = line.strip_prefix(b"data:") {
            if !data.is_empty() {
                data.push(b'\n');
            }
            data.extend_from_slice(d.strip_prefix(b" ").unwrap_or(d));
        }
    }
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(&data) else { return false };
    let no_choices = matches!(obj.get("choices"), Some(Value::Array(a)) if a.is_empty());
    no_choices && matches!(obj.get("usage"), Some(Value::Object(_)))
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    #[test]
    fn streaming_requests_get_include_usage() {
        let body =
            br#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"{\"stream_options\":1}"}]}"#;
        let out = rewrite_request(body).unwrap();
        assert_eq!(
            out,
            br#"{"stream_options":{"include_usage":true},"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"{\"stream_options\":1}"}]}"#
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        // Leading whitespace is kept.
        let out = rewrite_request(b" \n{\"stream\":true}").unwrap();
        assert_eq!(out, b" \n{\"stream_options\":{\"include_usage\":true},\"stream\":true}");
        // An existing options object is completed; an explicit false is overridden.
        for body in [
            &br#"{"stream":true,"stream_options":{"include_obfuscation":false}}"#[..],
            br#"{"stream":true,"stream_options":{"include_usage":false}}"#,
            br#"{"stream":true,"stream_options":null}"#,
        ] {
            let v: Value = serde_json::from_slice(&rewrite_request(body).unwrap()).unwrap();
            assert_eq!(v["stream_options"]["include_usage"], true, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn other_requests_are_left_alone() {
        assert_eq!(rewrite_request(br#"{"stream":false}"#), Err(Unchanged::NotNeeded));
        assert_eq!(rewrite_request(br#"{"model":"m"}"#), Err(Unchanged::NotNeeded));
        assert_eq!(rewrite_request(br#"{"stream":"true"}"#), Err(Unchanged::NotNeeded));
        assert_eq!(
            rewrite_request(br#"{"stream":true,"stream_options":{"include_usage":true}}"#),
            Err(Unchanged::NotNeeded)
        );
        assert_eq!(rewrite_request(b"[1]"), Err(Unchanged::NotJson));
        assert_eq!(rewrite_request(b"{\"stream\":true"), Err(Unchanged::NotJson));
    }

    const STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"usage\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n",
        "data: [DONE]\n\n",
    );

    fn expected() -> String {
        STREAM.replace(
            "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n",
            "",
        )
    }

    #[test]
    fn the_usage_chunk_is_removed_at_every_split() {
        let body = STREAM.as_bytes();
        for i in 0..=body.len() {
            let mut s = UsageChunkStripper::default();
            let (a, b) = body.split_at(i);
            let mut out = s.process(a, false);
            out.extend(s.process(b, true));
            assert_eq!(String::from_utf8(out).unwrap(), expected(), "split at {i}");
            assert_eq!(s.removed(), 1);
        }
        // Byte by byte, with CRLF line ends.
        let crlf = STREAM.replace('\n', "\r\n");
        let mut s = UsageChunkStripper::default();
        let mut out = Vec::new();
        for b in crlf.as_bytes() {
            out.extend(s.process(std::slice::from_ref(b), false));
        }
        out.extend(s.process(b"", true));
        assert_eq!(String::from_utf8(out).unwrap(), expected().replace('\n', "\r\n"));
    }

    #[test]
    fn complete_events_pass_at_once_and_huge_ones_are_not_held() {
        let mut s = UsageChunkStripper::default();
        let first = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
        assert_eq!(s.process(format!("{first}data: {{\"cho").as_bytes(), false), first.as_bytes());
        let huge = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "x".repeat(MAX_PENDING_EVENT * 2)
        );
        let mut s = UsageChunkStripper::default();
        let mut out = Vec::new();
        for piece in huge.as_bytes().chunks(1000) {
            let o = s.process(piece, false);
            out.extend(o);
        }
        out.extend(s.process(b"", true));
        assert_eq!(out, huge.as_bytes());
        assert!(s.pending.capacity() <= 4 * MAX_PENDING_EVENT);
    }
}
