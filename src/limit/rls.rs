//! The messages of Envoy's rate limit service protocol (`envoy.service.ratelimit.v3`), encoded
//! and decoded by hand: the filter needs one request and one response type, and a protobuf code
//! generator (and `protoc`) for four small messages would cost more than these lines.
//!
//! Only the fields the filter uses are written; unknown fields of a response are skipped, as
//! protobuf requires, so a service that sends more (headers to add, quotas, metadata) decodes.

/// The gRPC service and method the filter calls.
pub const SERVICE: &str = "envoy.service.ratelimit.v3.RateLimitService";
pub const METHOD: &str = "ShouldRateLimit";

/// `envoy.type.v3.RateLimitUnit` (also `RateLimitResponse.RateLimit.Unit`, same numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Second = 1,
    Minute = 2,
    Hour = 3,
    Day = 4,
    Month = 5,
    Year = 6,
    Week = 7,
}

impl Unit {
    /// The unit a rule's window asks the service for. Fixed windows have their own unit.
    /// Calendar windows travel with a `period` entry naming the window (so each is its own
    /// counter) and ask for a unit at least as long as the window: a service whose windows
    /// start at a counter's first hit (Limitador, llm-rls) then never resets a counter inside
    /// its period. Months ask for a year (a service's MONTH is 30 days, shorter than 31).
    pub fn of(window: crate::config::Window) -> Unit {
        use crate::config::Window;
        match window {
            Window::Second => Unit::Second,
            Window::Minute => Unit::Minute,
            Window::Hour => Unit::Hour,
            Window::Day => Unit::Day,
            Window::Week => Unit::Week,
            Window::Month => Unit::Year,
        }
    }
}

/// One `RateLimitDescriptor`: hierarchical entries, and the limit to apply (the descriptor's
/// `limit` override, so the filter's configuration is the one source of the numbers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub entries: Vec<(&'static str, String)>,
    pub limit: Option<(u32, Unit)>,
}

/// Encodes a `RateLimitRequest`, in one pass into one buffer: each nested message's length is
/// computed before it is written (it goes first), so nothing is built twice.
pub fn encode_request(domain: &str, descriptors: &[Descriptor], hits_addend: u32) -> Vec<u8> {
    let entry_len = |k: &str, v: &str| field_len(k.len()) + field_len(v.len());
    let limit_len = |n: u32, unit: Unit| 2 + varint_len(u64::from(n)) + varint_len(unit as u64);
    let desc_len = |d: &Descriptor| {
        d.entries.iter().map(|(k, v)| field_len(entry_len(k, v))).sum::<usize>()
            + d.limit.map_or(0, |(n, unit)| field_len(limit_len(n, unit)))
    };
    let total = field_len(domain.len())
        + descriptors.iter().map(|d| field_len(desc_len(d))).sum::<usize>()
        + if hits_addend != 0 { 1 + varint_len(u64::from(hits_addend)) } else { 0 };
    let mut out = Vec::with_capacity(total);
    put_bytes(&mut out, 1, domain.as_bytes());
    for d in descriptors {
        put_header(&mut out, 2, desc_len(d));
        for (k, v) in &d.entries {
            put_header(&mut out, 1, entry_len(k, v));
            put_bytes(&mut out, 1, k.as_bytes());
            put_bytes(&mut out, 2, v.as_bytes());
        }
        if let Some((n, unit)) = d.limit {
            put_header(&mut out, 2, limit_len(n, unit));
            put_varint_field(&mut out, 1, u64::from(n));
            put_varint_field(&mut out, 2, unit as u64);
        }
    }
    if hits_addend != 0 {
        put_varint_field(&mut out, 3, u64::from(hits_addend));
    }
    out
}

/// Bytes of a length-delimited field (field number < 16) holding `len` bytes.
fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

fn varint_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 0x80 {
        len += 1;
        n >>= 7;
    }
    len
}

