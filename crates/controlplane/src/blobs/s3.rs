//! Blobs in an S3-compatible bucket (AWS S3, Garage, MinIO, R2, …) through
//! the `object_store` crate: `<prefix>/ab/cdef…`, the same content-addressed
//! keys as the disk store, so several control-plane nodes share one bucket.
//!
//! Nothing unverified is ever visible under a blob's key. A body that fits
//! in one part is held in memory, hashed, and stored with one PUT only after
//! its hash and size check; a larger one goes to a multipart upload, which
//! S3 keeps invisible until it is completed, and is completed only after the
//! last byte hashed right (any failure, a refused body or a dropped request
//! aborts it). That beats a temp key and a copy: S3's copy is a second full
//! write (and needs multipart copy past 5 GB), and a crash between the two
//! would leave a temp object behind where an unfinished multipart upload is
//! invisible and removed by the bucket's usual abort-incomplete-uploads rule.
//!
//! Reads are verified too: a blob whose bytes no longer hash to its key is
//! an error naming the hash and is never served.
//!
//! A confirmed blob's grace period (see `gc`) is restarted with a marker,
//! `<prefix>/in-use/ab/cdef…` (empty), not by rewriting the blob: S3 cannot
//! refresh an object's last-modified in place, and copying it onto itself
//! is refused without a metadata change `object_store` does not send.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as Key;
use object_store::{MultipartUpload, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, UploadPart};
use sha2::{Digest, Sha256};

use super::{BlobEntry, BlobError, BlobStore, ByteStream, PutOutcome, REFRESH_FRACTION};
use crate::validate;

/// Where the markers that restart a blob's grace period live, below the prefix.
const MARKERS: &str = "in-use";
/// S3's smallest part (but the last) is 5 MiB; 8 MiB keeps a 64 MiB blob
/// to 8 parts and two parts (one uploading, one filling) in memory.
pub const DEFAULT_PART_SIZE_BYTES: usize = 8 * 1024 * 1024;
/// Markers this node wrote, remembered so a blob confirmed again soon
/// costs no request; forgotten whole past this many.
const MAX_REMEMBERED_MARKERS: usize = 100_000;

/// How to reach the bucket. What is not set here comes from the usual
/// environment (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP`, …).
#[derive(Clone)]
pub struct S3Config {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: String,
    /// `http(s)://host:port` of a non-AWS service (Garage, MinIO, …).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    /// A credential: never in `Debug` or a log.
    pub secret_access_key: Option<String>,
    /// A body larger than this is a multipart upload, in parts this big.
    pub part_size_bytes: usize,
}

impl S3Config {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            part_size_bytes: DEFAULT_PART_SIZE_BYTES,
        }
    }
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "<redacted>"))
            .field("part_size_bytes", &self.part_size_bytes)
            .finish()
    }
}

/// Splits `s3://bucket/prefix` into the bucket and the prefix's segments.
fn parse_url(url: &str) -> Result<(String, Vec<String>), String> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| format!("{url:?} is not an s3://bucket/prefix URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    // S3's bucket naming rules, checked here so the error names the setting.
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !bucket.starts_with(['-', '.'])
        && !bucket.ends_with(['-', '.']);
    if !bucket_ok {
        return Err(format!("{bucket:?} is not a bucket name (3-63 of a-z, 0-9, '-', '.')"));
    }
    let segments: Vec<String> = prefix.split('/').filter(|s| !s.is_empty()).map(str::to_owned).collect();
    for segment in &segments {
        let ok = segment != "."
            && segment != ".."
            && segment.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            return Err(format!("prefix segment {segment:?} may hold only a-z, A-Z, 0-9, '-', '_', '.'"));
        }
    }
    if url.contains(['?', '#']) {
        return Err(format!("{url:?} must not carry a query or fragment"));
    }
    Ok((bucket.to_owned(), segments))
}

