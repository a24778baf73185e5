//! Event templates: the JSON scan of an SSE event is skipped when the event provably scans like
//! one already scanned.
//!
//! A stream repeats one event shape hundreds of times. OpenAI's chunks differ only in their
//! content delta (and `obfuscation` padding), Anthropic's `content_block_delta` events only in
//! their text, the Responses API's deltas also in `sequence_number`. Their per-event JSON scan
//! ([`JsonScanner`]) costs several times the SSE framing, yet finds nothing new: a
//! `"usage":null`, the model already decoded.
//!
//! A template is the data of an event that was scanned in full, was a complete JSON object and
//! whose every finding changed nothing (usage `null`, the `model` already decoded), with its
//! *opaque spans*: the bytes the JSON scanner reads only to find where they end. They are the
//! contents of strings it skips (up to the closing quote), numbers and literals it skips (up to
//! their first byte that cannot be in one) and the inside of arrays and objects it skips, outside
//! their strings (up to the next quote or bracket). Which values are skipped is decided by the
//! top-level keys, so a span never lies in a top-level key, in the value of a key a path starts
//! with (`usage`, `model`, `message`, `response`, `usageMetadata`, `modelVersion`), or in the
//! value of a key written with escapes; those bytes, the structure and the whitespace between
//! values are *fixed*.
//!
//! The next event is compared with the template, sixteen bytes at a time. Where they differ, the
//! template must be inside an opaque span: the event's bytes are then skimmed to where that span's
//! kind ends (the closing quote, with escapes; the end of the number; the next quote or bracket),
//! the template jumps to where its own span ends, and the comparison goes on. An event that
//! reaches the end of the template this way is one the JSON scanner reads through the same states
//! as the template, position for position at every fixed byte, since it only differs in bytes the
//! scanner passes over without looking: it finds the same values in the same fixed bytes (no-ops,
//! as long as the model has not changed since), and it is as complete. So its scan is skipped, and
//! nothing about it is counted or kept.
//!
//! Any other event (a difference in a fixed byte, an event longer or shorter than the template)
//! falls back to the full scan where the difference is: of the whole event if all of it so far is
//! in the piece at hand (events usually come whole). If earlier pieces are gone, the JSON scanner
//! is first fed the template up to that point, which takes it to the state the event's own bytes
//! so far would have (they scan alike, see above), then the rest of the event: nothing of the
//! event has to be kept, and its scan costs what it did without templates (plus the comparison).
//! An event that ends while it matches but before the template does is, likewise, given the state
//! its scan would end in. So whatever the event and however it is cut, the findings, the skips
//! counted and the JSON scanner's state are those of the full scan.
//!
//! An event scanned in full becomes the next template if it was a complete object whose findings
//! changed nothing, and if it is recorded: when there is no template for the current model, or
//! when the template missed the event before as well (one odd event, a `ping` among deltas, does
//! not replace it; of two shapes that alternate, one keeps matching), unless recording pauses,
//! which it does after templates were replaced before they paid for themselves (a stream whose
//! events rarely share a shape), for longer each time. That only decides how often events match.
//!
//! Bounds: the template, and the copy of the event being scanned that may replace it, are at most
//! [`MAX_TEMPLATE`] bytes each (longer events are scanned in full and never become templates) and
//! a template has at most [`MAX_SPANS`] spans: [`TEMPLATE_BYTES`] in all, whatever the stream. The
//! state of the event being matched is a few offsets, held inline.

use crate::scan::json_scan::{find_nest_byte, find_quote, is_nest_byte, is_scalar, is_ws, Found, JsonScanner};

/// Largest event data kept as a template. Real delta events are 150–500 bytes.
pub const MAX_TEMPLATE: usize = 1024;
/// Most opaque spans a template may have (a 500 byte OpenAI chunk has about 30).
pub const MAX_SPANS: usize = 64;
/// The heap a stream's templates may hold at most: the template, the event copy that may replace
/// it and the template's spans.
pub const TEMPLATE_BYTES: usize = 2 * MAX_TEMPLATE + MAX_SPANS * std::mem::size_of::<Span>();

