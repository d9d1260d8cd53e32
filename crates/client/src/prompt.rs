//! Questions asked on the terminal: a confirmation and a hidden token.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::process::{Command, Stdio};

use anyhow::Context as _;

pub fn stdin_is_terminal() -> bool {
    std::io::stdin().is_terminal()
}

/// One line from stdin after showing `question` on stderr, trimmed.
pub fn ask(question: &str) -> anyhow::Result<String> {
    eprint!("{question}");
    std::io::stderr().flush().ok();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("cannot read the answer from stdin")?;
    Ok(line.trim().to_string())
}

/// Like [`ask`], with the terminal's echo off so the token does not stay on
/// screen. `stty` does the switching: no terminal `unsafe` in this binary,
/// and without `stty` the prompt still works, only visibly.
pub fn ask_secret(question: &str) -> anyhow::Result<String> {
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
