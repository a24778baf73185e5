//! Per-request records: the facts of one metered exchange (models, app, status, tokens, cost,
//! timings, the rule that rejected it, a hash of its key), published for Envoy's access log.
//!
//! Metrics answer "how much, per model and app"; a record answers "which request": billing and
//! chargeback per API key, audit, debugging one slow or expensive call. The filter publishes the
//! record as Envoy filter state `wasm.<name>` (proxy-wasm `set_property`) in its log callback,
//! which Envoy runs before the connection manager writes its access logs, for every way an
//! exchange ends (completed, streamed, cancelled by the client, answered locally, timed out).
//!
//! Why this shape: Envoy 1.40 has no hostcall that sets dynamic metadata from wasm (Envoy issue
//! 15148), and filter state set with `set_property` is stored as bytes that the access log's
//! `%FILTER_STATE(...)%` prints base64-encoded inside a `BytesValue` (issue 38795). Declaring
//! the property first (the `declare_property` foreign function) as a protobuf of type
//! `google.protobuf.Struct` makes `%FILTER_STATE(wasm.llm_meter:TYPED)%` print it as a JSON
//! object with typed numbers, in one hostcall per request. If the host refuses the declaration
//! (an Envoy without the foreign function), the record is published as JSON text instead,
//! readable with `:PLAIN`.
//!
//! Everything here is plain Rust: the record, its protobuf and JSON encodings, and the
//! declaration's arguments.

use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;

/// Default filter state name (`wasm.llm_meter` in the access log format).
pub const DEFAULT_NAME: &str = "llm_meter";
/// Longest model name a record carries (client-supplied; longer ones are cut at a character
/// boundary).
pub const MAX_MODEL_BYTES: usize = 256;

/// The facts of one exchange. `None` fields are left out of the published record.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record<'a> {
    /// The model the client asked for (request body `model`, or the Gemini path).
    pub request_model: Option<Cow<'a, str>>,
    /// The model the request was sent to: the requested one, or a fallback's.
    pub model: Option<Cow<'a, str>>,
    /// The model the response names (e.g. a dated snapshot), if it names one.
    pub response_model: Option<Cow<'a, str>>,
    /// The `model` label the request's metrics were counted under (`other` beyond the bound).
    pub model_label: Cow<'a, str>,
    /// The `app` label.
    pub app: Cow<'a, str>,
    /// The operation (`chat`, `embeddings`, `messages`, …).
    pub operation: &'static str,
    /// The API family, OpenTelemetry's `gen_ai.provider.name`: `openai`, `anthropic`,
    /// `gcp.gemini`.
    pub provider: &'static str,
    /// The response was a stream (server-sent events).
    pub stream: bool,
    /// HTTP status sent to the client (0: none, the client left first).
    pub status: u16,
    /// The `error_type` label (`none` for a success).
    pub error_type: &'static str,
    /// Token usage, as counted in `tokens_total`; `None` when the response reported none.
    pub usage: Option<RecordUsage>,
    /// Cost in micro-USD (fractional); `None` without usage or price.
    pub cost_microusd: Option<f64>,
    /// Time to the first response body byte (streams: the first token), ms.
    pub ttft_ms: Option<u64>,
    /// Time per output token after the first, ms (streams with at least 2 output tokens).
    pub tpot_ms: Option<f64>,
    /// From request headers to the end of the response, ms.
    pub duration_ms: u64,
    /// The rule that rejected the request, when this filter answered it itself: a limit rule,
    /// `max_input_tokens`, `failure_mode`, or `circuit_open`.
    pub rejected_by: Option<Cow<'a, str>>,
    /// The first 12 hex digits of the SHA-256 of the record's key (see [`key_hash`]).
    pub key_hash: Option<Cow<'a, str>>,
}

/// Token counts of a record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordUsage {
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
    pub cache_creation_input: u64,
    pub reasoning: u64,
}

