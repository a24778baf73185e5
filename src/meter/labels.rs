//! Metric label values: sanitizing and bounding them.
//!
//! Envoy prints tag values into `/stats/prometheus` without escaping, and the tag-extraction
//! regexes in `envoy/envoy.yaml` split stat names on `=.=` and `;.;`. So every label value is
//! reduced to a conservative character set before it becomes part of a stat name, and is cut to
//! [`MAX_LABEL_LEN`] bytes.
//!
//! Every stat Envoy defines lives until Envoy exits, so label values coming from traffic (model
//! names, app header values) must be bounded. [`LabelSet`] admits the first `max` distinct values
//! and maps every later one to [`OTHER`]. The admitted set lives in proxy-wasm shared data, so
//! all Envoy worker threads agree on it: without that, each worker would admit its own first
//! `max` values and the bound would be `workers × max`.

use std::collections::HashSet;

/// Label for values beyond the configured bound or outside the allowlist.
pub const OTHER: &str = "other";
/// Label for a value that is absent (no model in the request, no app header).
pub const UNKNOWN: &str = "unknown";
/// Longest label value kept, in bytes; longer values are cut.
pub const MAX_LABEL_LEN: usize = 128;
/// How often a shared-data compare-and-swap is retried before giving up.
const CAS_RETRIES: usize = 16;

/// True for the bytes a label value may keep.
pub fn is_label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'@' | b'+' | b'-')
}

/// Reduces `raw` (any bytes, not necessarily UTF-8) to a safe label value: bytes outside `[A-Za-z0-9._:/@+-]` become `_`, the result
/// is cut to [`MAX_LABEL_LEN`] bytes, and an empty value becomes [`UNKNOWN`].
///
/// The kept set covers real model names (`gpt-4.1`, `meta-llama/Llama-3.1-8B`,
/// `ft:gpt-4o:org::id`, `claude-3-5-sonnet@20241022`) and excludes everything that could break
/// the Prometheus text format (`"`, `\`, newlines) or the tag regexes (`=`, `;`).
pub fn sanitize(raw: impl AsRef<[u8]>) -> String {
    sanitized(raw.as_ref()).into_owned()
}

/// [`sanitize`], borrowing `raw` when it is a label value already (the usual case: a model or
/// app name seen before), so a request's labels cost no allocation to check.
pub fn sanitized(raw: &[u8]) -> std::borrow::Cow<'_, str> {
    if !raw.is_empty() && raw.len() <= MAX_LABEL_LEN && raw.iter().all(|&b| is_label_byte(b)) {
        if let Ok(clean) = std::str::from_utf8(raw) {
            return std::borrow::Cow::Borrowed(clean);
        }
    }
    std::borrow::Cow::Owned(sanitize_bytes(raw))
}

fn sanitize_bytes(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len().min(MAX_LABEL_LEN));
    for &b in raw.iter().take(MAX_LABEL_LEN) {
        out.push(if is_label_byte(b) { b as char } else { '_' });
    }
    if out.is_empty() {
        out.push_str(UNKNOWN);
    }
    out
}

/// Why a shared-data write failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Another worker wrote the key since it was read.
    CasMismatch,
    /// Any other host failure.
    Other,
}