/// Encodes the `envoy.config.core.v3.GrpcService` naming `cluster` (`envoy_grpc.cluster_name`).
/// Passed to Envoy instead of the bare cluster name: Envoy then builds the client without
/// requiring the cluster to exist, and a missing cluster fails the call (which the filter
/// counts) instead of the dispatch.
pub fn encode_grpc_service(cluster: &str) -> Vec<u8> {
    let mut envoy_grpc = Vec::new();
    put_bytes(&mut envoy_grpc, 1, cluster.as_bytes());
    let mut out = Vec::new();
    put_bytes(&mut out, 1, &envoy_grpc);
    out
}

/// `RateLimitResponse.Code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Unknown,
    Ok,
    OverLimit,
}

impl Code {
    fn from(n: u64) -> Code {
        match n {
            1 => Code::Ok,
            2 => Code::OverLimit,
            _ => Code::Unknown,
        }
    }
}

/// One `DescriptorStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    /// `current_limit.requests_per_unit`, when the service says.
    pub limit: Option<u32>,
    pub remaining: u32,
    /// `duration_until_reset`, in milliseconds, when the service says.
    pub reset_ms: Option<u64>,
}

/// A decoded `RateLimitResponse`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub overall: Code,
    pub statuses: Vec<Status>,
}

/// Why a response could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError;

/// Decodes a `RateLimitResponse`.
pub fn decode_response(bytes: &[u8]) -> Result<Response, DecodeError> {
    let mut response = Response { overall: Code::Unknown, statuses: Vec::new() };
    for field in Fields(bytes) {
        match field? {
            (1, Value::Varint(n)) => response.overall = Code::from(n),
            (2, Value::Bytes(b)) => response.statuses.push(decode_status(b)?),
            _ => {}
        }
    }
    Ok(response)
}

fn decode_status(bytes: &[u8]) -> Result<Status, DecodeError> {
    let mut status = Status { code: Code::Unknown, limit: None, remaining: 0, reset_ms: None };
    for field in Fields(bytes) {
        match field? {
            (1, Value::Varint(n)) => status.code = Code::from(n),
            (2, Value::Bytes(b)) => {
                for f in Fields(b) {
                    if let (1, Value::Varint(n)) = f? {
                        status.limit = Some(u32::try_from(n).unwrap_or(u32::MAX));
                    }
                }
            }
            (3, Value::Varint(n)) => status.remaining = u32::try_from(n).unwrap_or(u32::MAX),
            (4, Value::Bytes(b)) => {
                let (mut secs, mut nanos) = (0u64, 0u64);
                for f in Fields(b) {
                    match f? {
                        // int64 seconds, int32 nanos: negative values (encoded as huge
                        // varints) make no sense for a reset and are read as 0.
                        (1, Value::Varint(n)) => secs = if n > i64::MAX as u64 { 0 } else { n },
                        (2, Value::Varint(n)) => nanos = if n >= 1_000_000_000 { 0 } else { n },
                        _ => {}
                    }
                }
                status.reset_ms = Some(secs.saturating_mul(1000).saturating_add(nanos / 1_000_000));
            }
            _ => {}
        }
    }
    Ok(status)
}

/// Test helper: appends a varint.
#[cfg(test)]
pub(crate) fn tests_put_varint(out: &mut Vec<u8>, n: u64) {
    put_varint(out, n);
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, n: u64) {
    put_varint(out, u64::from(field) << 3);
    put_varint(out, n);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_header(out, field, bytes.len());
    out.extend_from_slice(bytes);
}

/// The tag and length of a length-delimited field whose `len` bytes follow.
fn put_header(out: &mut Vec<u8>, field: u32, len: usize) {
    put_varint(out, (u64::from(field) << 3) | 2);
    put_varint(out, len as u64);
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    /// Fixed 32/64-bit values: no field the filter reads has one.
    Fixed,
}