/// One field's value.
#[derive(Debug, Clone, PartialEq)]
enum Value<'a> {
    Str(&'a str),
    Num(f64),
    Bool(bool),
}

impl Record<'_> {
    /// The record with every text owned (to keep it past the exchange, as the tests do).
    pub fn into_owned(self) -> Record<'static> {
        let own = |v: Option<Cow<'_, str>>| v.map(|v| Cow::Owned(v.into_owned()));
        Record {
            request_model: own(self.request_model),
            model: own(self.model),
            response_model: own(self.response_model),
            model_label: Cow::Owned(self.model_label.into_owned()),
            app: Cow::Owned(self.app.into_owned()),
            rejected_by: own(self.rejected_by),
            key_hash: own(self.key_hash),
            ..self
        }
    }

    /// Calls `f` with each published field, in a fixed order (the access log's JSON printer
    /// sorts them).
    fn for_each_field(&self, mut f: impl FnMut(&'static str, Value<'_>)) {
        let n = |v: u64| Value::Num(v as f64);
        /// An optional string field, left out when absent.
        fn s<F: FnMut(&'static str, Value<'_>)>(f: &mut F, key: &'static str, v: &Option<Cow<'_, str>>) {
            if let Some(v) = v.as_deref() {
                f(key, Value::Str(v));
            }
        }
        s(&mut f, "request_model", &self.request_model);
        s(&mut f, "model", &self.model);
        s(&mut f, "response_model", &self.response_model);
        f("model_label", Value::Str(&self.model_label));
        f("app", Value::Str(&self.app));
        f("operation", Value::Str(self.operation));
        f("provider", Value::Str(self.provider));
        f("stream", Value::Bool(self.stream));
        f("status", n(u64::from(self.status)));
        f("error_type", Value::Str(self.error_type));
        if let Some(u) = self.usage {
            f("input_tokens", n(u.input));
            f("output_tokens", n(u.output));
            f("cached_input_tokens", n(u.cached_input));
            f("cache_creation_input_tokens", n(u.cache_creation_input));
            f("reasoning_tokens", n(u.reasoning));
        }
        if let Some(c) = self.cost_microusd {
            f("cost_microusd", Value::Num(c));
        }
        if let Some(t) = self.ttft_ms {
            f("ttft_ms", n(t));
        }
        if let Some(t) = self.tpot_ms {
            f("tpot_ms", Value::Num(t));
        }
        f("duration_ms", n(self.duration_ms));
        s(&mut f, "rejected_by", &self.rejected_by);
        s(&mut f, "key_hash", &self.key_hash);
    }

    /// The record as a serialized `google.protobuf.Struct` (what the declared property holds),
    /// written in one pass into one buffer.
    pub fn to_struct(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(768);
        self.write_struct(&mut out);
        out
    }

    /// [`Record::to_struct`], appended to `out` (the glue reuses one buffer per worker).
    pub fn write_struct(&self, out: &mut Vec<u8>) {
        self.for_each_field(|key, v| {
            // Value: string_value = 3 (length-delimited), number_value = 2 (double), bool_value
            // = 4 (varint).
            let value_len = match v {
                Value::Str(s) => 1 + varint_len(s.len()) + s.len(),
                Value::Num(_) => 9,
                Value::Bool(_) => 2,
            };
            // map<string, Value> entry: key = 1, value = 2.
            let entry_len = 1 + varint_len(key.len()) + key.len() + 1 + varint_len(value_len) + value_len;
            // Struct.fields = 1
            out.push(1 << 3 | 2);
            varint(out, entry_len);
            bytes_field(out, 1, key.as_bytes());
            out.push(2 << 3 | 2);
            varint(out, value_len);
            match v {
                Value::Str(s) => bytes_field(out, 3, s.as_bytes()),
                Value::Num(x) => {
                    out.push(2 << 3 | 1);
                    out.extend_from_slice(&x.to_le_bytes());
                }
                Value::Bool(b) => out.extend_from_slice(&[4 << 3, u8::from(b)]),
            }
        });
    }

    /// The record as one line of JSON (the fallback when the property cannot be declared, and
    /// what the tests compare).
    pub fn to_json(&self) -> String {
        let mut map = serde_json::Map::new();
        self.for_each_field(|key, v| {
            let v = match v {
                Value::Str(s) => serde_json::Value::from(s),
                Value::Num(x) => serde_json::Number::from_f64(x).map_or(serde_json::Value::Null, Into::into),
                Value::Bool(b) => serde_json::Value::from(b),
            };
            map.insert(key.to_string(), v);
        });
        serde_json::Value::Object(map).to_string()
    }
}

