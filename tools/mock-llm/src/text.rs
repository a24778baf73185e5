//! What every API answers with: the generated text and how a stream cuts it up, token estimates,
//! ids, timestamps and SSE framing.

use crate::knobs::Knobs;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Generated text stops growing here; the reported token counts do not.
const MAX_WORDS: usize = 4096;
/// Completion tokens when neither a header nor the request says.
pub const DEFAULT_COMPLETION_TOKENS: u64 = 16;

const WORDS: &[&str] = &[
    "Hello",
    "there",
    "this",
    "is",
    "a",
    "mock",
    "completion",
    "from",
    "the",
    "llm-meter",
    "test",
    "gateway",
    "with",
    "tokens",
    "streamed",
    "one",
    "word",
    "at",
    "a",
    "time",
];

/// Rough token count of a text: about 4 bytes per token, at least 1 for non-empty text.
pub fn text_tokens(s: &str) -> u64 {
    (s.len() as u64).div_ceil(4)
}

/// Splits `items` into at most `n` consecutive, nearly equal groups, concatenated.
pub fn group(items: &[String], n: usize) -> Vec<String> {
    let n = n.clamp(1, items.len().max(1));
    let (base, extra) = (items.len() / n, items.len() % n);
    let mut out = Vec::with_capacity(n);
    let mut at = 0;
    for i in 0..n {
        let len = base + usize::from(i < extra);
        out.push(items[at..at + len].concat());
        at += len;
    }
    out
}

/// The assistant's text, in the pieces a stream delivers it in: `x-mock-content` in groups of
/// about 4 characters, else one generated word per token (`x-mock-chunks` regroups either).
pub fn content_pieces(knobs: &Knobs, text_tokens: u64) -> Vec<String> {
    match &knobs.content {
        Some(content) => {
            let chars: Vec<String> = content.chars().map(String::from).collect();
            let default = chars.len().div_ceil(4);
            group(&chars, knobs.chunks.unwrap_or(default))
        }
        None => {
            let words = (text_tokens as usize).min(MAX_WORDS);
            let words: Vec<String> = (0..words)
                .map(|i| {
                    let w = WORDS[i % WORDS.len()];
                    if i == 0 {
                        w.to_string()
                    } else {
                        format!(" {w}")
                    }
                })
                .collect();
            group(&words, knobs.chunks.unwrap_or(words.len()))
        }
    }
}

/// Sentences [`pad`] draws from.
const SENTENCES: &[&str] = &[
    "The meter reads every byte that passes and keeps only what it needs.",
    "A stream may end at any moment, and the count must still be right.",
    "Tokens in, tokens out, and the cost of both, per model and per app.",
    "Nothing here is buffered whole; chunks come and go as they arrive.",
    "Compressed bodies are decoded on the side while the client gets the original.",
    "Budgets are shared by every worker thread of the proxy.",
    "The gateway answered in time, and the usage was at the very end.",
    "Each rule has a window, a key, and a limit that is exact.",
    "Operators read the dashboards at night and sleep better for it.",
    "A hostile body is a counted skip, never a crash.",
    "Latency is measured from the request headers to the last byte.",
    "The first token arrives, then the rest, one event at a time.",
    "Labels stay bounded however many models the clients invent.",
    "Memory per stream is bounded, whatever the size of the response.",
    "The window of the decoder is the price of reading compressed text.",
    "When in doubt, let the request through and count the doubt.",
];

/// Pads `text` with generated prose (ASCII, space-separated sentences drawn pseudo-randomly
/// with a fixed seed, each with a number, so it compresses about as well as real text: 20 MB to
/// 0.86 MB with brotli) until it is `len` bytes long. Longer text is left as it is.
pub fn pad(text: &mut String, len: usize) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    text.reserve(len.saturating_sub(text.len()));
    while text.len() < len {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32;
        let sentence = SENTENCES[r as usize % SENTENCES.len()];
        let piece = format!(" {} ({})", sentence, (r >> 8) % 100);
        let room = len - text.len();
        text.push_str(&piece[..piece.len().min(room)]);
    }
}

/// A fresh id: `{prefix}mock` and a process-wide sequence number.
pub fn id(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(1);
    format!("{prefix}mock{:08}", N.fetch_add(1, Ordering::Relaxed))
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `secs` since the epoch as RFC 3339 UTC, e.g. `2025-01-02T03:04:05Z`.
pub fn rfc3339(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// An unnamed SSE event (`data: …`), as OpenAI's chat and completions streams send them.
pub fn sse(data: &str) -> Vec<u8> {
    format!("data: {data}\n\n").into_bytes()
}

/// A named SSE event (`event: …` then `data: …`), as Anthropic and the Responses API send them.
pub fn sse_event(event: &str, data: &str) -> Vec<u8> {
    format!("event: {event}\ndata: {data}\n\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping() {
        let items: Vec<String> = "abcdefg".chars().map(String::from).collect();
        assert_eq!(group(&items, 3), ["abc", "de", "fg"]);
        assert_eq!(group(&items, 100).len(), 7);
        assert_eq!(group(&items, 0), ["abcdefg"]);
        assert_eq!(group(&[], 4), [""]);
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_735_787_045), "2025-01-02T03:04:05Z");
    }

    #[test]
    fn padding() {
        let mut t = "Hello there".to_string();
        pad(&mut t, 1000);
        assert_eq!(t.len(), 1000);
        assert!(t.starts_with("Hello there The ") || t.starts_with("Hello there "), "{t}");
        let mut u = "Hello there".to_string();
        pad(&mut u, 1000);
        assert_eq!(t, u, "deterministic");
        let mut short = "already long enough".to_string();
        pad(&mut short, 5);
        assert_eq!(short, "already long enough");
        let mut big = String::new();
        pad(&mut big, 1 << 20);
        assert_eq!(big.len(), 1 << 20);
        assert!(big.is_ascii() && !big.contains('"') && !big.contains('\\'), "no JSON escapes");
    }

    #[test]
    fn framing() {
        assert_eq!(sse("[DONE]"), b"data: [DONE]\n\n");
        assert_eq!(sse_event("ping", r#"{"type":"ping"}"#), b"event: ping\ndata: {\"type\":\"ping\"}\n\n");
        assert!(id("msg_").starts_with("msg_mock"));
    }
}
