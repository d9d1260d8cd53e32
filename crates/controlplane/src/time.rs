//! Times: stored as milliseconds since the Unix epoch (`BIGINT`, the same on
//! SQLite and PostgreSQL, and trivially ordered and bucketed), shown as
//! RFC 3339 in UTC.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(now.as_millis()).unwrap_or(i64::MAX)
}

/// `2024-05-01T12:00:00.000Z`. Values outside years 1970–9999 are clamped
/// rather than failing: they only ever come from our own rows.
pub fn format_ms(ms: i64) -> String {
    const MAX_MS: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    let clamped = ms.clamp(0, MAX_MS);
    let time = OffsetDateTime::from_unix_timestamp_nanos(i128::from(clamped) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        time.year(),
        u8::from(time.month()),
        time.day(),
        time.hour(),
        time.minute(),
        time.second(),
        time.millisecond()
    )
}

/// Parses an RFC 3339 timestamp (any offset) into epoch milliseconds.
pub fn parse_rfc3339_ms(text: &str) -> Result<i64, String> {
    if text.len() > 64 {
        return Err("is not an RFC 3339 timestamp (too long)".into());
    }
    let time = OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|e| format!("{text:?} is not an RFC 3339 timestamp such as 2024-05-01T12:00:00Z ({e})"))?;
    i64::try_from(time.unix_timestamp_nanos() / 1_000_000).map_err(|_| format!("{text:?} is out of range"))
}

/// A `Duration` as whole milliseconds, saturating.
pub fn duration_ms(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let ms = parse_rfc3339_ms("2024-05-01T12:34:56.789Z").unwrap();
        assert_eq!(format_ms(ms), "2024-05-01T12:34:56.789Z");
        assert_eq!(parse_rfc3339_ms("2024-05-01T14:34:56.789+02:00").unwrap(), ms);
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn refuses_non_rfc3339() {
        for bad in ["yesterday", "2024-05-01", "2024-05-01 12:00:00", ""] {
            assert!(parse_rfc3339_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn clamps_out_of_range() {
        assert!(format_ms(i64::MAX).starts_with("9999-"));
        assert_eq!(format_ms(i64::MIN), "1970-01-01T00:00:00.000Z");
    }
}