/// Whether `endpoint`'s host is a loopback address (`localhost`,
/// `127.0.0.0/8`, `::1`): plain HTTP is allowed there without asking.
fn is_loopback_endpoint(endpoint: &str) -> bool {
    let Ok(url) = url::Url::parse(endpoint) else { return false };
    match url.host() {
        Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Blobs in an S3-compatible bucket.
pub struct S3BlobStore {
    store: Arc<dyn ObjectStore>,
    /// The prefix's segments (empty: the bucket's root).
    prefix: Vec<String>,
    /// `s3://bucket/prefix`, for messages.
    url: String,
    part_size_bytes: usize,
    /// A confirmed blob whose last write or marker is older than this gets
    /// a fresh marker.
    refresh_after: Duration,
    /// Markers this node wrote: hash → when.
    markers: Mutex<HashMap<String, SystemTime>>,
}

impl S3BlobStore {
    /// Connects to the bucket of `config.url` and checks that it answers
    /// (a listing of the prefix's top level: the bucket exists, the
    /// credentials may read it). Blobs collected by GC get `gc_grace`.
    pub async fn open(config: &S3Config, gc_grace: Duration) -> Result<Self, BlobError> {
        let (bucket, prefix) = parse_url(&config.url).map_err(|e| Self::setup_error(&config.url, e))?;
        let url = match prefix.is_empty() {
            true => format!("s3://{bucket}"),
            false => format!("s3://{bucket}/{}", prefix.join("/")),
        };
        if config.part_size_bytes < 5 * 1024 * 1024 {
            return Err(Self::setup_error(&url, "the part size must be at least 5 MiB (S3's smallest part)"));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&bucket).with_retry(RetryConfig {
            // A request path (an origin read) waits on this: give up within
            // seconds, not object_store's default three minutes.
            max_retries: 3,
            retry_timeout: Duration::from_secs(15),
            ..RetryConfig::default()
        });
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &config.region {
            builder = builder.with_region(region);
        }
        if let Some(key) = &config.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &config.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        if let Some(endpoint) = builder.get_config_value(&AmazonS3ConfigKey::Endpoint) {
            // Plain HTTP on loopback (a local Garage or MinIO) needs no
            // switch; anywhere else it takes AWS_ALLOW_HTTP=true.
            if is_loopback_endpoint(&endpoint) {
                builder = builder.with_allow_http(true);
            }
        }
        let store = builder.build().map_err(|e| Self::setup_error(&url, e))?;
        let this = Self {
            store: Arc::new(store),
            prefix,
            url,
            part_size_bytes: config.part_size_bytes,
            refresh_after: gc_grace / REFRESH_FRACTION,
            markers: Mutex::new(HashMap::new()),
        };
        let root = this.root();
        this.store
            .list_with_delimiter(root.as_ref())
            .await
            .map_err(|e| Self::setup_error(&this.url, format!("the bucket does not answer a listing: {e}")))?;
        Ok(this)
    }

    fn setup_error(url: &str, message: impl std::fmt::Display) -> BlobError {
        BlobError::Io {
            path: url.into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, message.to_string()),
        }
    }

    fn root(&self) -> Option<Key> {
        (!self.prefix.is_empty()).then(|| Key::from_iter(self.prefix.iter().map(String::as_str)))
    }

    fn key_with(&self, extra: Option<&str>, hash: &str) -> Key {
        let mut parts: Vec<&str> = self.prefix.iter().map(String::as_str).collect();
        parts.extend(extra);
        parts.extend([&hash[..2], &hash[2..]]);
        Key::from_iter(parts)
    }

    /// The blob's key, `<prefix>/ab/cdef…`, for a valid hash.
    fn key_of(&self, hash: &str) -> Result<Key, BlobError> {
        validate::sha256(hash).map_err(BlobError::BadHash)?;
        Ok(self.key_with(None, hash))
    }

    fn marker_of(&self, hash: &str) -> Key {
        self.key_with(Some(MARKERS), hash)
    }

    /// The hash a listed key names, and whether it is a marker; `None` for
    /// keys that are neither (left alone).
    fn parse_key(&self, key: &Key) -> Option<(String, bool)> {
        let owned: Vec<object_store::path::PathPart<'_>> = key.parts().collect();
        let parts: Vec<&str> = owned.iter().map(|p| p.as_ref()).collect();
        let rest = parts.get(self.prefix.len()..)?;
        let (marker, shard, tail) = match rest {
            [shard, tail] => (false, shard, tail),
            [markers, shard, tail] if *markers == MARKERS => (true, shard, tail),
            _ => return None,
        };
        let hash = format!("{shard}{tail}");
        (shard.len() == 2 && validate::sha256(&hash).is_ok()).then_some((hash, marker))
    }

    fn error(&self, key: &Key, e: object_store::Error) -> BlobError {
        BlobError::Io { path: format!("{}/{}", self.bucket_url(), key).into(), source: std::io::Error::other(e) }
    }

    /// `s3://bucket` (keys already carry the prefix).
    fn bucket_url(&self) -> &str {
        let without_scheme = &self.url["s3://".len()..];
        let bucket_len = without_scheme.find('/').unwrap_or(without_scheme.len());
        &self.url[.."s3://".len() + bucket_len]
    }

    /// The object's size and last-modified time, `None` when it is absent.
    async fn head(&self, key: &Key) -> Result<Option<(u64, SystemTime)>, BlobError> {
        match self.store.head(key).await {
            Ok(meta) => Ok(Some((meta.size, SystemTime::from(meta.last_modified)))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(key, e)),
        }
    }

    /// When the blob was last written or confirmed, its marker considered.
    async fn used_at(&self, hash: &str, modified: SystemTime) -> Result<SystemTime, BlobError> {
        let marked = self.head(&self.marker_of(hash)).await?.map(|(_, at)| at);
        Ok(marked.map_or(modified, |at| at.max(modified)))
    }

    /// The blob (last written at `modified`) was just confirmed: once half
    /// its grace period has passed, a fresh marker restarts it.
    async fn refresh(&self, hash: &str, modified: SystemTime) -> Result<(), BlobError> {
        let now = SystemTime::now();
        let stale = |at: SystemTime| now.duration_since(at).unwrap_or_default() >= self.refresh_after;
        if !stale(modified) {
            return Ok(());
        }
        let remembered = self.markers.lock().unwrap_or_else(|p| p.into_inner()).get(hash).copied();
        if remembered.is_some_and(|at| !stale(at)) {
            return Ok(());
        }
        // Another node may have refreshed it: a HEAD is cheaper than a PUT.
        if !stale(self.used_at(hash, modified).await?) {
            return Ok(());
        }
        let marker = self.marker_of(hash);
        self.store.put(&marker, PutPayload::new()).await.map_err(|e| self.error(&marker, e))?;
        let mut markers = self.markers.lock().unwrap_or_else(|p| p.into_inner());
        if markers.len() >= MAX_REMEMBERED_MARKERS {
            markers.clear();
        }
        markers.insert(hash.to_owned(), now);
        Ok(())
    }

    async fn delete_key(&self, key: &Key) -> Result<(), BlobError> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(key, e)),
        }
    }
}