/// What the JSON scanner does with the bytes of an opaque span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The content of a string it skips: it looks for the closing quote only.
    Str,
    /// A number or literal it skips: it looks for the first byte that cannot be in one.
    Scalar,
    /// The inside of an array or object it skips, outside strings: it counts brackets only.
    Nest,
}

/// An opaque span of the template: `start..=end`, where `end` is the byte the scanner finds its
/// end at (the closing quote, the delimiter after a number, the quote or bracket that ends a run
/// of a container). A difference from the event at any of these positions can be skimmed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u16,
    end: u16,
    kind: Kind,
}

/// Where the event stands while the template is skimmed over an opaque span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skim {
    /// Comparing byte for byte.
    No,
    /// In the content of an opaque string that started to differ at template position `from`,
    /// where the template had an unpaired backslash just before if `from_esc`. `esc`: the event's
    /// last byte is an unpaired backslash. The template goes on at its closing quote, `to`.
    Str { from: usize, from_esc: bool, esc: bool, to: usize },
    /// In an opaque number or literal that started to differ at `from` (the event has read at
    /// least one of its bytes); the template goes on at its delimiter, `to`.
    Scalar { from: usize, to: usize },
    /// Inside an opaque container, outside strings, since `from`; the template goes on at its
    /// next quote or bracket, `to`.
    Nest { from: usize, to: usize },
}

/// How the current event compares with the template so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    /// The event so far scans like `template[..t]` (when not skimming).
    t: usize,
    /// The first span that does not end before `t`.
    ix: usize,
    skim: Skim,
    /// Earlier pieces of the event were matched (and are gone).
    earlier: bool,
}

/// The current event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// No data yet.
    Idle,
    /// Compared with the template (see [`Templates::cursor`]); the JSON scanner has not seen it.
    Matching,
    /// Scanned in full.
    Scanning,
}

