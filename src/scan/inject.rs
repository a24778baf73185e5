//! `stream_options.include_usage` injection.
//!
//! An OpenAI-style streaming chat/completions response carries usage only when the request asked
//! for it (`"stream_options": {"include_usage": true}`); many clients do not, which would make
//! every such stream a metering blind spot. So the filter adds the option to streaming requests
//! that lack it ([`rewrite_request`]), and removes from the stream the client receives the usage
//! it did not ask for ([`UsageChunkStripper`]), so the client gets the stream it asked for while
//! the meter reads the usage:
//!
//! - The usage-only chunk is cut: an event whose data is a chunk with a `usage` object and a
//!   `choices` array in which no choice carries anything. OpenAI sends `"choices": []`; LiteLLM's
//!   proxy sends `"choices": [{"index": 0, "delta": {}}]`. A choice carries nothing when every
//!   member but `index` is blank: `null`, `""`, `[]`, or an object of blank members (so no
//!   content, role, tool call, function call, refusal, logprobs or finish reason).
//! - A chunk that carries something and also a `usage` object (a gateway that puts the usage on
//!   the final `finish_reason` chunk) is kept, minus its `usage` member: the client did not ask
//!   for usage, and that member is the only change to the bytes of the event.
//!
//! `"usage": null` members (OpenAI adds one to every chunk of a stream with `include_usage`) are
//! left alone: to an OpenAI client they mean what an absent member means.

use crate::memory::Lease;
use serde_json::Value;
use std::rc::Rc;

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
///
/// The bytes it holds between chunks (the pending event, as allocated) are charged to the
/// stream's memory lease ([`crate::memory`]) and allocated fallibly. When the budget refuses
/// (or the heap has no room), the stripper gives up: what it held is forwarded with the chunk
/// and every later byte passes as it comes, so the client may then see the usage chunk, but
/// never loses a byte.
#[derive(Debug, Default)]
pub struct UsageChunkStripper {
    pending: Vec<u8>,
    /// The pending event outgrew the bound: pass it through until it ends.
    passing: bool,
    removed: u32,
    cleared: u32,
    /// The stream's share of the memory budget (`None`: only the heap limits it).
    lease: Option<Rc<Lease>>,
    /// Bytes of `pending`'s allocation charged to the lease.
    charged: usize,
    /// Memory was refused: everything passes from now on.
    gave_up: bool,
}

/// What to forward for a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// The chunk as it came.
    Unchanged,
    /// These bytes instead.
    Bytes(Vec<u8>),
}

/// Pending allocations above this are shrunk back after each chunk, so one large chunk does
/// not leave a large allocation behind for the rest of the stream.
const PENDING_KEEP: usize = 4 * 1024;

impl UsageChunkStripper {
    /// A stripper whose held bytes are charged to `lease`.
    pub fn with_lease(lease: Rc<Lease>) -> Self {
        Self { lease: Some(lease), ..Self::default() }
    }

    /// True once memory was refused and the stripper passes everything through.
    pub fn gave_up(&self) -> bool {
        self.gave_up
    }

    /// Stops stripping (the stream's memory was refused elsewhere): what is held goes out with
    /// the next chunk, and every byte after it as it comes.
    pub fn abandon(&mut self) {
        self.gave_up = true;
    }

    /// The bytes to forward for `chunk` (`end`: the last chunk of the body).
    pub fn process(&mut self, chunk: &[u8], end: bool) -> Vec<u8> {
        match self.forward(chunk, end) {
            Forward::Unchanged => chunk.to_vec(),
            Forward::Bytes(bytes) => bytes,
        }
    }

    /// What to forward for `chunk` (`end`: the last chunk of the body), without copying a
    /// chunk that passes unchanged.
    pub fn forward(&mut self, chunk: &[u8], end: bool) -> Forward {
        if self.gave_up {
            // Bytes still held (the stream was abandoned between chunks) go out first.
            return if self.pending.is_empty() { Forward::Unchanged } else { self.give_up(chunk) };
        }
        if !self.fit(self.pending.len().saturating_add(chunk.len())) {
            return self.give_up(chunk);
        }
        let mut out = Vec::new();
        if out.try_reserve(chunk.len().saturating_add(self.pending.len())).is_err() {
            return self.give_up(chunk);
        }
        let out = self.strip(chunk, end, out);
        self.shrink();
        if out == chunk {
            Forward::Unchanged
        } else {
            Forward::Bytes(out)
        }
    }

