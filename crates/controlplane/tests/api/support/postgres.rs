//! A throwaway PostgreSQL cluster per test binary: `initdb` into a temp dir
//! and `postgres` on a free port of 127.0.0.1 (its unix socket in the temp
//! dir too), fsync off. PostgreSQL refuses to run as root, so under root
//! both run as the `postgres` system user (the Debian package makes it)
//! with the temp dir chowned to it. Each test gets a database of its own,
//! so tests run in parallel.
//!
//! The cluster also speaks TLS, with a certificate for 127.0.0.1 from a CA
//! of its own (`ca.crt` in the temp dir). Other tests connect with sqlx's
//! default `sslmode=prefer`; the role `tls_only` is let in over TLS alone
//! (`pg_hba.conf`), for the tests of the encrypted connection.
//!
//! The server is started from a thread that lives as long as the test
//! process and asks for SIGINT (PostgreSQL's fast shutdown) when it goes
//! (`PR_SET_PDEATHSIG`); an `atexit` hook stops it and removes the dir.

#![allow(unsafe_code, reason = "signals, getpwnam and a pre_exec hook for the PostgreSQL the tests start")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sqlx::Connection;

/// Why PostgreSQL tests cannot run here.
#[derive(Debug)]
pub struct Unavailable(pub String);

struct Cluster {
    child: Child,
    dir: Option<tempfile::TempDir>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child process by pid.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        drop(self.dir.take());
    }
}

static CLUSTER: Mutex<Option<Cluster>> = Mutex::new(None);
static PORT: OnceLock<Result<u16, String>> = OnceLock::new();
/// The CA that signed the cluster's certificate (PEM), once started.
static CA_PATH: OnceLock<PathBuf> = OnceLock::new();

/// The role `pg_hba.conf` admits over TLS only.
pub const TLS_ONLY_ROLE: &str = "tls_only";

extern "C" fn stop_cluster() {
    if let Ok(mut cluster) = CLUSTER.lock() {
        drop(cluster.take());
    }
}

fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// The uid and gid of the `postgres` user.
fn postgres_user() -> Result<(u32, u32), String> {
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam with a valid C string; the result is read at once,
    // before any other call could reuse its static buffer.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Err("running as root, but there is no `postgres` user to run PostgreSQL as".into());
    }
    // SAFETY: non-null pointer returned by getpwnam.
    Ok(unsafe { ((*entry).pw_uid, (*entry).pw_gid) })
}

/// `command`, as the postgres user when we are root; with `parent_death`,
/// SIGINT when the spawning thread ends.
fn as_postgres(mut command: Command, user: Option<(u32, u32)>, parent_death: bool) -> Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if let Some((uid, gid)) = user
                && (libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            // After setuid: a credential change clears the death signal.
            if parent_death && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

fn start(bin: &Path) -> Result<(u16, Cluster), String> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let user = if root { Some(postgres_user()?) } else { None };
    let dir = tempfile::Builder::new()
        .prefix("isocloud-pg-")
        .tempdir_in(std::env::temp_dir())
        .map_err(|e| format!("temp dir: {e}"))?;
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).map_err(|e| format!("chown: {e}"))?;
    }
    let data = dir.path().join("data");
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let output = as_postgres(initdb, user, false).output().map_err(|e| format!("initdb: {e}"))?;
    if !output.status.success() {
        return Err(format!("initdb failed: {}", String::from_utf8_lossy(&output.stderr)));
    }
    let tls = write_tls_files(dir.path(), user)?;
    // First match wins: the TLS-only role never gets past the first line
    // unencrypted; everyone else keeps initdb's trust lines.
    let hba = data.join("pg_hba.conf");
    let rest = std::fs::read_to_string(&hba).map_err(|e| format!("pg_hba.conf: {e}"))?;
    std::fs::write(
        &hba,
        format!(
            "hostnossl all {TLS_ONLY_ROLE} 127.0.0.1/32 reject\nhostssl all {TLS_ONLY_ROLE} 127.0.0.1/32 trust\n{rest}"
        ),
    )
    .map_err(|e| format!("pg_hba.conf: {e}"))?;
    let port = free_port()?;
    let log = std::fs::File::create(dir.path().join("postgres.log")).map_err(|e| format!("log file: {e}"))?;
    let mut postgres = Command::new(bin.join("postgres"));
    postgres
        .arg("-D")
        .arg(&data)
        .arg("-p")
        .arg(port.to_string())
        .arg("-k")
        .arg(dir.path())
        .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off"])
        .args(["-c", "full_page_writes=off", "-c", "max_connections=400", "-c", "shared_buffers=64MB"])
        .args(["-c", "ssl=on", "-c", &format!("ssl_cert_file={}", tls.cert.display())])
        .args(["-c", &format!("ssl_key_file={}", tls.key.display())])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    let child = as_postgres(postgres, user, true).spawn().map_err(|e| format!("postgres: {e}"))?;
    let mut cluster = Cluster { child, dir: Some(dir) };

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = Command::new(bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            let _ = CA_PATH.set(tls.ca);
            return Ok((port, cluster));
        }
        if let Ok(Some(status)) = cluster.child.try_wait() {
            let log = cluster.dir.as_ref().map(|d| std::fs::read_to_string(d.path().join("postgres.log")));
            return Err(format!("postgres exited ({status}): {log:?}"));
        }
        if Instant::now() > deadline {
            return Err("postgres did not become ready within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A CA and the server's certificate for 127.0.0.1 and localhost signed by
/// it, in `dir`. PostgreSQL wants its key 0600 and owned by the user it
/// runs as.
fn write_tls_files(dir: &Path, user: Option<(u32, u32)>) -> Result<TlsFiles, String> {
    use std::os::unix::fs::PermissionsExt;
    let failed = |e: rcgen::Error| format!("test certificate: {e}");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "isocloud test PostgreSQL CA");
    let ca_key = rcgen::KeyPair::generate().map_err(failed)?;
    let ca = ca_params.self_signed(&ca_key).map_err(failed)?;
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).map_err(failed)?;
    let key = rcgen::KeyPair::generate().map_err(failed)?;
    let cert = params.signed_by(&key, &ca, &ca_key).map_err(failed)?;
    let files = TlsFiles { ca: dir.join("ca.crt"), cert: dir.join("server.crt"), key: dir.join("server.key") };
    let write = |path: &Path, pem: String, mode: u32| -> Result<(), String> {
        std::fs::write(path, pem).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| format!("chown: {e}"))?;
        }
        Ok(())
    };
    write(&files.ca, ca.pem(), 0o644)?;
    write(&files.cert, cert.pem(), 0o644)?;
    write(&files.key, key.serialize_pem(), 0o600)?;
    Ok(files)
}

