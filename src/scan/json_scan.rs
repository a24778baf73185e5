//! Incremental JSON path-capture scanner.
//!
//! Envoy hands the filter a body chunk by chunk and the filter must not buffer or pause it, yet
//! it needs a few values out of it (`usage`, `model`, later `message.usage`, `response.usage`,
//! `usageMetadata`). [`JsonScanner`] reads a JSON object document incrementally and reports the
//! raw bytes of the values found at a fixed set of key paths, without building a tree.
//!
//! Only the objects along the target paths are parsed structurally (keys decoded and compared);
//! every other value (strings, arrays, objects whose key matches no path) is skipped quickly:
//! string contents by searching for `"` and `\` (eight bytes at a time, long strings with
//! `memchr2`), container contents eight bytes at a time, walking one mask of the word's quotes,
//! backslashes and brackets while counting nesting (strings that end within the word included).
//! So a `"usage"` key inside message content, tool-call arguments or an array is never mistaken
//! for the top-level one.
//!
//! Keys are compared by their decoded value (`\"`, `\\`, `\/`, `\uXXXX` with surrogate pairs);
//! every occurrence of a duplicate key is reported (the consumer picks the last); a leading
//! UTF-8 BOM is skipped and anything after the top-level object is ignored. Results never
//! depend on where the chunks are split.
//!
//! Bounds, whatever the input: no recursion; nesting depth is a counter (100k levels of `[` cost
//! nothing); the structurally parsed depth never exceeds the longest path. Memory held between
//! chunks is at most the value being captured (dropped, and reported as [`Found::TooLarge`],
//! once it exceeds `max_capture`) plus a key being decoded (at most the longest target key;
//! longer keys cannot match and are not kept). A value that lies within one chunk is reported
//! straight from the chunk without copying.
//!
//! The scanner validates only what it parses structurally: the top-level value must be an
//! object and the objects along the paths must be well formed, otherwise the document is
//! flagged malformed and ignored. Skipped subtrees are not validated (brackets are counted, not
//! matched). Bytes are bytes: invalid UTF-8 never matters, except that it cannot match a key.

use memchr::memchr2;

/// What the scanner reports for a value found at one of its paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found<'a> {
    /// The complete raw bytes of the value exactly as in the input (strings include their
    /// quotes; objects their braces).
    Value {
        /// Index of the path in the scanner's `paths`.
        path: usize,
        /// The value's raw JSON bytes.
        raw: &'a [u8],
    },
    /// The value at `path` exceeded `max_capture` bytes; it was skipped.
    TooLarge {
        /// Index of the path in the scanner's `paths`.
        path: usize,
    },
}

/// Where the scanner is in the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Matched this many bytes of a leading UTF-8 byte order mark.
    Bom(u8),
    /// Before the top-level value.
    Start,
    /// Just after `{` of a parsed object: a key or `}`.
    ObjStart,
    /// Just after `,` in a parsed object: a key.
    ObjNext,
    /// Inside a key string.
    Key,
    /// Just after a `\` in a key.
    KeyEsc,
    /// Inside the hex digits of a `\u` escape in a key.
    KeyHex,
    /// After a key: `:`.
    Colon,
    /// After `:`: the value.
    Value,
    /// After a value in a parsed object: `,` or `}`.
    AfterValue,
    /// Inside a number or literal being skipped or captured.
    SkipScalar,
    /// Inside a string being skipped or captured.
    SkipStr,
    /// Just after a `\` in a string being skipped or captured.
    SkipStrEsc,
    /// Inside an array or object being skipped or captured (`nest` open containers).
    SkipNest,
    /// In a top-level array of objects (Gemini's non-SSE stream): before an element or `]`.
    ArrItem,
    /// In a top-level array, after an element: `,` or `]`.
    ArrAfter,
    /// The top-level object was closed; the rest is ignored.
    Done,
    /// Not a JSON object document; the rest is ignored.
    Malformed,
}