    /// Makes room for `need` pending bytes: charged to the lease, then reserved fallibly.
    fn fit(&mut self, need: usize) -> bool {
        let extra = need.saturating_sub(self.pending.capacity());
        if extra == 0 {
            return true;
        }
        if let Some(lease) = &self.lease {
            let charge = need.saturating_sub(self.charged);
            if !lease.try_take(charge) {
                return false;
            }
            self.charged = self.charged.saturating_add(charge);
        }
        if self.pending.try_reserve_exact(need.saturating_sub(self.pending.len())).is_err() {
            if let Some(lease) = &self.lease {
                lease.refuse();
            }
            return false;
        }
        true
    }

    /// Gives the pending allocation back when it is large and mostly empty.
    fn shrink(&mut self) {
        if self.pending.capacity() > PENDING_KEEP && self.pending.len() <= self.pending.capacity() / 2 {
            self.pending.shrink_to(self.pending.len().max(PENDING_KEEP));
        }
        self.settle_charge();
    }

    /// Charges the lease for exactly what `pending` holds allocated.
    fn settle_charge(&mut self) {
        let Some(lease) = &self.lease else { return };
        let cap = self.pending.capacity();
        if cap < self.charged {
            lease.give(self.charged - cap);
            self.charged = cap;
        }
    }

    /// Memory was refused: forwards what was held with `chunk`, and everything as it comes
    /// from now on.
    fn give_up(&mut self, chunk: &[u8]) -> Forward {
        self.gave_up = true;
        let mut out = std::mem::take(&mut self.pending);
        if let Some(lease) = &self.lease {
            lease.refuse();
        }
        if out.is_empty() {
            self.settle_charge();
            return Forward::Unchanged;
        }
        // Held bytes must reach the client: this one allocation is made even if the heap is
        // short (the budget keeps that from happening in practice).
        out.extend_from_slice(chunk);
        self.settle_charge();
        Forward::Bytes(out)
    }

