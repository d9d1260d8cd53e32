//! `isocloud logs`: a project's (or one deployment's) log lines and
//! lifecycle events, once or followed until Ctrl-C.

use std::time::{Duration, SystemTime};

use clap::Args;
use futures_util::StreamExt as _;

use super::api::{Api, LogEntry, LogQuery, decode};
use super::error::{ClientError, InputError};
use super::output::sanitize;
use super::{ConnectionFlags, connect, time};

/// An NDJSON line longer than this is not a log entry the server sends
/// (the runner bounds messages far below it); the stream is dropped.
const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(10);

#[derive(Args, Debug)]
pub struct LogsArgs {
    #[command(flatten)]
    pub connection: ConnectionFlags,
    #[arg(long, short = 'p', value_name = "NAME", required_unless_present = "build")]
    pub project: Option<String>,
    /// The build log of this deployment (what deno printed at deploy time) instead.
    #[arg(long, value_name = "DEPLOYMENT_ID", conflicts_with_all = ["deployment", "since", "limit", "follow"])]
    pub build: Option<String>,
    /// Only this deployment's logs.
    #[arg(long, value_name = "ID")]
    pub deployment: Option<String>,
    /// From this time on: RFC 3339 (2025-01-31T12:00:00Z) or a duration back from now (10m, 1h30m, 2d).
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// The newest N entries (default 100; more than a page of 1,000 are read page by page).
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    /// Keep printing new entries until Ctrl-C.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Print each entry as one JSON line.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: LogsArgs) -> Result<(), ClientError> {
    let since = args.since.as_deref().map(|s| time::parse_since(s, SystemTime::now())).transpose();
    let since = since.map_err(InputError::Since)?;
    let api = connect(&args.connection)?;
    if let Some(id) = &args.build {
        let build = api.build_log(id).await?;
        if args.json {
            println!("{}", serde_json::to_string(&build)?);
            return Ok(());
        }
        match build.log.as_deref().map(str::trim_end) {
            Some("") => println!("(the build printed nothing)"),
            Some(log) => println!("{}", sanitize_multiline(log)),
            None => println!("(no build: the deployment was not built from files)"),
        }
        if build.status == "failed" {
            let reason = sanitize(build.error.as_deref().unwrap_or("no reason given")).into_owned();
            return Err(ClientError::BuildFailed { id: build.id, reason });
        }
        return Ok(());
    }
    let Some(project) = args.project.as_deref() else { return Err(InputError::ProjectRequired.into()) };
    let query = LogQuery { deployment: args.deployment.clone(), since, limit: args.limit };
    if !args.follow {
        let mut entries = api.logs(project, &query).await?;
        // Oldest first, as a terminal reads them, whatever the server's order.
        entries.sort_by_key(|e| e.id);
        for entry in &entries {
            print_entry(entry, args.json);
        }
        return Ok(());
    }
    tokio::select! {
        result = follow(&api, project, query, args.json) => result,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// Each line of a multi-line text, sanitized (no terminal control codes).
fn sanitize_multiline(text: &str) -> String {
    text.lines().map(sanitize).collect::<Vec<_>>().join("\n")
}

/// Streams until Ctrl-C. A dropped stream is picked up again from the
/// last entry's time; entries already shown (by id) are skipped.
async fn follow(api: &Api, project: &str, mut query: LogQuery, json: bool) -> Result<(), ClientError> {
    let mut last: Option<(i64, String)> = None;
    let mut delay = Duration::from_millis(500);
    let mut connected_once = false;
    loop {
        match api.follow_logs(project, &query).await {
            Ok(response) => {
                connected_once = true;
                delay = Duration::from_millis(500);
                let mut stream = response.bytes_stream();
                let mut buffer: Vec<u8> = Vec::new();
                while let Some(chunk) = stream.next().await {
                    let Ok(chunk) = chunk else { break };
                    buffer.extend_from_slice(&chunk);
                    while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buffer.drain(..=end).collect();
                        handle_line(&line, &mut last, json);
                    }
                    if buffer.len() > MAX_LINE_BYTES {
                        return Err(ClientError::LogLineTooLong { max_bytes: MAX_LINE_BYTES });
                    }
                }
                eprintln!("the log stream ended; reconnecting");
            }
            // A refused first request (bad project, bad token) is an answer, not a blip.
            Err(e) if !connected_once => return Err(e.into()),
            Err(e) => eprintln!("cannot reconnect ({e}); retrying in {} s", delay.as_secs_f32()),
        }
        if let Some((_, timestamp)) = &last {
            query.since = Some(timestamp.clone());
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RECONNECT_DELAY);
    }
}

fn handle_line(line: &[u8], last: &mut Option<(i64, String)>, json: bool) {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    // Blank lines keep idle connections open.
    if text.is_empty() {
        return;
    }
    match decode::<LogEntry>(text.as_bytes()) {
        Ok(entry) => {
            if last.as_ref().is_some_and(|(id, _)| entry.id <= *id) {
                return;
            }
            print_entry(&entry, json);
            *last = Some((entry.id, entry.timestamp));
        }
        Err(e) => eprintln!("warning: skipping a line that is not a log entry ({e}): {}", sanitize(text)),
    }
}

fn print_entry(entry: &LogEntry, json: bool) {
    if json {
        if let Ok(line) = serde_json::to_string(entry) {
            println!("{line}");
        }
        return;
    }
    println!("{}", format_entry(entry));
}

/// `timestamp level [request_id] message`; lifecycle events (no level)
/// show their type in the level's place, so a crash stands out.
pub fn format_entry(entry: &LogEntry) -> String {
    let level = entry.level.as_deref().unwrap_or(&entry.kind);
    let request = entry.request_id.as_deref().map(|id| format!("[{id}] ")).unwrap_or_default();
    sanitize(&format!("{} {level:<5} {request}{}", entry.timestamp, entry.message.trim_end())).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: &str, level: Option<&str>, request_id: Option<&str>, message: &str) -> LogEntry {
        LogEntry {
            id: 1,
            deployment_id: "abc".into(),
            timestamp: "2025-01-31T12:00:00.123Z".into(),
            kind: kind.into(),
            level: level.map(Into::into),
            message: message.into(),
            request_id: request_id.map(Into::into),
        }
    }

