//! `isocloud login`: check a token against a control plane's `whoami`,
//! then save URL and token for the other commands.

use std::io::Read as _;
use std::path::PathBuf;

use clap::Args;

use super::api::Api;
use super::credentials::{self, Credentials};
use super::error::{ClientError, FilesError, InputError, PromptError};
use super::output::sanitize;
use super::{ConnectionFlags, prompt};

/// Token files and piped tokens are small; a bound keeps `--token-file
/// /dev/zero` from eating memory.
const MAX_TOKEN_BYTES: u64 = 64 * 1024;

#[derive(Args, Debug)]
pub struct LoginArgs {
    #[command(flatten)]
    pub connection: ConnectionFlags,
    /// Read the token from this file instead of --token or stdin.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

pub async fn run(args: LoginArgs) -> Result<(), ClientError> {
    let dir = credentials::config_dir()?;
    let saved = credentials::load(&dir).ok().flatten();
    // Logging in again without --url keeps the saved control plane.
    let url_text = match (args.connection.url.as_deref().filter(|u| !u.trim().is_empty()), &saved) {
        (Some(url), _) => url.to_string(),
        (None, Some(saved)) => saved.url.clone(),
        (None, None) => return Err(InputError::NoUrl.into()),
    };
    let url = credentials::parse_url(&url_text)?;
    let token = read_token(&args)?;
    if token.is_empty() {
        return Err(InputError::NoToken.into());
    }
    if url.scheme() == "http" && !is_loopback(&url) {
        eprintln!("warning: {url} is plain http: the token crosses the network unencrypted");
    }
    let api = Api::new(url.clone(), token.clone())?;
    let whoami = api.whoami().await?;
    let shown_url = url.as_str().trim_end_matches('/').to_string();
    let path = credentials::save(&dir, &Credentials { url: shown_url.clone(), token })?;
    println!("logged in to {shown_url} as {}", sanitize(&whoami.token_name));
    eprintln!("credentials saved to {}", path.display());
    Ok(())
}

/// --token-file, else --token (or ISOCLOUD_TOKEN), else stdin: piped, or
/// asked for on a terminal.
fn read_token(args: &LoginArgs) -> Result<String, ClientError> {
    if let Some(path) = &args.token_file {
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_TOKEN_BYTES).read_to_string(&mut text))
            .map_err(|source| FilesError::ReadToken { path: path.clone(), source })?;
        return Ok(text.trim().to_string());
    }
    if let Some(token) = args.connection.token.as_deref().map(str::trim).filter(|t| !t.is_empty()) {
        return Ok(token.to_string());
    }
    if prompt::stdin_is_terminal() {
        return Ok(prompt::ask_secret("token (input hidden): ")?);
    }
    let mut text = String::new();
    std::io::stdin()
        .take(MAX_TOKEN_BYTES)
        .read_to_string(&mut text)
        .map_err(|source| PromptError::Read { what: "the token", source })?;
    Ok(text.trim().to_string())
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(name)) => name == "localhost" || name.ends_with(".localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}