    fn strip(&mut self, chunk: &[u8], end: bool, mut out: Vec<u8>) -> Vec<u8> {
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
            match judge(event) {
                Verdict::Keep => out.extend_from_slice(event),
                Verdict::Drop => self.removed += 1,
                Verdict::Rewrite(event) => {
                    self.cleared += 1;
                    out.extend_from_slice(&event);
                }
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

    /// Bytes held between chunks (the pending event's allocation).
    pub fn held(&self) -> usize {
        self.pending.capacity()
    }

    /// Usage-only chunks removed so far.
    pub fn removed(&self) -> u32 {
        self.removed
    }

    /// Chunks kept without their `usage` member so far.
    pub fn cleared(&self) -> u32 {
        self.cleared
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

/// What becomes of one complete event.
#[derive(Debug, PartialEq)]
enum Verdict {
    Keep,
    /// The usage-only chunk.
    Drop,
    /// A chunk with content and usage: the event without its `usage` member.
    Rewrite(Vec<u8>),
}

/// Sorts an event (see the module documentation for the rule).
fn judge(event: &[u8]) -> Verdict {
    if memchr::memmem::find(event, b"usage").is_none() {
        return Verdict::Keep;
    }
    let mut data = Vec::new();
    // The span of the payload of the only `data:` line, when there is one.
    let mut payload = None;
    let mut data_lines = 0;
    let mut start = 0;
    while start < event.len() {
        let end =
            memchr::memchr2(b'\n', b'\r', event.get(start..).unwrap_or_default()).map_or(event.len(), |i| start + i);
        let line = event.get(start..end).unwrap_or_default();
        if let Some(d) = line.strip_prefix(b"data:") {
            let d = d.strip_prefix(b" ").unwrap_or(d);
            if data_lines > 0 {
                data.push(b'\n');
            }
            data.extend_from_slice(d);
            data_lines += 1;
            payload = Some((end - d.len(), end));
        }
        start = end + 1;
    }
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(&data) else { return Verdict::Keep };
    let (Some(Value::Object(_)), Some(Value::Array(choices))) = (obj.get("usage"), obj.get("choices")) else {
        return Verdict::Keep;
    };
    if choices.iter().all(choice_is_blank) {
        return Verdict::Drop;
    }
    // A chunk with content: only its `usage` member goes, when the JSON is on one line (an event
    // with the JSON split over several `data:` lines is kept as it is).
    let Some((from, to)) = payload.filter(|_| data_lines == 1) else { return Verdict::Keep };
    let Some(json) = event.get(from..to).and_then(without_usage) else { return Verdict::Keep };
    let mut out = Vec::with_capacity(event.len());
    out.extend_from_slice(event.get(..from).unwrap_or_default());
    out.extend_from_slice(&json);
    out.extend_from_slice(event.get(to..).unwrap_or_default());
    Verdict::Rewrite(out)
}

/// True for a choice that carries nothing: every member but `index` is blank.
fn choice_is_blank(choice: &Value) -> bool {
    match choice {
        Value::Object(members) => members.iter().all(|(k, v)| k == "index" || is_blank(v)),
        _ => false,
    }
}

/// `null`, `""`, `[]`, or an object whose members are all blank (serde_json's parser bounds the
/// nesting, so the recursion is bounded too).
fn is_blank(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_blank),
        Value::Bool(_) | Value::Number(_) => false,
    }
}

/// `json` (a valid JSON object) without its top-level `usage` member, every other byte kept;
/// `None` when the member is not found spelt plainly, or appears twice.
fn without_usage(json: &[u8]) -> Option<Vec<u8>> {
    let open = json.iter().position(|b| !b.is_ascii_whitespace())?;
    if json.get(open) != Some(&b'{') {
        return None;
    }
    // The object's `{`, its top-level commas and its `}`: members lie between neighbours.
    let mut seps = vec![open];
    let (mut depth, mut in_string, mut escaped, mut closed) = (0usize, false, false, false);
    for (i, &b) in json.iter().enumerate().skip(open) {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    seps.push(i);
                    closed = true;
                    break;
                }
            }
            b',' if depth == 1 => seps.push(i),
            _ => {}
        }
    }
    if !closed {
        return None;
    }
    let mut found = None;
    for (n, pair) in seps.windows(2).enumerate() {
        let &[a, b] = pair else { return None };
        let member = json.get(a + 1..b)?.trim_ascii_start();
        if member.strip_prefix(b"\"usage\"").is_some_and(|rest| rest.trim_ascii_start().starts_with(b":")) {
            if found.is_some() {
                return None;
            }
            found = Some(n);
        }
    }
    let n = found?;
    let before = *seps.get(n)?;
    let after = *seps.get(n + 1)?;
    let (cut_from, cut_to) = if n > 0 {
        // `,"usage":{…}`: from the comma before it.
        (before, after)
    } else if seps.len() > 2 {
        // The first member: through the comma after it.
        (before + 1, after + 1)
    } else {
        // The only member.
        (before + 1, after)
    };
    let mut out = Vec::with_capacity(json.len());
    out.extend_from_slice(json.get(..cut_from)?);
    out.extend_from_slice(json.get(cut_to..)?);
    Some(out)
}

#[cfg(test)]
mod tests {
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