/// What to do with the value of the key just read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Matches no path: skip.
    Skip,
    /// Completes this path: capture.
    Capture(usize),
    /// A strict prefix of this path: parse it if it is an object.
    Descend(usize),
}

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// Incremental scanner reporting the values at a fixed set of key paths of a JSON object.
#[derive(Debug, Clone)]
pub struct JsonScanner {
    paths: &'static [&'static [&'static str]],
    max_capture: usize,
    /// Longest key of any path, in bytes.
    max_key: usize,
    /// Bit `n` set when some path has a key of `n` bytes (bit 63: of 63 bytes or more), so most
    /// keys are rejected by their length alone.
    key_lens: u64,
    mode: Mode,
    /// Depth of the object parsed structurally (1 = top level); never more than the longest path.
    depth: usize,
    /// The document is an array whose elements are each scanned as a top-level object.
    in_array: bool,
    /// A path whose first `depth - 1` keys are the keys leading to the current object.
    rep: usize,
    target: Target,
    /// Open containers inside the value being skipped or captured.
    nest: u64,
    /// Decoded bytes of the key being read when it spans chunks or has escapes.
    key: Vec<u8>,
    /// The key being read cannot match (too long, bad escape).
    key_poisoned: bool,
    hex_len: u8,
    hex_val: u32,
    /// A `\uD800`-`\uDBFF` escape waiting for its low surrogate.
    high_surrogate: Option<u32>,
    /// Path of the value being captured.
    capture: Option<usize>,
    /// Offset of the captured value's first byte in the current chunk (0 once continued).
    cap_start: usize,
    cap_too_large: bool,
    /// Captured bytes from earlier chunks.
    buf: Vec<u8>,
}

impl JsonScanner {
    /// `paths`: each path is a sequence of object keys starting at the top-level value, e.g.
    /// `&["usage"]`, `&["model"]`, `&["message", "usage"]`. Paths go through objects only (a
    /// path never matches inside arrays). If one path is a prefix of another, the shorter one
    /// wins: its value is captured whole and the longer path is not reported inside it. Empty
    /// paths never match.
    pub fn new(paths: &'static [&'static [&'static str]], max_capture: usize) -> Self {
        let max_key = paths.iter().flat_map(|p| p.iter()).map(|k| k.len()).max().unwrap_or(0);
        let key_lens = paths.iter().flat_map(|p| p.iter()).fold(0, |m, k| m | (1 << k.len().min(63)));
        Self {
            paths,
            max_capture,
            max_key,
            key_lens,
            mode: Mode::Bom(0),
            depth: 0,
            in_array: false,
            rep: 0,
            target: Target::Skip,
            nest: 0,
            key: Vec::new(),
            key_poisoned: false,
            hex_len: 0,
            hex_val: 0,
            high_surrogate: None,
            capture: None,
            cap_start: 0,
            cap_too_large: false,
            buf: Vec::new(),
        }
    }

    /// Forget everything and start a new document (reuses allocations).
    pub fn reset(&mut self) {
        self.mode = Mode::Bom(0);
        self.depth = 0;
        self.in_array = false;
        self.rep = 0;
        self.target = Target::Skip;
        self.nest = 0;
        self.key.clear();
        self.key_poisoned = false;
        self.hex_len = 0;
        self.hex_val = 0;
        self.high_surrogate = None;
        self.capture = None;
        self.cap_start = 0;
        self.cap_too_large = false;
        self.buf.clear();
    }

    /// True once the top-level value has been closed.
    pub fn is_complete(&self) -> bool {
        self.mode == Mode::Done
    }

    /// True if the input was seen not to be a JSON object document (top-level is not an
    /// object, stray closing bracket, garbage). After that the scanner ignores input until
    /// reset.
    pub fn is_malformed(&self) -> bool {
        self.mode == Mode::Malformed
    }

    /// True if a document was started (something other than whitespace or a byte order mark
    /// was read) but neither closed nor found malformed: the input stopped inside it.
    pub fn is_truncated(&self) -> bool {
        !matches!(self.mode, Mode::Bom(_) | Mode::Start | Mode::Done | Mode::Malformed)
    }

    /// Bytes currently held between chunks (capture buffer + key buffer), for bound tests.
    /// At most `max_capture` plus the longest target key.
    pub fn carry_len(&self) -> usize {
        self.buf.len() + self.key.len()
    }

    /// Scan the next chunk. Calls `on_found` once per completed value at a path (in document
    /// order).
    pub fn feed<F: FnMut(Found<'_>)>(&mut self, chunk: &[u8], mut on_found: F) {
        let mut i = 0;
        while let Some(&b) = chunk.get(i) {
            match self.mode {
                Mode::Done | Mode::Malformed => return,
                Mode::Bom(n) => {
                    if n == 0 && b != BOM[0] {
                        self.mode = Mode::Start;
                    } else if BOM.get(usize::from(n)) == Some(&b) {
                        i += 1;
                        self.mode = if n >= 2 { Mode::Start } else { Mode::Bom(n + 1) };
                    } else {
                        return self.malformed();
                    }
                }
                Mode::Start | Mode::ArrItem => {
                    i += 1;
                    match b {
                        b'{' => {
                            self.depth = 1;
                            self.mode = Mode::ObjStart;
                        }
                        b'[' if self.mode == Mode::Start => {
                            self.in_array = true;
                            self.mode = Mode::ArrItem;
                        }
                        b']' if self.mode == Mode::ArrItem => self.mode = Mode::Done,
                        b if is_ws(b) => {}
                        _ => return self.malformed(),
                    }
                }
                Mode::ArrAfter => {
                    i += 1;
                    match b {
                        b',' => self.mode = Mode::ArrItem,
                        b']' => self.mode = Mode::Done,
                        b if is_ws(b) => {}
                        _ => return self.malformed(),
                    }
                }
                Mode::ObjStart | Mode::ObjNext => {
                    i += 1;
                    match b {
                        b'"' => self.begin_key(),
                        b'}' if self.mode == Mode::ObjStart => self.close_object(),
                        b if is_ws(b) => {}
                        _ => return self.malformed(),
                    }
                }
                // Keys and compact values follow each other without going back to the dispatch.
                Mode::Key => loop {
                    let rest = chunk.get(i..).unwrap_or_default();
                    match find_quote(rest) {
                        Some(p) => {
                            let run = rest.get(..p).unwrap_or_default();
                            i += p + 1;
                            if rest.get(p) == Some(&b'"') {
                                self.target =
                                    if self.key.is_empty() && !self.key_poisoned && self.high_surrogate.is_none() {
                                        // Fast path: the whole key is in this chunk, without escapes.
                                        self.decide(run)
                                    } else {
                                        self.push_key(run);
                                        if self.high_surrogate.is_some() {
                                            self.poison_key();
                                        }
                                        if self.key_poisoned {
                                            Target::Skip
                                        } else {
                                            self.decide(&self.key)
                                        }
                                    };
                                self.key.clear();
                                self.mode = Mode::Colon;
                                // Compact JSON: the colon and the value follow the key.
                                if chunk.get(i) == Some(&b':') {
                                    i += 1;
                                    self.mode = Mode::Value;
                                    if chunk.get(i).is_some_and(|&c| !is_ws(c)) {
                                        match self.value(chunk, i, &mut on_found) {
                                            Some(next) => i = next,
                                            None => return self.malformed(),
                                        }
                                    }
                                }
                            } else {
                                self.push_key(run);
                                self.mode = Mode::KeyEsc;
                            }
                        }
                        None => {
                            self.push_key(rest);
                            i = chunk.len();
                            break;
                        }
                    }
                    if self.mode != Mode::Key {
                        break;
                    }
                },
                Mode::KeyEsc => {
                    i += 1;
                    self.mode = Mode::Key;
                    let decoded = match b {
                        b'"' | b'\\' | b'/' => b,
                        b'b' => 0x08,
                        b'f' => 0x0C,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'u' => {
                            self.hex_len = 0;
                            self.hex_val = 0;
                            self.mode = Mode::KeyHex;
                            continue;
                        }
                        _ => {
                            self.poison_key();
                            continue;
                        }
                    };
                    self.push_key(&[decoded]);
                }
                Mode::KeyHex => match hex_digit(b) {
                    Some(d) => {
                        i += 1;
                        self.hex_val = (self.hex_val << 4) | d;
                        self.hex_len += 1;
                        if self.hex_len >= 4 {
                            self.push_code_unit(self.hex_val);
                            self.mode = Mode::Key;
                        }
                    }
                    None => {
                        // Invalid escape: the key cannot match; reread this byte as key content
                        // (it may be the closing quote).
                        self.poison_key();
                        self.mode = Mode::Key;
                    }
                },
                Mode::Colon => {
                    i += 1;
                    match b {
                        b':' => self.mode = Mode::Value,
                        b if is_ws(b) => {}
                        _ => return self.malformed(),
                    }
                }
                Mode::Value => {
                    if is_ws(b) {
                        i += 1;
                    } else {
                        match self.value(chunk, i, &mut on_found) {
                            Some(next) => i = next,
                            None => return self.malformed(),
                        }
                    }
                }
                Mode::AfterValue => {
                    i += 1;
                    match b {
                        b',' => self.mode = Mode::ObjNext,
                        b'}' => self.close_object(),
                        b if is_ws(b) => {}
                        _ => return self.malformed(),
                    }
                }
                Mode::SkipScalar => i = self.scalar_from(chunk, i, &mut on_found),
                Mode::SkipStr | Mode::SkipStrEsc | Mode::SkipNest => i = self.skip_from(chunk, i, &mut on_found),
            }
        }
        // Keep the part of a value being captured that lies in this chunk.
        if self.capture.is_some() {
            if !self.cap_too_large {
                let part = chunk.get(self.cap_start..).unwrap_or_default();
                // Over the bound, or no heap to keep it: skipped like a value too large.
                if self.buf.len().saturating_add(part.len()) > self.max_capture
                    || self.buf.try_reserve(part.len()).is_err()
                {
                    self.cap_too_large = true;
                    self.buf.clear();
                } else {
                    self.buf.extend_from_slice(part);
                }
            }
            self.cap_start = 0;
        }
    }

    fn malformed(&mut self) {
        self.mode = Mode::Malformed;
        self.capture = None;
        self.buf.clear();
        self.key.clear();
    }

    fn begin_key(&mut self) {
        self.key.clear();
        self.key_poisoned = false;
        self.high_surrogate = None;
        self.mode = Mode::Key;
    }

    fn poison_key(&mut self) {
        self.key_poisoned = true;
        self.high_surrogate = None;
        self.key.clear();
    }

    /// Appends decoded key bytes; a key longer than any target key is poisoned, not kept.
    fn push_key(&mut self, bytes: &[u8]) {
        if self.key_poisoned || bytes.is_empty() {
            return;
        }
        if self.high_surrogate.is_some()
            || self.key.len().saturating_add(bytes.len()) > self.max_key
            || self.key.try_reserve(bytes.len()).is_err()
        {
            return self.poison_key();
        }
        self.key.extend_from_slice(bytes);
    }

    /// Appends one UTF-16 code unit of a `\u` escape, pairing surrogates.
    fn push_code_unit(&mut self, unit: u32) {
        let code = match (self.high_surrogate.take(), unit) {
            (Some(high), 0xDC00..=0xDFFF) => 0x10000 + ((high - 0xD800) << 10) + (unit - 0xDC00),
            (None, 0xD800..=0xDBFF) => {
                if !self.key_poisoned {
                    self.high_surrogate = Some(unit);
                }
                return;
            }
            (Some(_), _) | (None, 0xDC00..=0xDFFF) => return self.poison_key(),
            (None, unit) => unit,
        };
        match char::from_u32(code) {
            Some(c) => {
                let mut utf8 = [0; 4];
                self.push_key(c.encode_utf8(&mut utf8).as_bytes());
            }
            None => self.poison_key(),
        }
    }

    /// What to do with the value of `key` in the object at `self.depth`.
    fn decide(&self, key: &[u8]) -> Target {
        if key.len() > self.max_key || self.key_lens & (1 << key.len().min(63)) == 0 {
            return Target::Skip;
        }
        let d = self.depth;
        let Some(prefix) = self.paths.get(self.rep).and_then(|p| p.get(..d.saturating_sub(1))) else {
            return Target::Skip;
        };
        let mut descend = None;
        for (q, path) in self.paths.iter().enumerate() {
            let (Some(k), Some(head)) = (path.get(d.saturating_sub(1)), path.get(..d.saturating_sub(1))) else {
                continue;
            };
            // (The first byte first: most keys differ there, and it saves a `memcmp` call.)
            if k.as_bytes().first() != key.first() || k.as_bytes() != key || head != prefix {
                continue;
            }
            if path.len() == d {
                return Target::Capture(q);
            }
            descend.get_or_insert(q);
        }
        descend.map_or(Target::Skip, Target::Descend)
    }

    /// A skipped value starts at `chunk[at]`; capture it if its path is a target.
    fn start_value(&mut self, at: usize) {
        if let Target::Capture(q) = self.target {
            self.capture = Some(q);
            self.cap_start = at;
            self.cap_too_large = false;
            self.buf.clear();
        }
    }

    /// A skipped value ended just before `chunk[end]`; report it if it was captured.
    #[inline(always)]
    fn end_value<F: FnMut(Found<'_>)>(&mut self, chunk: &[u8], end: usize, on_found: &mut F) {
        self.mode = Mode::AfterValue;
        if self.capture.is_some() {
            self.report(chunk, end, on_found);
        }
    }

    /// Reports the captured value that ended just before `chunk[end]`.
    #[inline(never)]
    fn report<F: FnMut(Found<'_>)>(&mut self, chunk: &[u8], end: usize, on_found: &mut F) {
        let Some(path) = self.capture.take() else {
            return;
        };
        let part = chunk.get(self.cap_start..end).unwrap_or_default();
        if self.cap_too_large
            || self.buf.len().saturating_add(part.len()) > self.max_capture
            || (!self.buf.is_empty() && self.buf.try_reserve(part.len()).is_err())
        {
            self.buf.clear();
            on_found(Found::TooLarge { path });
        } else if self.buf.is_empty() {
            on_found(Found::Value { path, raw: part });
        } else {
            self.buf.extend_from_slice(part);
            on_found(Found::Value { path, raw: &self.buf });
            self.buf.clear();
        }
        self.cap_start = 0;
    }

    /// In `Mode::Value` at the value's first byte `chunk[i]` (not whitespace): descends into
    /// an object on a path, or starts skipping (capturing if targeted) the value and goes on
    /// as far as the chunk allows. Returns where to continue, `None` if it is not a value.
    fn value<F: FnMut(Found<'_>)>(&mut self, chunk: &[u8], i: usize, on_found: &mut F) -> Option<usize> {
        let b = chunk.get(i).copied()?;
        match b {
            b'{' if matches!(self.target, Target::Descend(_)) => {
                if let Target::Descend(q) = self.target {
                    self.rep = q;
                }
                self.depth += 1;
                self.mode = Mode::ObjStart;
                Some(i + 1)
            }
            b'{' | b'[' => {
                self.start_value(i);
                self.nest = 1;
                self.mode = Mode::SkipNest;
                Some(self.skip_from(chunk, i + 1, on_found))
            }
            b'"' => {
                self.start_value(i);
                // Fast path: a string without escapes that ends in this chunk.
                let rest = chunk.get(i + 1..).unwrap_or_default();
                if let Some(p) = find_quote(rest) {
                    if rest.get(p) == Some(&b'"') {
                        let end = i + p + 2;
                        self.end_value(chunk, end, on_found);
                        return Some(self.next_key_fast(chunk, end));
                    }
                }
                self.nest = 0;
                self.mode = Mode::SkipStr;
                Some(self.skip_from(chunk, i + 1, on_found))
            }
            b if is_scalar(b) => {
                self.start_value(i);
                self.mode = Mode::SkipScalar;
                Some(self.scalar_from(chunk, i + 1, on_found))
            }
            _ => None,
        }
    }

    /// In `Mode::SkipScalar`: skips to the end of the number or literal if it is in this chunk.
    fn scalar_from<F: FnMut(Found<'_>)>(&mut self, chunk: &[u8], i: usize, on_found: &mut F) -> usize {
        let rest = chunk.get(i..).unwrap_or_default();
        match rest.iter().position(|&c| !is_scalar(c)) {
            Some(p) => {
                // The delimiter is not part of the value: AfterValue reads it.
                self.end_value(chunk, i + p, on_found);
                self.next_key_fast(chunk, i + p)
            }
            None => chunk.len(),
        }
    }

    /// In a string or container skip mode: skips to the end of the value if it is in this chunk.
    fn skip_from<F: FnMut(Found<'_>)>(&mut self, chunk: &[u8], i: usize, on_found: &mut F) -> usize {
        match self.skip(chunk.get(i..).unwrap_or_default()) {
            Some(p) => {
                self.end_value(chunk, i + p, on_found);
                self.next_key_fast(chunk, i + p)
            }
            None => chunk.len(),
        }
    }

    /// Inside a container or string value being skipped or captured: consumes `rest` up to
    /// the end of the value and returns its length, or saves the state and returns `None` if
    /// the value goes on past `rest`.
    fn skip(&mut self, rest: &[u8]) -> Option<usize> {
        let mut nest = self.nest;
        let mut mode = self.mode;
        let mut i = 0;
        let ended = 'scan: loop {
            match mode {
                Mode::SkipStrEsc => {
                    if i >= rest.len() {
                        break false;
                    }
                    i += 1;
                    mode = Mode::SkipStr;
                }
                Mode::SkipStr => match find_quote(rest.get(i..).unwrap_or_default()) {
                    Some(p) => {
                        let quote = rest.get(i + p) == Some(&b'"');
                        i += p + 1;
                        if !quote {
                            mode = Mode::SkipStrEsc;
                        } else if nest == 0 {
                            break true;
                        } else {
                            mode = Mode::SkipNest;
                        }
                    }
                    None => break false,
                },
                _ => {
                    // In a container, outside strings: eight bytes at a time, every bracket of a
                    // word taken from one mask. Strings that end within the word are skipped here
                    // too; longer ones and escapes are left to the string states.
                    loop {
                        // The last bytes are padded with zeros, which match nothing.
                        let (x, last) = match word_at(rest, i) {
                            Some(x) => (x, false),
                            None if i < rest.len() => (padded_word(rest.get(i..).unwrap_or_default()), true),
                            None => break 'scan false,
                        };
                        let mut m = container_bytes(x);
                        let mut in_str = false;
                        while m != 0 {
                            let p = i + lowest_byte(m);
                            // (A false positive of the mask, or padding, matches none of these.)
                            let c = rest.get(p).copied().unwrap_or(0);
                            if in_str {
                                if c == b'"' {
                                    in_str = false;
                                } else if c == b'\\' {
                                    i = p + 1;
                                    mode = Mode::SkipStrEsc;
                                    continue 'scan;
                                }
                            } else if c == b'"' {
                                in_str = true;
                            } else if c | 0x20 == b'{' {
                                nest = nest.saturating_add(1);
                            } else if c | 0x20 == b'}' {
                                nest = nest.saturating_sub(1);
                                if nest == 0 {
                                    i = p + 1;
                                    break 'scan true;
                                }
                            }
                            m &= m - 1;
                        }
                        if in_str {
                            mode = Mode::SkipStr;
                        }
                        if last {
                            break 'scan false;
                        }
                        i += 8;
                        if in_str {
                            continue 'scan;
                        }
                    }
                }
            }
        };
        self.nest = nest;
        self.mode = mode;
        ended.then_some(i)
    }

