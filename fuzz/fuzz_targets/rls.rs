//! Rate limit service answers, from any bytes:
//! - as an answer: it decodes or fails, never panics; what decodes has at most one status per
//!   2 bytes (a status is at least a tag and a length), decodes again to the same answer once
//!   re-encoded the way a service writes it, and is unchanged by fields it does not know
//!   appended (what a newer service may send);
//! - as a description of an answer (its codes, limits, remaining counts and resets, which
//!   fields are present, in which order, with unknown fields between them): the bytes a
//!   service would send for it decode to exactly that answer, out-of-range numbers clamped as
//!   `llm_meter::limit::rls` documents.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llm_meter::limit::rls::{decode_response, Code, Response, Status};

fuzz_target!(|input: &[u8]| {
    if let Ok(r) = decode_response(input) {
        assert!(2 * r.statuses.len() <= input.len(), "{} statuses from {} bytes", r.statuses.len(), input.len());
        let canonical = encode(&r);
        assert_eq!(decode_response(&canonical).as_ref(), Ok(&r), "re-encoded as {canonical:?}");
        let mut newer = input.to_vec();
        // raw_body (5, bytes), a fixed32 and a fixed64 field from the future.
        newer.extend([0x2a, 2, b'h', b'i', 0x3d, 1, 2, 3, 4, 0x41, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(decode_response(&newer), Ok(r), "with unknown fields appended");
    }
    if let Some((want, bytes)) = described(input) {
        assert_eq!(decode_response(&bytes), Ok(want), "bytes {bytes:?}");
    }
});

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u64, n: u64) {
    put_varint(out, field << 3);
    put_varint(out, n);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn code_number(code: Code) -> u64 {
    match code {
        Code::Unknown => 0,
        Code::Ok => 1,
        Code::OverLimit => 2,
    }
}

/// What `RateLimitResponse.Code` number `n` means (0 is UNKNOWN, so is any number not defined).
fn code_of(n: u64) -> Code {
    match n {
        1 => Code::Ok,
        2 => Code::OverLimit,
        _ => Code::Unknown,
    }
}

/// The canonical encoding of an answer: every field the filter reads, in field order.
fn encode(r: &Response) -> Vec<u8> {
    let mut out = Vec::new();
    put_varint_field(&mut out, 1, code_number(r.overall));
    for s in &r.statuses {
        let mut status = Vec::new();
        put_varint_field(&mut status, 1, code_number(s.code));
        if let Some(n) = s.limit {
            let mut limit = Vec::new();
            put_varint_field(&mut limit, 1, u64::from(n));
            put_bytes(&mut status, 2, &limit);
        }
        put_varint_field(&mut status, 3, u64::from(s.remaining));
        if let Some(ms) = s.reset_ms {
            let mut duration = Vec::new();
            put_varint_field(&mut duration, 1, ms / 1000);
            put_varint_field(&mut duration, 2, ms % 1000 * 1_000_000);
            put_bytes(&mut status, 4, &duration);
        }
        put_bytes(&mut out, 2, &status);
    }
    out
}

/// The fuzz input read as a description of an answer.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    /// A number of the width the next byte picks (1, 2, 4 or 8 bytes, little-endian), so
    /// small and huge numbers are both common.
    fn number(&mut self) -> Option<u64> {
        let width = 1 << (self.byte()? % 4);
        let bytes = self.0.get(..width)?;
        self.0 = &self.0[width..];
        let mut le = [0; 8];
        le[..width].copy_from_slice(bytes);
        Some(u64::from_le_bytes(le))
    }

    /// A field the decoder does not read (number 5 to 20, any wire type), or nothing.
    fn unknown_field(&mut self, out: &mut Vec<u8>) -> Option<()> {
        let b = self.byte()?;
        if b & 0x80 == 0 {
            return Some(());
        }
        let field = 5 + u64::from(b & 0x0f);
        match (b >> 4) & 3 {
            0 => put_varint_field(out, field, self.number()?),
            1 => {
                put_varint(out, (field << 3) | 1);
                out.extend(self.number()?.to_le_bytes());
            }
            2 => {
                let len = usize::from(self.byte()? % 16);
                put_bytes(out, field, self.0.get(..len)?);
                self.0 = &self.0[len..];
            }
            _ => {
                put_varint(out, (field << 3) | 5);
                out.extend((self.number()? as u32).to_le_bytes());
            }
        }
        Some(())
    }
}

/// The answer `input` describes and the bytes a service would send for it.
fn described(input: &[u8]) -> Option<(Response, Vec<u8>)> {
    let mut input = Input(input);
    let shape = input.byte()?;
    let mut want = Response { overall: Code::Unknown, statuses: Vec::new() };
    let mut bytes = Vec::new();
    let overall = if shape & 0x08 != 0 { Some(input.number()?) } else { None };
    // The overall code goes before or after the statuses (protobuf does not order fields).
    let overall_first = shape & 0x10 != 0;
    if let (Some(n), true) = (overall, overall_first) {
        put_varint_field(&mut bytes, 1, n);
    }
    for _ in 0..shape % 8 {
        let (status, encoded) = status(&mut input)?;
        want.statuses.push(status);
        put_bytes(&mut bytes, 2, &encoded);
        input.unknown_field(&mut bytes)?;
    }
    if let (Some(n), false) = (overall, overall_first) {
        put_varint_field(&mut bytes, 1, n);
    }
    if let Some(n) = overall {
        want.overall = code_of(n);
    }
    Some((want, bytes))
}

/// One status from the input: what it decodes to and its bytes.
fn status(input: &mut Input<'_>) -> Option<(Status, Vec<u8>)> {
    let present = input.byte()?;
    let mut want = Status { code: Code::Unknown, limit: None, remaining: 0, reset_ms: None };
    let mut fields: Vec<Vec<u8>> = Vec::new();
    if present & 1 != 0 {
        let n = input.number()?;
        want.code = code_of(n);
        let mut f = Vec::new();
        put_varint_field(&mut f, 1, n);
        fields.push(f);
    }
    if present & 2 != 0 {
        // RateLimit { requests_per_unit (uint32), unit, name }: only the first is read, and a
        // value beyond uint32 is read as its maximum.
        let n = input.number()?;
        want.limit = Some(u32::try_from(n).unwrap_or(u32::MAX));
        let mut limit = Vec::new();
        put_varint_field(&mut limit, 1, n);
        put_varint_field(&mut limit, 2, input.number()?);
        input.unknown_field(&mut limit)?;
        let mut f = Vec::new();
        put_bytes(&mut f, 2, &limit);
        fields.push(f);
    }
    if present & 4 != 0 {
        let n = input.number()?;
        want.remaining = u32::try_from(n).unwrap_or(u32::MAX);
        let mut f = Vec::new();
        put_varint_field(&mut f, 3, n);
        fields.push(f);
    }
    if present & 8 != 0 {
        // Duration { seconds (int64), nanos (int32) }: a negative or absent part is 0, nanos of
        // a second or more are 0 (not a valid Duration).
        let mut duration = Vec::new();
        let secs = if present & 0x10 != 0 { Some(input.number()?) } else { None };
        let nanos = if present & 0x20 != 0 { Some(input.number()?) } else { None };
        if let Some(s) = secs {
            put_varint_field(&mut duration, 1, s);
        }
        input.unknown_field(&mut duration)?;
        if let Some(n) = nanos {
            put_varint_field(&mut duration, 2, n);
        }
        let secs = secs.filter(|&s| s <= i64::MAX as u64).unwrap_or(0);
        let nanos = nanos.filter(|&n| n < 1_000_000_000).unwrap_or(0);
        want.reset_ms = Some(secs.saturating_mul(1000).saturating_add(nanos / 1_000_000));
        let mut f = Vec::new();
        put_bytes(&mut f, 4, &duration);
        fields.push(f);
    }
    // Any field order, with unknown fields between.
    if present & 0x40 != 0 {
        fields.reverse();
    }
    let mut bytes = Vec::new();
    for f in fields {
        bytes.extend(f);
        input.unknown_field(&mut bytes)?;
    }
    Some((want, bytes))
}
