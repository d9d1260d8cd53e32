//! The isolate process's own stdout and stderr, line by line, into its
//! hooks: every line cut to a bound and put in isocloud's words.

use std::sync::{Arc, Mutex};

use isocloud_protocol::LogLevel;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

use crate::IsolateHooks;

/// A console line or output line longer than this is cut, and says so:
/// one line must not become megabytes in the activity queue and the
/// origin's store.
pub const MAX_LOG_MESSAGE_BYTES: usize = 32 * 1024;
const STDERR_TAIL_BYTES: usize = 4096;

/// Cuts `message` to [`MAX_LOG_MESSAGE_BYTES`] (on a character boundary),
/// saying how much was cut, with deno's command-line advice in isocloud's
/// words (`isocloud_protocol::deno_words`): every line and error an isolate
/// reports goes through here.
pub fn truncate_log(message: String) -> String {
    let mut message = match isocloud_protocol::deno_words::in_isocloud_words(&message) {
        std::borrow::Cow::Borrowed(_) => message,
        std::borrow::Cow::Owned(rewritten) => rewritten,
    };
    if message.len() <= MAX_LOG_MESSAGE_BYTES {
        return message;
    }
    let total = message.len();
    let mut cut = MAX_LOG_MESSAGE_BYTES;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    message.truncate(cut);
    message.push_str(&format!(" … [isocloud: truncated, {total} bytes in all]"));
    message
}

pub(crate) async fn pump_output(
    stream: impl AsyncRead + Unpin,
    level: LogLevel,
    hooks: Arc<dyn IsolateHooks>,
    tail: Option<Arc<Mutex<String>>>,
) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(64 * 1024).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = truncate_log(String::from_utf8_lossy(&line).trim_end().to_owned());
        if let Some(tail) = &tail {
            let mut tail = tail.lock().expect("stderr tail poisoned");
            tail.push_str(&text);
            tail.push('\n');
            if tail.len() > STDERR_TAIL_BYTES {
                let cut = tail.len() - STDERR_TAIL_BYTES;
                let cut = (cut..tail.len()).find(|i| tail.is_char_boundary(*i)).unwrap_or(0);
                tail.drain(..cut);
            }
        }
        hooks.log(level, text, None);
    }
}

pub(crate) fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out.trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_log_lines_are_cut_on_a_character_boundary_and_say_so() {
        let short = "é".repeat(10);
        assert_eq!(truncate_log(short.clone()), short);
        let long = "é".repeat(MAX_LOG_MESSAGE_BYTES);
        let cut = truncate_log(long);
        assert!(cut.len() < MAX_LOG_MESSAGE_BYTES + 64);
        assert!(cut.ends_with(&format!("[isocloud: truncated, {} bytes in all]", MAX_LOG_MESSAGE_BYTES * 2)), "{cut}");
    }
}
