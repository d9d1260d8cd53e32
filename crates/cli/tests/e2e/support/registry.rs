//! Hermetic package registries served by the test itself on loopback: a
//! small npm registry (packuments and tarballs built in memory) under
//! `/npm/` and a small JSR (its file layout: `meta.json`, `<v>_meta.json`
//! with a manifest of checksums, and the files) under `/jsr/`. Builds point
//! `--npm-registry` and `--jsr-registry` here, so npm and `jsr:` apps build
//! without the internet, from packages a test can change under them.
//!
//! The server has a thread and a runtime of its own: tests block their own
//! thread on the CLI while deno, in the control plane, fetches from it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use sha2::{Digest, Sha256, Sha512};

/// One npm package version: its `package.json` (name, version and
/// dependencies filled in) and its files, under `package/` in the tarball.
#[derive(Clone)]
pub struct NpmPackage {
    pub name: String,
    pub version: String,
    dependencies: BTreeMap<String, String>,
    fields: serde_json::Map<String, Value>,
    files: Vec<(String, Vec<u8>)>,
}

impl NpmPackage {
    pub fn new(name: &str, version: &str) -> Self {
        Self {
            name: name.to_owned(),
            version: version.to_owned(),
            dependencies: BTreeMap::new(),
            fields: serde_json::Map::new(),
            files: Vec::new(),
        }
    }

    pub fn dependency(mut self, name: &str, range: &str) -> Self {
        self.dependencies.insert(name.to_owned(), range.to_owned());
        self
    }

    /// Another `package.json` field (`main`, `type`, `exports`, …).
    pub fn field(mut self, name: &str, value: Value) -> Self {
        self.fields.insert(name.to_owned(), value);
        self
    }

    pub fn file(mut self, path: &str, text: &str) -> Self {
        self.files.push((path.to_owned(), text.as_bytes().to_vec()));
        self
    }

    fn package_json(&self) -> Value {
        let mut manifest = self.fields.clone();
        manifest.insert("name".into(), json!(self.name));
        manifest.insert("version".into(), json!(self.version));
        manifest.insert("dependencies".into(), json!(self.dependencies));
        Value::Object(manifest)
    }

    /// The `.tgz` npm publishes: `package/package.json` and the files.
    pub fn tarball(&self) -> Vec<u8> {
        let manifest = serde_json::to_vec_pretty(&self.package_json()).unwrap();
        let mut entries = vec![("package/package.json".to_owned(), manifest)];
        entries.extend(self.files.iter().map(|(path, bytes)| (format!("package/{path}"), bytes.clone())));
        gzip_stored(&ustar(&entries))
    }

    /// The file name of the tarball (`name-1.0.0.tgz`, without the scope).
    fn tarball_name(&self) -> String {
        let base = self.name.rsplit('/').next().unwrap();
        format!("{base}-{}.tgz", self.version)
    }
}

/// One JSR package version: its files and exports.
#[derive(Clone)]
pub struct JsrPackage {
    /// `@scope/name`.
    pub name: String,
    pub version: String,
    exports: BTreeMap<String, String>,
    files: BTreeMap<String, Vec<u8>>,
}

impl JsrPackage {
    pub fn new(name: &str, version: &str) -> Self {
        assert!(name.starts_with('@') && name.contains('/'), "a JSR name is @scope/name: {name}");
        Self { name: name.to_owned(), version: version.to_owned(), exports: BTreeMap::new(), files: BTreeMap::new() }
    }

    /// `.` → `./mod.ts`, `./sub` → `./sub.ts`, as in `jsr.json`.
    pub fn export(mut self, name: &str, path: &str) -> Self {
        self.exports.insert(name.to_owned(), path.to_owned());
        self
    }

    /// A file at `/<path>` of the package.
    pub fn file(mut self, path: &str, text: &str) -> Self {
        self.files.insert(format!("/{}", path.trim_start_matches('/')), text.as_bytes().to_vec());
        self
    }

    /// `<version>_meta.json`: every file's size and SHA-256, the exports.
    fn version_meta(&self) -> Value {
        let manifest: serde_json::Map<String, Value> = self
            .files
            .iter()
            .map(|(path, bytes)| {
                let checksum = format!("sha256-{}", hex(&Sha256::digest(bytes)));
                (path.clone(), json!({ "size": bytes.len(), "checksum": checksum }))
            })
            .collect();
        json!({ "manifest": manifest, "exports": self.exports })
    }
}