    /// Compact JSON: a value is usually followed by `,"` and the next key.
    fn next_key_fast(&mut self, chunk: &[u8], i: usize) -> usize {
        if chunk.get(i) == Some(&b',') && chunk.get(i + 1) == Some(&b'"') {
            self.begin_key();
            i + 2
        } else {
            i
        }
    }

    fn close_object(&mut self) {
        if self.depth <= 1 {
            self.depth = 0;
            self.mode = if self.in_array { Mode::ArrAfter } else { Mode::Done };
        } else {
            self.depth -= 1;
            self.mode = Mode::AfterValue;
        }
    }
}

pub(crate) fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Bytes of numbers and literals (`true`, `false`, `null`).
pub(crate) fn is_scalar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.')
}

fn hex_digit(b: u8) -> Option<u32> {
    char::from(b).to_digit(16)
}

/// The bytes a skipped container is read by outside strings: `"` and the brackets.
pub(crate) fn is_nest_byte(b: u8) -> bool {
    matches!(b, b'"' | b'{' | b'}' | b'[' | b']')
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// The high bit of every zero byte of `v`, plus possibly of bytes right above a zero byte (the
/// borrow of the subtraction). So the lowest set bit is exact; higher ones must be checked.
#[inline(always)]
fn zero_bytes(v: u64) -> u64 {
    v.wrapping_sub(LO) & !v & HI
}

/// Eight bytes as a little-endian word (byte `k` in bits `8k..8k+8`), whatever the target.
#[inline(always)]
fn word_at(s: &[u8], at: usize) -> Option<u64> {
    let bytes = s.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(<[u8; 8]>::try_from(bytes).ok()?))
}

