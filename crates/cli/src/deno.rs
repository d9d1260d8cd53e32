//! Finding the deno binary isolates run on.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The version the harness is written and tested against.
pub const PINNED_DENO_VERSION: &str = "2.9.8";
/// Where `scripts/install-deno` puts it, relative to the project root.
pub const PROJECT_DENO: &str = ".isocloud/deno/bin/deno";

#[derive(Debug, thiserror::Error)]
pub enum DenoError {
    #[error(
        "no usable deno found ({tried}).\n  Install the pinned deno {PINNED_DENO_VERSION} with `./scripts/install-deno` \
         (from the isocloud checkout), or pass --deno PATH, or set ISOCLOUD_DENO=PATH."
    )]
    NotFound { tried: String },
    #[error(
        "deno at {path} does not run: {reason}. Pass --deno PATH or set ISOCLOUD_DENO=PATH to a working deno {PINNED_DENO_VERSION}."
    )]
    Broken { path: String, reason: String },
}

/// `--deno PATH`, then `ISOCLOUD_DENO`, then the project's own folder (found
/// upwards from the binary and the working directory), then `PATH`.
pub fn find_deno(flag: Option<&Path>) -> Result<(PathBuf, String), DenoError> {
    if let Some(path) = flag {
        return check(path);
    }
    if let Some(path) = std::env::var_os("ISOCLOUD_DENO").filter(|p| !p.is_empty()) {
        return check(Path::new(&path));
    }
    let mut tried = Vec::new();
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    for root in roots {
        let candidate = root.join(PROJECT_DENO);
        if candidate.is_file() {
            return check(&candidate);
        }
    }
    tried.push(format!("no {PROJECT_DENO} above the binary or the working directory"));
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("deno");
            if candidate.is_file() {
                return check(&candidate);
            }
        }
    }
    tried.push("no deno on PATH".into());
    Err(DenoError::NotFound { tried: tried.join("; ") })
}

fn check(path: &Path) -> Result<(PathBuf, String), DenoError> {
    let broken = |reason: String| DenoError::Broken { path: path.display().to_string(), reason };
    let output = Command::new(path).arg("--version").output().map_err(|e| broken(e.to_string()))?;
    if !output.status.success() {
        return Err(broken(format!("`deno --version` exited with {}", output.status)));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("deno "))
        .and_then(|rest| rest.split_whitespace().next())
        .ok_or_else(|| broken(format!("unexpected `deno --version` output: {text:?}")))?
        .to_owned();
    if version != PINNED_DENO_VERSION {
        tracing::warn!(%version, pinned = PINNED_DENO_VERSION, "deno is not the pinned version; isolates may behave differently");
    }
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    Ok((path, version))
}