/// The fields of a message, in order; an error ends the iteration.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.0.split_first().ok_or(DecodeError)?;
            self.0 = rest;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(DecodeError)
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], DecodeError> {
        let n = usize::try_from(n).map_err(|_| DecodeError)?;
        if n > self.0.len() {
            return Err(DecodeError);
        }
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(taken)
    }

    fn field(&mut self) -> Result<(u64, Value<'a>), DecodeError> {
        let tag = self.varint()?;
        let value = match tag & 7 {
            0 => Value::Varint(self.varint()?),
            1 => self.take(8).map(|_| Value::Fixed)?,
            2 => {
                let len = self.varint()?;
                Value::Bytes(self.take(len)?)
            }
            5 => self.take(4).map(|_| Value::Fixed)?,
            _ => return Err(DecodeError),
        };
        Ok((tag >> 3, value))
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let field = self.field();
        if field.is_err() {
            self.0 = &[];
        }
        Some(field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bytes_are_protobuf() {
        let d = Descriptor { entries: vec![("rule", "rpm".into())], limit: Some((300, Unit::Minute)) };
        let got = encode_request("llm", &[d], 1);
        #[rustfmt::skip]
        let want = [
            0x0a, 3, b'l', b'l', b'm',                       // domain
            0x12, 20,                                        // descriptors[0]
                0x0a, 11,                                    //   entries[0]
                    0x0a, 4, b'r', b'u', b'l', b'e',         //     key
                    0x12, 3, b'r', b'p', b'm',               //     value
                0x12, 5, 0x08, 0xac, 0x02, 0x10, 2,          //   limit {300, MINUTE}
            0x18, 1,                                         // hits_addend
        ];
        assert_eq!(got, want);
        // hits_addend 0 is the protocol's default (read as 1): not written.
        assert_eq!(encode_request("d", &[], 0), [0x0a, 1, b'd']);
        assert_eq!(encode_grpc_service("rls"), [0x0a, 5, 0x0a, 3, b'r', b'l', b's']);
    }

    /// The request as nested messages built one inside the other (the plain way, for the test
    /// below).
    fn encode_nested(domain: &str, descriptors: &[Descriptor], hits_addend: u32) -> Vec<u8> {
        let mut out = Vec::new();
        put_bytes(&mut out, 1, domain.as_bytes());
        for d in descriptors {
            let mut desc = Vec::new();
            for (k, v) in &d.entries {
                let mut entry = Vec::new();
                put_bytes(&mut entry, 1, k.as_bytes());
                put_bytes(&mut entry, 2, v.as_bytes());
                put_bytes(&mut desc, 1, &entry);
            }
            if let Some((n, unit)) = d.limit {
                let mut limit = Vec::new();
                put_varint_field(&mut limit, 1, u64::from(n));
                put_varint_field(&mut limit, 2, unit as u64);
                put_bytes(&mut desc, 2, &limit);
            }
            put_bytes(&mut out, 2, &desc);
        }
        if hits_addend != 0 {
            put_varint_field(&mut out, 3, u64::from(hits_addend));
        }
        out
    }

    #[test]
    fn one_pass_encoding_equals_the_nested_one() {
        let mut rng = crate::scan::test_rng::Rng(0x5eed);
        let units = [Unit::Second, Unit::Minute, Unit::Hour, Unit::Day, Unit::Month, Unit::Year, Unit::Week];
        // Lengths around the varint steps (127/128, 16383/16384).
        let lens = [0, 1, 5, 32, 127, 128, 129, 200, 16_383, 16_384];
        let text = |rng: &mut crate::scan::test_rng::Rng| "k".repeat(lens[rng.below(lens.len())]);
        for _ in 0..300 {
            let descriptors: Vec<Descriptor> = (0..rng.below(3))
                .map(|_| Descriptor {
                    entries: (0..rng.below(4)).map(|_| (&*text(&mut rng).leak(), text(&mut rng))).collect(),
                    limit: (rng.below(2) == 0).then(|| (rng.next() as u32 >> rng.below(32), units[rng.below(7)])),
                })
                .collect();
            let domain = text(&mut rng);
            let hits = [0, 1, 127, 128, u32::MAX][rng.below(5)];
            let got = encode_request(&domain, &descriptors, hits);
            assert_eq!(got, encode_nested(&domain, &descriptors, hits));
            assert_eq!(got.len(), got.capacity(), "sized exactly");
        }
    }

    #[test]
    fn responses_decode_and_unknown_fields_are_skipped() {
        #[rustfmt::skip]
        let bytes = [
            0x08, 2,                                         // overall_code OVER_LIMIT
            0x12, 19,                                        // statuses[0]
                0x08, 2,                                     //   code
                0x12, 4, 0x08, 100, 0x10, 2,                 //   current_limit {100, MINUTE}
                0x18, 0,                                     //   limit_remaining
                0x22, 7, 0x08, 42, 0x10, 0x80, 0xad, 0xe2, 0x04, // duration_until_reset 42 s 10 ms
            0x2a, 2, b'n', b'o',                             // raw_body (unknown to the filter)
            0x3d, 1, 2, 3, 4,                                // a fixed32 field from the future
        ];
        let r = decode_response(&bytes).unwrap();
        assert_eq!(r.overall, Code::OverLimit);
        assert_eq!(
            r.statuses,
            vec![Status { code: Code::OverLimit, limit: Some(100), remaining: 0, reset_ms: Some(42_010) }]
        );
        assert_eq!(decode_response(&[]).unwrap(), Response { overall: Code::Unknown, statuses: vec![] });
        assert_eq!(decode_response(&[0x08, 1]).unwrap().overall, Code::Ok);
    }

    #[test]
    fn truncated_or_garbage_responses_are_errors_never_panics() {
        for bad in [
            &[0x08][..],
            &[0x12, 5, 1],
            &[0x0f],
            &[0xff; 11],
            &[0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
        ] {
            assert_eq!(decode_response(bad), Err(DecodeError), "{bad:?}");
        }
        // A prefix of a valid response cut between two of its fields is the response of those
        // fields; cut anywhere else (inside a tag, a length or a status) it is an error.
        let ok = Status { code: Code::Ok, limit: Some(600), remaining: 599, reset_ms: Some(30_500) };
        let over = Status { code: Code::OverLimit, limit: Some(1), remaining: 0, reset_ms: None };
        let full = Response { overall: Code::OverLimit, statuses: vec![ok, over] };
        let bytes = encode_response(&full);
        let mut cuts = vec![(0, Response { overall: Code::Unknown, statuses: vec![] })];
        let mut end = encode_response(&Response { overall: Code::OverLimit, statuses: vec![] }).len();
        cuts.push((end, Response { overall: Code::OverLimit, statuses: vec![] }));
        for (i, &status) in full.statuses.iter().enumerate() {
            end += encode_status(&status).len() + 2;
            cuts.push((end, Response { overall: Code::OverLimit, statuses: full.statuses[..=i].to_vec() }));
        }
        assert_eq!(end, bytes.len());
        for i in 0..=bytes.len() {
            let want = cuts.iter().find(|(at, _)| *at == i).map(|(_, r)| r.clone()).ok_or(DecodeError);
            assert_eq!(decode_response(&bytes[..i]), want, "cut at {i} of {}", bytes.len());
        }
    }

    /// A `DescriptorStatus` as a service writes it (the filter only reads them).
    fn encode_status(s: &Status) -> Vec<u8> {
        let code = |c: Code| match c {
            Code::Unknown => 0,
            Code::Ok => 1,
            Code::OverLimit => 2,
        };
        let mut out = Vec::new();
        put_varint_field(&mut out, 1, code(s.code));
        if let Some(n) = s.limit {
            let mut limit = Vec::new();
            put_varint_field(&mut limit, 1, u64::from(n));
            put_varint_field(&mut limit, 2, Unit::Minute as u64);
            put_bytes(&mut out, 2, &limit);
        }
        put_varint_field(&mut out, 3, u64::from(s.remaining));
        if let Some(ms) = s.reset_ms {
            let mut duration = Vec::new();
            put_varint_field(&mut duration, 1, ms / 1000);
            put_varint_field(&mut duration, 2, ms % 1000 * 1_000_000);
            put_bytes(&mut out, 4, &duration);
        }
        out
    }

    /// A `RateLimitResponse` as a service writes it (statuses shorter than 128 bytes).
    fn encode_response(r: &Response) -> Vec<u8> {
        let mut out = Vec::new();
        if r.overall != Code::Unknown {
            put_varint_field(&mut out, 1, if r.overall == Code::Ok { 1 } else { 2 });
        }
        for s in &r.statuses {
            put_bytes(&mut out, 2, &encode_status(s));
        }
        out
    }

    #[test]
    fn encoded_responses_decode_to_themselves() {
        let statuses = [
            Status { code: Code::Ok, limit: Some(u32::MAX), remaining: u32::MAX, reset_ms: Some(0) },
            Status { code: Code::OverLimit, limit: None, remaining: 0, reset_ms: Some(86_400_999) },
            Status { code: Code::Unknown, limit: Some(0), remaining: 7, reset_ms: None },
        ];
        for overall in [Code::Unknown, Code::Ok, Code::OverLimit] {
            let r = Response { overall, statuses: statuses.to_vec() };
            assert_eq!(decode_response(&encode_response(&r)), Ok(r));
        }
    }

    #[test]
    fn numbers_out_of_range_are_clamped_or_ignored() {
        let status = |fields: &[u8]| {
            let mut bytes = vec![0x12, fields.len() as u8];
            bytes.extend_from_slice(fields);
            decode_response(&bytes).unwrap().statuses[0]
        };
        let mut big = Vec::new();
        put_varint_field(&mut big, 3, u64::from(u32::MAX) + 1);
        assert_eq!(status(&big).remaining, u32::MAX, "remaining beyond uint32");
        let mut limit = Vec::new();
        put_varint_field(&mut limit, 1, u64::MAX);
        let mut big = Vec::new();
        put_bytes(&mut big, 2, &limit);
        assert_eq!(status(&big).limit, Some(u32::MAX), "requests_per_unit beyond uint32");
        // duration_until_reset: negative seconds (int64 -1) and nanos of a second or more read
        // as 0; a huge number of seconds saturates.
        let reset = |secs: u64, nanos: u64| {
            let mut duration = Vec::new();
            put_varint_field(&mut duration, 1, secs);
            put_varint_field(&mut duration, 2, nanos);
            let mut fields = Vec::new();
            put_bytes(&mut fields, 4, &duration);
            status(&fields).reset_ms
        };
        assert_eq!(reset(u64::MAX, 5_000_000), Some(5));
        assert_eq!(reset(2, 1_000_000_000), Some(2_000));
        assert_eq!(reset(i64::MAX as u64, 0), Some(u64::MAX));
        assert_eq!(reset(3, 999_999_999), Some(3_999));
        // Codes the filter does not know are Unknown, like 0.
        assert_eq!(status(&[0x08, 3]).code, Code::Unknown);
        assert_eq!(decode_response(&[0x08, 0x7f]).unwrap().overall, Code::Unknown);
    }

    #[test]
    fn units_of_windows() {
        use crate::config::Window;
        assert_eq!(Unit::of(Window::Minute), Unit::Minute);
        assert_eq!(Unit::of(Window::Day), Unit::Day);
        // Envoy's RateLimitUnit numbers (envoy/type/v3/ratelimit_unit.proto).
        assert_eq!(Unit::of(Window::Week) as u8, 7);
        // A 31-day month does not fit a service's 30-day MONTH.
        assert_eq!(Unit::of(Window::Month) as u8, 6);
    }
}