    #[test]
    fn lines_read_timestamp_level_request_message() {
        assert_eq!(
            format_entry(&entry("log", Some("info"), Some("req1"), "hello\n")),
            "2025-01-31T12:00:00.123Z info  [req1] hello"
        );
        assert_eq!(format_entry(&entry("log", Some("error"), None, "boom")), "2025-01-31T12:00:00.123Z error boom");
        assert_eq!(
            format_entry(&entry("cpu_time_limit", None, None, "over 50 ms")),
            "2025-01-31T12:00:00.123Z cpu_time_limit over 50 ms"
        );
        assert_eq!(
            format_entry(&entry("log", Some("info"), None, "\u{1b}[31mred")),
            "2025-01-31T12:00:00.123Z info  \\u{1b}[31mred"
        );
    }

    #[test]
    fn followed_lines_skip_what_was_shown() {
        let mut last = None;
        let line = |id: i64, message: &str| {
            let entry = LogEntry { id, timestamp: format!("t{id}"), ..entry("log", Some("info"), None, message) };
            serde_json::to_vec(&entry).unwrap()
        };
        handle_line(&line(5, "a"), &mut last, false);
        assert_eq!(last, Some((5, "t5".to_string())));
        handle_line(&line(4, "old"), &mut last, false);
        // An entry missing a field is skipped with a warning, not shown half.
        handle_line(br#"{"id":9,"timestamp":"t9","type":"log","message":"a"}"#, &mut last, false);
        handle_line(b"\n", &mut last, false);
        handle_line(b"not json", &mut last, false);
        assert_eq!(last, Some((5, "t5".to_string())));
    }
}