/// A stream's template, and how its current event compares with it.
#[derive(Debug)]
pub(crate) struct Templates {
    /// Off: every event is scanned in full (the reference the tests compare with).
    enabled: bool,
    /// Paths of the JSON scanner: a top-level key that starts one has a fixed value.
    paths: &'static [&'static [&'static str]],
    /// The template's data; empty when there is none.
    template: Vec<u8>,
    spans: Vec<Span>,
    /// The model generation the template was recorded at: its findings are no-ops for that model
    /// only.
    model_gen: u64,
    /// A copy of the event being scanned in full (the template's bytes standing for the part of
    /// it matched in earlier pieces), the next template if it qualifies.
    candidate: Vec<u8>,
    /// `candidate` holds the whole event so far and every finding in it changed nothing.
    recording: bool,
    event: Event,
    /// How the event compares with the template, while `Matching`. (Not inside [`Event`]: the
    /// event is set up field by field, which compiles to far fewer memory moves per event.)
    cursor: Cursor,
    /// Events that matched the template since it was recorded.
    hits: u32,
    /// Events in a row that did not match the template.
    misses: u8,
    /// Templates in a row replaced before they paid for themselves (at most [`MAX_WASTED`]).
    wasted: u8,
    /// Events left that are not recorded: after `wasted` templates in a row, 2^`wasted` - 1.
    pause: u8,
    /// Events that matched the template whole, for tests.
    matched: u64,
}

/// Bound of [`Templates::wasted`]: a stream whose events never have the shape of the one
/// before records one event in 64 at most.
const MAX_WASTED: u8 = 6;
/// Matches a template must have had when replaced not to count as wasted: recording one (a copy
/// and a listing of its spans) costs about what matching saves on two events.
const PAID_HITS: u32 = 2;

impl Templates {
    /// No template yet. `paths`: the JSON scanner's; `enabled`: false to scan every event in full.
    pub(crate) fn new(paths: &'static [&'static [&'static str]], enabled: bool) -> Self {
        Self {
            enabled,
            paths,
            template: Vec::new(),
            spans: Vec::new(),
            model_gen: 0,
            candidate: Vec::new(),
            recording: false,
            event: Event::Idle,
            cursor: Cursor::START,
            hits: 0,
            misses: 0,
            wasted: 0,
            pause: 0,
            matched: 0,
        }
    }

    /// Events that matched the template whole so far.
    pub(crate) fn matched(&self) -> u64 {
        self.matched
    }

    /// Heap bytes held (at most [`TEMPLATE_BYTES`]: each buffer is allocated once, at its bound).
    pub(crate) fn held_len(&self) -> usize {
        self.template.capacity() + self.candidate.capacity() + self.spans.capacity() * std::mem::size_of::<Span>()
    }

    /// Next bytes of the current event's data. Compared with the template while they match it;
    /// otherwise fed to `json` (from the event's start, or after the template's bytes that stand
    /// for the part matched in earlier pieces), whose findings go to `absorb`, which returns true
    /// when a finding changed nothing. `model_gen` counts the model changes so far.
    pub(crate) fn data<F: FnMut(Found<'_>) -> bool>(
        &mut self,
        bytes: &[u8],
        model_gen: u64,
        json: &mut JsonScanner,
        mut absorb: F,
    ) {
        if self.event == Event::Idle {
            self.start(model_gen);
        }
        let rest = match self.event {
            Event::Matching => {
                let cursor = &mut self.cursor;
                let earlier = cursor.earlier;
                let Some(n) = cursor.advance(&self.template, &self.spans, bytes) else {
                    cursor.earlier = true;
                    return;
                };
                // The event differs in a fixed byte: scanned in full from here on.
                let t = cursor.t;
                self.event = Event::Scanning;
                self.candidate.clear();
                if earlier {
                    // Its earlier pieces are gone: the template's `..t`, where `bytes[..n]`
                    // brought the event, takes the scanner to the same state.
                    let prefix = self.template.get(..t).unwrap_or_default();
                    record(&mut self.candidate, &mut self.recording, prefix);
                    let recording = &mut self.recording;
                    json.feed(prefix, |f| *recording &= absorb(f));
                    bytes.get(n..).unwrap_or_default()
                } else {
                    // All of it is in this piece: scanned from its start.
                    bytes
                }
            }
            Event::Scanning | Event::Idle => bytes,
        };
        let recording = &mut self.recording;
        json.feed(rest, |f| *recording &= absorb(f));
        record(&mut self.candidate, &mut self.recording, rest);
    }

    /// The current event ended. True if it matched the template whole: its full scan would have
    /// ended complete and found nothing new, and `json` was not used. Otherwise `json` is in the
    /// state the event's full scan leaves; if that is complete and found nothing new, the event
    /// becomes the template.
    pub(crate) fn dispatch<F: FnMut(Found<'_>) -> bool>(
        &mut self,
        json: &mut JsonScanner,
        model_gen: u64,
        mut absorb: F,
    ) -> bool {
        match std::mem::replace(&mut self.event, Event::Idle) {
            Event::Idle => false,
            Event::Matching => {
                let cursor = &self.cursor;
                if cursor.skim == Skim::No && cursor.t == self.template.len() {
                    self.matched = self.matched.saturating_add(1);
                    self.hits = self.hits.saturating_add(1);
                    // (`start` counted it as a miss.)
                    self.misses = 0;
                    return true;
                }
                // Shorter than the template, or cut inside an opaque span: what its scan would say.
                cursor.replay(&self.template, |piece| {
                    json.feed(piece, |f| {
                        absorb(f);
                    })
                });
                false
            }
            Event::Scanning => {
                if self.recording && json.is_complete() {
                    self.adopt(model_gen);
                }
                self.recording = false;
                self.candidate.clear();
                false
            }
        }
    }

    /// How the next event is read: matched if there is a template for the current model, and
    /// whether it is recorded (see the module doc: when there is no template for the model, or
    /// the template missed the event before too, and recording does not pause).
    fn start(&mut self, model_gen: u64) {
        let valid = self.enabled && !self.template.is_empty() && self.model_gen == model_gen;
        self.candidate.clear();
        self.recording = self.enabled && (!valid || (self.misses > 0 && self.pause == 0));
        self.pause = self.pause.saturating_sub(1);
        if !valid {
            self.event = Event::Scanning;
            return;
        }
        // A miss until it matches whole.
        self.misses = self.misses.saturating_add(1);
        self.event = Event::Matching;
        self.cursor = Cursor::START;
    }

    /// The candidate becomes the template, if its spans can be listed. Replacing a template that
    /// did not pay for itself pauses recording: 1, 3, 7 … 63 events, as it happens in a row.
    fn adopt(&mut self, model_gen: u64) {
        if !self.template.is_empty() && self.model_gen == model_gen {
            if self.hits < PAID_HITS {
                self.wasted = self.wasted.saturating_add(1).min(MAX_WASTED);
                self.pause = (1 << self.wasted) - 1;
            } else {
                self.wasted = 0;
            }
        }
        self.hits = 0;
        self.misses = 0;
        self.spans.clear();
        if opaque_spans(&self.candidate, self.paths, &mut self.spans).is_some() {
            std::mem::swap(&mut self.template, &mut self.candidate);
            self.model_gen = model_gen;
        } else {
            self.template.clear();
            self.spans.clear();
        }
    }
}

/// Appends `bytes` to the event copy while it is being recorded and fits. The copy is allocated
/// at its bound once (and handed to the template and back), so it never grows past it.
fn record(candidate: &mut Vec<u8>, recording: &mut bool, bytes: &[u8]) {
    if !*recording {
        return;
    }
    let room = candidate.capacity() >= MAX_TEMPLATE || candidate.try_reserve_exact(MAX_TEMPLATE).is_ok();
    if !room || candidate.len().saturating_add(bytes.len()) > MAX_TEMPLATE {
        *recording = false;
        candidate.clear();
        return;
    }
    candidate.extend_from_slice(bytes);
}

impl Cursor {
    /// At the start of the event and of the template.
    const START: Cursor = Cursor { t: 0, ix: 0, skim: Skim::No, earlier: false };

