//! proxy-wasm's serialized header map, as `proxy_get_header_map_pairs` returns it.
//!
//! The filter reads all response headers in one hostcall instead of one call per name (it looks
//! up over a dozen names: three families of rate-limit headers, status, encoding, type). The SDK
//! has a parser for this format, but it indexes and unwraps: bytes the host got wrong would abort
//! the VM. This one checks every length and returns `None` instead. [`serialize`] writes the same
//! format, for the headers of a local reply.
//!
//! Format (little-endian u32s): the number of pairs `n`; then `n` pairs of (name length, value
//! length); then, for each pair, the name bytes, a NUL, the value bytes, a NUL.

/// Header pairs from a serialized map; `None` if the bytes are not a well-formed map.
pub fn parse(bytes: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let u32_at = |at: usize| -> Option<usize> {
        let raw: [u8; 4] = bytes.get(at..at.checked_add(4)?)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(raw)).ok()
    };
    let count = u32_at(0)?;
    // Each pair takes at least 8 bytes of sizes and 2 NULs: a count beyond that is corrupt
    // (and must not size an allocation).
    if count > bytes.len() / 10 {
        return None;
    }
    let mut pairs = Vec::with_capacity(count);
    let mut at = 4usize.checked_add(count.checked_mul(8)?)?;
    let mut take = |len: usize| -> Option<&[u8]> {
        let end = at.checked_add(len)?;
        let data = bytes.get(at..end)?;
        if bytes.get(end) != Some(&0) {
            return None;
        }
        at = end.checked_add(1)?;
        Some(data)
    };
    for i in 0..count {
        let sizes = 4 + i * 8;
        let (name_len, value_len) = (u32_at(sizes)?, u32_at(sizes + 4)?);
        let name = String::from_utf8(take(name_len)?.to_vec()).ok()?;
        let value = take(value_len)?.to_vec();
        pairs.push((name, value));
    }
    Some(pairs)
}

/// Serializes header pairs (for a local reply's headers).
pub fn serialize(pairs: &[(&str, &[u8])]) -> Vec<u8> {
    let len32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    let size = 4 + pairs.iter().map(|(k, v)| 8 + k.len() + v.len() + 2).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend(len32(pairs.len()));
    for (k, v) in pairs {
        out.extend(len32(k.len()));
        out.extend(len32(v.len()));
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    #[test]
    fn round_trips_headers_with_any_value_bytes() {
        let pairs: [(&str, &[u8]); 3] = [(":status", b"200"), ("x-bin", b"\xff\x00\n"), ("empty", b"")];
        let parsed = parse(&serialize(&pairs)).unwrap();
        let expected: Vec<(String, Vec<u8>)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect();
        assert_eq!(parsed, expected);
        assert_eq!(parse(b""), Some(Vec::new()));
        assert_eq!(parse(&0u32.to_le_bytes()), Some(Vec::new()));
    }

    #[test]
    fn malformed_maps_are_none_never_a_panic() {
        let pairs: [(&str, &[u8]); 2] = [("content-type", b"application/json"), ("date", b"x")];
        let good = serialize(&pairs);
        let parsed: Vec<(String, Vec<u8>)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect();
        // Every truncation: only the empty one is a (empty) map, every other lacks a NUL at least.
        assert_eq!(parse(&good[..0]), Some(Vec::new()));
        for end in 1..good.len() {
            assert_eq!(parse(&good[..end]), None, "cut at {end}");
        }
        // Where each name and value lies: after the count (4 bytes) and the sizes (8 per pair),
        // each followed by a NUL.
        let mut at = 4 + 8 * pairs.len();
        let mut data = Vec::new();
        for (pair, (name, value)) in pairs.iter().enumerate() {
            data.push((at..at + name.len(), pair, true));
            at += name.len() + 1;
            data.push((at..at + value.len(), pair, false));
            at += value.len() + 1;
        }
        assert_eq!(at, good.len());
        // Every single-byte corruption: a byte of a name or value is read as it is (a name
        // must stay UTF-8); a corrupted count, size or NUL makes the map malformed.
        for i in 0..good.len() {
            for b in [0u8, 1, 0x7f, 0xff] {
                let mut bad = good.clone();
                bad[i] = b;
                let in_data = data.iter().find(|(range, ..)| range.contains(&i));
                let want = if bad == good {
                    Some(parsed.clone())
                } else if let Some((range, pair, is_name)) = in_data {
                    let mut want = parsed.clone();
                    if *is_name {
                        let mut name = want[*pair].0.clone().into_bytes();
                        name[i - range.start] = b;
                        String::from_utf8(name).ok().map(|name| {
                            want[*pair].0 = name;
                            want
                        })
                    } else {
                        want[*pair].1[i - range.start] = b;
                        Some(want)
                    }
                } else if i == 0 && b == 0 {
                    // A count of 0 is an empty map; the bytes after it are not looked at
                    // (proxy-wasm hosts send exactly the map, so nothing checks for leftovers).
                    Some(Vec::new())
                } else {
                    None
                };
                assert_eq!(parse(&bad), want, "byte {i} set to {b:#x}");
            }
        }
        assert_eq!(parse(&u32::MAX.to_le_bytes()), None);
        let mut huge_len = good.clone();
        huge_len[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse(&huge_len), None);
    }
}
