//! Where the client finds its control plane and token: `--url`/`--token`
//! (or `ISOCLOUD_URL`/`ISOCLOUD_TOKEN`), else the credentials file that
//! `isocloud login` wrote (`$ISOCLOUD_CONFIG_DIR`, `$XDG_CONFIG_HOME/isocloud`
//! or `~/.config/isocloud`, file `credentials.json`, mode 0600).

use std::ffi::OsString;
use std::fs::{DirBuilder, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use url::Url;

const FILE_NAME: &str = "credentials.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub url: String,
    pub token: String,
}

/// Why the client has no control plane and token to use.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot find a config directory: set HOME, XDG_CONFIG_HOME or ISOCLOUD_CONFIG_DIR")]
    NoConfigDir,
    #[error("cannot read {}", .path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{} is damaged; run `isocloud login` again", .path.display())]
    Damaged { path: PathBuf, source: serde_json::Error },
    #[error("cannot create {}", .path.display())]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot write {}", .path.display())]
    Write { path: PathBuf, source: std::io::Error },
    /// `why` ends with an example of a good one.
    #[error("invalid URL `{text}`: {why}")]
    InvalidUrl { text: String, why: String },
    #[error("no control plane to talk to: run `isocloud login --url URL`, or pass --url (or set ISOCLOUD_URL)")]
    NoControlPlane,
    #[error("no token for {url}: run `isocloud login --url {url}`, or pass --token (or set ISOCLOUD_TOKEN)")]
    NoToken { url: String },
}

/// A control plane and the token to present to it.
#[derive(Debug, Clone)]
pub struct Connection {
    pub url: Url,
    pub token: String,
}

/// The directory of the credentials file, from the environment.
pub fn config_dir() -> Result<PathBuf, CredentialsError> {
    config_dir_from(
        std::env::var_os("ISOCLOUD_CONFIG_DIR"),
        std::env::var_os("XDG_CONFIG_HOME"),
        std::env::var_os("HOME"),
    )
}

fn config_dir_from(
    isocloud: Option<OsString>,
    xdg_config_home: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf, CredentialsError> {
    let non_empty = |value: Option<OsString>| value.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = non_empty(isocloud) {
        return Ok(dir);
    }
    // The XDG spec says to ignore a relative XDG_CONFIG_HOME.
    if let Some(dir) = non_empty(xdg_config_home).filter(|d| d.is_absolute()) {
        return Ok(dir.join("isocloud"));
    }
    match non_empty(home) {
        Some(home) => Ok(home.join(".config").join("isocloud")),
        None => Err(CredentialsError::NoConfigDir),
    }
}

pub fn file_in(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// The saved credentials, or `None` when nobody logged in yet.
pub fn load(dir: &Path) -> Result<Option<Credentials>, CredentialsError> {
    let path = file_in(dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CredentialsError::Read { path, source }),
    };
    if let Ok(metadata) = std::fs::metadata(&path)
        && metadata.permissions().mode() & 0o077 != 0
    {
        eprintln!("warning: {} is readable by other users; `chmod 600` it", path.display());
    }
    let credentials = serde_json::from_str(&text).map_err(|source| CredentialsError::Damaged { path, source })?;
    Ok(Some(credentials))
}

/// Writes the file with mode 0600 from the start (never briefly readable
/// by others) and renames it into place, so a crash leaves the old file.
pub fn save(dir: &Path, credentials: &Credentials) -> Result<PathBuf, CredentialsError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CredentialsError::CreateDir { path: dir.to_owned(), source })?;
    let path = file_in(dir);
    let temporary = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temporary)?;
        // `mode` applies only to a new file; a leftover one keeps its own.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        let mut text = serde_json::to_vec_pretty(credentials).map_err(std::io::Error::other)?;
        text.push(b'\n');
        file.write_all(&text)?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path)
    };
    write().map_err(|source| {
        let _ = std::fs::remove_file(&temporary);
        CredentialsError::Write { path: path.clone(), source }
    })?;
    Ok(path)
}

/// A control plane URL as typed: http(s), a host, no query or fragment.
/// The trailing `/` is dropped so equal URLs compare equal.
pub fn parse_url(text: &str) -> Result<Url, CredentialsError> {
    let text = text.trim();
    let invalid = |why: String| CredentialsError::InvalidUrl { text: text.to_owned(), why };
    let url = Url::parse(text).map_err(|e| invalid(format!("{e} (expected e.g. http://127.0.0.1:8081)")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(invalid("expected http:// or https:// and a host, e.g. http://127.0.0.1:8081".into()));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("no user, query or fragment, please".into()));
    }
    let trimmed = url.as_str().trim_end_matches('/').to_string();
    Url::parse(&trimmed).map_err(|e| invalid(e.to_string()))
}

