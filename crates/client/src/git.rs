//! The git commit a deploy records, asked of the `git` binary. Any failure
//! (no git, not a work tree, no commit yet, a repository git refuses to
//! read) means "no git info": a deploy never fails because of git.

use std::path::Path;
use std::process::{Command, Stdio};

/// The commit HEAD is, as git tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitInfo {
    pub commit: String,
    /// Its first line.
    pub message: String,
    /// `None` on a detached HEAD.
    pub branch: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkTree {
    pub info: GitInfo,
    /// Uncommitted changes (tracked or not): the deployment is then not
    /// exactly the recorded commit.
    pub dirty: bool,
}

pub fn work_tree(dir: &Path) -> Option<WorkTree> {
    if git(dir, &["rev-parse", "--is-inside-work-tree"])? != "true" {
        return None;
    }
    let commit = git(dir, &["rev-parse", "--verify", "--quiet", "HEAD^{commit}"])?;
    let body = git(dir, &["log", "-1", "--format=%B", "HEAD"]).unwrap_or_default();
    let message = body.lines().next().unwrap_or_default().trim().to_string();
    // Detached HEAD: no branch.
    let branch = git(dir, &["symbolic-ref", "--short", "--quiet", "HEAD"]);
    // `.` limits the check to the deployed folder, which may be a part of the repository.
    let dirty = git(dir, &["status", "--porcelain", "--", "."]).is_some_and(|s| !s.is_empty());
    Some(WorkTree { info: GitInfo { commit, message, branch }, dirty })
}

/// One git command's trimmed stdout, or `None` on any failure.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        // An inherited GIT_DIR (e.g. inside a git hook) would point elsewhere.
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8(output.stdout).ok().map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(dir: &Path, args: &[&str]) {
        let status = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "git {args:?}");
    }

    fn git_available() -> bool {
        Command::new("git").arg("--version").output().is_ok_and(|o| o.status.success())
    }

    #[test]
    fn a_real_repository() {
        if !git_available() {
            eprintln!("skipped: no git binary");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert_eq!(work_tree(root), None, "not a repository yet");
        run(root, &["init", "-q", "-b", "trunk"]);
        assert_eq!(work_tree(root), None, "no commit yet");
        std::fs::write(root.join("main.ts"), "x").unwrap();
        run(root, &["add", "."]);
        run(root, &["commit", "-q", "-m", "First line\n\nThe body."]);
        let tree = work_tree(root).unwrap();
        assert_eq!(tree.info.message, "First line");
        assert_eq!(tree.info.branch.as_deref(), Some("trunk"));
        assert_eq!(tree.info.commit.len(), 40);
        assert!(tree.info.commit.chars().all(|c| c.is_ascii_hexdigit()));
        assert!(!tree.dirty);

        std::fs::write(root.join("new.ts"), "y").unwrap();
        assert!(work_tree(root).unwrap().dirty, "untracked files make it dirty");

        // A subfolder records the same commit; detached HEAD has no branch.
        std::fs::create_dir(root.join("sub")).unwrap();
        let commit = tree.info.commit.clone();
        run(root, &["checkout", "-q", "--detach"]);
        let sub = work_tree(&root.join("sub")).unwrap();
        assert_eq!(sub.info.commit, commit);
        assert_eq!(sub.info.branch, None);
        assert!(!sub.dirty, "changes outside the deployed folder do not count");
    }
}
