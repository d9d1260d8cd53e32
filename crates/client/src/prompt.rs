//! Questions asked on the terminal: a confirmation and a hidden token.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::process::{Command, Stdio};

use super::error::PromptError;

pub fn stdin_is_terminal() -> bool {
    std::io::stdin().is_terminal()
}

/// One line from stdin after showing `question` on stderr, trimmed.
pub fn ask(question: &str) -> Result<String, PromptError> {
    eprint!("{question}");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|source| PromptError::Read { what: "the answer", source })?;
    Ok(line.trim().to_string())
}

/// Like [`ask`], with the terminal's echo off so the token does not stay on
/// screen. `stty` does the switching: no terminal `unsafe` in this binary,
/// and without `stty` the prompt still works, only visibly.
pub fn ask_secret(question: &str) -> Result<String, PromptError> {
    let echo_off = stty("-echo");
    let answer = ask(question);
    if echo_off {
        stty("echo");
        eprintln!();
    }
    answer
}

fn stty(setting: &str) -> bool {
    Command::new("stty")
        .arg(setting)
        .stdin(Stdio::inherit())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
