//! How the client commands show things: tables, sizes, server-supplied text
//! made safe for a terminal, and errors with a hint at what to do next.

use std::borrow::Cow;
use std::fmt::Write as _;

use super::error::ClientError;

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

/// The whole message a failed command prints: `error: …` with each cause
/// after a `: `, and, when the failure suggests one, a `hint: …` line.
pub fn render_error(error: &ClientError) -> String {
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(error);
    while let Some(next) = cause {
        let _ = write!(text, ": {next}");
        cause = next.source();
    }
    let mut out = format!("error: {}", sanitize(&text));
    if let Some(hint) = error.hint() {
        out.push_str("\nhint: ");
        out.push_str(&hint);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApiError, ApiErrorBody, CallError};
    use crate::credentials::CredentialsError;
    use crate::error::FilesError;
    use crate::walk::WalkError;

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

    fn api_error(code: &str, field: Option<&str>) -> ClientError {
        CallError::Api(ApiError {
            body: ApiErrorBody { field: field.map(str::to_string), ..ApiErrorBody::new(code, "name is taken") },
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
        let upload = ClientError::Upload { path: "main.ts".into(), source: Box::new(api_error("CONFLICT", None)) };
        assert_eq!(render_error(&upload), "error: cannot upload main.ts: name is taken (CONFLICT)");
    }

    #[test]
    fn unauthorized_and_unreachable_suggest_login() {
        let rendered = render_error(&api_error("UNAUTHORIZED", None));
        assert!(rendered.contains("\nhint: ") && rendered.contains("isocloud login"), "{rendered}");
        let unreachable = || -> ClientError {
            CallError::Unreachable {
                base: "http://127.0.0.1:9".to_string(),
                cause: "Connection refused (os error 111)".to_string(),
            }
            .into()
        };
        let rendered = render_error(&unreachable());
        assert!(rendered.starts_with("error: cannot reach the control plane at http://127.0.0.1:9"), "{rendered}");
        assert!(rendered.contains("isocloud login --url"), "{rendered}");
        // Behind an upload too.
        let upload = ClientError::Upload { path: "a.txt".into(), source: Box::new(unreachable()) };
        let rendered = render_error(&upload);
        assert!(rendered.starts_with("error: cannot upload a.txt: cannot reach"), "{rendered}");
        assert!(rendered.contains("\nhint: ") && rendered.contains("isocloud login --url"), "{rendered}");
        let no_hint = render_error(&CredentialsError::NoControlPlane.into());
        assert!(!no_hint.contains("hint:"), "{no_hint}");
    }

    /// A cause is shown once, after its context, as anyhow's `{:#}` did.
    #[test]
    fn causes_follow_their_message_once() {
        let denied = || std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let read: ClientError = FilesError::Read { path: "key.pem".into(), source: denied() }.into();
        assert_eq!(render_error(&read), "error: cannot read key.pem: denied");
        let walk: ClientError = WalkError::Io { path: "a.txt".into(), source: denied() }.into();
        assert_eq!(render_error(&walk), "error: cannot read `a.txt`: denied");
        let damaged = CredentialsError::Damaged {
            path: "/c/credentials.json".into(),
            source: serde_json::from_str::<Vec<u8>>("[").unwrap_err(),
        };
        let rendered = render_error(&damaged.into());
        assert!(
            rendered
                .starts_with("error: /c/credentials.json is damaged; run `isocloud login` again: EOF while parsing"),
            "{rendered}"
        );
    }

    /// The messages the e2e tests and scripts look for, word for word.
    #[test]
    fn messages_that_name_the_fix_are_kept() {
        use crate::error::InputError;
        let cases: [(ClientError, &str); 4] = [
            (
                InputError::NoProject { name: "hello".into() }.into(),
                "error: there is no project `hello`: create it with `isocloud projects create hello`",
            ),
            (
                CredentialsError::NoToken { url: "http://127.0.0.1:9".into() }.into(),
                "error: no token for http://127.0.0.1:9: run `isocloud login --url http://127.0.0.1:9`, or pass --token (or set ISOCLOUD_TOKEN)",
            ),
            (
                ClientError::DeployFailed { id: "abc".into(), reason: "boom".into() },
                "error: deployment abc failed: boom\n(its whole build log: isocloud logs --build abc)",
            ),
            (ClientError::LogLineTooLong { max_bytes: 4 << 20 }, "error: the log stream sent a line over 4 MiB"),
        ];
        for (error, text) in cases {
            assert_eq!(render_error(&error), text);
        }
    }
}
