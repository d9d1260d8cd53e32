//! The rules every input field must pass, as plain functions: each returns a
//! message that reads after the field's name (`"name: must be …"`). The API
//! attaches the field; the rules themselves know nothing of HTTP. A project
//! name and a deployment id taken from a request come out as the newtypes
//! [`ProjectName`] and [`DeploymentId`], so what passed is what gets used.

/// Names a project may not take: they would shadow the control plane's own
/// hosts under the base domain.
pub const RESERVED_PROJECT_NAMES: [&str; 4] = ["api", "www", "admin", "dashboard"];
/// A project name leaves room for `-<12-char deployment id>` inside one
/// 63-byte DNS label.
pub const MAX_PROJECT_NAME_BYTES: usize = 50;
pub const MAX_ENV_NAME_BYTES: usize = 256;
pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;
/// How many env vars one project may hold (they all go into every boot).
pub const MAX_ENV_VARS: usize = 200;
pub const MAX_PATH_BYTES: usize = 1024;
pub const MAX_PATH_SEGMENT_BYTES: usize = 255;
pub const MAX_PATH_DEPTH: usize = 32;
/// Files in one deployment (the apps folder's bound too).
pub const MAX_FILES: usize = 20_000;
pub const MAX_DOMAIN_BYTES: usize = 253;
pub const MAX_GIT_MESSAGE_BYTES: usize = 1024;
pub const MAX_BRANCH_BYTES: usize = 255;
pub const MAX_REPOSITORY_BYTES: usize = 1024;
pub const MIN_WEBHOOK_SECRET_BYTES: usize = 16;
pub const MAX_WEBHOOK_SECRET_BYTES: usize = 256;
/// Extensions loaded as modules (bundle layers); every file is an asset too.
pub const CODE_EXTENSIONS: [&str; 9] = ["js", "mjs", "cjs", "jsx", "ts", "mts", "cts", "tsx", "json"];

type Rule = Result<(), String>;

/// A name that passed [`project_name`]: the store writes no other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectName(String);

impl ProjectName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An id of [`deployment_id`]'s shape (which says nothing of whether it
/// exists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentId(String);

impl DeploymentId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// `a-z0-9-`, 1–50 bytes, no leading or trailing `-`, not reserved.
pub fn project_name(name: &str) -> Result<ProjectName, String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_PROJECT_NAME_BYTES {
        return Err(format!(
            "must be at most {MAX_PROJECT_NAME_BYTES} characters (it is {}; `<name>-<deployment id>` must fit one DNS label)",
            name.len()
        ));
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err(format!("{name:?} may contain only a-z, 0-9 and '-'"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!("{name:?} must not start or end with '-'"));
    }
    if RESERVED_PROJECT_NAMES.contains(&name) {
        return Err(format!("{name:?} is reserved"));
    }
    // `<project>-<deployment id>.<base>` is a deployment's immutable URL: a
    // name of that shape could take one over, so none has it.
    if name.rsplit_once('-').is_some_and(|(_, last)| is_deployment_id(last)) {
        return Err(format!(
            "{name:?} must not end in '-' and 12 characters of a-z0-9: that is the shape of a deployment's host \
             (<project>-<deployment id>), which no project name may take"
        ));
    }
    Ok(ProjectName(name.to_owned()))
}

/// `[A-Za-z_][A-Za-z0-9_]*`, at most 256 bytes, and none of the names that
/// change deno, V8 or the loader (`isocloud_protocol::env_policy`: the
/// runner would refuse the deployment's config anyway).
pub fn env_name(name: &str) -> Rule {
    let mut bytes = name.bytes();
    let Some(first) = bytes.next() else { return Err("must not be empty".into()) };
    if name.len() > MAX_ENV_NAME_BYTES {
        return Err(format!("must be at most {MAX_ENV_NAME_BYTES} bytes"));
    }
    if !(first.is_ascii_alphabetic() || first == b'_') || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!("{name:?} must match [A-Za-z_][A-Za-z0-9_]*"));
    }
    isocloud_protocol::env_policy::check_env_name(name)
}

/// At most 32 KiB, no NUL.
pub fn env_value(value: &str) -> Rule {
    if value.len() > MAX_ENV_VALUE_BYTES {
        return Err(format!("must be at most {MAX_ENV_VALUE_BYTES} bytes (it is {})", value.len()));
    }
    if value.contains('\0') {
        return Err("must not contain NUL".into());
    }
    Ok(())
}