/// The part of proxy-wasm shared data the label registry needs: a byte value per key with a
/// compare-and-swap token.
pub trait SharedStore {
    /// Current value and its CAS token; `None` when the key was never written.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes `value` if the key is still at `cas` (`None`: the key must not exist yet, or the host
    /// does not check).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

/// Read-modify-write of the value at `key` with compare-and-swap, the discipline every
/// shared counter of the filter follows (rate-limit buckets, circuits): read the value and its
/// token, compute, write with the token; when another worker wrote first, read again, at most
/// `retries` times. `f` gets the decoded value (`None`: the key was never written) and returns
/// the value to write, or `None` to leave it. Returns what was read and what was written;
/// `Err` when the value does not decode, the store fails, or the conflicts outlast the retries.
pub fn cas_update<S: SharedStore + ?Sized, T: Copy, B: AsRef<[u8]>>(
    store: &S,
    key: &str,
    retries: usize,
    decode: impl Fn(&[u8]) -> Option<T>,
    encode: impl Fn(&T) -> B,
    mut f: impl FnMut(Option<T>) -> Option<T>,
) -> Result<(Option<T>, Option<T>), CasFailed> {
    for _ in 0..retries {
        let (current, cas) = match store.get(key) {
            Some((bytes, cas)) => (Some(decode(&bytes).ok_or(CasFailed)?), Some(cas)),
            None => (None, None),
        };
        let Some(next) = f(current) else { return Ok((current, None)) };
        match store.set(key, encode(&next).as_ref(), cas) {
            Ok(()) => return Ok((current, Some(next))),
            Err(StoreError::CasMismatch) => continue,
            Err(StoreError::Other) => return Err(CasFailed),
        }
    }
    Err(CasFailed)
}

/// Decodes a shared value of two `u64` (little-endian, 16 bytes), the format of the rate-limit
/// buckets (window, used) and the output-token averages (average, responses); `None` for any
/// other length.
pub fn decode_pair(bytes: &[u8]) -> Option<(u64, u64)> {
    let a = u64::from_le_bytes(bytes.get(0..8)?.try_into().ok()?);
    let b = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
    (bytes.len() == 16).then_some((a, b))
}

/// Encodes two `u64` as [`decode_pair`] reads them.
pub fn encode_pair(a: u64, b: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    let (x, y) = out.split_at_mut(8);
    x.copy_from_slice(&a.to_le_bytes());
    y.copy_from_slice(&b.to_le_bytes());
    out
}

/// [`cas_update`] failed: a value that does not decode, a store failure, or conflicts that
/// outlasted the retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CasFailed;

/// What [`LabelSet::resolve`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The label value to use.
    pub label: String,
    /// The shared registry could not be updated (CAS retries exhausted or host error); the value
    /// was labelled [`OTHER`]. Counted as an internal error by the caller.
    pub store_failed: bool,
}

/// A bounded set of admitted label values, shared by all workers through a [`SharedStore`].
///
/// Each worker keeps a local copy so that a known value costs no hostcall. Once the shared set is
/// full it can never change again (values are never removed), so a full local copy is complete and
/// unknown values go straight to [`OTHER`].
#[derive(Debug)]
pub struct LabelSet {
    key: String,
    max: usize,
    local: HashSet<String>,
    full: bool,
}

impl LabelSet {
    /// `key` names the shared-data entry; `max` bounds the number of admitted values.
    pub fn new(key: impl Into<String>, max: usize) -> Self {
        Self { key: key.into(), max, local: HashSet::new(), full: false }
    }