/// A client-supplied model name cut to [`MAX_MODEL_BYTES`] at a character boundary.
pub fn bounded_model(model: &str) -> &str {
    if model.len() <= MAX_MODEL_BYTES {
        return model;
    }
    let mut end = MAX_MODEL_BYTES;
    while !model.is_char_boundary(end) {
        end -= 1;
    }
    model.get(..end).unwrap_or_default()
}

/// The first 12 hex digits of the SHA-256 of `value`: enough to tell keys apart in a billing
/// report, far too little to recover or confirm a key. The limiter's bucket ids (and its
/// warning logs) start with the same 12 digits for the same key.
pub fn key_hash(value: &[u8]) -> String {
    sha256_hex(value, 6)
}

/// The first `bytes` bytes of the SHA-256 of `value`, as lowercase hex (the limiter's bucket
/// ids take 16, records' [`key_hash`] 6).
pub(crate) fn sha256_hex(value: &[u8], bytes: usize) -> String {
    let digest = Sha256::digest(value);
    hex(digest.get(..bytes).unwrap_or(&digest))
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * bytes.len());
    let digit = |n: u8| char::from(DIGITS.get(usize::from(n & 0xf)).copied().unwrap_or(b'0'));
    for &b in bytes {
        out.push(digit(b >> 4));
        out.push(digit(b));
    }
    out
}

/// The hashes of the keys seen lately, per worker: an API key sends many requests, and SHA-256
/// in a Wasm VM costs about a microsecond. Records ([`KeyHashes::get`]) and the limiter's
/// bucket ids ([`KeyHashes::bucket_id`]) share it: one hash per key, not one per request and
/// use. Bounded: at most [`KeyHashes::MAX_KEYS`] values of at most
/// [`KeyHashes::MAX_KEY_BYTES`] (longer ones are hashed every time), forgotten all at once when
/// full. Behind a `RefCell` so that the limiter reaches it through its `&self` host.
#[derive(Debug, Default)]
pub struct KeyHashes(RefCell<HashMap<Vec<u8>, [u8; BUCKET_ID_BYTES]>>);

/// Bytes of the SHA-256 in a limiter bucket id (32 hex digits).
pub(crate) const BUCKET_ID_BYTES: usize = 16;

impl KeyHashes {
    /// Keys remembered.
    pub const MAX_KEYS: usize = 256;
    /// Longest key remembered, in bytes.
    pub const MAX_KEY_BYTES: usize = 256;

    /// [`key_hash`] of `value`.
    pub fn get(&self, value: &[u8]) -> String {
        hex(&self.digest(value)[..6])
    }

    /// The limiter's id for `value`: `sha256_hex(value, 16)`.
    pub fn bucket_id(&self, value: &[u8]) -> String {
        hex(&self.digest(value))
    }

    fn digest(&self, value: &[u8]) -> [u8; BUCKET_ID_BYTES] {
        if let Some(digest) = self.0.borrow().get(value) {
            return *digest;
        }
        let mut digest = [0; BUCKET_ID_BYTES];
        for (d, s) in digest.iter_mut().zip(Sha256::digest(value)) {
            *d = s;
        }
        if value.len() <= Self::MAX_KEY_BYTES {
            let mut map = self.0.borrow_mut();
            if map.len() >= Self::MAX_KEYS {
                map.clear();
            }
            map.insert(value.to_vec(), digest);
        }
        digest
    }