    /// Compares the next bytes of the event. `None`: they all match (byte for byte, or skimmed
    /// over an opaque span). `Some(n)`: `bytes[n]` differs from the template at `self.t` where
    /// no span allows it; `bytes[..n]` brought the event where `template[..self.t]` brings the
    /// scanner.
    fn advance(&mut self, template: &[u8], spans: &[Span], bytes: &[u8]) -> Option<usize> {
        let mut n = 0;
        loop {
            let rest = bytes.get(n..).unwrap_or_default();
            match &mut self.skim {
                Skim::No => {
                    let same = common_prefix(rest, template.get(self.t..).unwrap_or_default());
                    n += same;
                    self.t += same;
                    let &b = bytes.get(n)?;
                    match self.resync(template, spans, b) {
                        Some(skim) => self.skim = skim,
                        None => return Some(n),
                    }
                }
                Skim::Str { esc, to, .. } => {
                    let end = string_end(rest, esc)?;
                    n += end;
                    self.t = *to;
                    self.skim = Skim::No;
                }
                Skim::Scalar { to, .. } => {
                    let end = rest.iter().position(|&c| !is_scalar(c))?;
                    n += end;
                    self.t = *to;
                    self.skim = Skim::No;
                }
                Skim::Nest { to, .. } => {
                    let end = find_nest_byte(rest)?;
                    n += end;
                    self.t = *to;
                    self.skim = Skim::No;
                }
            }
        }
    }

