//! When an upstream that answered 429 says to come back: `retry-after` (seconds or an HTTP
//! date, RFC 9110), OpenAI's `x-ratelimit-reset-requests` / `-tokens` (`1m30s`, `6ms`,
//! `1h2m3.5s`), Anthropic's `anthropic-ratelimit-*-reset` (an RFC 3339 time).
//!
//! Every form is read into milliseconds from now; the longest wins (the upstream is not asked
//! again before every one of its limits has room). Values that do not parse are ignored, and
//! a pause is capped at a day (a bad clock or a bad header must not silence a model for good).

/// The longest pause accepted, ms.
pub const MAX_PAUSE_MS: u64 = 86_400_000;

/// The headers read, in no particular order.
pub const HEADERS: [&str; 6] = [
    "retry-after",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-reset",
];

/// Milliseconds from `now_ms` (Unix time) until the upstream wants to be asked again, from
/// the headers `header` gives; `None` when none says.
pub fn come_back_after(header: impl Fn(&str) -> Option<Vec<u8>>, now_ms: u64) -> Option<u64> {
    HEADERS
        .iter()
        .filter_map(|name| {
            let value = header(name)?;
            let value = std::str::from_utf8(&value).ok()?.trim();
            match *name {
                "retry-after" => seconds(value).or_else(|| http_date(value).map(|t| t.saturating_sub(now_ms))),
                "x-ratelimit-reset-requests" | "x-ratelimit-reset-tokens" => duration(value),
                _ => rfc3339(value).map(|t| t.saturating_sub(now_ms)),
            }
        })
        .max()
        .map(|ms| ms.min(MAX_PAUSE_MS))
}

/// `retry-after: 40` (delay-seconds), in ms.
fn seconds(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse::<u64>().ok().map(|s| s.saturating_mul(1000))
}

/// OpenAI's durations: a sequence of `<number><unit>` with units `h`, `m`, `s`, `ms`, and
/// fractions allowed (`1m30s`, `6ms`, `0.5s`, `1h2m3.5s`), in ms (rounded up). Parsed in
/// integers: milliseconds are as fine as any pause needs.
fn duration(value: &str) -> Option<u64> {
    let mut rest = value;
    let mut total: u64 = 0;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let whole_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (whole, tail) = rest.split_at(whole_len);
        let (frac, tail) = match tail.strip_prefix('.') {
            Some(t) => {
                let n = t.bytes().take_while(u8::is_ascii_digit).count();
                t.split_at(n)
            }
            None => ("", tail),
        };
        if whole.is_empty() && frac.is_empty() {
            return None;
        }
        let (scale, tail) = if let Some(t) = tail.strip_prefix("ms") {
            (1u64, t)
        } else if let Some(t) = tail.strip_prefix('h') {
            (3_600_000, t)
        } else if let Some(t) = tail.strip_prefix('m') {
            (60_000, t)
        } else if let Some(t) = tail.strip_prefix('s') {
            (1000, t)
        } else {
            return None;
        };
        let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
        // The fraction, to 9 digits, in billionths of the unit.
        let digits = frac.bytes().take(9).fold(0u64, |a, c| a * 10 + u64::from(c - b'0'));
        let billionths = digits * 10u64.pow(9 - frac.len().min(9) as u32);
        let part = whole.checked_mul(scale)?.checked_add((billionths * scale).div_ceil(1_000_000_000))?;
        total = total.checked_add(part)?;
        rest = tail;
    }
    Some(total)
}

/// Days from 1970-01-01 to `y-m-d` (proleptic Gregorian), for dates after 1970.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn unix_ms(y: i64, mo: u32, d: u32, h: u32, mi: u32, s: u32, ms: u64) -> Option<u64> {
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let days = days_from_civil(y, mo, d);
    let secs = days.checked_mul(86_400)? + i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(s);
    u64::try_from(secs).ok()?.checked_mul(1000)?.checked_add(ms)
}

/// An IMF-fixdate (`Wed, 21 Oct 2015 07:28:00 GMT`), the form RFC 9110 requires senders to
/// use, as Unix ms.
fn http_date(value: &str) -> Option<u64> {
    let mut parts = value.split_ascii_whitespace();
    let _weekday = parts.next()?.strip_suffix(',')?;
    let day: u32 = parts.next()?.parse().ok()?;
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let month_name = parts.next()?;
    let month = MONTHS.iter().position(|m| *m == month_name)? as u32 + 1;
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':').map(|n| n.parse::<u32>().ok());
    let (h, mi, s) = (hms.next()??, hms.next()??, hms.next()??);
    if parts.next()? != "GMT" || parts.next().is_some() {
        return None;
    }
    unix_ms(year, month, day, h, mi, s, 0)
}

