//! Where a rate-limit window starts and ends.
//!
//! Second, minute and hour windows are fixed lengths aligned to the Unix epoch (a minute resets
//! at :00). Day, week and month windows are calendar windows in UTC: a day starts at 00:00, a
//! week on Monday 00:00, a month at 00:00 on the 1st, whatever its length (28 to 31 days, leap
//! years included). A rule's `window_offset_hours` shifts its calendar windows for a team whose
//! day starts elsewhere: with +5, a month starts at 00:00 UTC+5 on the 1st (19:00 UTC the day
//! before).
//!
//! A window is numbered ([`Span::index`]) so that consecutive windows have consecutive numbers:
//! the limiter stores the number with a bucket's count and carries one window's excess into the
//! next (debt). The dates are computed with Howard Hinnant's `civil_from_days` /
//! `days_from_civil`, exact for the proleptic Gregorian calendar.

use crate::config::Window;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// A rule's window: its length and, for calendar windows, the offset of its day from UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    /// Which window.
    pub window: Window,
    /// Hours added to UTC before the calendar is read (−12…+14; 0 for fixed windows).
    pub offset_hours: i8,
}

/// One window in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// The window's number: consecutive windows have consecutive numbers.
    pub index: u64,
    /// Start, ms since the Unix epoch.
    pub start_ms: u64,
    /// End (the next window's start), ms since the Unix epoch.
    pub end_ms: u64,
}

impl Span {
    /// Milliseconds from `now_ms` until the window resets (at least 0).
    pub fn reset_ms(&self, now_ms: u64) -> u64 {
        self.end_ms.saturating_sub(now_ms)
    }
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Period {
    /// A fixed window, or a calendar window in UTC.
    pub fn utc(window: Window) -> Self {
        Period { window, offset_hours: 0 }
    }

    /// True for day, week and month windows.
    pub fn is_calendar(self) -> bool {
        self.window.is_calendar()
    }

    /// The window `now_ms` falls in.
    pub fn at(self, now_ms: u64) -> Span {
        let fixed = |len: i64| {
            let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
            let index = now.div_euclid(len);
            Span { index: to_u64(index), start_ms: to_u64(index * len), end_ms: to_u64((index + 1) * len) }
        };
        let offset = i64::from(self.offset_hours) * HOUR_MS;
        // Local time: what the team's clock shows.
        let local = i64::try_from(now_ms).unwrap_or(i64::MAX / 2).saturating_add(offset);
        let day = local.div_euclid(DAY_MS);
        let span = |index: i64, first_day: i64, end_day: i64| Span {
            index: to_u64(index),
            start_ms: to_u64(first_day * DAY_MS - offset),
            end_ms: to_u64(end_day * DAY_MS - offset),
        };
        match self.window {
            Window::Second => fixed(1000),
            Window::Minute => fixed(60_000),
            Window::Hour => fixed(HOUR_MS),
            Window::Day => span(day, day, day + 1),
            Window::Week => {
                // Day 0 (1970-01-01) was a Thursday; day 4 the first Monday.
                let week = (day + 3).div_euclid(7);
                let monday = week * 7 - 3;
                span(week, monday, monday + 7)
            }
            Window::Month => {
                let (y, m, _) = civil_from_days(day);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                span(y * 12 + i64::from(m) - 1, days_from_civil(y, m, 1), days_from_civil(ny, nm, 1))
            }
        }
    }

    /// The local date a calendar window starts on (`2026-11-01`): names the window in the rate
    /// limit service's descriptors, so each calendar window is its own counter there.
    pub fn start_date(self, span: &Span) -> String {
        let offset = i64::from(self.offset_hours) * HOUR_MS;
        let local = i64::try_from(span.start_ms).unwrap_or(0) + offset;
        let (y, m, d) = civil_from_days(local.div_euclid(DAY_MS));
        format!("{y:04}-{m:02}-{d:02}")
    }

    /// The shared-data name of the window: seconds for fixed windows (and for UTC days, as
    /// before calendar windows existed), else the window and its offset.
    pub fn tag(self) -> String {
        match (self.window, self.offset_hours) {
            (Window::Week, 0) => "week".into(),
            (Window::Month, 0) => "month".into(),
            (w, 0) => w.secs().to_string(),
            (Window::Week, o) => format!("week{o:+}"),
            (Window::Month, o) => format!("month{o:+}"),
            (w, o) => format!("{}{o:+}", w.secs()),
        }
    }
}

/// (year, month 1–12, day 1–31) of a day number (days since 1970-01-01).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
}