    /// Maps a sanitized label value to itself if it is (or can still be) admitted, else to
    /// [`OTHER`]. [`UNKNOWN`] and [`OTHER`] never take a slot.
    pub fn resolve(&mut self, store: &dyn SharedStore, value: &str) -> Resolved {
        let admitted = |label: &str| Resolved { label: label.to_string(), store_failed: false };
        if value == UNKNOWN || value == OTHER || self.local.contains(value) {
            return admitted(value);
        }
        if self.full {
            return admitted(OTHER);
        }
        for _ in 0..CAS_RETRIES {
            let (current, cas) = match store.get(&self.key) {
                Some((bytes, cas)) => (bytes, Some(cas)),
                None => (Vec::new(), None),
            };
            self.absorb(&current);
            if self.local.contains(value) {
                return admitted(value);
            }
            if self.full {
                return admitted(OTHER);
            }
            let mut next = current;
            if !next.is_empty() {
                next.push(b'\n');
            }
            next.extend_from_slice(value.as_bytes());
            match store.set(&self.key, &next, cas) {
                Ok(()) => {
                    self.local.insert(value.to_string());
                    self.full = self.local.len() >= self.max;
                    return admitted(value);
                }
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Other) => break,
            }
        }
        Resolved { label: OTHER.to_string(), store_failed: true }
    }

    /// Writes an empty registry if none exists yet; false if the store failed.
    pub fn init(&self, store: &dyn SharedStore) -> bool {
        store.get(&self.key).is_some() || store.set(&self.key, b"", None).is_ok() || store.get(&self.key).is_some()
    }

    /// Number of values admitted as far as this worker knows.
    pub fn len(&self) -> usize {
        self.local.len()
    }

    /// True when this worker knows of no admitted value.
    pub fn is_empty(&self) -> bool {
        self.local.is_empty()
    }

    /// Merges the shared list (newline-separated) into the local copy, never beyond `max`.
    fn absorb(&mut self, shared: &[u8]) {
        for entry in shared.split(|&b| b == b'\n').filter(|e| !e.is_empty()) {
            if self.local.len() >= self.max {
                break;
            }
            if let Ok(s) = std::str::from_utf8(entry) {
                if !self.local.contains(s) {
                    self.local.insert(s.to_string());
                }
            }
        }
        self.full = self.local.len() >= self.max;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    /// In-memory shared data with CAS tokens, and an optional number of forced CAS conflicts to
    /// simulate another worker writing first.
    #[derive(Default)]
    pub(crate) struct FakeStore {
        pub data: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        pub conflicts: Cell<usize>,
        pub broken: Cell<bool>,
        /// Number of `get` calls (hostcalls in the filter).
        pub reads: Cell<usize>,
    }

    impl SharedStore for FakeStore {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.reads.set(self.reads.get() + 1);
            self.data.borrow().get(key).cloned()
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            if self.broken.get() {
                return Err(StoreError::Other);
            }
            if self.conflicts.get() > 0 {
                self.conflicts.set(self.conflicts.get() - 1);
                return Err(StoreError::CasMismatch);
            }
            let mut data = self.data.borrow_mut();
            let current = data.get(key).map(|(_, c)| *c);
            if cas.is_some() && cas != current {
                return Err(StoreError::CasMismatch);
            }
            let next = current.unwrap_or(0) + 1;
            data.insert(key.to_string(), (value.to_vec(), next));
            Ok(())
        }
    }

    #[test]
    fn sanitize_keeps_model_names_and_replaces_the_rest() {
        assert_eq!(sanitize("gpt-4.1"), "gpt-4.1");
        assert_eq!(sanitize("meta-llama/Llama-3.1-8B"), "meta-llama/Llama-3.1-8B");
        assert_eq!(sanitize("ft:gpt-4o:org::id"), "ft:gpt-4o:org::id");
        assert_eq!(sanitize("a\"b\\c\nd;.;e=f{g} h"), "a_b_c_d_._e_f_g__h");
        assert_eq!(sanitize(""), UNKNOWN);
        assert_eq!(sanitize("modèle"), "mod__le");
        assert_eq!(sanitize("x".repeat(10_000)).len(), MAX_LABEL_LEN);
        assert_eq!(sanitize(b"\xff\xfeok\x00"), "__ok_");
        // Borrowed only when nothing changes.
        assert!(matches!(sanitized(b"gpt-4.1"), std::borrow::Cow::Borrowed("gpt-4.1")));
        let exact = "x".repeat(MAX_LABEL_LEN);
        assert!(matches!(sanitized(exact.as_bytes()), std::borrow::Cow::Borrowed(_)));
        for raw in [&b""[..], b"a b", b"mod\xc3\xa8le", "x".repeat(MAX_LABEL_LEN + 1).as_bytes()] {
            assert!(matches!(sanitized(raw), std::borrow::Cow::Owned(_)), "{raw:?}");
            assert_eq!(sanitized(raw), sanitize(raw));
        }
    }

    #[test]
    fn admits_first_max_values_then_other() {
        let store = FakeStore::default();
        let mut set = LabelSet::new("k", 2);
        assert_eq!(set.resolve(&store, "a").label, "a");
        assert_eq!(set.resolve(&store, "b").label, "b");
        assert_eq!(set.resolve(&store, "c").label, OTHER);
        assert_eq!(set.resolve(&store, "a").label, "a");
        assert_eq!(set.resolve(&store, UNKNOWN).label, UNKNOWN);
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn workers_agree_through_the_store() {
        let store = FakeStore::default();
        let mut w1 = LabelSet::new("k", 2);
        let mut w2 = LabelSet::new("k", 2);
        assert_eq!(w1.resolve(&store, "a").label, "a");
        assert_eq!(w2.resolve(&store, "b").label, "b");
        // w1 has not seen b yet, but the registry is full: c must be other on both.
        assert_eq!(w1.resolve(&store, "c").label, OTHER);
        assert_eq!(w2.resolve(&store, "c").label, OTHER);
        assert_eq!(w1.resolve(&store, "b").label, "b");
    }

    #[test]
    fn retries_cas_conflicts_and_reports_exhaustion() {
        let store = FakeStore::default();
        store.conflicts.set(3);
        let mut set = LabelSet::new("k", 5);
        assert_eq!(set.resolve(&store, "a"), Resolved { label: "a".into(), store_failed: false });
        store.conflicts.set(1000);
        let r = set.resolve(&store, "b");
        assert_eq!(r, Resolved { label: OTHER.into(), store_failed: true });
        store.conflicts.set(0);
        store.broken.set(true);
        assert!(set.resolve(&store, "c").store_failed);
    }

    #[test]
    fn hostile_shared_value_stays_bounded() {
        let store = FakeStore::default();
        let junk: Vec<u8> = (0..5000u32).flat_map(|i| format!("v{i}\n").into_bytes()).collect();
        store.data.borrow_mut().insert("k".into(), (junk, 1));
        let mut set = LabelSet::new("k", 10);
        assert_eq!(set.resolve(&store, "new").label, OTHER);
        assert_eq!(set.len(), 10);
    }
}
