//! A full disk (#21 row 10): writes that find no space are answered 507
//! `STORAGE_FULL` (not 500 `INTERNAL`), nothing half-written stays, the
//! storage figures are there for `/metrics`, and writes work again once
//! space is back. The data dir is a small tmpfs mounted by the test (root;
//! CI runs as root, where a failed mount fails the test).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::backend_tests;
use crate::support::{Backend, TestServer, sha256_hex};

backend_tests!(a_full_disk_is_507_storage_full);

struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size_mb: u32) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m,mode=0700"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        if output.status.success() {
            return Some(Tmpfs(dir));
        }
        let why = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(std::env::var("CI").map_or(true, |v| v != "true"), "cannot mount a tmpfs under CI=true: {why}");
        eprintln!("SKIPPED: cannot mount a tmpfs: {why}");
        None
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// Writes a file until the file system is full.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        while file.write_all(&chunk[..512]).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

fn blob(tag: u8) -> Vec<u8> {
    (0..512 * 1024).map(|i| (i % 251) as u8 ^ tag).collect()
}

async fn put_blob(s: &TestServer, bytes: &[u8]) -> crate::support::Reply {
    let url = s.url(&format!("/api/v1/blobs/{}", sha256_hex(bytes)));
    s.send(s.client.put(url).bearer_auth(&s.token).body(bytes.to_vec())).await
}

async fn a_full_disk_is_507_storage_full(backend: Backend) {
    let Some(tmpfs) = Tmpfs::mount(24) else { return };
    let data_dir = tmpfs.path().join("data");
    let s = TestServer::start_with(backend, |o| o.data_dir = data_dir.clone()).await;
    // Probe: writes fit.
    assert_eq!(put_blob(&s, &blob(1)).await.status, 201);
    assert_eq!(s.post("/api/v1/projects", serde_json::json!({"name": "before"})).await.status, 201);
    s.cp.measure_storage().await;
    let figures = s.cp.storage();
    assert!(figures.database_bytes > 0, "{figures:?}");
    assert!(figures.blob_bytes >= 512 * 1024, "{figures:?}");
    assert!(figures.data_disk_free_bytes.is_some_and(|b| b > 0 && b <= 24 * 1024 * 1024), "{figures:?}");

    let filler = tmpfs.fill();
    let reply = put_blob(&s, &blob(2)).await;
    reply.assert_error(507, "STORAGE_FULL", None);
    assert!(!reply.text.contains(tmpfs.path().to_str().unwrap()), "no path to the client: {}", reply.text);
    assert_eq!(std::fs::read_dir(data_dir.join("blobs/tmp")).unwrap().count(), 0, "no half-written blob");
    // The database's own writes: SQLite's (SQLITE_FULL) the same way;
    // PostgreSQL's disk is not this one.
    let reply = s.post("/api/v1/projects", serde_json::json!({"name": "during"})).await;
    match s.backend {
        Backend::Sqlite => reply.assert_error(507, "STORAGE_FULL", None),
        Backend::Postgres { .. } => assert_eq!(reply.status, 201, "{}", reply.text),
    }
    assert_eq!(s.get("/api/v1/projects/before").await.status, 200, "reads still work");
    assert!(s.cp.storage().storage_full_errors >= 1);

    std::fs::remove_file(filler).unwrap();
    assert_eq!(put_blob(&s, &blob(2)).await.status, 201, "space is back");
    // Every pooled connection writes again (one that SQLite's refusal had
    // left inside sqlx's transaction count used to fail every later write).
    for i in 0..12 {
        let reply = s.post("/api/v1/projects", serde_json::json!({"name": format!("after-{i}")})).await;
        assert_eq!(reply.status, 201, "{}", reply.text);
    }
    drop(s);
}