/// Up to eight bytes as a word, padded with zero bytes.
#[inline(always)]
fn padded_word(s: &[u8]) -> u64 {
    let mut bytes = [0; 8];
    for (slot, &b) in bytes.iter_mut().zip(s) {
        *slot = b;
    }
    u64::from_le_bytes(bytes)
}

/// Byte index of the lowest set bit of a [`zero_bytes`] mask.
#[inline(always)]
fn lowest_byte(mask: u64) -> usize {
    (mask.trailing_zeros() / 8) as usize
}

/// `"` and `\` bytes of a word; the lowest set bit is exact.
#[inline(always)]
fn quote_bytes(x: u64) -> u64 {
    zero_bytes(x ^ (u64::from(b'"') * LO)) | zero_bytes(x ^ (u64::from(b'\\') * LO))
}

/// `"`, `\`, `{`, `}`, `[` and `]` bytes of a word (`b | 0x20` is `{` for `[` and `{`, `}` for
/// `]` and `}`), plus possibly bytes right above a match, which the caller rejects by looking at
/// the byte.
#[inline(always)]
fn container_bytes(x: u64) -> u64 {
    let y = x | (0x20 * LO);
    zero_bytes(y ^ (u64::from(b'{') * LO)) | zero_bytes(y ^ (u64::from(b'}') * LO)) | quote_bytes(x)
}

/// Strings up to this long are searched inline, eight bytes at a time; longer ones go to
/// `memchr2`.
const INLINE_QUOTE_SEARCH: usize = 64;

/// Position of the first `"` or `\`. Most JSON strings are short, so the first 64 bytes are
/// searched inline, eight at a time; longer strings go to `memchr2`.
#[inline(always)]
pub(crate) fn find_quote(s: &[u8]) -> Option<usize> {
    let mut at = 0;
    while at < INLINE_QUOTE_SEARCH {
        let Some(x) = word_at(s, at) else {
            // Fewer than eight bytes left: the zero padding matches nothing.
            let m = quote_bytes(padded_word(s.get(at..).unwrap_or_default()));
            return (m != 0).then(|| at + lowest_byte(m));
        };
        let m = quote_bytes(x);
        if m != 0 {
            return Some(at + lowest_byte(m));
        }
        at += 8;
    }
    let tail = s.get(at..).unwrap_or_default();
    memchr2(b'"', b'\\', tail).map(|p| at + p)
}