/// Reads `body` to its end, checking its size and hash, storing nothing.
async fn drain_verified(hash: &str, mut body: ByteStream, limit_bytes: u64) -> Result<u64, BlobError> {
    let mut hasher = Sha256::new();
    let mut size_bytes = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| BlobError::Body(e.to_string()))?;
        size_bytes += chunk.len() as u64;
        if size_bytes > limit_bytes {
            return Err(BlobError::TooLarge { limit_bytes });
        }
        hasher.update(&chunk);
    }
    let actual = hex::encode(hasher.finalize());
    if actual != hash {
        return Err(BlobError::HashMismatch { expected: hash.to_owned(), actual });
    }
    Ok(size_bytes)
}

/// A multipart upload that is aborted unless it was completed: a refused
/// body, an error or a dropped request leaves no parts behind.
struct Multipart {
    upload: Option<Box<dyn MultipartUpload>>,
    /// The part being uploaded (on a task of its own) while the next one fills.
    in_flight: Option<tokio::task::JoinHandle<object_store::Result<()>>>,
}

impl Multipart {
    fn upload(&mut self) -> &mut Box<dyn MultipartUpload> {
        self.upload.as_mut().expect("an upload until it completes")
    }

    /// Starts uploading `parts` as the next part, once the one before is up.
    async fn send(&mut self, parts: Vec<Bytes>) -> object_store::Result<()> {
        self.wait().await?;
        let part: UploadPart = self.upload().put_part(PutPayload::from_iter(parts));
        self.in_flight = Some(tokio::spawn(part));
        Ok(())
    }

    /// Waits for the part in flight.
    async fn wait(&mut self) -> object_store::Result<()> {
        match self.in_flight.take() {
            Some(part) => part.await.map_err(|e| object_store::Error::Generic { store: "S3", source: Box::new(e) })?,
            None => Ok(()),
        }
    }

