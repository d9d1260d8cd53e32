//! `--since` values: an RFC 3339 time or a duration back from now (`10m`,
//! `1h30m`, `2d`), both sent to the server as RFC 3339 UTC. Dates are the
//! `time` crate's; only the duration syntax is ours.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// Parses `--since` against `now`.
pub fn parse_since(text: &str, now: SystemTime) -> Result<String, String> {
    let text = text.trim();
    if let Some(duration) = parse_duration(text) {
        let before_1970 = || format!("`{text}` reaches back before 1970");
        let at = now.checked_sub(duration).ok_or_else(before_1970)?;
        let since_epoch = at.duration_since(UNIX_EPOCH).map_err(|_| before_1970())?;
        let at = i128::try_from(since_epoch.as_nanos())
            .ok()
            .and_then(|nanos| OffsetDateTime::from_unix_timestamp_nanos(nanos).ok())
            .ok_or_else(|| format!("`{text}` is out of range"))?;
        return Ok(format_utc(at));
    }
    match parse_rfc3339(text) {
        Some(at) => Ok(format_utc(at)),
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

/// `YYYY-MM-DD[Tt ]HH:MM:SS[.frac](Z|±HH:MM)`, in UTC.
fn parse_rfc3339(text: &str) -> Option<OffsetDateTime> {
    // The time crate takes any byte between date and time; RFC 3339 names
    // `T` (either case) and, in a note, a space.
    if !matches!(text.as_bytes().get(10), Some(b'T' | b't' | b' ')) {
        return None;
    }
    OffsetDateTime::parse(text, &Rfc3339).ok()?.checked_to_offset(UtcOffset::UTC)
}

/// RFC 3339 UTC, with milliseconds when there are any.
fn format_utc(at: OffsetDateTime) -> String {
    let date = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    );
    match at.millisecond() {
        0 => format!("{date}Z"),
        millis => format!("{date}.{millis:03}Z"),
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
        let with_millis = UNIX_EPOCH + Duration::from_nanos(1_700_000_000_250_999_999);
        assert_eq!(parse_since("0s", with_millis).unwrap(), "2023-11-14T22:13:20.250Z");
    }

    #[test]
    fn since_a_time_is_normalised_to_utc() {
        let now = SystemTime::now();
        assert_eq!(parse_since("2025-01-31T12:00:00Z", now).unwrap(), "2025-01-31T12:00:00Z");
        assert_eq!(parse_since("2025-01-31t12:00:00.25+02:00", now).unwrap(), "2025-01-31T10:00:00.250Z");
        assert_eq!(parse_since("2024-02-29 23:30:00-01:00", now).unwrap(), "2024-03-01T00:30:00Z");
        assert_eq!(parse_since("2025-01-31T12:00:00.1234567891z", now).unwrap(), "2025-01-31T12:00:00.123Z");
        for bad in [
            "2025-02-30T00:00:00Z",
            "2025-01-31",
            "2025-01-31T25:00:00Z",
            "2025-01-31T12:00:00",
            "2025-01-31T12:00:00+-1:00",
            "2025-01-31T12:00:00+01:60",
            "2025-01-31T12:00:00.Z",
            "2025-01-31X12:00:00Z",
            "2025-01-31T12:00:00Z ago",
            "yesterday",
        ] {
            let error = parse_since(bad, now).unwrap_err();
            assert!(error.contains("RFC 3339"), "{bad}: {error}");
        }
    }

    /// What the hand-written civil-date algorithm was checked on: the epoch,
    /// a leap day, both ends of the days it round-tripped.
    #[test]
    fn civil_dates() {
        let at = |seconds: i64| format_utc(OffsetDateTime::from_unix_timestamp(seconds).unwrap());
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(-719_468 * 86_400), "0000-03-01T00:00:00Z");
        assert_eq!(at(-86_400), "1969-12-31T00:00:00Z");
        assert_eq!(at(19_782 * 86_400), "2024-02-29T00:00:00Z");
        assert_eq!(at(2_932_896 * 86_400), "9999-12-31T00:00:00Z");
        let now = SystemTime::now();
        assert_eq!(parse_since("0000-03-01T00:00:00Z", now).unwrap(), "0000-03-01T00:00:00Z");
        assert_eq!(parse_since("9999-12-31T00:00:00Z", now).unwrap(), "9999-12-31T00:00:00Z");
    }

    /// The one change from the hand-written parser: a leap second is the
    /// time crate's, the last nanosecond before the next minute, and only
    /// where one can occur (the last second of a month, UTC).
    #[test]
    fn leap_seconds() {
        let now = SystemTime::now();
        assert_eq!(parse_since("2016-12-31T23:59:60Z", now).unwrap(), "2016-12-31T23:59:59.999Z");
        assert!(parse_since("2025-01-31T12:00:60Z", now).is_err());
    }
}