/// The day number (days since 1970-01-01) of a date.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let (m, d) = (i64::from(m), i64::from(d));
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3_600_000;
    const D: u64 = 24 * H;

    fn ms(y: i64, m: u32, d: u32, hh: u64, mm: u64, ss: u64) -> u64 {
        days_from_civil(y, m, d) as u64 * D + hh * H + mm * 60_000 + ss * 1000
    }

    fn leap(y: i64) -> bool {
        (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
    }

    fn month_days(y: i64, m: u32) -> u64 {
        match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        }
    }

    #[test]
    fn every_month_from_1970_to_2400_has_its_length_and_follows_the_last() {
        // Walk the calendar day by day against a naive month table: the date of each day, and
        // each month's window (start, end, consecutive index).
        let month = Period::utc(Window::Month);
        let (mut y, mut m, mut d) = (1970i64, 1u32, 1u32);
        let mut last_index = None;
        for day in 0..days_from_civil(2400, 12, 31) {
            assert_eq!(civil_from_days(day), (y, m, d), "day {day}");
            assert_eq!(days_from_civil(y, m, d), day);
            if d == 1 {
                let span = month.at(day as u64 * D + 5 * H);
                assert_eq!(span.start_ms, day as u64 * D, "{y}-{m}");
                assert_eq!(span.end_ms - span.start_ms, month_days(y, m) * D, "{y}-{m}");
                if let Some(prev) = last_index {
                    assert_eq!(span.index, prev + 1, "{y}-{m}");
                }
                last_index = Some(span.index);
                assert_eq!(month.start_date(&span), format!("{y:04}-{m:02}-01"));
            }
            d += 1;
            if d as u64 > month_days(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn leap_days_and_month_ends() {
        let month = Period::utc(Window::Month);
        // 2024 is a leap year, 2100 is not, 2000 is.
        for (y, days) in [(2024, 29), (2025, 28), (2100, 28), (2000, 29)] {
            let span = month.at(ms(y, 2, 15, 12, 0, 0));
            assert_eq!((span.end_ms - span.start_ms) / D, days, "{y}");
        }
        let feb29 = month.at(ms(2024, 2, 29, 23, 59, 59));
        assert_eq!(feb29.end_ms, ms(2024, 3, 1, 0, 0, 0));
        assert_eq!(feb29.reset_ms(ms(2024, 2, 29, 23, 59, 59)), 1000);
        // The last second of a 31-day month: the window resets in 1 s, then a new one starts.
        let now = ms(2026, 12, 31, 23, 59, 59);
        let span = month.at(now);
        assert_eq!(span.reset_ms(now), 1000);
        assert_eq!(span.start_ms, ms(2026, 12, 1, 0, 0, 0));
        let next = month.at(now + 1000);
        assert_eq!((next.index, next.start_ms), (span.index + 1, ms(2027, 1, 1, 0, 0, 0)));
        assert_eq!(next.reset_ms(now + 1000), 31 * D);
        // And at 23:59:59 on the 31st of a 31-day month that is not December.
        let now = ms(2026, 10, 31, 23, 59, 59);
        assert_eq!(month.at(now).reset_ms(now), 1000);
        let day = Period::utc(Window::Day);
        assert_eq!(day.at(now).reset_ms(now), 1000);
    }

    #[test]
    fn weeks_start_on_monday() {
        let week = Period::utc(Window::Week);
        // 2026-11-30 is a Monday.
        let span = week.at(ms(2026, 12, 3, 10, 0, 0));
        assert_eq!((span.start_ms, span.end_ms), (ms(2026, 11, 30, 0, 0, 0), ms(2026, 12, 7, 0, 0, 0)));
        assert_eq!(week.start_date(&span), "2026-11-30");
        // Sunday 23:59:59 is the last second of a week.
        let sunday = ms(2026, 11, 29, 23, 59, 59);
        assert_eq!(week.at(sunday).reset_ms(sunday), 1000);
        assert_eq!(week.at(sunday).index + 1, span.index);
        // Across a year end.
        let span = week.at(ms(2027, 1, 1, 0, 0, 0));
        assert_eq!(span.start_ms, ms(2026, 12, 28, 0, 0, 0));
    }

    #[test]
    fn offsets_shift_calendar_windows() {
        // UTC+5: the month of December starts at 19:00 UTC on November 30.
        let month = Period { window: Window::Month, offset_hours: 5 };
        let span = month.at(ms(2026, 11, 30, 19, 0, 0));
        assert_eq!(span.start_ms, ms(2026, 11, 30, 19, 0, 0));
        assert_eq!(span.end_ms, ms(2026, 12, 31, 19, 0, 0));
        assert_eq!(month.start_date(&span), "2026-12-01");
        let before = month.at(ms(2026, 11, 30, 18, 59, 59));
        assert_eq!((before.index + 1, month.start_date(&before)), (span.index, "2026-11-01".to_string()));
        // 23:59:59 on the 31st in UTC+5 is 18:59:59 UTC: 1 s left.
        let now = ms(2026, 12, 31, 18, 59, 59);
        assert_eq!(month.at(now).reset_ms(now), 1000);
        // UTC−8: a day starts at 08:00 UTC; a week on Monday 08:00 UTC.
        let day = Period { window: Window::Day, offset_hours: -8 };
        let span = day.at(ms(2026, 11, 30, 7, 0, 0));
        assert_eq!((span.start_ms, day.start_date(&span)), (ms(2026, 11, 29, 8, 0, 0), "2026-11-29".to_string()));
        let week = Period { window: Window::Week, offset_hours: -8 };
        assert_eq!(week.at(ms(2026, 12, 1, 0, 0, 0)).start_ms, ms(2026, 11, 30, 8, 0, 0));
        // +14 and −12, the extremes.
        let day = Period { window: Window::Day, offset_hours: 14 };
        assert_eq!(day.at(ms(2026, 11, 30, 10, 0, 0)).start_ms, ms(2026, 11, 30, 10, 0, 0));
        let day = Period { window: Window::Day, offset_hours: -12 };
        assert_eq!(day.at(ms(2026, 11, 30, 11, 59, 59)).start_ms, ms(2026, 11, 29, 12, 0, 0));
    }

    #[test]
    fn fixed_windows_are_epoch_aligned_and_utc_days_keep_their_numbers() {
        let minute = Period::utc(Window::Minute);
        let span = minute.at(10 * 60_000 + 15_000);
        assert_eq!((span.index, span.reset_ms(10 * 60_000 + 15_000)), (10, 45_000));
        // A UTC day is numbered as the epoch-aligned 86400 s window was (buckets keep counting).
        let now = ms(2026, 11, 30, 17, 0, 0);
        assert_eq!(Period::utc(Window::Day).at(now).index, now / D);
        assert_eq!(Period::utc(Window::Day).tag(), "86400");
        assert_eq!(Period { window: Window::Day, offset_hours: -3 }.tag(), "86400-3");
        assert_eq!(Period { window: Window::Month, offset_hours: 5 }.tag(), "month+5");
        assert_eq!(Period::utc(Window::Week).tag(), "week");
    }
}