    async fn complete(&mut self) -> object_store::Result<()> {
        self.wait().await?;
        self.upload().complete().await?;
        self.upload = None;
        Ok(())
    }
}

impl Drop for Multipart {
    fn drop(&mut self) {
        let Some(mut upload) = self.upload.take() else { return };
        let in_flight = self.in_flight.take();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                // A part still uploading would outlive an abort sent now.
                if let Some(part) = in_flight {
                    let _ = part.await;
                }
                if let Err(e) = upload.abort().await {
                    tracing::warn!(target: "isocloud::controlplane", error = %e, "aborting a refused blob upload failed");
                }
            });
        }
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn put_stream(&self, hash: &str, mut body: ByteStream, limit_bytes: u64) -> Result<PutOutcome, BlobError> {
        let key = self.key_of(hash)?;
        if let Some((_, modified)) = self.head(&key).await? {
            // Already there: the body is still checked (the caller learns a
            // wrong one), never uploaded again.
            let size_bytes = drain_verified(hash, body, limit_bytes).await?;
            self.refresh(hash, modified).await?;
            return Ok(PutOutcome { size_bytes, created: false });
        }
        let mut hasher = Sha256::new();
        let mut size_bytes = 0u64;
        // Bytes not yet sent: all of a small blob, or the part filling.
        let mut pending: Vec<Bytes> = Vec::new();
        let mut pending_bytes = 0usize;
        let mut multipart: Option<Multipart> = None;
        while let Some(chunk) = body.next().await {
            let mut chunk = chunk.map_err(|e| BlobError::Body(e.to_string()))?;
            size_bytes += chunk.len() as u64;
            if size_bytes > limit_bytes {
                return Err(BlobError::TooLarge { limit_bytes });
            }
            hasher.update(&chunk);
            while !chunk.is_empty() {
                let take = chunk.len().min(self.part_size_bytes - pending_bytes);
                pending.push(chunk.split_to(take));
                pending_bytes += take;
                if pending_bytes < self.part_size_bytes {
                    continue;
                }
                if multipart.is_none() {
                    let upload = self.store.put_multipart(&key).await.map_err(|e| self.error(&key, e))?;
                    multipart = Some(Multipart { upload: Some(upload), in_flight: None });
                }
                let parts = std::mem::take(&mut pending);
                pending_bytes = 0;
                let upload = multipart.as_mut().expect("started above");
                upload.send(parts).await.map_err(|e| self.error(&key, e))?;
            }
        }
        let actual = hex::encode(hasher.finalize());
        if actual != hash {
            return Err(BlobError::HashMismatch { expected: hash.to_owned(), actual });
        }
        match multipart.as_mut() {
            Some(upload) => {
                if !pending.is_empty() {
                    upload.send(pending).await.map_err(|e| self.error(&key, e))?;
                }
                upload.complete().await.map_err(|e| self.error(&key, e))?;
            }
            None => {
                self.store.put(&key, PutPayload::from_iter(pending)).await.map_err(|e| self.error(&key, e))?;
            }
        }
        Ok(PutOutcome { size_bytes, created: true })
    }

    async fn get(&self, hash: &str) -> Result<Option<Bytes>, BlobError> {
        let key = self.key_of(hash)?;
        let bytes = match self.store.get(&key).await {
            Ok(result) => result.bytes().await.map_err(|e| self.error(&key, e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.error(&key, e)),
        };
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != hash {
            // Rot or tampering in the bucket: never served.
            let message = format!("stored blob {hash} is corrupt: its bytes hash to {actual}; it is not served");
            tracing::error!(target: "isocloud::controlplane", hash, actual, key = %key, "corrupt blob in the bucket");
            return Err(BlobError::Io {
                path: format!("{}/{}", self.bucket_url(), key).into(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, message),
            });
        }
        Ok(Some(bytes))
    }

    async fn size(&self, hash: &str) -> Result<Option<u64>, BlobError> {
        let key = self.key_of(hash)?;
        let Some((size, modified)) = self.head(&key).await? else { return Ok(None) };
        self.refresh(hash, modified).await?;
        Ok(Some(size))
    }

    fn list(&self) -> BoxStream<'_, Result<BlobEntry, BlobError>> {
        let root = self.root();
        let markers_root = Key::from_iter(self.prefix.iter().map(String::as_str).chain([MARKERS]));
        let markers = async move {
            // The markers first (few: one per blob confirmed while old),
            // then the blobs a page at a time.
            let mut markers: HashMap<String, SystemTime> = HashMap::new();
            let mut listing = self.store.list(Some(&markers_root));
            while let Some(meta) = listing.next().await {
                let meta = meta.map_err(|e| self.error(&markers_root, e))?;
                if let Some((hash, true)) = self.parse_key(&meta.location) {
                    markers.insert(hash, SystemTime::from(meta.last_modified));
                }
            }
            Ok::<_, BlobError>(markers)
        };
        futures_util::stream::once(markers)
            .map(move |markers| match markers {
                Err(e) => futures_util::stream::once(async move { Err(e) }).boxed(),
                Ok(markers) => {
                    let listed_under = root.clone().unwrap_or_default();
                    self.store
                        .list(root.as_ref())
                        .filter_map(move |meta| {
                            let entry = match meta {
                                Err(e) => Some(Err(self.error(&listed_under, e))),
                                Ok(meta) => match self.parse_key(&meta.location) {
                                    Some((hash, false)) => {
                                        let modified = SystemTime::from(meta.last_modified);
                                        let used_at = markers.get(&hash).map_or(modified, |at| (*at).max(modified));
                                        Some(Ok(BlobEntry { hash, size_bytes: meta.size, used_at }))
                                    }
                                    _ => None,
                                },
                            };
                            futures_util::future::ready(entry)
                        })
                        .boxed()
                }
            })
            .flatten()
            .boxed()
    }

    async fn entry(&self, hash: &str) -> Result<Option<BlobEntry>, BlobError> {
        let key = self.key_of(hash)?;
        let Some((size_bytes, modified)) = self.head(&key).await? else { return Ok(None) };
        let used_at = self.used_at(hash, modified).await?;
        Ok(Some(BlobEntry { hash: hash.to_owned(), size_bytes, used_at }))
    }

    async fn delete(&self, hash: &str) -> Result<(), BlobError> {
        let key = self.key_of(hash)?;
        self.delete_key(&key).await?;
        // The marker after the blob: a crash in between leaves a marker,
        // which protects nothing (it only ever extends a stored blob's time).
        self.markers.lock().unwrap_or_else(|p| p.into_inner()).remove(hash);
        self.delete_key(&self.marker_of(hash)).await
    }

    fn describe(&self) -> String {
        self.url.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blobs::test_s3::TestS3;

    const DAY: Duration = Duration::from_secs(86_400);

    fn chunks(data: &[u8], chunk_bytes: usize) -> ByteStream {
        let parts: Vec<Result<Bytes, std::io::Error>> =
            data.chunks(chunk_bytes).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        futures_util::stream::iter(parts).boxed()
    }

    /// Every object under `prefix`, straight from the bucket.
    async fn objects(server: &TestS3, prefix: &str) -> Vec<String> {
        let raw = server.raw();
        let mut keys: Vec<String> = raw
            .list(Some(&Key::from(prefix)))
            .map(|meta| meta.expect("a listing").location.to_string())
            .collect()
            .await;
        keys.sort();
        keys
    }

    #[tokio::test]
    async fn blobs_round_trip_under_content_addressed_keys() {
        let Some(server) = TestS3::start() else { return };
        let store = S3BlobStore::open(&server.config("round/trip"), DAY).await.unwrap();
        assert_eq!(store.describe(), "s3://isocloud-test/round/trip");
        let hash = crate::ids::sha256_hex(b"hello world");
        assert!(!store.has(&hash).await.unwrap());
        assert_eq!(store.get(&hash).await.unwrap(), None);

        let out = store.put_stream(&hash, chunks(b"hello world", 4), 100).await.unwrap();
        assert_eq!(out, PutOutcome { size_bytes: 11, created: true });
        let key = format!("round/trip/{}/{}", &hash[..2], &hash[2..]);
        assert_eq!(objects(&server, "round").await, vec![key]);
        let again = store.put_stream(&hash, chunks(b"hello world", 11), 100).await.unwrap();
        assert_eq!(again, PutOutcome { size_bytes: 11, created: false });
        assert_eq!(store.get(&hash).await.unwrap().unwrap(), Bytes::from_static(b"hello world"));
        assert_eq!(store.size(&hash).await.unwrap(), Some(11));
        assert!(store.has(&hash).await.unwrap());
        assert_eq!(store.put(Bytes::from_static(b"other")).await.unwrap(), crate::ids::sha256_hex(b"other"));

        let listed: Vec<BlobEntry> = store.list().map(Result::unwrap).collect().await;
        let mut hashes: Vec<&str> = listed.iter().map(|e| e.hash.as_str()).collect();
        hashes.sort();
        let other = crate::ids::sha256_hex(b"other");
        let mut expected = vec![hash.as_str(), other.as_str()];
        expected.sort();
        assert_eq!(hashes, expected);
        let entry = store.entry(&hash).await.unwrap().unwrap();
        assert_eq!(entry.size_bytes, 11);
        assert!(SystemTime::now().duration_since(entry.used_at).unwrap_or_default() < Duration::from_secs(60));

        store.delete(&hash).await.unwrap();
        assert!(!store.has(&hash).await.unwrap());
        store.delete(&hash).await.unwrap();
        assert!(matches!(store.get("../../etc/passwd").await, Err(BlobError::BadHash(_))));
    }

    #[tokio::test]
    async fn a_wrong_or_oversized_body_leaves_nothing_visible() {
        let Some(server) = TestS3::start() else { return };
        let mut config = server.config("refused");
        config.part_size_bytes = 5 * 1024 * 1024;
        let store = S3BlobStore::open(&config, DAY).await.unwrap();
        let small = b"small blob".to_vec();
        let large: Vec<u8> = (0..12 * 1024 * 1024 + 7).map(|i: u32| (i % 251) as u8).collect();
        for (what, body) in [("one PUT", &small), ("multipart", &large)] {
            let hash = crate::ids::sha256_hex(body);
            let wrong = crate::ids::sha256_hex(b"something else");
            // The probe: the same store takes the body under its own hash
            // (in a prefix of its own, so the refusals below start empty).
            let probe = S3BlobStore::open(&server.config(&format!("probe-{}", body.len())), DAY).await.unwrap();
            assert!(probe.put_stream(&hash, chunks(body, 64 * 1024), body.len() as u64).await.unwrap().created);

            let err = store.put_stream(&wrong, chunks(body, 64 * 1024), u64::MAX).await.unwrap_err();
            assert!(matches!(err, BlobError::HashMismatch { .. }), "{what}: {err}");
            let limit = body.len() as u64 - 1;
            let err = store.put_stream(&hash, chunks(body, 64 * 1024), limit).await.unwrap_err();
            assert!(matches!(err, BlobError::TooLarge { limit_bytes } if limit_bytes == limit), "{what}: {err}");
            assert!(!store.has(&hash).await.unwrap() && !store.has(&wrong).await.unwrap(), "{what}");
            assert_eq!(objects(&server, "refused").await, Vec::<String>::new(), "{what}");
        }
    }

    #[tokio::test]
    async fn a_large_blob_goes_up_in_parts_and_comes_back_whole() {
        let Some(server) = TestS3::start() else { return };
        let mut config = server.config("large");
        config.part_size_bytes = 5 * 1024 * 1024;
        let store = S3BlobStore::open(&config, DAY).await.unwrap();
        // Three parts: two full, one short; chunks that straddle part edges.
        let data: Vec<u8> =
            (0..11 * 1024 * 1024 + 3).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let hash = crate::ids::sha256_hex(&data);
        let out = store.put_stream(&hash, chunks(&data, 1_000_003), 64 * 1024 * 1024).await.unwrap();
        assert_eq!(out, PutOutcome { size_bytes: data.len() as u64, created: true });
        assert_eq!(store.size(&hash).await.unwrap(), Some(data.len() as u64));
        assert!(store.get(&hash).await.unwrap().unwrap() == data, "the bytes come back as stored");
        // S3 marks an object completed from parts with an ETag `…-<parts>`.
        let key = store.key_of(&hash).unwrap();
        let etag = server.raw().head(&key).await.unwrap().e_tag.unwrap_or_default();
        assert!(etag.trim_matches('"').ends_with("-3"), "a three-part upload: ETag {etag}");
    }

    #[tokio::test]
    async fn a_corrupted_object_is_refused_on_read_naming_its_hash() {
        let Some(server) = TestS3::start() else { return };
        let store = S3BlobStore::open(&server.config("corrupt"), DAY).await.unwrap();
        let hash = store.put(Bytes::from_static(b"export default 1;")).await.unwrap();
        assert_eq!(store.get(&hash).await.unwrap().unwrap(), Bytes::from_static(b"export default 1;"));
        // Overwritten behind the store's back, through the S3 API.
        let key = store.key_of(&hash).unwrap();
        server.raw().put(&key, PutPayload::from_static(b"export default 666;")).await.unwrap();
        let err = store.get(&hash).await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&hash) && text.contains("corrupt"), "{text}");
        assert!(matches!(&err, BlobError::Io { source, .. } if source.kind() == std::io::ErrorKind::InvalidData));
    }

    #[tokio::test]
    async fn confirming_an_old_blob_marks_it_in_use_again() {
        let Some(server) = TestS3::start() else { return };
        // A 2 s grace: a blob is "old" (due a marker) after 1 s.
        let store = S3BlobStore::open(&server.config("marks"), Duration::from_secs(2)).await.unwrap();
        let hash = store.put(Bytes::from_static(b"kept")).await.unwrap();
        let stored_at = store.entry(&hash).await.unwrap().unwrap().used_at;
        assert!(store.has(&hash).await.unwrap());
        assert!(objects(&server, "marks/in-use").await.is_empty(), "a fresh blob needs no marker");
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(store.has(&hash).await.unwrap());
        let marker = format!("marks/in-use/{}/{}", &hash[..2], &hash[2..]);
        assert_eq!(objects(&server, "marks/in-use").await, vec![marker]);
        let used_at = store.entry(&hash).await.unwrap().unwrap().used_at;
        assert!(used_at > stored_at, "{used_at:?} after {stored_at:?}");
        let listed: Vec<BlobEntry> = store.list().map(Result::unwrap).collect().await;
        assert_eq!(listed.len(), 1, "markers are not blobs: {listed:?}");
        // A listing has milliseconds, a HEAD's Last-Modified whole seconds.
        let apart = listed[0].used_at.duration_since(used_at).unwrap_or_else(|e| e.duration());
        assert!(apart < Duration::from_secs(1), "{:?} vs {used_at:?}", listed[0].used_at);
        store.delete(&hash).await.unwrap();
        assert!(objects(&server, "marks").await.is_empty(), "the marker goes with its blob");
    }

    #[tokio::test]
    async fn a_missing_bucket_or_bad_credentials_fail_at_open() {
        let Some(server) = TestS3::start() else { return };
        let no_bucket = S3Config { url: "s3://no-such-bucket/x".into(), ..server.config("x") };
        let err = S3BlobStore::open(&no_bucket, DAY).await.err().expect("no such bucket");
        assert!(err.to_string().contains("s3://no-such-bucket/x"), "{err}");
        let mut bad_secret = server.config("x");
        bad_secret.secret_access_key = Some("0".repeat(64));
        assert!(S3BlobStore::open(&bad_secret, DAY).await.is_err());
        assert!(S3BlobStore::open(&server.config("x"), DAY).await.is_ok());
    }

    #[test]
    fn urls_name_a_bucket_and_a_clean_prefix() {
        assert_eq!(parse_url("s3://blobs").unwrap(), ("blobs".into(), vec![]));
        assert_eq!(parse_url("s3://blobs/").unwrap(), ("blobs".into(), vec![]));
        assert_eq!(parse_url("s3://my.blobs/a/b-c/").unwrap(), ("my.blobs".into(), vec!["a".into(), "b-c".into()]));
        for bad in
            ["blobs", "http://blobs/x", "s3://", "s3://UPPER", "s3://ab", "s3://b/../x", "s3://b/a b", "s3://b/x?y"]
        {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plain_http_is_allowed_on_loopback_only() {
        assert!(is_loopback_endpoint("http://127.0.0.1:3900"));
        assert!(is_loopback_endpoint("http://127.1.2.3:3900"));
        assert!(is_loopback_endpoint("http://[::1]:3900"));
        assert!(is_loopback_endpoint("http://localhost:3900"));
        assert!(!is_loopback_endpoint("http://10.0.0.1:3900"));
        assert!(!is_loopback_endpoint("http://s3.example.com"));
        assert!(!is_loopback_endpoint("not a url"));
    }

    #[test]
    fn the_secret_is_never_in_debug() {
        let mut config = S3Config::new("s3://blobs");
        config.secret_access_key = Some("hunter2-very-secret".into());
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