/// Position of the first `"`, `{`, `}`, `[` or `]`, eight bytes at a time (the search that
/// skipping containers does; event templates skim the runs of a container with it).
pub(crate) fn find_nest_byte(s: &[u8]) -> Option<usize> {
    let mut at = 0;
    while let Some(rest) = s.get(at..).filter(|r| !r.is_empty()) {
        let mut m = container_bytes(word_at(rest, 0).unwrap_or_else(|| padded_word(rest)));
        while m != 0 {
            let p = at + lowest_byte(m);
            if s.get(p).is_some_and(|&b| is_nest_byte(b)) {
                return Some(p);
            }
            m &= m - 1;
        }
        at += 8;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::test_rng::Rng;
    use serde_json::Value;

    /// What a scan reported, owned: `(path, Some(raw))` or `(path, None)` for TooLarge.
    type Report = Vec<(usize, Option<Vec<u8>>)>;

    static USAGE: &[&[&str]] = &[&["usage"]];
    static MULTI: &[&[&str]] = &[&["model"], &["usage"], &["message", "usage"]];

    fn scan_with(s: &mut JsonScanner, chunks: &[&[u8]]) -> Report {
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, |f| match f {
                Found::Value { path, raw } => out.push((path, Some(raw.to_vec()))),
                Found::TooLarge { path } => out.push((path, None)),
            });
        }
        out
    }

    fn scan(paths: &'static [&'static [&'static str]], chunks: &[&[u8]]) -> (Report, bool, bool) {
        let mut s = JsonScanner::new(paths, 4096);
        let r = scan_with(&mut s, chunks);
        (r, s.is_complete(), s.is_malformed())
    }

    fn values(paths: &'static [&'static [&'static str]], doc: &str) -> Vec<(usize, String)> {
        let (r, _, _) = scan(paths, &[doc.as_bytes()]);
        r.into_iter().map(|(p, v)| (p, String::from_utf8(v.unwrap()).unwrap())).collect()
    }

    fn v(path: usize, raw: &str) -> (usize, String) {
        (path, raw.to_string())
    }

    /// Scans `doc` whole, split in two at every position, byte by byte, and in 3 and 7 byte
    /// chunks, asserting identical results; returns them.
    fn scan_all_splits(paths: &'static [&'static [&'static str]], max: usize, doc: &[u8]) -> (Report, bool, bool) {
        let run = |chunks: &[&[u8]]| {
            let mut s = JsonScanner::new(paths, max);
            let mut r = Vec::new();
            for c in chunks {
                s.feed(c, |f| match f {
                    Found::Value { path, raw } => r.push((path, Some(raw.to_vec()))),
                    Found::TooLarge { path } => r.push((path, None)),
                });
                assert!(s.carry_len() <= max + s.max_key, "carry {}", s.carry_len());
            }
            (r, s.is_complete(), s.is_malformed())
        };
        let whole = run(&[doc]);
        for i in 0..=doc.len() {
            let (a, b) = doc.split_at(i);
            assert_eq!(run(&[a, b]), whole, "split at {i}");
        }
        for n in [1, 3, 7] {
            let chunks: Vec<&[u8]> = doc.chunks(n).collect();
            assert_eq!(run(&chunks), whole, "chunks of {n}");
        }
        whole
    }

    /// The value at `path` in a full parse (objects only; last duplicate wins in serde_json).
    fn lookup<'v>(doc: &'v Value, path: &[&str]) -> Option<&'v Value> {
        path.iter().try_fold(doc, |v, k| v.as_object()?.get(*k))
    }

    /// Differential check against serde_json: the last value captured for each path parses
    /// to the value a full parse finds there.
    fn assert_matches_serde(paths: &'static [&'static [&'static str]], doc: &[u8], report: &Report) {
        let full: Value = serde_json::from_slice(doc).unwrap();
        for (p, path) in paths.iter().enumerate() {
            let ours = report.iter().rev().find(|(q, _)| *q == p).map(|(_, raw)| {
                let raw = raw.as_ref().expect("not too large");
                serde_json::from_slice::<Value>(raw).unwrap()
            });
            assert_eq!(ours.as_ref(), lookup(&full, path), "path {path:?}");
        }
    }

    const CHAT: &str = r#"{
  "id": "chatcmpl-AbC123",
  "object": "chat.completion",
  "created": 1727000000,
  "model": "gpt-4o-2024-08-06",
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "assistant",
        "content": "Sure! Here is JSON: {\"usage\": {\"prompt_tokens\": 999}} and a quote \\\" and {[ braces",
        "tool_calls": [
          {"id": "call_1", "type": "function", "function": {"name": "get_usage", "arguments": "{\"usage\":{\"total_tokens\":5},\"x\":[1,2]}"}}
        ],
        "refusal": null
      },
      "logprobs": null,
      "finish_reason": "tool_calls",
      "usage": {"prompt_tokens": 123}
    }
  ],
  "usage": {
    "prompt_tokens": 19,
    "completion_tokens": 10,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 2, "audio_tokens": 0}
  },
  "system_fingerprint": "fp_50cad350e4"
}
"#;

    /// A realistic embeddings response: a long array of floats before the usage.
    fn embeddings_body() -> String {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut data = Vec::new();
        for index in 0..3 {
            let floats: Vec<String> = (0..48)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let f = (x % 2_000_000) as f64 / 100_000_000.0 - 0.01;
                    format!("{f:.9}")
                })
                .collect();
            data.push(format!("{{\"object\":\"embedding\",\"index\":{index},\"embedding\":[{}]}}", floats.join(",")));
        }
        format!(
            "{{\"object\":\"list\",\"data\":[{}],\"model\":\"text-embedding-3-small\",\"usage\":{{\"prompt_tokens\":8,\"total_tokens\":8}}}}",
            data.join(",")
        )
    }

    #[test]
    fn finds_top_level_usage_and_ignores_the_fake_ones() {
        let (r, complete, malformed) = scan(MULTI, &[CHAT.as_bytes()]);
        assert!(complete && !malformed);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (0, Some(br#""gpt-4o-2024-08-06""#.to_vec())));
        let (path, raw) = &r[1];
        assert_eq!(*path, 1);
        let usage: Value = serde_json::from_slice(raw.as_ref().unwrap()).unwrap();
        assert_eq!(usage["prompt_tokens"], 19);
        assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 2);
        assert!(raw.as_ref().unwrap().starts_with(b"{") && raw.as_ref().unwrap().ends_with(b"}"));
    }

    #[test]
    fn chat_fixture_every_split_matches_serde() {
        let r = scan_all_splits(MULTI, 4096, CHAT.as_bytes());
        assert_eq!(r.0.len(), 2);
        assert!(r.1 && !r.2);
        assert_matches_serde(MULTI, CHAT.as_bytes(), &r.0);
    }

    #[test]
    fn embeddings_fixture_every_split_matches_serde() {
        let body = embeddings_body();
        assert!(body.len() > 1500);
        let r = scan_all_splits(MULTI, 4096, body.as_bytes());
        assert_eq!(
            r.0,
            vec![
                (0, Some(br#""text-embedding-3-small""#.to_vec())),
                (1, Some(br#"{"prompt_tokens":8,"total_tokens":8}"#.to_vec()))
            ]
        );
        assert_matches_serde(MULTI, body.as_bytes(), &r.0);
    }

    #[test]
    fn nested_usage_is_not_top_level() {
        for doc in [
            r#"{"a":{"usage":1}}"#,
            r#"{"choices":[{"message":{"content":"{\"usage\":1}"}}]}"#,
            r#"{"tool_calls":[{"function":{"arguments":"{\"usage\":{\"x\":1}}"}}]}"#,
            r#"{"list":[{"usage":1},{"usage":2}],"x":[[{"usage":3}]]}"#,
            r#"{"s":"\"usage\":1","t":"\\\"usage\\\":2"}"#,
            r#"{"message":{"a":{"usage":1}},"x":{"message":{"usage":2}}}"#,
        ] {
            assert_eq!(values(MULTI, doc), vec![], "{doc}");
            assert!(scan(MULTI, &[doc.as_bytes()]).1, "{doc}");
        }
        assert_eq!(
            values(USAGE, r#"{"choices":[{"message":{"content":"{\"usage\":1}"}}],"usage":{"total_tokens":3}}"#),
            vec![v(0, r#"{"total_tokens":3}"#)]
        );
    }

    #[test]
    fn paths_only_descend_through_objects() {
        assert_eq!(values(MULTI, r#"{"message":[{"usage":1}],"usage":2}"#), vec![v(1, "2")]);
        assert_eq!(values(MULTI, r#"{"message":"usage","usage":2}"#), vec![v(1, "2")]);
        assert_eq!(values(MULTI, r#"{"message":null,"message":{"usage":5}}"#), vec![v(2, "5")]);
    }

    #[test]
    fn scalar_values_null_strings_and_literals() {
        assert_eq!(values(USAGE, r#"{"usage":null}"#), vec![v(0, "null")]);
        assert_eq!(values(USAGE, r#"{"usage" : true }"#), vec![v(0, "true")]);
        assert_eq!(values(USAGE, r#"{"usage":-1.5e+3,"x":1}"#), vec![v(0, "-1.5e+3")]);
        assert_eq!(values(USAGE, r#"{"usage":"a\"b\\"}"#), vec![v(0, r#""a\"b\\""#)]);
        assert_eq!(values(USAGE, r#"{"usage":[1,{"a":"]"}]}"#), vec![v(0, r#"[1,{"a":"]"}]"#)]);
        assert_eq!(values(USAGE, r#"{"usage":{}}"#), vec![v(0, "{}")]);
    }

    #[test]
    fn duplicate_keys_are_each_reported() {
        assert_eq!(
            values(USAGE, r#"{"usage":null,"x":1,"usage":{"total_tokens":2},"usage":3}"#),
            vec![v(0, "null"), v(0, r#"{"total_tokens":2}"#), v(0, "3")]
        );
    }

    #[test]
    fn escapes_and_braces_in_strings_before_the_key() {
        let doc = r#"{"a":"x\"}y\\","b":"\\\\","c":"\\\"usage\\\":","d":"{[}]","e":"\u0022","usage":7}"#;
        assert_eq!(values(USAGE, doc), vec![v(0, "7")]);
        let r = scan_all_splits(USAGE, 64, doc.as_bytes());
        assert_matches_serde(USAGE, doc.as_bytes(), &r.0);
    }

    #[test]
    fn keys_are_compared_decoded() {
        static PATHS: &[&[&str]] = &[&["usage"], &["a/b\"c\\"], &["k\u{e9}\u{1F600}y"], &["tab\t"]];
        let doc = r#"{"\u0075sage":1,"us\u0061ge":2,"u\u0073\u0061\u0067\u0065":3,"a\/b\"c\\":4,"k\u00e9\ud83d\ude00y":5,"kéy":6,"k\u00E9😀y":7,"tab\t":8,"\u0055sage":9}"#;
        assert_eq!(
            values(PATHS, doc),
            vec![v(0, "1"), v(0, "2"), v(0, "3"), v(1, "4"), v(2, "5"), v(2, "7"), v(3, "8")]
        );
        let r = scan_all_splits(PATHS, 64, doc.as_bytes());
        assert_eq!(r.0.len(), 7);
        assert_matches_serde(PATHS, doc.as_bytes(), &r.0);
    }

    #[test]
    fn bad_or_long_keys_do_not_match() {
        let doc = r#"{"\ud800usage":1,"\udc00":2,"\ud83dusage":3,"\u00zzusage":4,"\xusage":5,"usageusage":6,"usag":7,"\ud83d\u0041":8,"":9,"usage":10}"#;
        assert_eq!(values(USAGE, doc), vec![v(0, "10")]);
        scan_all_splits(USAGE, 64, doc.as_bytes());
        // A huge key is not buffered.
        let long = format!(r#"{{"{}":1,"usage":2}}"#, "k".repeat(100_000));
        let mut s = JsonScanner::new(USAGE, 64);
        let mut max_carry = 0;
        let mut r = Vec::new();
        for c in long.as_bytes().chunks(10) {
            r.extend(scan_with(&mut s, &[c]));
            max_carry = max_carry.max(s.carry_len());
        }
        assert_eq!(r, vec![(0, Some(b"2".to_vec()))]);
        assert!(max_carry <= "usage".len(), "carry {max_carry}");
    }

    #[test]
    fn values_split_at_chunk_ends() {
        let (r, complete, _) = scan(USAGE, &[b"{\"usage\":12", b"34", b"}"]);
        assert_eq!((r, complete), (vec![(0, Some(b"1234".to_vec()))], true));
        let (r, _, _) = scan(USAGE, &[b"{\"usage\":tr", b"ue", b" }"]);
        assert_eq!(r, vec![(0, Some(b"true".to_vec()))]);
        let (r, _, _) = scan(USAGE, &[b"{\"us", b"age\"", b":\"a\\", b"\"b\"", b"}"]);
        assert_eq!(r, vec![(0, Some(br#""a\"b""#.to_vec()))]);
        // A number at the very end of a chunk is not reported until its delimiter arrives.
        let mut s = JsonScanner::new(USAGE, 64);
        assert!(scan_with(&mut s, &[b"{\"usage\":5"]).is_empty());
        assert_eq!(s.carry_len(), 1);
        assert_eq!(scan_with(&mut s, &[b"}"]), vec![(0, Some(b"5".to_vec()))]);
        assert_eq!(s.carry_len(), 0);
    }

    #[test]
    fn whitespace_everywhere() {
        let doc = " \r\n\t{ \"model\" \n:\t\"m\" , \"message\" : { \"usage\" : [ 1 , 2 ] } ,\"usage\"\r\n:\r\n{ \"a\" : 1 }\n}\n ";
        assert_eq!(values(MULTI, doc), vec![v(0, "\"m\""), v(2, "[ 1 , 2 ]"), v(1, "{ \"a\" : 1 }")]);
        let r = scan_all_splits(MULTI, 64, doc.as_bytes());
        assert_matches_serde(MULTI, doc.as_bytes(), &r.0);
    }

    #[test]
    fn deep_nesting_costs_nothing() {
        let n = 100_000;
        for (open, close) in [("[", "]"), ("{\"usage\":", "}")] {
            let doc = format!("{{\"a\":{}1{},\"usage\":{{\"total_tokens\":1}}}}", open.repeat(n), close.repeat(n));
            let mut s = JsonScanner::new(USAGE, 64);
            let mut r = Vec::new();
            for c in doc.as_bytes().chunks(4096) {
                r.extend(scan_with(&mut s, &[c]));
                assert_eq!(s.carry_len(), 0);
            }
            assert_eq!(r, vec![(0, Some(br#"{"total_tokens":1}"#.to_vec()))]);
            assert!(s.is_complete());
        }
        // Deep nesting inside a parsed object on a path.
        let doc = format!("{{\"message\":{{\"x\":{}{},\"usage\":4}}}}", "[".repeat(n), "]".repeat(n));
        assert_eq!(values(MULTI, &doc), vec![v(2, "4")]);
        // Deep top-level arrays are just malformed.
        let (r, _, malformed) = scan(USAGE, &["[".repeat(n).as_bytes()]);
        assert!(r.is_empty() && malformed);
    }

    #[test]
    fn a_top_level_array_scans_each_object_as_a_root() {
        // Gemini's streamGenerateContent without alt=sse: a JSON array of response chunks.
        let doc = r#" [{"usage":1,"x":{"usage":9}} , {"usage":{"n":2}}]"#;
        for i in 0..=doc.len() {
            let (a, b) = doc.as_bytes().split_at(i);
            let (r, complete, malformed) = scan(USAGE, &[a, b]);
            assert_eq!(r, vec![(0, Some(b"1".to_vec())), (0, Some(br#"{"n":2}"#.to_vec()))], "split at {i}");
            assert!(complete && !malformed);
        }
        let (r, complete, _) = scan(USAGE, &[b"[]"]);
        assert!(r.is_empty() && complete);
    }

    #[test]
    fn non_objects_are_malformed_and_find_nothing() {
        for doc in [
            "[DONE]",
            "[[{\"usage\":1}]]",
            "[1]",
            "[\"usage\"]",
            "42",
            "\"usage\"",
            "null",
            "true",
            "<html>{\"usage\":1}</html>",
            "}",
            "{]",
            "{\"a\":1]",
            "{\"a\" 1}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":1 \"usage\":2}",
            "{usage:1}",
            "{\"a\":\u{e9}}",
            "\u{FEFF}\u{FEFF}{}",
            "\u{EF}{}",
        ] {
            let (r, complete, malformed) = scan(USAGE, &[doc.as_bytes()]);
            assert!(r.is_empty() && !complete && malformed, "{doc}");
            let mut s = JsonScanner::new(USAGE, 64);
            scan_with(&mut s, &[doc.as_bytes()]);
            // Ignored until reset.
            assert!(scan_with(&mut s, &[b"{\"usage\":1}"]).is_empty());
            s.reset();
            assert_eq!(scan_with(&mut s, &[b"{\"usage\":1}"]), vec![(0, Some(b"1".to_vec()))]);
        }
        // Values reported before the garbage stay reported.
        let (r, _, malformed) = scan(USAGE, &[b"{\"usage\":1,]"]);
        assert_eq!((r, malformed), (vec![(0, Some(b"1".to_vec()))], true));
        // Not enough input is neither complete nor malformed.
        for doc in ["", "  ", "{", "{\"usage\":{\"a\":1}", "\u{FEFF}"] {
            let (_, complete, malformed) = scan(USAGE, &[doc.as_bytes()]);
            assert!(!complete && !malformed, "{doc}");
        }
    }

    #[test]
    fn bom_and_trailing_data() {
        let doc = b"\xEF\xBB\xBF{\"usage\":1} {\"usage\":2} garbage ]";
        let r = scan_all_splits(USAGE, 64, doc);
        assert_eq!(r, (vec![(0, Some(b"1".to_vec()))], true, false));
    }

    #[test]
    fn too_large_values_are_skipped_and_dropped() {
        let max = 32;
        let exact = format!("\"{}\"", "x".repeat(max - 2));
        let over = format!("[{}]", "1,".repeat(max));
        let doc = format!(r#"{{"usage":{exact},"usage":{over},"model":"m","usage":{{"deep":{over}}},"usage":1}}"#);
        let r = scan_all_splits(USAGE, max, doc.as_bytes());
        assert_eq!(r.0, vec![(0, Some(exact.into_bytes())), (0, None), (0, None), (0, Some(b"1".to_vec()))]);
        assert!(r.1);
        // A huge value split in many chunks keeps the carry bounded.
        let huge = format!(r#"{{"usage":"{}","usage":2}}"#, "y".repeat(1 << 20));
        let mut s = JsonScanner::new(USAGE, 1024);
        let mut out = Vec::new();
        for c in huge.as_bytes().chunks(1000) {
            out.extend(scan_with(&mut s, &[c]));
            assert!(s.carry_len() <= 1024);
        }
        assert_eq!(out, vec![(0, None), (0, Some(b"2".to_vec()))]);
        // Same whole: no copy needed, still too large.
        let (r, _, _) = scan(USAGE, &[huge.as_bytes()]);
        assert_eq!(r, vec![(0, None), (0, Some(b"2".to_vec()))]);
    }

    #[test]
    fn multiple_paths() {
        let doc = r#"{"type":"message_start","message":{"id":"msg_1","model":"claude-x","content":[],"usage":{"input_tokens":25,"output_tokens":1}},"model":"top","usage":null}"#;
        assert_eq!(
            values(MULTI, doc),
            vec![v(2, r#"{"input_tokens":25,"output_tokens":1}"#), v(0, "\"top\""), v(1, "null")]
        );
        let r = scan_all_splits(MULTI, 4096, doc.as_bytes());
        assert_matches_serde(MULTI, doc.as_bytes(), &r.0);
    }

    #[test]
    fn longer_paths_and_prefixes() {
        static DEEP: &[&[&str]] = &[&["a", "b", "c"], &["a", "x"], &["response", "usage"], &["a", "b", "d", "e"]];
        let doc = r#"{"a":{"b":{"d":{"e":1},"c":2,"x":3},"x":4,"b":{"c":5}},"response":{"usage":{"input_tokens":9}}}"#;
        assert_eq!(values(DEEP, doc), vec![v(3, "1"), v(0, "2"), v(1, "4"), v(0, "5"), v(2, r#"{"input_tokens":9}"#)]);
        scan_all_splits(DEEP, 4096, doc.as_bytes());
        // (A full parse keeps only the last `"b"`, so compare with serde without duplicates.)
        let doc = r#"{"a":{"b":{"d":{"e":1},"c":2,"x":3},"x":4},"response":{"usage":{"input_tokens":9}}}"#;
        let r = scan_all_splits(DEEP, 4096, doc.as_bytes());
        assert_eq!(r.0.len(), 4);
        assert_matches_serde(DEEP, doc.as_bytes(), &r.0);
        // A path that is a prefix of another: the shorter one is captured whole.
        static OVERLAP: &[&[&str]] = &[&["message", "usage"], &["message"]];
        assert_eq!(values(OVERLAP, r#"{"message":{"usage":1}}"#), vec![v(1, r#"{"usage":1}"#)]);
        // No paths at all.
        static NONE: &[&[&str]] = &[];
        let (r, complete, _) = scan(NONE, &[CHAT.as_bytes()]);
        assert!(r.is_empty() && complete);
    }

    #[test]
    fn reset_starts_a_new_document() {
        let mut s = JsonScanner::new(USAGE, 64);
        assert!(scan_with(&mut s, &[b"{\"usage\":{\"a\":\"\\"]).is_empty());
        assert!(s.carry_len() > 0);
        s.reset();
        assert_eq!(s.carry_len(), 0);
        assert!(!s.is_complete() && !s.is_malformed());
        assert_eq!(scan_with(&mut s, &[b"{\"usage\":2}"]), vec![(0, Some(b"2".to_vec()))]);
        assert!(s.is_complete());
        s.reset();
        assert!(!s.is_complete());
    }

    #[test]
    fn find_nest_byte_agrees_with_a_plain_search() {
        let mut x: u64 = 99;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|k| {
                    let r = x.rotate_left(k as u32 * 7);
                    if r % 5 == 0 {
                        b"\"{}[]Y_y\x7f\xdb\xfb\xdd\xfd"[(r / 5 % 13) as usize]
                    } else {
                        (r >> 8) as u8
                    }
                })
                .collect();
            assert_eq!(find_nest_byte(&bytes), bytes.iter().position(|&b| is_nest_byte(b)), "{bytes:?}");
        }
    }

    /// Random documents built mostly from JSON tokens, garbage and invalid UTF-8 included.
    fn random_doc(rng: &mut Rng) -> Vec<u8> {
        const TOKENS: &[&[u8]] = &[
            b"{",
            b"}",
            b"[",
            b"]",
            b":",
            b",",
            b"\"",
            b"\\",
            b"\"usage\"",
            b"\"model\"",
            b"\"message\"",
            b"1",
            b"-2.5e3",
            b"null",
            b"true",
            b" ",
            b"\n",
            b"\\u0075",
            b"\\ud83d",
            b"\xff",
            b"\xef\xbb\xbf",
            b"x",
            b"\"a\":",
        ];
        let len = rng.below(60);
        let mut doc = if rng.below(3) > 0 { b"{".to_vec() } else { Vec::new() };
        for _ in 0..len {
            if rng.below(10) == 0 {
                doc.push(rng.next() as u8);
            } else {
                doc.extend_from_slice(TOKENS[rng.below(TOKENS.len())]);
            }
        }
        doc
    }

    #[test]
    fn random_input_never_panics_and_ignores_chunking() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..3000 {
            let doc = random_doc(&mut rng);
            let max = 1 + rng.below(16);
            let run = |chunks: &[&[u8]]| {
                let mut s = JsonScanner::new(MULTI, max);
                let mut r = Vec::new();
                for c in chunks {
                    r.extend(scan_with(&mut s, &[c]));
                    assert!(s.carry_len() <= max + "message".len());
                }
                (r, s.is_complete(), s.is_malformed())
            };
            let whole = run(&[&doc]);
            let (a, b) = doc.split_at(rng.below(doc.len() + 1));
            assert_eq!(run(&[a, b]), whole, "{doc:?}");
            let bytes: Vec<&[u8]> = doc.chunks(1).collect();
            assert_eq!(run(&bytes), whole, "{doc:?}");
            // Anything reported as a value from a document serde accepts must agree with it.
            let valid = serde_json::from_slice::<Value>(&doc).is_ok_and(|v| v.is_object());
            if valid && whole.0.iter().all(|(_, raw)| raw.is_some()) {
                assert_matches_serde(MULTI, &doc, &whole.0);
            }
        }
    }

    /// Random JSON values shaped like API responses, for a differential check with serde_json.
    fn random_value(rng: &mut Rng, depth: usize) -> Value {
        const KEYS: &[&str] = &["usage", "model", "message", "content", "a", "us\"age", "é", "tab\t", "😀", "\\"];
        const STRS: &[&str] = &["", "x", "\"usage\":{", "\\", "}]", "\u{1}\n", "日本", "😀\"\\/"];
        match rng.below(if depth > 4 { 4 } else { 7 }) {
            0 => Value::Null,
            1 => Value::from(rng.next() as i64 >> rng.below(64)),
            2 => Value::from(STRS[rng.below(STRS.len())]),
            3 => Value::Bool(rng.below(2) == 0),
            4 => Value::from((rng.next() % 100_000) as f64 / 7.0),
            5 => Value::Array((0..rng.below(4)).map(|_| random_value(rng, depth + 1)).collect()),
            _ => Value::Object(
                (0..rng.below(6))
                    .map(|_| (KEYS[rng.below(KEYS.len())].to_string(), random_value(rng, depth + 1)))
                    .collect(),
            ),
        }
    }

    #[test]
    fn random_documents_agree_with_serde() {
        let mut rng = Rng(0xDEAD_BEEF_CAFE_F00D);
        for k in 0..1500 {
            let mut top = serde_json::Map::new();
            for _ in 0..rng.below(6) {
                let key = ["usage", "model", "message", "x"][rng.below(4)];
                top.insert(key.to_string(), random_value(&mut rng, 1));
            }
            let value = Value::Object(top);
            let doc = if k % 2 == 0 { serde_json::to_vec(&value) } else { serde_json::to_vec_pretty(&value) }.unwrap();
            let mut s = JsonScanner::new(MULTI, 1 << 20);
            let whole = scan_with(&mut s, &[&doc]);
            assert!(s.is_complete());
            assert_matches_serde(MULTI, &doc, &whole);
            let mut s = JsonScanner::new(MULTI, 1 << 20);
            let (a, b) = doc.split_at(rng.below(doc.len() + 1));
            assert_eq!(scan_with(&mut s, &[a, b]), whole);
        }
    }
}
