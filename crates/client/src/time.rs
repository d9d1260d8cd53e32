//! `--since` values: an RFC 3339 time or a duration back from now (`10m`,
//! `1h30m`, `2d`), both sent to the server as RFC 3339 UTC.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Parses `--since` against `now`.
pub fn parse_since(text: &str, now: SystemTime) -> Result<String, String> {
    let text = text.trim();
    if let Some(duration) = parse_duration(text) {
        let at = now.checked_sub(duration).ok_or_else(|| format!("`{text}` reaches back before 1970"))?;
        let since_epoch = at.duration_since(UNIX_EPOCH).map_err(|_| format!("`{text}` reaches back before 1970"))?;
        return Ok(format_utc(since_epoch.as_secs() as i64, since_epoch.subsec_nanos()));
    }
    match parse_rfc3339(text) {
        Some((seconds, nanos)) => Ok(format_utc(seconds, nanos)),
        None => Err(format!(
            "`{text}` is neither an RFC 3339 time (2025-01-31T12:00:00Z) nor a duration (90s, 10m, 1h30m, 2d)"
        )),
    }
}

/// `<number><unit>` repeated, units `s m h d w`; `None` if not that shape.
pub fn parse_duration(text: &str) -> Option<Duration> {
    if text.is_empty() {
        return None;
    }
    let mut total: u64 = 0;
    let mut number: Option<u64> = None;
    for c in text.chars() {
        if let Some(digit) = c.to_digit(10) {
            number = Some(number.unwrap_or(0).checked_mul(10)?.checked_add(u64::from(digit))?);
            continue;
        }
        let unit: u64 = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => return None,
        };
        total = total.checked_add(number.take()?.checked_mul(unit)?)?;
    }
    // A trailing bare number ("10") is ambiguous: refuse it.
    if number.is_some() {
        return None;
    }
    Some(Duration::from_secs(total))
}

/// `YYYY-MM-DD[Tt ]HH:MM:SS[.frac](Z|±HH:MM)` → seconds since the epoch
/// (UTC) and nanoseconds.
fn parse_rfc3339(text: &str) -> Option<(i64, u32)> {
    let b = text.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(range)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    // 60 allows a leap second; it lands on the next minute's first.
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut rest = &text[19..];
    let mut nanos = 0u32;
    if let Some(fraction) = rest.strip_prefix('.') {
        let end = fraction.find(|c: char| !c.is_ascii_digit()).unwrap_or(fraction.len());
        if end == 0 {
            return None;
        }
        let mut padded: String = fraction[..end].chars().take(9).collect();
        while padded.len() < 9 {
            padded.push('0');
        }
        nanos = padded.parse().ok()?;
        rest = &fraction[end..];
    }
    let offset_seconds = match rest {
        "Z" | "z" => 0,
        _ => {
            let ob = rest.as_bytes();
            if ob.len() != 6 || ob[3] != b':' || ![1, 2, 4, 5].iter().all(|&i| ob[i].is_ascii_digit()) {
                return None;
            }
            let sign = match ob[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let hours: i64 = rest.get(1..3)?.parse().ok()?;
            let minutes: i64 = rest.get(4..6)?.parse().ok()?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            sign * (hours * 3600 + minutes * 60)
        }
    };
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    Some((seconds, nanos))
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (if month <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, month, day)
}

/// RFC 3339 UTC, with milliseconds when there are any.
pub fn format_utc(seconds: i64, nanos: u32) -> String {
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let of_day = seconds.rem_euclid(86_400);
    let (hour, minute, second) = (of_day / 3600, of_day % 3600 / 60, of_day % 60);
    let millis = nanos / 1_000_000;
    if millis == 0 {
        format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
    } else {
        format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millis:03}Z")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Some(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("1w"), Some(Duration::from_secs(604_800)));
        for bad in ["", "10", "m", "1x", "-1m", "1.5h", "99999999999999999999s", "18446744073709551615w"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn since_a_duration_counts_back_from_now() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_since("10m", now).unwrap(), "2023-11-14T22:03:20Z");
        assert!(parse_since("100000w", now).is_err(), "before 1970");
    }

    #[test]
    fn since_a_time_is_normalised_to_utc() {
        let now = SystemTime::now();
        assert_eq!(parse_since("2025-01-31T12:00:00Z", now).unwrap(), "2025-01-31T12:00:00Z");
        assert_eq!(parse_since("2025-01-31t12:00:00.25+02:00", now).unwrap(), "2025-01-31T10:00:00.250Z");
        assert_eq!(parse_since("2024-02-29 23:30:00-01:00", now).unwrap(), "2024-03-01T00:30:00Z");
        for bad in [
            "2025-02-30T00:00:00Z",
            "2025-01-31",
            "2025-01-31T25:00:00Z",
            "2025-01-31T12:00:00",
            "2025-01-31T12:00:00+-1:00",
            "yesterday",
        ] {
            let error = parse_since(bad, now).unwrap_err();
            assert!(error.contains("RFC 3339"), "{bad}: {error}");
        }
    }

    #[test]
    fn civil_dates_roundtrip() {
        for days in [-719_468, -1, 0, 1, 11_016, 19_782, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(format_utc(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400, 0), "2000-02-29T00:00:00Z");
    }
}