    /// Byte for byte what LiteLLM's proxy (litellm 1.106.2, an `openai/` model in front of the
    /// mock gateway) streams for a chat request with `include_usage`: its usage chunk keeps one
    /// empty choice and adds `cost` to the usage.
    const LITELLM_STREAM: &str = concat!(
        "data: {\"id\":\"chatcmpl-mock00000003\",\"created\":1796051661,\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_mock\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\",\"role\":\"assistant\"}}]}\n\n",
        "data: {\"id\":\"chatcmpl-mock00000003\",\"created\":1796051661,\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_mock\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}]}\n\n",
        "data: {\"id\":\"chatcmpl-mock00000003\",\"created\":1796051661,\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_mock\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there\"}}]}\n\n",
        "data: {\"id\":\"chatcmpl-mock00000003\",\"created\":1796051661,\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_mock\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" this\"}}]}\n\n",
        "data: {\"id\":\"chatcmpl-mock00000003\",\"created\":1796051661,\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_mock\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" is\"}}]}\n\n",
        "data: {\"id\":\"chatcmpl-mock00000003\",\"created\":1796051661,\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_mock\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" a\"}}]}\n\n",
        "data: {\"id\":\"chatcmpl-mock00000003\",\"created\":1796051661,\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_mock\",\"choices\":[{\"finish_reason\":\"stop\",\"index\":0,\"delta\":{}}]}\n\n",
        "data: {\"id\":\"chatcmpl-mock00000003\",\"created\":1796051661,\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_mock\",\"choices\":[{\"index\":0,\"delta\":{}}],\"usage\":{\"completion_tokens\":5,\"prompt_tokens\":42,\"total_tokens\":47,\"completion_tokens_details\":{\"accepted_prediction_tokens\":0,\"audio_tokens\":0,\"reasoning_tokens\":0,\"rejected_prediction_tokens\":0},\"prompt_tokens_details\":{\"audio_tokens\":0,\"cached_tokens\":0},\"cost\":0.000155}}\n\n",
        "data: [DONE]\n\n",
    );

    /// The same request without `include_usage`, as LiteLLM streams it (captured the same way;
    /// only its `id`, chatcmpl-mock00000004, is set to the first one's).
    const LITELLM_PLAIN: &str = concat!(
        "data: {\"id\":\"chatcmpl-mock00000003\",\"created\":1796051661,\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_mock\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\",\"role\":\"assistant\"}}]}\n\n",
        "data: {\"id\":\"chatcmpl-mock00000003\",\"created\":1796051661,\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_mock\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}]}\n\n",
        "data: {\"id\":\"chatcmpl-mock00000003\",\"created\":1796051661,\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_mock\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there\"}}]}\n\n",
        "data: {\"id\":\"chatcmpl-mock00000003\",\"created\":1796051661,\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_mock\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" this\"}}]}\n\n",
        "data: {\"id\":\"chatcmpl-mock00000003\",\"created\":1796051661,\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_mock\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" is\"}}]}\n\n",
        "data: {\"id\":\"chatcmpl-mock00000003\",\"created\":1796051661,\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_mock\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" a\"}}]}\n\n",
        "data: {\"id\":\"chatcmpl-mock00000003\",\"created\":1796051661,\"model\":\"gpt-4o\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_mock\",\"choices\":[{\"finish_reason\":\"stop\",\"index\":0,\"delta\":{}}]}\n\n",
        "data: [DONE]\n\n",
    );

    /// Runs `body` through a stripper split at `at` (or byte by byte for `None`); the output and
    /// the stripper's counts.
    fn strip(body: &[u8], at: Option<usize>) -> (String, u32, u32) {
        let mut s = UsageChunkStripper::default();
        let mut out = Vec::new();
        match at {
            Some(i) => {
                let (a, b) = body.split_at(i);
                out.extend(s.process(a, false));
                out.extend(s.process(b, true));
            }
            None => {
                for b in body {
                    out.extend(s.process(std::slice::from_ref(b), false));
                }
                out.extend(s.process(b"", true));
            }
        }
        (String::from_utf8(out).unwrap(), s.removed(), s.cleared())
    }

    #[test]
    fn litellms_usage_chunk_is_removed_at_every_split() {
        for (stream, plain) in [
            (LITELLM_STREAM.to_string(), LITELLM_PLAIN.to_string()),
            (LITELLM_STREAM.replace('\n', "\r\n"), LITELLM_PLAIN.replace('\n', "\r\n")),
        ] {
            assert_eq!(strip(stream.as_bytes(), None), (plain.clone(), 1, 0), "byte by byte");
            for i in 0..=stream.len() {
                assert_eq!(strip(stream.as_bytes(), Some(i)), (plain.clone(), 1, 0), "split at {i}");
            }
        }
    }