#[derive(Default)]
struct State {
    /// name → version → package, in publish order of names' latest.
    npm: BTreeMap<String, BTreeMap<String, NpmPackage>>,
    npm_latest: BTreeMap<String, String>,
    jsr: BTreeMap<String, BTreeMap<String, JsrPackage>>,
    jsr_latest: BTreeMap<String, String>,
    /// `METHOD path status`, in arrival order.
    requests: Vec<String>,
}

/// An npm registry and a JSR on one loopback port, stopped on drop.
pub struct TestRegistry {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl TestRegistry {
    pub fn start() -> TestRegistry {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let stream = tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => match accepted {
                            Ok((stream, _)) => stream,
                            Err(_) => continue,
                        },
                    };
                    let state = shared.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |request| {
                            let state = state.clone();
                            async move { Ok::<_, std::convert::Infallible>(answer(&state, request, addr)) }
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            // Dropping the runtime here ends the connections' tasks.
        });
        TestRegistry { addr, state, stop: Some(stop), thread: Some(thread) }
    }

    /// For `--npm-registry`.
    pub fn npm_url(&self) -> String {
        format!("http://{}/npm/", self.addr)
    }

    /// For `--jsr-registry`.
    pub fn jsr_url(&self) -> String {
        format!("http://{}/jsr/", self.addr)
    }

    /// Publishes (or replaces: a registry that changed a tarball under a
    /// lockfile) one version; it becomes `latest`.
    pub fn publish_npm(&self, package: NpmPackage) {
        let mut state = self.state.lock().unwrap();
        state.npm_latest.insert(package.name.clone(), package.version.clone());
        state.npm.entry(package.name.clone()).or_default().insert(package.version.clone(), package);
    }

    pub fn publish_jsr(&self, package: JsrPackage) {
        let mut state = self.state.lock().unwrap();
        state.jsr_latest.insert(package.name.clone(), package.version.clone());
        state.jsr.entry(package.name.clone()).or_default().insert(package.version.clone(), package);
    }

    /// Every request so far: `GET /npm/a 200`.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

fn answer(state: &Mutex<State>, request: Request<hyper::body::Incoming>, addr: SocketAddr) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let (status, content_type, body) = if request.method() != hyper::Method::GET {
        (405, "text/plain", Bytes::from_static(b"GET only"))
    } else {
        let state = state.lock().unwrap();
        let found = if let Some(rest) = path.strip_prefix("/npm/") {
            npm_answer(&state, rest, addr)
        } else if let Some(rest) = path.strip_prefix("/jsr/") {
            jsr_answer(&state, rest)
        } else {
            None
        };
        found.unwrap_or((404, "text/plain", Bytes::from_static(b"not found")))
    };
    state.lock().unwrap().requests.push(format!("GET {path} {status}"));
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    response.headers_mut().insert("content-type", content_type.parse().unwrap());
    response
}

/// `<name>` (a scoped one as `@scope%2fname` or `@scope/name`): the
/// packument; `<name>/-/<file>.tgz`: a tarball.
fn npm_answer(state: &State, rest: &str, addr: SocketAddr) -> Option<(u16, &'static str, Bytes)> {
    let rest = rest.replace("%2f", "/").replace("%2F", "/");
    if let Some((name, file)) = rest.split_once("/-/") {
        let package = state.npm.get(name)?.values().find(|p| p.tarball_name() == file)?;
        return Some((200, "application/octet-stream", Bytes::from(package.tarball())));
    }
    let versions = state.npm.get(rest.as_str())?;
    let entries: serde_json::Map<String, Value> = versions
        .values()
        .map(|package| {
            let tarball = package.tarball();
            let mut manifest = package.package_json();
            manifest["dist"] = json!({
                "tarball": format!("http://{addr}/npm/{}/-/{}", package.name, package.tarball_name()),
                "integrity": format!("sha512-{}", base64(&Sha512::digest(&tarball))),
                "shasum": hex(&sha1(&tarball)),
            });
            (package.version.clone(), manifest)
        })
        .collect();
    let packument = json!({
        "name": rest,
        "dist-tags": { "latest": state.npm_latest[rest.as_str()] },
        "versions": entries,
    });
    Some((200, "application/json", Bytes::from(packument.to_string())))
}