    /// The event's byte `b` differs from the template's at `self.t`: how to skim over it, if the
    /// template is in an opaque span there. Every skim moves the event or the template on, and
    /// ends on a byte the scanner reads alike in both (a quote; a delimiter or bracket compared
    /// next), so a difference is never skimmed twice.
    fn resync(&mut self, template: &[u8], spans: &[Span], b: u8) -> Option<Skim> {
        let t = self.t;
        let mut ix = self.ix;
        while spans.get(ix).is_some_and(|s| usize::from(s.end) < t) {
            ix += 1;
        }
        self.ix = ix;
        let span = spans.get(ix).filter(|s| usize::from(s.start) <= t)?;
        let to = usize::from(span.end);
        match span.kind {
            Kind::Str => {
                // An unpaired backslash right before `t` escapes the event's byte too.
                let content = template.get(usize::from(span.start)..t).unwrap_or_default();
                let from_esc = content.iter().rev().take_while(|&&c| c == b'\\').count() % 2 == 1;
                Some(Skim::Str { from: t, from_esc, esc: from_esc, to })
            }
            // The event's number ends here where the template's goes on, or the event has no
            // number where the template has one: not alike.
            Kind::Scalar => is_scalar(b).then_some(Skim::Scalar { from: t, to }),
            Kind::Nest => {
                let &c = template.get(t)?;
                // Two different brackets or quotes: not alike.
                if is_nest_byte(b) && is_nest_byte(c) {
                    return None;
                }
                let next = find_nest_byte(template.get(t..=to)?)?;
                Some(Skim::Nest { from: t, to: t + next })
            }
        }
    }

    /// Feeds `feed` the bytes that take a fresh JSON scanner where the event's bytes so far took
    /// it: the template up to where they match, then, inside a span being skimmed, stand-ins for
    /// the state the event is in there (content bytes do not matter to the scanner in a skipped
    /// string, only whether a backslash is pending; in a number, that one was started).
    fn replay(&self, template: &[u8], mut feed: impl FnMut(&[u8])) {
        let upto = |t: usize| template.get(..t).unwrap_or_default();
        match self.skim {
            Skim::No => feed(upto(self.t)),
            Skim::Str { from, from_esc, esc, .. } => {
                feed(upto(from));
                if from_esc {
                    feed(b"x");
                }
                if esc {
                    feed(b"\\");
                }
            }
            Skim::Scalar { from, .. } => {
                feed(upto(from));
                feed(b"0");
            }
            Skim::Nest { from, .. } => feed(upto(from)),
        }
    }
}

/// Length of the common prefix of `a` and `b`, sixteen bytes at a time (one SIMD comparison on
/// the filter's wasm target, whose `u128` is two 64-bit halves).
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline]
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    use core::arch::wasm32::{u64x2, u8x16_bitmask, u8x16_eq};
    let halves = |s: &[u8]| u64x2(half(s.get(..8).unwrap_or_default()), half(s.get(8..).unwrap_or_default()));
    let mut n = 0;
    for (x, y) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        // Bit `k` set where byte `k` is equal.
        let equal = u8x16_bitmask(u8x16_eq(halves(x), halves(y)));
        if equal != u16::MAX {
            return n + equal.trailing_ones() as usize;
        }
        n += 16;
    }
    n + tail_prefix(a.get(n..).unwrap_or_default(), b.get(n..).unwrap_or_default())
}

/// Eight bytes as a little-endian word.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(always)]
fn half(s: &[u8]) -> u64 {
    u64::from_le_bytes(<[u8; 8]>::try_from(s).unwrap_or_default())
}

/// Length of the common prefix of `a` and `b`, sixteen bytes at a time.
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
#[inline]
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let mut n = 0;
    for (x, y) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        let diff = word(x) ^ word(y);
        if diff != 0 {
            return n + (diff.trailing_zeros() / 8) as usize;
        }
        n += 16;
    }
    n + tail_prefix(a.get(n..).unwrap_or_default(), b.get(n..).unwrap_or_default())
}

/// The common prefix of the last (fewer than sixteen) bytes.
#[inline(always)]
fn tail_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(p, q)| p == q).count()
}

/// Sixteen bytes as a little-endian word (the first differing byte is the lowest set one).
#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
#[inline(always)]
fn word(s: &[u8]) -> u128 {
    u128::from_le_bytes(<[u8; 16]>::try_from(s).unwrap_or_default())
}

/// Where the string whose content `s` continues ends: the index of its closing quote. `esc`: the
/// byte before `s` was an unpaired backslash; updated when the string goes on past `s`.
fn string_end(s: &[u8], esc: &mut bool) -> Option<usize> {
    let mut i = 0;
    if *esc {
        if s.is_empty() {
            return None;
        }
        *esc = false;
        i = 1;
    }
    loop {
        let p = i + find_quote(s.get(i..).unwrap_or_default())?;
        if s.get(p) == Some(&b'"') {
            return Some(p);
        }
        // A backslash: the next byte is escaped, wherever it is.
        if p + 1 >= s.len() {
            *esc = true;
            return None;
        }
        i = p + 2;
    }
}

