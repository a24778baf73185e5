//! Reads chosen fields of one small JSON object (a usage object) without building it.
//!
//! Every response with usage used to be decoded into a `serde_json::Value`: a `BTreeMap` with a
//! `String` per key and a node per value, allocated, read for four to six counts and freed. In
//! Envoy's V8 that decode was a fifth of the filter's own code for a non-streaming exchange.
//! [`read`] walks the bytes once instead, validating the whole value, and keeps only the
//! fields asked for.
//!
//! It takes only the plain shape providers send: ASCII strings without escapes, non-negative
//! integers without fraction or exponent, nesting up to [`MAX_DEPTH`]. Anything else (an
//! escape, a negative or fractional number, a non-ASCII byte, a syntax error, deeper nesting, a
//! key in `refuse`) returns `None`, and the caller decodes the value with `serde_json` as
//! before: for every input the result is the one `serde_json` gives (usage.rs' differential
//! tests and the `usage` fuzz target hold this).

/// Deepest nesting walked (serde_json allows 128; usage objects nest two levels).
pub const MAX_DEPTH: usize = 32;

/// What one field holds, as a token count reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Slot {
    /// The key is not there.
    #[default]
    Absent,
    /// `null`.
    Null,
    /// A non-negative integer that fits `u64`.
    Count(u64),
    /// Anything else: a string, a boolean, an array, an object.
    Other,
}

/// A field to read: a top-level key, or a key inside the object under a top-level key.
pub type Path = (&'static str, Option<&'static str>);

/// Reads `raw`, one JSON value. `Some(false)` for `null`; `Some(true)` for an object, with
/// `slots[i]` what `paths[i]` holds (the last occurrence of a repeated key, as serde_json keeps;
/// a nested path whose outer value is not an object reads `Absent`); `None` when the walk does
/// not take the input (see the module doc), or when a top-level key is in `refuse`.
pub fn read(raw: &[u8], paths: &[Path], refuse: &[&str], slots: &mut [Slot]) -> Option<bool> {
    let mut w = Walk { b: raw, i: 0 };
    w.space();
    let object = match w.peek()? {
        b'n' => {
            w.literal(b"null")?;
            false
        }
        b'{' => {
            w.object(0, |key, value, b| {
                if refuse.iter().any(|r| r.as_bytes() == key) {
                    return None;
                }
                for (slot, &(outer, inner)) in slots.iter_mut().zip(paths) {
                    if outer.as_bytes() != key {
                        continue;
                    }
                    *slot = match (inner, value) {
                        (None, Value::Object(_)) => Slot::Other,
                        (None, Value::Slot(s)) => s,
                        (Some(inner), Value::Object(start)) => inner_slot(b.get(start..)?, inner)?,
                        (Some(_), Value::Slot(_)) => Slot::Absent,
                    };
                }
                Some(())
            })?;
            true
        }
        _ => return None,
    };
    w.space();
    (w.i == raw.len()).then_some(object)
}

/// What `name` holds in the object `raw` starts with (already walked once).
fn inner_slot(raw: &[u8], name: &str) -> Option<Slot> {
    let mut found = Slot::Absent;
    Walk { b: raw, i: 0 }.object(1, |key, value, _| {
        if key == name.as_bytes() {
            found = match value {
                Value::Slot(s) => s,
                Value::Object(_) => Slot::Other,
            };
        }
        Some(())
    })?;
    Some(found)
}

/// A value as the walk reports it: objects by where they start, so a caller can read inside.
#[derive(Clone, Copy)]
enum Value {
    Slot(Slot),
    Object(usize),
}

