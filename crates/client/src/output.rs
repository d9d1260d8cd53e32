//! How the client commands show things: tables, sizes, server-supplied text
//! made safe for a terminal, and errors with a hint at what to do next.

use std::borrow::Cow;
use std::fmt::Write as _;

use super::api::ClientError;

/// Columns padded to their widest cell; the last column is not padded, so
/// a long commit message does not drag trailing spaces along.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(i) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths.get(i).copied().unwrap_or(0).saturating_sub(cell.chars().count());
                let _ = write!(line, "{cell}{:pad$}  ", "");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Decimal units (1 MB = 1,000,000 bytes), one decimal place above bytes.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KB", "MB", "GB", "TB", "PB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    while value >= 999.95 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Text that came from the server or a tenant's isolate (log lines, error
/// messages) may carry escape sequences; printed raw, they could rewrite the
/// user's terminal. Control characters other than newline and tab are shown
/// escaped instead.
pub fn sanitize(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `2025-01-02T10:11:12.345678Z` → `2025-01-02T10:11:12Z`: sub-seconds only
/// widen list columns.
pub fn short_time(rfc3339: &str) -> String {
    match (rfc3339.find('.'), rfc3339.ends_with('Z')) {
        (Some(dot), true) if dot >= 19 => format!("{}Z", &rfc3339[..dot]),
        _ => rfc3339.to_string(),
    }
}

/// The whole message a failed command prints: `error: …` and, when the
/// failure suggests one, a `hint: …` line.
pub fn render_error(error: &anyhow::Error) -> String {
    let mut out = format!("error: {}", sanitize(&format!("{error:#}")));
    let client_error = error.chain().find_map(|cause| cause.downcast_ref::<ClientError>());
    if let Some(hint) = client_error.and_then(ClientError::hint) {
        out.push_str("\nhint: ");
        out.push_str(&hint);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ApiError;

    #[test]
    fn tables_pad_all_but_the_last_column() {
        let rows = vec![
            vec!["hello".to_string(), "abc".to_string(), "x".to_string()],
            vec!["a".to_string(), "".to_string(), "long message".to_string()],
        ];
        assert_eq!(table(&["NAME", "ID", "MSG"], &rows), "NAME   ID   MSG\nhello  abc  x\na           long message\n");
    }

    #[test]
    fn sizes_are_decimal() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(2_100_000), "2.1 MB");
        assert_eq!(human_bytes(999_999), "1.0 MB");
        assert_eq!(human_bytes(u64::MAX), "18446.7 PB");
    }

    #[test]
    fn escape_sequences_are_defused() {
        assert_eq!(sanitize("plain\tline\nnext"), "plain\tline\nnext");
        assert_eq!(sanitize("\u{1b}[2Jgone"), "\\u{1b}[2Jgone");
    }

    #[test]
    fn times_lose_their_fraction() {
        assert_eq!(short_time("2025-01-02T10:11:12.345Z"), "2025-01-02T10:11:12Z");
        assert_eq!(short_time("2025-01-02T10:11:12Z"), "2025-01-02T10:11:12Z");
        assert_eq!(short_time("garbage.Z"), "garbage.Z");
    }

    fn api_error(code: &str, field: Option<&str>) -> anyhow::Error {
        ClientError::Api(ApiError {
            status: 400,
            code: code.to_string(),
            message: "name is taken".to_string(),
            field: field.map(str::to_string),
            missing: Vec::new(),
        })
        .into()
    }

    #[test]
    fn api_errors_show_message_code_and_field() {
        assert_eq!(render_error(&api_error("CONFLICT", None)), "error: name is taken (CONFLICT)");
        assert_eq!(
            render_error(&api_error("INVALID_FIELD", Some("name"))),
            "error: name is taken (INVALID_FIELD, field name)"
        );
        let with_context = api_error("CONFLICT", None).context("cannot rename hello");
        assert_eq!(render_error(&with_context), "error: cannot rename hello: name is taken (CONFLICT)");
    }

    #[test]
    fn unauthorized_and_unreachable_suggest_login() {
        let rendered = render_error(&api_error("UNAUTHORIZED", None));
        assert!(rendered.contains("\nhint: ") && rendered.contains("isocloud login"), "{rendered}");
        let unreachable: anyhow::Error = ClientError::Unreachable {
            base: "http://127.0.0.1:9".to_string(),
            cause: "Connection refused (os error 111)".to_string(),
        }
        .into();
        let rendered = render_error(&unreachable);
        assert!(rendered.starts_with("error: cannot reach the control plane at http://127.0.0.1:9"), "{rendered}");
        assert!(rendered.contains("isocloud login --url"), "{rendered}");
    }
}