/// Lists the opaque spans of `doc` into `spans`, in order: the event data of a complete JSON
/// object the scanner (with `paths`) read whole. `None` for anything this reading does not cover
/// (a byte order mark, a top-level array, more than [`MAX_SPANS`] spans): no template then.
///
/// It reads the top-level object as the scanner does, with the same byte classes: a key decides
/// whether its value is skipped (no escapes, and no path starts with it) or fixed. A skipped
/// string, number or literal is one span; a skipped container is cut at its strings into runs
/// and string contents. A fixed value is passed over by counting brackets outside strings, where
/// the scanner (which parses the objects on a path, and skips the rest the same way) ends it too.
fn opaque_spans(doc: &[u8], paths: &[&[&str]], spans: &mut Vec<Span>) -> Option<()> {
    // Allocated at its bound once: `span` never pushes past it.
    if spans.capacity() < MAX_SPANS {
        spans.try_reserve_exact(MAX_SPANS - spans.len()).ok()?;
    }
    let mut r = Reader { doc, spans };
    let mut i = r.ws(0);
    r.want(i, b'{')?;
    i = r.ws(i + 1);
    if doc.get(i) == Some(&b'}') {
        return Some(());
    }
    loop {
        r.want(i, b'"')?;
        let key_end = r.string_end(i + 1)?;
        let key = doc.get(i + 1..key_end)?;
        let skipped = !key.contains(&b'\\') && !paths.iter().any(|p| p.first().is_some_and(|k| k.as_bytes() == key));
        i = r.ws(key_end + 1);
        r.want(i, b':')?;
        i = r.value(r.ws(i + 1), skipped)?;
        i = r.ws(i);
        match doc.get(i)? {
            b',' => i = r.ws(i + 1),
            b'}' => return Some(()),
            _ => return None,
        }
    }
}

/// Reads a template's top-level object for [`opaque_spans`].
struct Reader<'a> {
    doc: &'a [u8],
    spans: &'a mut Vec<Span>,
}