/// Starts the cluster once per test binary; its port.
fn cluster_port() -> Result<u16, Unavailable> {
    let Some(bin) = bin_dir() else {
        return Err(Unavailable("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb)".into()));
    };
    let port = PORT.get_or_init(|| {
        let (sender, receiver) = std::sync::mpsc::channel();
        // The keeper thread spawns postgres and never ends, so the death
        // signal fires only when the test process does.
        std::thread::Builder::new()
            .name("postgres-keeper".into())
            .spawn(move || {
                let started = start(&bin).map(|(port, cluster)| {
                    *CLUSTER.lock().expect("cluster lock") = Some(cluster);
                    // SAFETY: registering a plain extern "C" function.
                    unsafe { libc::atexit(stop_cluster) };
                    port
                });
                let _ = sender.send(started);
                loop {
                    std::thread::park();
                }
            })
            .map_err(|e| e.to_string())
            .and_then(|_| receiver.recv().map_err(|e| e.to_string()).and_then(|r| r))
    });
    // An installed PostgreSQL that does not start is a failure, not a skip.
    match port {
        Ok(port) => Ok(*port),
        Err(e) => panic!("the test PostgreSQL cluster did not start: {e}"),
    }
}

/// A new, empty database on the cluster; its URL.
pub async fn fresh_database() -> Result<String, Unavailable> {
    let port = tokio::task::spawn_blocking(cluster_port).await.expect("cluster start task")?;
    let name = format!("test_{}", hex::encode(rand_bytes()));
    let mut admin = sqlx::postgres::PgConnection::connect(&format!("postgres://postgres@127.0.0.1:{port}/postgres"))
        .await
        .expect("connect to the test cluster");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create database");
    admin.close().await.expect("close");
    Ok(format!("postgres://postgres@127.0.0.1:{port}/{name}"))
}

/// A new, empty database owned by [`TLS_ONLY_ROLE`], which the cluster
/// admits over TLS only: its URL without connection options (the test adds
/// its `sslmode`), and the CA that signed the cluster's certificate.
pub async fn fresh_tls_only_database() -> Result<(String, PathBuf), Unavailable> {
    let port = tokio::task::spawn_blocking(cluster_port).await.expect("cluster start task")?;
    let name = format!("test_{}", hex::encode(rand_bytes()));
    let mut admin = sqlx::postgres::PgConnection::connect(&format!("postgres://postgres@127.0.0.1:{port}/postgres"))
        .await
        .expect("connect to the test cluster");
    // Tests run in parallel: the role may be made by another one meanwhile.
    let made = sqlx::query(&format!("CREATE ROLE {TLS_ONLY_ROLE} LOGIN")).execute(&mut admin).await;
    if let Err(e) = made {
        let duplicate = e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == "42710" || c == "23505");
        assert!(duplicate, "create role: {e}");
    }
    sqlx::query(&format!("CREATE DATABASE {name} OWNER {TLS_ONLY_ROLE}"))
        .execute(&mut admin)
        .await
        .expect("create database");
    admin.close().await.expect("close");
    let ca = CA_PATH.get().expect("the cluster wrote its CA").clone();
    Ok((format!("postgres://{TLS_ONLY_ROLE}@127.0.0.1:{port}/{name}"), ca))
}

fn rand_bytes() -> [u8; 8] {
    use rand::Rng;
    rand::rng().random()
}
