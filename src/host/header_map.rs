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
    let mut pairs = Vec::new();
    let mut utf8 = true;
    walk(bytes, |name, value| match std::str::from_utf8(name) {
        Ok(name) => pairs.push((name.to_string(), value.to_vec())),
        Err(_) => utf8 = false,
    })?;
    utf8.then_some(pairs)
}

/// The values of the headers `names` (lower case, as Envoy keeps names) from a serialized map,
/// in the order asked: the first value of each name, as `proxy_get_header_map_value` gives it.
/// Only the asked values are copied. `None` if the bytes are not a well-formed map.
pub fn values_of<S: AsRef<str>>(bytes: &[u8], names: &[S]) -> Option<Vec<Option<Vec<u8>>>> {
    let mut values: Vec<Option<Vec<u8>>> = vec![None; names.len()];
    walk(bytes, |name, value| {
        for (slot, wanted) in values.iter_mut().zip(names) {
            if slot.is_none() && wanted.as_ref().as_bytes() == name {
                *slot = Some(value.to_vec());
            }
        }
    })?;
    Some(values)
}

/// Calls `pair` with every (name, value) of a serialized map, after checking the whole layout
/// (count, sizes, NULs); `None` (and no call) if it is malformed.
fn walk<'a>(bytes: &'a [u8], mut pair: impl FnMut(&'a [u8], &'a [u8])) -> Option<()> {
    if bytes.is_empty() {
        return Some(());
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
    let mut at = 4usize.checked_add(count.checked_mul(8)?)?;
    let mut take = |len: usize| -> Option<&'a [u8]> {
        let end = at.checked_add(len)?;
        let data = bytes.get(at..end)?;
        if bytes.get(end) != Some(&0) {
            return None;
        }
        at = end.checked_add(1)?;
        Some(data)
    };
    let mut found = Vec::with_capacity(count);
    for i in 0..count {
        let sizes = 4 + i * 8;
        let (name_len, value_len) = (u32_at(sizes)?, u32_at(sizes + 4)?);
        found.push((take(name_len)?, take(value_len)?));
    }
    for (name, value) in found {
        pair(name, value);
    }
    Some(())
}

/// `current` with every header named in `set` replaced by `set`'s value (each name once, in
/// `set`'s order, after the others): the whole map to write back when several headers change.
pub fn replaced(current: &[(String, Vec<u8>)], set: &[(&str, &str)]) -> Vec<u8> {
    let mut pairs: Vec<(&str, &[u8])> = current
        .iter()
        .filter(|(name, _)| !set.iter().any(|(n, _)| n == name))
        .map(|(name, value)| (name.as_str(), value.as_slice()))
        .collect();
    pairs.extend(set.iter().map(|(name, value)| (*name, value.as_bytes())));
    serialize(&pairs)
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

    #[test]
    fn replaced_sets_each_name_once_and_keeps_the_others() {
        let current: Vec<(String, Vec<u8>)> = [
            (":status", "200"),
            ("x-ratelimit-limit-requests", "10"),
            ("set-cookie", "a"),
            ("set-cookie", "b"),
            ("x-ratelimit-limit-requests", "11"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
        let map = replaced(&current, &[("x-ratelimit-limit-requests", "5"), ("x-ratelimit-remaining-requests", "4")]);
        let want: Vec<(String, Vec<u8>)> = [
            (":status", "200"),
            ("set-cookie", "a"),
            ("set-cookie", "b"),
            ("x-ratelimit-limit-requests", "5"),
            ("x-ratelimit-remaining-requests", "4"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect();
        assert_eq!(parse(&map), Some(want));
    }

    #[test]
    fn values_of_copies_the_first_value_of_each_name_asked() {
        let pairs: [(&str, &[u8]); 5] = [
            (":path", b"/v1/chat/completions"),
            ("x-app-id", b"web"),
            ("authorization", b"Bearer \xff"),
            ("x-app-id", b"second"),
            ("content-length", b"208"),
        ];
        let map = serialize(&pairs);
        let got = values_of(&map, &[":path", "authorization", "x-app-id", "x-missing", "Content-Length"]).unwrap();
        assert_eq!(
            got,
            vec![
                Some(b"/v1/chat/completions".to_vec()),
                Some(b"Bearer \xff".to_vec()),
                Some(b"web".to_vec()),
                None,
                // Names are matched as Envoy keeps them: lower case.
                None,
            ]
        );
        assert_eq!(values_of::<&str>(&map, &[]), Some(vec![]));
        assert_eq!(values_of(b"", &[":path"]), Some(vec![None]));
        // A malformed map gives nothing, whatever its first pairs held.
        for end in 1..map.len() {
            assert_eq!(values_of(&map[..end], &[":path"]), None, "cut at {end}");
        }
    }
}