impl Reader<'_> {
    fn ws(&self, mut i: usize) -> usize {
        while self.doc.get(i).is_some_and(|&b| is_ws(b)) {
            i += 1;
        }
        i
    }

    /// `Some` if the byte at `i` is `b`.
    fn want(&self, i: usize, b: u8) -> Option<()> {
        (self.doc.get(i) == Some(&b)).then_some(())
    }

    fn string_end(&self, from: usize) -> Option<usize> {
        Some(from + string_end(self.doc.get(from..)?, &mut false)?)
    }

    fn span(&mut self, start: usize, end: usize, kind: Kind) -> Option<()> {
        if self.spans.len() >= MAX_SPANS {
            return None;
        }
        let (start, end) = (u16::try_from(start).ok()?, u16::try_from(end).ok()?);
        self.spans.push(Span { start, end, kind });
        Some(())
    }

    /// The value at `i`; returns where it ends. Its spans are listed if it is `skipped`.
    fn value(&mut self, i: usize, skipped: bool) -> Option<usize> {
        match *self.doc.get(i)? {
            b'"' => {
                let end = self.string_end(i + 1)?;
                if skipped {
                    self.span(i + 1, end, Kind::Str)?;
                }
                Some(end + 1)
            }
            b'{' | b'[' => Some(self.container(i + 1, skipped)? + 1),
            b if is_scalar(b) => {
                let end = i + self.doc.get(i..)?.iter().position(|&c| !is_scalar(c))?;
                if skipped {
                    self.span(i, end, Kind::Scalar)?;
                }
                Some(end)
            }
            _ => None,
        }
    }

    /// The inside of a container from `from` (after its opening bracket); returns the index of
    /// its closing bracket.
    fn container(&mut self, from: usize, skipped: bool) -> Option<usize> {
        let mut nest = 1_u32;
        let (mut run, mut i) = (from, from);
        loop {
            let p = i + find_nest_byte(self.doc.get(i..)?)?;
            let c = *self.doc.get(p)?;
            if c == b'"' {
                let end = self.string_end(p + 1)?;
                if skipped {
                    self.span(run, p, Kind::Nest)?;
                    self.span(p + 1, end, Kind::Str)?;
                }
                i = end + 1;
                run = i;
            } else if c == b'{' || c == b'[' {
                nest = nest.saturating_add(1);
                i = p + 1;
            } else {
                nest = nest.saturating_sub(1);
                i = p + 1;
                if nest == 0 {
                    if skipped {
                        self.span(run, p, Kind::Nest)?;
                    }
                    return Some(p);
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "template_tests.rs"]
mod differential;

#[cfg(test)]
mod tests {
    use super::*;

    static PATHS: &[&[&str]] = &[&["usage"], &["model"]];

    // README and docs/configuration.md say a stream's templates hold 2.4 KiB at most: the tests
    // do not build if they hold more.
    const _: () = assert!(TEMPLATE_BYTES * 10 <= 24 * 1024);

    fn spans_of(doc: &str) -> Option<Vec<(String, Kind)>> {
        let mut spans = Vec::new();
        opaque_spans(doc.as_bytes(), PATHS, &mut spans)?;
        Some(spans.iter().map(|s| (doc[usize::from(s.start)..=usize::from(s.end)].to_string(), s.kind)).collect())
    }

    #[test]
    fn spans_cover_what_the_scanner_skips_and_nothing_on_a_path() {
        let doc = r#"{"id":"c1","n":12,"choices":[{"i":0,"d":{"c":"hi \"x\""}}],"model":"m","usage":null}"#;
        let got = spans_of(doc).unwrap();
        let want: Vec<(String, Kind)> = [
            ("c1\"", Kind::Str),
            ("12,", Kind::Scalar),
            ("{\"", Kind::Nest),
            ("i\"", Kind::Str),
            (":0,\"", Kind::Nest),
            ("d\"", Kind::Str),
            (":{\"", Kind::Nest),
            ("c\"", Kind::Str),
            (":\"", Kind::Nest),
            ("hi \\\"x\\\"\"", Kind::Str),
            ("}}]", Kind::Nest),
        ]
        .iter()
        .map(|(s, k)| (s.to_string(), *k))
        .collect();
        assert_eq!(got, want);
        // Keys with escapes, and the values of path keys, are fixed.
        assert_eq!(spans_of(r#"{"\u0069d":"x","model":{"a":"b"},"usage":[1]}"#).unwrap(), vec![]);
        assert_eq!(spans_of("{}").unwrap(), vec![]);
        for doc in ["[{}]", "\u{feff}{}", "{\"a\":1", "{\"a\" 1}", "{\"a\":1,}"] {
            assert_eq!(spans_of(doc), None, "{doc}");
        }
    }

    /// What a JSON scanner reported (`(path, raw)`, raw `None` when too large) and whether it
    /// ended complete, malformed, truncated.
    type Scanned = (Vec<(usize, Option<Vec<u8>>)>, bool, bool, bool);

    /// What a JSON scanner reports and ends in, after `pieces`.
    fn scanned(pieces: &[&[u8]]) -> Scanned {
        let mut json = JsonScanner::new(PATHS, 4096);
        let mut found = Vec::new();
        for piece in pieces {
            json.feed(piece, |f| {
                found.push(match f {
                    Found::Value { path, raw } => (path, Some(raw.to_vec())),
                    Found::TooLarge { path } => (path, None),
                })
            });
        }
        (found, json.is_complete(), json.is_malformed(), json.is_truncated())
    }

    /// Wherever an event is cut while it matches its template (byte for byte or inside a
    /// skimmed span), the template's bytes that the replay feeds take the scanner where the
    /// event's own bytes did: with the rest of the event after them, it reports and ends alike.
    #[test]
    fn a_replay_takes_the_scanner_where_the_event_took_it() {
        let template = r#"{"id":"a\"b","n":12,"c":[{"i":0,"t":"x\\y"},[1,2]],"model":"m","usage":null,"e":""}"#;
        let events = [
            r#"{"id":"a\"b\\\"","n":7,"c":[{"i":345,"t":"\\"},[]],"model":"m","usage":null,"e":"\n"}"#,
            r#"{"id":"","n":1e5,"c":[{"i":0,"t":"x\\y\"z"},[1,2,3,{}]],"model":"m","usage":null,"e":"é"}"#,
            r#"{"id":"a\"b","n":12,"c":[{"i":0,"t":"x\\y"},[1,2]],"model":"m","usage":null,"e":""}"#,
            r#"{"id":"a\"b","n":12,"c":[{"i":0,"t":"x\\y"},[1,2]],"model":"n","usage":{"a":1},"e":""}"#,
            r#"{"id":"a\"b","n":12,"c":[{"i":0,"t":"x\\y"},[1,2],"model":"m"}"#,
            r#"{"id":"a\"b","n":12,"c":[{"i":0,"t":"x\\y"},[1,2]],"model":"m","usage":null,"e":""} trailing"#,
            r#"{"id":"a\\"#,
            // The template's `\"` is `\n` here: the byte after the backslash differs, then the
            // string ends.
            r#"{"id":"a\n","n":12,"c":[{"i":0,"t":"x\\y"},[1,2]],"model":"m","usage":null,"e":""}"#,
        ];
        let mut spans = Vec::new();
        opaque_spans(template.as_bytes(), PATHS, &mut spans).unwrap();
        for event in events {
            let event = event.as_bytes();
            for cut in 0..=event.len() {
                let (head, rest) = event.split_at(cut);
                // Matched in two pieces, cut again at every place of the head.
                for split in [0, cut / 2, cut] {
                    let mut cursor = Cursor::START;
                    let mut fell_back = None;
                    for (start, piece) in [(0, &head[..split]), (split, &head[split..])] {
                        if let Some(n) = cursor.advance(template.as_bytes(), &spans, piece) {
                            fell_back = Some(start + n);
                            break;
                        }
                    }
                    let mut replayed: Vec<Vec<u8>> = Vec::new();
                    cursor.replay(template.as_bytes(), |piece| replayed.push(piece.to_vec()));
                    let mut pieces: Vec<&[u8]> = replayed.iter().map(Vec::as_slice).collect();
                    // After a fallback, the replay stands for the bytes before the difference.
                    let tail = fell_back.map_or(rest, |at| &event[at..]);
                    pieces.push(tail);
                    let show = String::from_utf8_lossy(event);
                    assert_eq!(scanned(&pieces), scanned(&[event]), "{show} cut at {cut}, {split}");
                }
            }
        }
    }

    #[test]
    fn the_span_count_is_bounded() {
        let many = format!("{{\"a\":[{}\"x\"]}}", "\"x\",".repeat(MAX_SPANS));
        assert_eq!(spans_of(&many), None);
    }

    #[test]
    fn common_prefix_agrees_with_a_plain_comparison() {
        let a = b"0123456789abcdefghijklmnopqrstuvwxyz".to_vec();
        for i in 0..a.len() {
            for len in [i, a.len()] {
                let mut b = a.clone();
                if let Some(x) = b.get_mut(i) {
                    *x ^= 1;
                }
                let b = &b[..len];
                let plain = a.iter().zip(b).take_while(|(p, q)| p == q).count();
                assert_eq!(common_prefix(&a, b), plain);
                assert_eq!(common_prefix(b, &a), plain);
            }
        }
    }

    #[test]
    fn string_ends_follow_escapes_across_pieces() {
        let s = br#"a\"b\\"rest"#;
        assert_eq!(string_end(s, &mut false), Some(6));
        for cut in 0..=s.len() {
            let (x, y) = s.split_at(cut);
            let mut esc = false;
            let got = match string_end(x, &mut esc) {
                Some(p) => Some(p),
                None => string_end(y, &mut esc).map(|p| p + cut),
            };
            assert_eq!(got, Some(6), "cut at {cut}");
        }
    }
}