/// A deployment file path: relative, `/`-separated, no empty, `.` or `..`
/// segment, no backslash, no control characters, bounded.
pub fn file_path(path: &str) -> Rule {
    if path.is_empty() {
        return Err("path must not be empty".into());
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(format!("path is longer than {MAX_PATH_BYTES} bytes"));
    }
    if path.starts_with('/') {
        return Err(format!("path {path:?} must be relative (no leading '/')"));
    }
    if path.contains('\\') {
        return Err(format!("path {path:?} must use '/' as separator, not '\\'"));
    }
    if path.chars().any(char::is_control) {
        return Err(format!("path {path:?} contains a control character"));
    }
    let segments: Vec<&str> = path.split('/').collect();
    if segments.len() > MAX_PATH_DEPTH {
        return Err(format!("path {path:?} is deeper than {MAX_PATH_DEPTH} levels"));
    }
    for segment in segments {
        match segment {
            "" => return Err(format!("path {path:?} has an empty segment")),
            "." | ".." => return Err(format!("path {path:?} must not contain '.' or '..' segments")),
            s if s.len() > MAX_PATH_SEGMENT_BYTES => {
                return Err(format!("path {path:?} has a segment longer than {MAX_PATH_SEGMENT_BYTES} bytes"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether a (valid) path is loaded as a module.
pub fn is_code_path(path: &str) -> bool {
    path.rsplit_once('.').is_some_and(|(stem, ext)| !stem.ends_with('/') && CODE_EXTENSIONS.contains(&ext))
}

/// A code file becomes the module `file:///src/<path>`: characters with a
/// meaning in URLs would change which module that is.
pub fn code_path(path: &str) -> Rule {
    if let Some(c) = path.chars().find(|c| matches!(c, '#' | '?' | '%')) {
        return Err(format!("code file path {path:?} must not contain {c:?} (it becomes a module URL)"));
    }
    Ok(())
}

/// 64 lowercase hex characters.
pub fn sha256(hash: &str) -> Rule {
    if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(format!("{:?} is not a SHA-256 (64 lowercase hex characters)", truncate(hash, 80)))
    }
}

/// A deployment id: 12 of `a-z0-9`.
pub fn is_deployment_id(id: &str) -> bool {
    id.len() == 12 && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// `id` as a [`DeploymentId`] when it has the shape of one.
pub fn deployment_id(id: &str) -> Option<DeploymentId> {
    is_deployment_id(id).then(|| DeploymentId(id.to_owned()))
}

/// A lowercase DNS name of at least two labels, not the base domain nor
/// under it, and not an IP address.
pub fn domain(domain: &str, base_domain: &str) -> Rule {
    if domain.is_empty() {
        return Err("must not be empty".into());
    }
    if domain.len() > MAX_DOMAIN_BYTES {
        return Err(format!("must be at most {MAX_DOMAIN_BYTES} characters"));
    }
    if domain.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!("{:?} must be lowercase", truncate(domain, 80)));
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 {
        return Err(format!("{domain:?} needs at least two labels (such as example.com)"));
    }
    for label in &labels {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{domain:?} has a label that is empty or longer than 63 characters"));
        }
        if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Err(format!("{domain:?} may contain only a-z, 0-9, '-' and '.'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("{domain:?} has a label starting or ending with '-'"));
        }
    }
    if labels.last().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
        return Err(format!("{domain:?} is an IP address, not a domain"));
    }
    if is_at_or_under(domain, base_domain) {
        return Err(format!("{domain:?} is under the base domain {base_domain:?}, whose names isocloud assigns"));
    }
    Ok(())
}

/// `host` is `base` or a name under it (`x.base`, not `xbase`).
pub fn is_at_or_under(host: &str, base: &str) -> bool {
    host == base || host.strip_suffix(base).is_some_and(|rest| rest.ends_with('.'))
}

/// A git object id: 40 (SHA-1) or 64 (SHA-256) lowercase hex characters.
pub fn git_commit(commit: &str) -> Rule {
    let hex = commit.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if hex && (commit.len() == 40 || commit.len() == 64) {
        Ok(())
    } else {
        Err(format!("{:?} is not a commit id (40 lowercase hex characters)", truncate(commit, 80)))
    }
}

/// A branch name as `git check-ref-format --branch` would take it, kept to
/// characters that are safe on a command line.
pub fn git_branch(branch: &str) -> Rule {
    if branch.is_empty() {
        return Err("must not be empty".into());
    }
    if branch.len() > MAX_BRANCH_BYTES {
        return Err(format!("must be at most {MAX_BRANCH_BYTES} bytes"));
    }
    if !branch.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./+".contains(&b)) {
        return Err(format!("{branch:?} may contain only A-Z, a-z, 0-9 and '-_./+'"));
    }
    let bad = branch.starts_with(['-', '/', '.'])
        || branch.ends_with(['/', '.'])
        || branch.ends_with(".lock")
        || branch.contains("..")
        || branch.contains("//")
        || branch.contains("/.");
    if bad {
        return Err(format!("{branch:?} is not a valid branch name"));
    }
    Ok(())
}

/// A commit message line as recorded with a deployment.
pub fn git_message(message: &str) -> Rule {
    if message.len() > MAX_GIT_MESSAGE_BYTES {
        return Err(format!("must be at most {MAX_GIT_MESSAGE_BYTES} bytes"));
    }
    if message.contains('\0') {
        return Err("must not contain NUL".into());
    }
    Ok(())
}

/// The first line of a commit message, bounded (for webhook payloads, which
/// carry whole messages).
pub fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or("").replace('\0', "");
    truncate(&line, MAX_GIT_MESSAGE_BYTES).to_owned()
}

/// A repository `git` may fetch: an absolute path, or a URL of a transport
/// that cannot run commands (`ext::` and friends are refused), or scp-like
/// `user@host:path`. Never something `git` could read as an option.
pub fn git_repository(repository: &str) -> Rule {
    if repository.is_empty() {
        return Err("must not be empty".into());
    }
    if repository.len() > MAX_REPOSITORY_BYTES {
        return Err(format!("must be at most {MAX_REPOSITORY_BYTES} bytes"));
    }
    if repository.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must not contain whitespace or control characters".into());
    }
    if repository.starts_with('-') {
        return Err("must not start with '-'".into());
    }
    if repository.contains("::") {
        return Err(format!("{repository:?}: git remote helpers (`<transport>::`) are not allowed"));
    }
    if repository.starts_with('/') {
        return Ok(());
    }
    if let Some((scheme, rest)) = repository.split_once("://") {
        return match scheme {
            "https" | "http" | "ssh" | "git" | "file" if !rest.is_empty() => Ok(()),
            _ => Err(format!("{repository:?}: only https, http, ssh, git and file URLs are allowed")),
        };
    }
    // scp-like: user@host:path (no slash before the colon).
    if let Some((host, path)) = repository.split_once(':')
        && !host.is_empty()
        && !host.contains('/')
        && !path.is_empty()
    {
        return Ok(());
    }
    Err(format!("{repository:?} is neither an absolute path nor a repository URL"))
}

pub fn webhook_secret(secret: &str) -> Rule {
    if secret.len() < MIN_WEBHOOK_SECRET_BYTES || secret.len() > MAX_WEBHOOK_SECRET_BYTES {
        return Err(format!("must be {MIN_WEBHOOK_SECRET_BYTES} to {MAX_WEBHOOK_SECRET_BYTES} bytes"));
    }
    if secret.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// A prefix of `text` of at most `max_bytes`, cut at a character boundary
/// (for echoing untrusted input in messages).
pub fn truncate(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_names() {
        // The last segment of 11 or 13 characters, or with a character a
        // deployment id lacks, is not a deployment id; nor is a name alone.
        for good in
            ["a", "hello", "my-app-2", &"a".repeat(50), "applications", "my-application", "my-applications1", "a-b"]
        {
            assert_eq!(project_name(good).map(|name| name.0), Ok(good.to_owned()));
        }
        for (bad, says) in [
            ("", "empty"),
            ("Hello", "a-z"),
            ("-a", "start"),
            ("a-", "end"),
            ("a_b", "a-z"),
            ("a.b", "a-z"),
            ("api", "reserved"),
            ("www", "reserved"),
            ("admin", "reserved"),
            ("dashboard", "reserved"),
            (&"a".repeat(51), "at most 50"),
            ("alpha-abc123def456", "deployment's host"),
            ("alpha-applications", "deployment's host"),
            ("a-b-000000000000", "deployment's host"),
        ] {
            let err = project_name(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn env_rules() {
        for good in ["A", "_x", "API_KEY_2", &"A".repeat(256)] {
            assert!(env_name(good).is_ok(), "{good}");
        }
        for bad in ["", "1A", "A-B", "A=B", "A B", "é", &"A".repeat(257)] {
            assert!(env_name(bad).is_err(), "{bad}");
        }
        assert!(env_name("LD_PRELOAD").unwrap_err().contains("may not be set by a tenant"));
        assert!(env_name("NODE_ENV").is_ok());
        assert!(env_value("").is_ok());
        assert!(env_value(&"v".repeat(32 * 1024)).is_ok());
        assert!(env_value(&"v".repeat(32 * 1024 + 1)).unwrap_err().contains("32768"));
        assert!(env_value("a\0b").unwrap_err().contains("NUL"));
    }

    #[test]
    fn paths() {
        for good in ["main.ts", "static/logo.svg", "a/b/c.json", ".well-known/x", "a b.txt", "ünï.txt"] {
            assert!(file_path(good).is_ok(), "{good}");
        }
        for (bad, says) in [
            ("", "empty"),
            ("/etc/passwd", "relative"),
            ("../x", "'..'"),
            ("a/../../x", "'..'"),
            ("a/./b", "'.'"),
            ("a//b", "empty segment"),
            ("a/", "empty segment"),
            ("a\\b", "separator"),
            ("a\0b", "control"),
            ("a\nb", "control"),
            ("a/".repeat(40).trim_end_matches('/'), "deeper"),
            (&"a".repeat(256), "segment longer"),
            (&"a/".repeat(600), "longer than"),
        ] {
            let err = file_path(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
        assert!(is_code_path("main.ts") && is_code_path("a/b.json") && is_code_path("x.tsx"));
        assert!(!is_code_path("logo.svg") && !is_code_path("Makefile") && !is_code_path("dir/.ts"));
        assert!(code_path("a#b.ts").unwrap_err().contains("'#'"));
        assert!(code_path("a.ts").is_ok());
    }

    #[test]
    fn hashes() {
        assert!(sha256(&"a".repeat(64)).is_ok());
        assert!(sha256(&"A".repeat(64)).is_err());
        assert!(sha256(&"a".repeat(63)).is_err());
        assert!(sha256(&"g".repeat(64)).is_err());
        assert!(sha256("../../etc/passwd").is_err());
        assert!(is_deployment_id("abc123def456"));
        assert_eq!(deployment_id("abc123def456").map(DeploymentId::into_string).as_deref(), Some("abc123def456"));
        assert_eq!(deployment_id("abc123def45"), None);
        assert!(!is_deployment_id("abc123def45") && !is_deployment_id("ABC123DEF456"));
    }

    #[test]
    fn domains() {
        for good in ["example.com", "www.example.com", "xn--bcher-kva.example", "a-b.c1.io"] {
            assert!(domain(good, "localhost").is_ok(), "{good}");
        }
        for (bad, says) in [
            ("", "empty"),
            ("com", "two labels"),
            ("Example.com", "lowercase"),
            ("a..com", "empty"),
            ("-a.com", "'-'"),
            ("a_b.com", "a-z"),
            ("*.example.com", "a-z"),
            ("1.2.3.4", "IP address"),
            ("example.com.", "empty"),
            ("hello.localhost", "base domain"),
            ("localhost", "two labels"),
            (&format!("{}.com", "a".repeat(64)), "63"),
            (&format!("{}com", "a.".repeat(130)), "at most 253"),
        ] {
            let err = domain(bad, "localhost").unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
        assert!(domain("apps.example.com", "apps.example.com").unwrap_err().contains("base domain"));
        assert!(domain("x.apps.example.com", "apps.example.com").unwrap_err().contains("base domain"));
        assert!(domain("myapps.example.com", "apps.example.com").is_ok());
    }

    #[test]
    fn git_rules() {
        assert!(git_commit(&"0".repeat(40)).is_ok() && git_commit(&"a".repeat(64)).is_ok());
        assert!(git_commit("main").is_err() && git_commit(&"A".repeat(40)).is_err());
        for good in ["main", "feature/x", "release-1.2", "v1+build"] {
            assert!(git_branch(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", "a..b", "a/", "x.lock", "a b", "a;b", "/a", "a//b", "a/.b"] {
            assert!(git_branch(bad).is_err(), "{bad}");
        }
        for good in ["/srv/git/hello.git", "https://example.com/a.git", "git@github.com:a/b.git", "file:///x"] {
            assert!(git_repository(good).is_ok(), "{good}");
        }
        for bad in ["", "-uhack", "ext::sh -c x", "fd::3", "relative/path", "ftp://x", "a b", "https://"] {
            assert!(git_repository(bad).is_err(), "{bad}");
        }
        assert_eq!(first_line("fix: it\n\nbody"), "fix: it");
        assert!(webhook_secret("short").is_err() && webhook_secret(&"s".repeat(16)).is_ok());
    }

    #[test]
    fn truncates_at_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