struct Walk<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Walk<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Option<()> {
        self.space();
        (self.peek()? == c).then(|| self.i += 1)
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// A string's contents (at its opening quote): printable ASCII without escapes only.
    fn string(&mut self) -> Option<&'a [u8]> {
        self.i += 1;
        let start = self.i;
        loop {
            match self.peek()? {
                b'"' => break,
                b'\\' | 0..=0x1f | 0x80.. => return None,
                _ => self.i += 1,
            }
        }
        self.i += 1;
        self.b.get(start..self.i - 1)
    }

    /// A non-negative integer without fraction or exponent that fits `u64`.
    fn count(&mut self) -> Option<u64> {
        let start = self.i;
        let mut n: u64 = 0;
        while let Some(d @ b'0'..=b'9') = self.peek() {
            n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.i += 1;
        }
        // JSON has no leading zeros; a fraction or exponent is for serde_json to read.
        let leading_zero = self.b.get(start) == Some(&b'0') && self.i - start > 1;
        (!leading_zero && !matches!(self.peek(), Some(b'.' | b'e' | b'E'))).then_some(n)
    }

    fn value(&mut self, depth: usize) -> Option<Value> {
        self.space();
        Some(Value::Slot(match self.peek()? {
            b'{' => {
                let start = self.i;
                self.object(depth + 1, |_, _, _| Some(()))?;
                return Some(Value::Object(start));
            }
            b'[' => {
                self.array(depth + 1)?;
                Slot::Other
            }
            b'"' => {
                self.string()?;
                Slot::Other
            }
            b't' => {
                self.literal(b"true")?;
                Slot::Other
            }
            b'f' => {
                self.literal(b"false")?;
                Slot::Other
            }
            b'n' => {
                self.literal(b"null")?;
                Slot::Null
            }
            b'0'..=b'9' => Slot::Count(self.count()?),
            _ => return None,
        }))
    }

    /// An object (at its `{`), handing each member to `member(key, value, bytes)`.
    fn object<F: FnMut(&[u8], Value, &'a [u8]) -> Option<()>>(&mut self, depth: usize, mut member: F) -> Option<()> {
        self.items(depth, b'}', |w| {
            w.space();
            if w.peek()? != b'"' {
                return None;
            }
            let key = w.string()?;
            w.expect(b':')?;
            let value = w.value(depth)?;
            member(key, value, w.b)
        })
    }

    /// An array (at its `[`).
    fn array(&mut self, depth: usize) -> Option<()> {
        self.items(depth, b']', |w| w.value(depth).map(drop))
    }

    /// A container's items (at its opening bracket) up to `close`, each read by `item`, comma
    /// separated, none after the last comma.
    fn items(&mut self, depth: usize, close: u8, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        if depth >= MAX_DEPTH {
            return None;
        }
        self.i += 1;
        self.space();
        if self.peek()? == close {
            self.i += 1;
            return Some(());
        }
        loop {
            item(self)?;
            self.space();
            match self.peek()? {
                b',' => self.i += 1,
                c if c == close => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATHS: &[Path] = &[("a", None), ("d", Some("x")), ("b", None)];

    fn run(raw: &str) -> Option<(bool, [Slot; 3])> {
        let mut slots = [Slot::Absent; 3];
        read(raw.as_bytes(), PATHS, &["refused"], &mut slots).map(|o| (o, slots))
    }

    #[test]
    fn reads_counts_nested_counts_and_other_values() {
        assert_eq!(
            run(r#" {"a": 12, "z": [1, {"q": "w"}, true, false, null], "d": {"x": 0, "y": "s"}, "b": null} "#),
            Some((true, [Slot::Count(12), Slot::Count(0), Slot::Null]))
        );
        assert_eq!(run(r#"{"a":"12","d":{"x":{}},"b":[]}"#), Some((true, [Slot::Other, Slot::Other, Slot::Other])));
        assert_eq!(run(r#"{"a":{},"d":7}"#), Some((true, [Slot::Other, Slot::Absent, Slot::Absent])));
        assert_eq!(run("{}"), Some((true, [Slot::Absent; 3])));
        assert_eq!(run(" null\n"), Some((false, [Slot::Absent; 3])));
        assert_eq!(
            run(r#"{"a":18446744073709551615}"#),
            Some((true, [Slot::Count(u64::MAX), Slot::Absent, Slot::Absent]))
        );
    }

    #[test]
    fn the_last_of_a_repeated_key_counts() {
        assert_eq!(
            run(r#"{"a":1,"a":2,"d":{"x":1},"d":{}}"#),
            Some((true, [Slot::Count(2), Slot::Absent, Slot::Absent]))
        );
        assert_eq!(run(r#"{"d":{"x":1,"x":null}}"#), Some((true, [Slot::Absent, Slot::Null, Slot::Absent])));
    }

    #[test]
    fn leaves_everything_unusual_to_serde_json() {
        for raw in [
            r#"{"a":-1}"#,
            r#"{"a":1.0}"#,
            r#"{"a":1e3}"#,
            r#"{"a":01}"#,
            r#"{"a":18446744073709551616}"#,
            r#"{"a\u0062":1}"#,
            r#"{"a":"\n"}"#,
            "{\"a\":\"\u{e9}\"}",
            r#"{"a":1,}"#,
            r#"{"a":1"#,
            r#"{"a" 1}"#,
            r#"{"a":1} x"#,
            r#"{"a":tru}"#,
            r#"{"a":[1,]}"#,
            r#"{"refused":null}"#,
            r#"[1]"#,
            "7",
            "",
            "nul",
        ] {
            assert_eq!(run(raw), None, "{raw}");
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert_eq!(run(&deep), None);
        let ok = format!("{{\"a\":{}{}}}", "[".repeat(MAX_DEPTH - 1), "]".repeat(MAX_DEPTH - 1));
        assert_eq!(run(&ok), Some((true, [Slot::Other, Slot::Absent, Slot::Absent])));
    }
}