    /// Keys remembered now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.borrow().len()
    }
}

/// The arguments of Envoy's `declare_property` foreign function (a serialized
/// `DeclarePropertyArguments`): property `name`, writable, of type protobuf
/// `google.protobuf.Struct`, living as long as the request.
pub fn declare_arguments(name: &str) -> Vec<u8> {
    const STRUCT: &[u8] = b"type.googleapis.com/google.protobuf.Struct";
    let mut out = Vec::with_capacity(name.len() + STRUCT.len() + 8);
    bytes_field(&mut out, 1, name.as_bytes()); // name
    out.extend_from_slice(&[3 << 3, 3]); // type = Protobuf (3)
    bytes_field(&mut out, 4, STRUCT); // schema: the type URL
    out.extend_from_slice(&[5 << 3, 1]); // span = DownstreamRequest (1)
    out
}

/// Appends a length-delimited protobuf field.
fn bytes_field(out: &mut Vec<u8>, number: u8, bytes: &[u8]) {
    out.push(number << 3 | 2);
    varint(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// Appends a protobuf varint.
fn varint(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Bytes of `n` as a protobuf varint.
fn varint_len(n: usize) -> usize {
    let mut len = 1;
    let mut n = n >> 7;
    while n > 0 {
        len += 1;
        n >>= 7;
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal protobuf reader for the tests: (field number, wire type, payload).
    fn read_fields(mut b: &[u8]) -> Vec<(u8, u8, Vec<u8>)> {
        let mut out = Vec::new();
        let varint = |b: &mut &[u8]| {
            let (mut v, mut shift) = (0u64, 0);
            loop {
                let byte = b[0];
                *b = &b[1..];
                v |= u64::from(byte & 0x7f) << shift;
                shift += 7;
                if byte < 0x80 {
                    return v;
                }
            }
        };
        while !b.is_empty() {
            let tag = varint(&mut b);
            let (number, wire) = ((tag >> 3) as u8, (tag & 7) as u8);
            let payload = match wire {
                0 => varint(&mut b).to_le_bytes().to_vec(),
                1 => {
                    let p = b[..8].to_vec();
                    b = &b[8..];
                    p
                }
                2 => {
                    let len = varint(&mut b) as usize;
                    let p = b[..len].to_vec();
                    b = &b[len..];
                    p
                }
                w => panic!("wire type {w}"),
            };
            out.push((number, wire, payload));
        }
        out
    }

    /// Decodes a serialized Struct into JSON, to compare with [`Record::to_json`].
    fn struct_to_json(b: &[u8]) -> serde_json::Value {
        let mut map = serde_json::Map::new();
        for (number, _, entry) in read_fields(b) {
            assert_eq!(number, 1);
            let e = read_fields(&entry);
            assert_eq!((e[0].0, e[1].0), (1, 2));
            let key = String::from_utf8(e[0].2.clone()).unwrap();
            let v = &read_fields(&e[1].2)[0];
            let value = match v.0 {
                2 => serde_json::json!(f64::from_le_bytes(v.2.clone().try_into().unwrap())),
                3 => serde_json::json!(String::from_utf8(v.2.clone()).unwrap()),
                4 => serde_json::json!(v.2[0] == 1),
                n => panic!("Value field {n}"),
            };
            map.insert(key, value);
        }
        serde_json::Value::Object(map)
    }

    fn full() -> Record<'static> {
        Record {
            request_model: Some("gpt-4.1".into()),
            model: Some("gpt-4o-mini".into()),
            response_model: Some("gpt-4o-mini-2024-07-18".into()),
            model_label: "gpt-4o-mini".into(),
            app: "web".into(),
            operation: "chat",
            provider: "openai",
            stream: true,
            status: 200,
            error_type: "none",
            usage: Some(RecordUsage {
                input: 1200,
                output: 340,
                cached_input: 1024,
                cache_creation_input: 0,
                reasoning: 64,
            }),
            cost_microusd: Some(1234.5),
            ttft_ms: Some(180),
            tpot_ms: Some(12.25),
            duration_ms: 4321,
            rejected_by: None,
            key_hash: Some(key_hash(b"Bearer sk-test").into()),
        }
    }

    #[test]
    fn the_struct_encoding_carries_the_same_fields_as_the_json() {
        let r = full();
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(struct_to_json(&r.to_struct()), json);
        assert_eq!(json["input_tokens"], 1200.0);
        assert_eq!(json["cost_microusd"], 1234.5);
        assert_eq!(json["stream"], true);
        assert_eq!(json["key_hash"].as_str().unwrap().len(), 12);
        assert!(json.get("rejected_by").is_none());
    }

    #[test]
    fn absent_facts_are_left_out() {
        let r = Record {
            model_label: "unknown".into(),
            app: "unknown".into(),
            operation: "chat",
            provider: "openai",
            status: 429,
            error_type: "rate_limited",
            duration_ms: 1,
            rejected_by: Some("key-rpm".into()),
            ..Record::default()
        };
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "app",
                "duration_ms",
                "error_type",
                "model_label",
                "operation",
                "provider",
                "rejected_by",
                "status",
                "stream"
            ]
        );
        assert_eq!(struct_to_json(&r.to_struct()), json);
    }

    #[test]
    fn long_and_hostile_strings_survive_both_encodings() {
        let mut r = full();
        let long = "m\u{e9}".repeat(200); // 600 bytes, 2-byte characters
        r.request_model = Some(bounded_model(&long).into());
        r.model = Some("quote\" backslash\\ newline\n".into());
        let m = r.request_model.as_deref().unwrap();
        assert!(m.len() <= MAX_MODEL_BYTES && m.len() > MAX_MODEL_BYTES - 3);
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["model"], "quote\" backslash\\ newline\n");
        assert_eq!(struct_to_json(&r.to_struct()), json);
    }

    #[test]
    fn key_hash_is_a_prefix_of_sha256() {
        // sha256("abc") = ba7816bf8f01cfea…
        assert_eq!(key_hash(b"abc"), "ba7816bf8f01");
        assert_eq!(sha256_hex(b"abc", 16), "ba7816bf8f01cfea414140de5dae2223");
        assert_eq!(sha256_hex(b"abc", 0), "");
    }

    #[test]
    fn remembered_hashes_are_the_hashes_and_the_memory_stays_bounded() {
        let hashes = KeyHashes::default();
        for i in 0..3 * KeyHashes::MAX_KEYS {
            let key = format!("Bearer sk-{}", i % (KeyHashes::MAX_KEYS + 7));
            assert_eq!(hashes.get(key.as_bytes()), key_hash(key.as_bytes()));
            assert!(hashes.len() <= KeyHashes::MAX_KEYS);
            assert_eq!(hashes.bucket_id(key.as_bytes()), sha256_hex(key.as_bytes(), 16));
        }
        let long = vec![b'k'; KeyHashes::MAX_KEY_BYTES + 1];
        assert_eq!(hashes.get(&long), key_hash(&long));
        assert!(!hashes.0.borrow().contains_key(&long));
    }

    #[test]
    fn declare_arguments_encode_a_struct_property() {
        let fields = read_fields(&declare_arguments("llm_meter"));
        assert_eq!(fields[0], (1, 2, b"llm_meter".to_vec()));
        assert_eq!((fields[1].0, fields[1].2[0]), (3, 3));
        assert_eq!(fields[2], (4, 2, b"type.googleapis.com/google.protobuf.Struct".to_vec()));
        assert_eq!((fields[3].0, fields[3].2[0]), (5, 1));
    }
}