/// An RFC 3339 time (`2024-01-01T00:00:30Z`, `2024-01-01T00:00:30.25+02:00`), as Unix ms.
fn rfc3339(value: &str) -> Option<u64> {
    let b = value.as_bytes();
    let num = |from: usize, len: usize| -> Option<u32> {
        let s = value.get(from..from + len)?;
        s.bytes().all(|c| c.is_ascii_digit()).then(|| s.parse().ok())?
    };
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') || !matches!(b.get(10), Some(b'T' | b't' | b' ')) {
        return None;
    }
    let (y, mo, d, h, mi, s) = (num(0, 4)?, num(5, 2)?, num(8, 2)?, num(11, 2)?, num(14, 2)?, num(17, 2)?);
    let mut rest = value.get(19..)?;
    let mut ms = 0u64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        let f = frac.get(..digits)?;
        ms = f.bytes().take(3).chain(std::iter::repeat(b'0')).take(3).fold(0, |a, c| a * 10 + u64::from(c - b'0'));
        rest = frac.get(digits..)?;
    }
    let base = unix_ms(i64::from(y), mo, d, h, mi, s, ms)?;
    if rest.eq_ignore_ascii_case("z") {
        return Some(base);
    }
    let sign = match rest.as_bytes().first()? {
        b'+' => 1i64,
        b'-' => -1,
        _ => return None,
    };
    let off = rest.get(1..)?;
    let (oh, om) = (off.get(0..2)?.parse::<i64>().ok()?, off.get(3..5)?.parse::<i64>().ok()?);
    if off.len() != 5 || off.as_bytes().get(2) != Some(&b':') {
        return None;
    }
    let offset_ms = sign * (oh * 3600 + om * 60) * 1000;
    u64::try_from(i64::try_from(base).ok()?.checked_sub(offset_ms)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn after(pairs: &[(&str, &str)], now_ms: u64) -> Option<u64> {
        let map: HashMap<String, Vec<u8>> = pairs.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect();
        come_back_after(|n| map.get(n).cloned(), now_ms)
    }

    #[test]
    fn every_form_in_milliseconds_the_longest_wins() {
        // 2015-10-21T07:28:00Z
        let t0 = 1_445_412_480_000;
        assert_eq!(after(&[("retry-after", "3")], t0), Some(3000));
        assert_eq!(after(&[("retry-after", " 40 ")], t0), Some(40_000));
        assert_eq!(after(&[("retry-after", "Wed, 21 Oct 2015 07:28:40 GMT")], t0), Some(40_000));
        assert_eq!(after(&[("retry-after", "Wed, 21 Oct 2015 07:27:00 GMT")], t0), Some(0), "a date past");
        assert_eq!(after(&[("x-ratelimit-reset-requests", "1m30s")], t0), Some(90_000));
        assert_eq!(after(&[("x-ratelimit-reset-tokens", "6ms")], t0), Some(6));
        assert_eq!(after(&[("x-ratelimit-reset-tokens", "1h2m3.5s")], t0), Some(3_723_500));
        assert_eq!(after(&[("anthropic-ratelimit-requests-reset", "2015-10-21T07:28:30Z")], t0), Some(30_000));
        assert_eq!(after(&[("anthropic-ratelimit-tokens-reset", "2015-10-21T09:28:30.5+02:00")], t0), Some(30_500));
        assert_eq!(
            after(
                &[("retry-after", "2"), ("x-ratelimit-reset-requests", "20s"), ("x-ratelimit-reset-tokens", "1s")],
                t0
            ),
            Some(20_000)
        );
        assert_eq!(after(&[("retry-after", "99999999")], t0), Some(MAX_PAUSE_MS), "capped at a day");
        assert_eq!(after(&[], t0), None);
    }

    #[test]
    fn malformed_values_are_ignored() {
        let t0 = 1_445_412_480_000;
        for bad in ["", "-1", "1.5", "soon", "Wed 21 Oct 2015 07:28:40 GMT", "Wed, 32 Oct 2015 07:28:40 GMT"] {
            assert_eq!(after(&[("retry-after", bad)], t0), None, "{bad:?}");
        }
        for bad in ["", "1x", "m", "1m30", "-1s"] {
            assert_eq!(after(&[("x-ratelimit-reset-requests", bad)], t0), None, "{bad:?}");
        }
        for bad in ["2015-10-21", "2015-13-21T07:28:30Z", "2015-10-21T07:28:30", "2015-10-21T07:28:30+0200"] {
            assert_eq!(after(&[("anthropic-ratelimit-requests-reset", bad)], t0), None, "{bad:?}");
        }
        assert_eq!(after(&[("retry-after", "bad"), ("x-ratelimit-reset-requests", "5s")], t0), Some(5000));
    }

    #[test]
    fn calendar_arithmetic() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(unix_ms(2024, 2, 29, 23, 59, 59, 0), Some(1_709_251_199_000));
    }
}