/// Flags win over the saved file. The saved token goes only to the URL it
/// was saved for: `--url` pointing elsewhere must bring its own token, so a
/// token never leaks to a server it was not meant for.
pub fn resolve(
    url_flag: Option<&str>,
    token_flag: Option<&str>,
    saved: Option<Credentials>,
) -> Result<Connection, CredentialsError> {
    let url_flag = url_flag.filter(|u| !u.trim().is_empty());
    let token_flag = token_flag.map(str::trim).filter(|t| !t.is_empty());
    let saved_url = saved.as_ref().and_then(|c| parse_url(&c.url).ok());
    let url = match (url_flag, &saved_url) {
        (Some(flag), _) => parse_url(flag)?,
        (None, Some(saved)) => saved.clone(),
        (None, None) => return Err(CredentialsError::NoControlPlane),
    };
    let token = match (token_flag, saved) {
        (Some(token), _) => token.to_string(),
        (None, Some(saved)) if saved_url.as_ref() == Some(&url) => saved.token,
        (None, _) => return Err(CredentialsError::NoToken { url: url.as_str().trim_end_matches('/').to_owned() }),
    };
    Ok(Connection { url, token })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<OsString> {
        Some(OsString::from(s))
    }

    #[test]
    fn the_config_dir_follows_the_environment() {
        assert_eq!(config_dir_from(os("/c"), os("/x"), os("/h")).unwrap(), PathBuf::from("/c"));
        assert_eq!(config_dir_from(None, os("/x"), os("/h")).unwrap(), PathBuf::from("/x/isocloud"));
        assert_eq!(config_dir_from(os(""), os("rel"), os("/h")).unwrap(), PathBuf::from("/h/.config/isocloud"));
        assert!(config_dir_from(None, None, None).is_err());
    }

    #[test]
    fn credentials_roundtrip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("nested").join("isocloud");
        assert_eq!(load(&config).unwrap(), None);
        let credentials = Credentials { url: "http://127.0.0.1:8081".into(), token: "secret".into() };
        let path = save(&config, &credentials).unwrap();
        assert_eq!(path, config.join("credentials.json"));
        assert_eq!(load(&config).unwrap(), Some(credentials.clone()));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&config).unwrap().permissions().mode() & 0o777, 0o700);

        // Overwriting a file someone widened narrows it again.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let other = Credentials { url: "https://cp.example.com".into(), token: "t2".into() };
        save(&config, &other).unwrap();
        assert_eq!(load(&config).unwrap(), Some(other));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(&config).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn a_damaged_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(file_in(dir.path()), "{not json").unwrap();
        let error = load(dir.path()).unwrap_err().to_string();
        assert!(error.contains("isocloud login"), "{error}");
    }

    #[test]
    fn urls_are_checked_and_normalised() {
        assert_eq!(parse_url("http://127.0.0.1:8081/").unwrap().as_str(), "http://127.0.0.1:8081/");
        assert_eq!(parse_url("https://x.example/cp/").unwrap().as_str(), "https://x.example/cp");
        for bad in ["127.0.0.1:8081", "localhost:8081", "ftp://x", "http://x/?a=b", "http://u:p@x", ""] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_win_and_saved_tokens_stay_with_their_url() {
        let saved = || Some(Credentials { url: "http://a.example:8081/".into(), token: "saved".into() });
        let c = resolve(None, None, saved()).unwrap();
        assert_eq!((c.url.as_str(), c.token.as_str()), ("http://a.example:8081/", "saved"));
        let c = resolve(Some("http://a.example:8081"), None, saved()).unwrap();
        assert_eq!(c.token, "saved");
        let c = resolve(None, Some("flag"), saved()).unwrap();
        assert_eq!(c.token, "flag");
        let error = resolve(Some("http://b.example"), None, saved()).unwrap_err().to_string();
        assert!(error.contains("no token for http://b.example"), "{error}");
        let c = resolve(Some("http://b.example"), Some("t"), None).unwrap();
        assert_eq!(c.url.host_str(), Some("b.example"));
        let error = resolve(None, Some("t"), None).unwrap_err().to_string();
        assert!(error.contains("isocloud login --url"), "{error}");
        // An empty ISOCLOUD_TOKEN counts as unset.
        assert_eq!(resolve(None, Some(""), saved()).unwrap().token, "saved");
    }
}