    /// A final chunk with `finish_reason` and the usage (as gateways that merge them send it).
    const MERGED: &str = concat!(
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn a_final_chunk_with_usage_is_kept_without_its_usage_at_every_split() {
        let want = MERGED.replace(",\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}", "");
        for (stream, want) in
            [(MERGED.to_string(), want.clone()), (MERGED.replace('\n', "\r\n"), want.replace('\n', "\r\n"))]
        {
            assert_eq!(strip(stream.as_bytes(), None), (want.clone(), 0, 1), "byte by byte");
            for i in 0..=stream.len() {
                assert_eq!(strip(stream.as_bytes(), Some(i)), (want.clone(), 0, 1), "split at {i}");
            }
        }
    }

    fn event(json: &str) -> String {
        format!("data: {json}\n\n")
    }

    #[test]
    fn only_chunks_whose_choices_carry_nothing_are_usage_only() {
        let usage = r#""usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}"#;
        // Dropped: no choice carries anything.
        for choices in [
            "[]",
            r#"[{"index":0,"delta":{}}]"#,
            r#"[{"index":0,"delta":{"content":"","role":null,"tool_calls":[],"refusal":null},"logprobs":null,"finish_reason":null}]"#,
            r#"[{"index":0,"delta":{"provider_specific_fields":{}},"logprobs":{"content":[],"refusal":null}}]"#,
            r#"[{"index":0,"delta":{}},{"index":1,"delta":{}}]"#,
            r#"[{"text":"","index":0,"logprobs":null,"finish_reason":null}]"#,
        ] {
            let e = event(&format!(r#"{{"id":"c","choices":{choices},{usage}}}"#));
            assert_eq!(judge(e.as_bytes()), Verdict::Drop, "{e}");
        }
        // Kept without the usage: a choice carries something.
        for delta in [
            r#""delta":{"content":"x"}"#,
            r#""delta":{"role":"assistant"}"#,
            r#""delta":{"tool_calls":[{"index":0,"function":{"arguments":""}}]}"#,
            r#""delta":{"function_call":{"name":"f"}}"#,
            r#""delta":{"refusal":"no"}"#,
            r#""delta":{"reasoning_content":"hmm"}"#,
            r#""delta":{},"logprobs":{"content":[{"token":"x","logprob":0}]}"#,
            r#""delta":{},"finish_reason":"length""#,
            r#""delta":{"audio":{"id":"a"}}"#,
        ] {
            let e = event(&format!(r#"{{"id":"c","choices":[{{"index":0,{delta}}}],{usage}}}"#));
            let want = event(&format!(r#"{{"id":"c","choices":[{{"index":0,{delta}}}]}}"#));
            assert_eq!(judge(e.as_bytes()), Verdict::Rewrite(want.into_bytes()), "{e}");
            // One content choice among blank ones is enough.
            let e = event(&format!(r#"{{"choices":[{{"index":0,"delta":{{}}}},{{"index":1,{delta}}}],{usage}}}"#));
            assert!(matches!(judge(e.as_bytes()), Verdict::Rewrite(_)), "{e}");
        }
        // Left as they are: no usage object, no choices array, not JSON, or JSON over two lines.
        for e in [
            event(r#"{"choices":[],"usage":null}"#),
            event(r#"{"choices":[{"index":0,"delta":{"content":"usage"}}],"usage":null}"#),
            event(r#"{"choices":[],"usage":3}"#),
            event(&format!(r#"{{"type":"message_delta",{usage}}}"#)),
            event(&format!(r#"{{"choices":{{}},{usage}}}"#)),
            "data: [DONE]\n\n".to_string(),
            "data: usage\n\n".to_string(),
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"x\"}}}}],\ndata: {usage}}}\n\n"),
        ] {
            assert_eq!(judge(e.as_bytes()), Verdict::Keep, "{e}");
        }
        // A choice that is not an object is not known to carry nothing.
        let e = event(&format!(r#"{{"choices":["x"],{usage}}}"#));
        assert_eq!(judge(e.as_bytes()), Verdict::Rewrite(event(r#"{"choices":["x"]}"#).into_bytes()));
        // JSON over two `data:` lines is still read whole for the usage-only chunk.
        let split = format!("data: {{\"choices\":[],\ndata: {usage}}}\n\n");
        assert_eq!(judge(split.as_bytes()), Verdict::Drop);
        // Other fields of the event are kept.
        let e = format!("event: chunk\nid: 7\ndata: {{\"choices\":[{{\"delta\":{{\"content\":\"x\"}}}}],{usage}}}\n\n");
        assert_eq!(
            judge(e.as_bytes()),
            Verdict::Rewrite(
                b"event: chunk\nid: 7\ndata: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n".to_vec()
            )
        );
    }

    #[test]
    fn the_usage_member_is_cut_with_its_comma() {
        let cut = |s: &str| without_usage(s.as_bytes()).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(
            cut(r#"{"a":1,"usage":{"x":[1,{"y":"}"}]},"b":"usage"}"#).as_deref(),
            Some(r#"{"a":1,"b":"usage"}"#)
        );
        assert_eq!(cut(r#"{"a":1,"usage":{"x":2}}"#).as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(cut(r#"{"usage":{"x":2},"a":1}"#).as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(cut(r#" { "usage" : { } } "#).as_deref(), Some(r#" {} "#));
        assert_eq!(
            cut("{\"a\" : \"x\\\"}\" ,\n \"usage\" : {\"n\":1} ,\"b\":[]}").as_deref(),
            Some("{\"a\" : \"x\\\"}\" ,\"b\":[]}")
        );
        // Nested `usage` keys and `usage` in strings are not the member.
        assert_eq!(cut(r#"{"x":{"usage":{}},"y":"\"usage\":1"}"#), None);
        // Spelt with an escape, or twice: left alone.
        assert_eq!(cut(r#"{"usag\u0065":{}}"#), None);
        assert_eq!(cut(r#"{"usage":{},"usage":{}}"#), None);
        assert_eq!(cut("[]"), None);
    }

    #[test]
    fn a_refused_budget_makes_the_stripper_pass_everything_without_losing_a_byte() {
        use crate::memory::{Lease, Pool};
        let pool = Pool::new(crate::memory::DEFAULT_MAX_TOTAL);
        // Room for a little pending data only: the usage chunk cut across chunks needs more.
        let body = STREAM.as_bytes();
        for i in 0..=body.len() {
            let lease = Lease::in_pool(&pool, 40);
            let mut s = UsageChunkStripper::with_lease(lease.clone());
            let (a, b) = body.split_at(i);
            let mut out = s.process(a, false);
            out.extend(s.process(b, true));
            if s.gave_up() {
                assert_eq!(out, body, "split at {i}: given up, every byte passes");
                assert!(lease.was_refused());
            } else {
                assert_eq!(String::from_utf8(out).unwrap(), expected(), "split at {i}");
            }
            drop(s);
            drop(lease);
            assert_eq!(pool.held(), 0, "split at {i}");
        }
        // Abandoned between chunks (another part of the stream was refused): what was held goes
        // out with the next chunk.
        let mut s = UsageChunkStripper::with_lease(Lease::in_pool(&pool, 1 << 20));
        let half = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]";
        assert_eq!(s.forward(half.as_bytes(), false), Forward::Bytes(Vec::new()));
        s.abandon();
        assert_eq!(s.forward(b"}\n\n", false), Forward::Bytes(format!("{half}}}\n\n").into_bytes()));
        assert_eq!(s.forward(b"data: x\n\n", true), Forward::Unchanged);
        // A large chunk's allocation is not kept for the rest of the stream.
        let lease = Lease::in_pool(&pool, 8 << 20);
        let mut s = UsageChunkStripper::with_lease(lease.clone());
        let big =
            format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\ndata: {{", "x".repeat(1 << 20));
        assert!(matches!(s.forward(big.as_bytes(), false), Forward::Bytes(_)));
        assert!(s.held() <= PENDING_KEEP && lease.held() <= PENDING_KEEP, "{} {}", s.held(), lease.held());
    }
}
