//! For tests only: a real S3 server on loopback. Garage (a distributed S3
//! store for self-hosters, `scripts/install-s3` installs it), one node on
//! free loopback ports with its own temp dir, a bucket and a key made at
//! start, killed when dropped. Shared by this crate's tests and the e2e
//! tests of the binary.

use std::io::Read as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;

use super::S3Config;

/// Garage's region (its `s3_region`): requests are signed for it.
pub const REGION: &str = "garage";
const BUCKET: &str = "isocloud-test";

/// A Garage node for one test.
pub struct TestS3 {
    child: Child,
    dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// Where the garage binary is: `$ISOCLOUD_GARAGE`, the project's
/// (`.isocloud/garage/bin/garage`, from `scripts/install-s3`), else `PATH`.
pub fn garage_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("ISOCLOUD_GARAGE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2)?;
    let project = repo.join(".isocloud/garage/bin/garage");
    if project.is_file() {
        return Some(project);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("garage")).find(|p| p.is_file())
}

/// Two distinct free loopback ports (both held while the second is picked).
fn free_ports() -> (u16, u16) {
    let bind = || TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    let (a, b) = (bind(), bind());
    let port = |l: &TcpListener| l.local_addr().expect("a bound port").port();
    (port(&a), port(&b))
}

impl TestS3 {
    /// Starts a node. Without a garage binary: `None` (noted on stderr),
    /// except under `CI=true`, where a missing server fails the test.
    pub fn start() -> Option<TestS3> {
        let Some(garage) = garage_binary() else {
            let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
            assert!(!ci, "no garage binary (CI=true): run scripts/install-s3 (scripts/test does)");
            eprintln!("skipped: no garage binary; run scripts/install-s3");
            return None;
        };
        // A port picked free may be taken by a parallel test before Garage
        // binds it: then Garage exits, and another set is tried.
        let mut last_log = String::new();
        for _ in 0..3 {
            match Self::try_start(&garage) {
                Ok(server) => return Some(server),
                Err(log) => last_log = log,
            }
        }
        panic!("garage ({}) did not start:\n{last_log}", garage.display());
    }

    fn try_start(garage: &Path) -> Result<TestS3, String> {
        let dir = tempfile::tempdir().expect("a temp dir");
        let (s3_port, rpc_port) = free_ports();
        // A key of its own: a parallel test's node that took the port this
        // one meant to bind refuses it, rather than passing for this one.
        let access_key_id = format!("GK{}", crate::ids::base36(24));
        let secret_access_key = crate::ids::base36(48);
        let config = format!(
            r#"metadata_dir = "{root}/meta"
data_dir = "{root}/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"
"#,
            root = dir.path().display(),
            secret = "c3ea8cb80333d04e208d136698b1a01ae370d463f0d435ab2177510b3478bf44",
        );
        let config_path = dir.path().join("garage.toml");
        std::fs::write(&config_path, config).expect("write garage.toml");
        let log_path = dir.path().join("garage.log");
        let log = std::fs::File::create(&log_path).expect("garage.log");
        let child = Command::new(garage)
            .arg("-c")
            .arg(&config_path)
            .args(["server", "--single-node", "--default-bucket"])
            .env("GARAGE_DEFAULT_ACCESS_KEY", &access_key_id)
            .env("GARAGE_DEFAULT_SECRET_KEY", &secret_access_key)
            .env("GARAGE_DEFAULT_BUCKET", BUCKET)
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("garage.log"))
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", garage.display()))?;
        let read_log = || {
            let mut text = String::new();
            let _ = std::fs::File::open(&log_path).and_then(|mut f| f.read_to_string(&mut text));
            text
        };
        let mut server = TestS3 {
            child,
            dir,
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            bucket: BUCKET.into(),
            access_key_id,
            secret_access_key,
        };
        // Ready when the bucket answers a listing signed with this node's key.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("garage exited ({status}):\n{}", read_log()));
            }
            if TcpStream::connect(("127.0.0.1", s3_port)).is_ok() && server.answers() {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(format!("garage did not serve within 30 s:\n{}", read_log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the bucket answers a listing (on a thread and runtime of its
    /// own: callers may be inside a runtime, or not).
    fn answers(&self) -> bool {
        let raw = self.raw();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            runtime.block_on(raw.list_with_delimiter(None)).is_ok()
        })
        .join()
        .unwrap_or(false)
    }

    /// `s3://<bucket>/<prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{}", self.bucket, prefix.trim_matches('/'))
    }

    /// The control plane's configuration for blobs under `prefix`.
    pub fn config(&self, prefix: &str) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint.clone()),
            region: Some(REGION.into()),
            access_key_id: Some(self.access_key_id.clone()),
            secret_access_key: Some(self.secret_access_key.clone()),
            ..S3Config::new(self.url(prefix))
        }
    }

    /// A plain client of the bucket, to look at or tamper with objects
    /// behind the store's back.
    pub fn raw(&self) -> Arc<dyn ObjectStore> {
        let store = AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_endpoint(&self.endpoint)
            .with_region(REGION)
            .with_access_key_id(&self.access_key_id)
            .with_secret_access_key(&self.secret_access_key)
            .with_allow_http(true)
            .with_retry(object_store::RetryConfig {
                max_retries: 1,
                retry_timeout: Duration::from_secs(5),
                ..Default::default()
            })
            .build()
            .expect("an S3 client");
        Arc::new(store)
    }

    /// The server's own directory (its metadata and data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