/// `@scope/name/meta.json`, `@scope/name/<v>_meta.json`, `@scope/name/<v>/<file>`.
fn jsr_answer(state: &State, rest: &str) -> Option<(u16, &'static str, Bytes)> {
    let mut parts = rest.splitn(3, '/');
    let name = format!("{}/{}", parts.next()?, parts.next()?);
    let tail = parts.next()?;
    let versions = state.jsr.get(&name)?;
    if tail == "meta.json" {
        let (scope, bare) = name.trim_start_matches('@').split_once('/')?;
        let listed: serde_json::Map<String, Value> = versions.keys().map(|v| (v.clone(), json!({}))).collect();
        let meta = json!({ "scope": scope, "name": bare, "versions": listed, "latest": state.jsr_latest[&name] });
        return Some((200, "application/json", Bytes::from(meta.to_string())));
    }
    if let Some(version) = tail.strip_suffix("_meta.json") {
        let meta = versions.get(version)?.version_meta();
        return Some((200, "application/json", Bytes::from(meta.to_string())));
    }
    let (version, file) = tail.split_once('/')?;
    let bytes = versions.get(version)?.files.get(&format!("/{file}"))?;
    // deno takes a module's kind from its content type, as jsr.io sends it.
    let content_type = match file.rsplit_once('.').map(|(_, ext)| ext) {
        Some("ts" | "mts" | "tsx") => "application/typescript",
        Some("js" | "mjs" | "jsx") => "application/javascript",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    };
    Some((200, content_type, Bytes::from(bytes.clone())))
}

// ------------------------------------------------------------------ formats

/// A POSIX ustar archive of regular files (mode 0644), two zero blocks at the end.
fn ustar(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (path, bytes) in entries {
        assert!(path.len() < 100, "a short path only: {path}");
        let mut header = [0u8; 512];
        let mut put = |at: usize, field: &[u8]| header[at..at + field.len()].copy_from_slice(field);
        put(0, path.as_bytes());
        put(100, b"0000644\0");
        put(108, b"0000000\0");
        put(116, b"0000000\0");
        put(124, format!("{:011o}\0", bytes.len()).as_bytes());
        put(136, b"00000000000\0");
        put(148, b"        ");
        put(156, b"0");
        put(257, b"ustar\0");
        put(263, b"00");
        let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
        header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(bytes);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// gzip (RFC 1952) of deflate's stored blocks: valid, uncompressed.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255];
    let mut chunks = data.chunks(65_535).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        out.push(u8::from(chunks.peek().is_none()));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in data {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// SHA-1 (FIPS 180-4), for npm's legacy `shasum`.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476, 0xc3d2_e1f0];
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in message.chunks(64) {
        let mut w = [0u32; 80];
        for (i, word) in block.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes(word.try_into().unwrap());
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, word) in w.iter().enumerate() {
            let (f, k) = match i {
                0..20 => ((b & c) | (!b & d), 0x5a82_7999),
                20..40 => (b ^ c ^ d, 0x6ed9_eba1),
                40..60 => ((b & c) | (b & d) | (c & d), 0x8f1b_bcdc),
                _ => (b ^ c ^ d, 0xca62_c1d6),
            };
            let t = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(*word);
            (e, d, c, b, a) = (d, c, b.rotate_left(30), a, t);
        }
        for (slot, value) in h.iter_mut().zip([a, b, c, d, e]) {
            *slot = slot.wrapping_add(value);
        }
    }
    let mut out = [0u8; 20];
    for (i, word) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&word.to_be_bytes());
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Padded standard base64 (RFC 4648 §4), as npm's `integrity` has it.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn the_formats_match_their_references() {
    assert_eq!(hex(&sha1(b"abc")), "a9993e364706816aba3e25717850c26c9cd0d89d");
    assert_eq!(hex(&sha1(b"")), "da39a3ee5e6b4b0d3255bfef95601890afd80709");
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    assert_eq!(base64(b"ab"), "YWI=");
    assert_eq!(base64(b"abc"), "YWJj");
    assert_eq!(base64(b"a"), "YQ==");
    // The tarball is one `tar` and `gzip -t` read.
    let dir = tempfile::tempdir().unwrap();
    let tgz = dir.path().join("p.tgz");
    std::fs::write(&tgz, NpmPackage::new("p", "1.0.0").file("lib/index.js", "module.exports = 1;\n").tarball())
        .unwrap();
    assert!(std::process::Command::new("gzip").arg("-t").arg(&tgz).status().unwrap().success());
    let status = std::process::Command::new("tar").arg("-xzf").arg(&tgz).arg("-C").arg(dir.path()).status().unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read_to_string(dir.path().join("package/lib/index.js")).unwrap(), "module.exports = 1;\n");
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("package/package.json")).unwrap()).unwrap();
    assert_eq!(manifest["name"], "p");
}
