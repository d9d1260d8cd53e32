//! The last boot answer of each deployment, kept in the runner's disk cache
//! so that a fault of the origin costs nothing the cache can answer: a
//! deployment whose isolate idled out boots again from its last answer (and
//! its layers and blobs, cached already) while the origin cannot be reached.
//!
//! Kept per (origin, deployment) as [`CacheKind::Boot`] entries — the answer
//! (config and inline layer, with the time it came) and, once read, the
//! asset tree — under the cache's size bound, least recently used first.
//! An answer is used only younger than [`StaleBoots::max_age`], only for a
//! fault ([`fault_of`]: the origin could not be reached, or failed with a
//! 5xx or 429), never when the origin answered; one that says the deployment is
//! gone removes both entries.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use isocloud_protocol::IsolateConfig;
use serde::{Deserialize, Serialize};

use crate::{AssetTree, BootAnswer, CacheKind, DiskCache, OriginError};

/// How long a kept boot answer may stand in for the origin's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleBoots {
    /// Zero: no answer is kept, none is used (one kept earlier is still
    /// removed when the origin says its deployment is gone).
    pub max_age: Duration,
}

impl StaleBoots {
    pub const OFF: StaleBoots = StaleBoots { max_age: Duration::ZERO };

    pub fn enabled(&self) -> bool {
        !self.max_age.is_zero()
    }
}

/// What a failed `boot` says about the deployment's kept answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The origin could not answer: the kept answer may stand in.
    Unavailable,
    /// The origin answered that the deployment does not exist: the kept
    /// answer goes.
    Gone,
    /// The origin answered, and refused (auth, a bad config, a 4xx): final
    /// for this boot; the kept answer stays for a later fault.
    Refused,
}

/// The policy, one arm per failure with its reason.
pub fn fault_of(error: &OriginError) -> Fault {
    match error {
        // Nothing came back: refused, reset, no route, no name.
        OriginError::Unreachable(_) => Fault::Unavailable,
        // A hung origin is a down origin to the visitor.
        OriginError::Timeout { .. } => Fault::Unavailable,
        // "No such deployment", in the origin's words (in process) or HTTP's.
        OriginError::DeploymentNotFound => Fault::Gone,
        OriginError::BootRefused { status: 404 | 410 } => Fault::Gone,
        // The origin (or a proxy in front of it) failing: it may well know
        // the deployment, it cannot say so now.
        OriginError::BootRefused { status } if *status >= 500 => Fault::Unavailable,
        // Too many requests: up, but shedding load; it cannot answer now.
        OriginError::BootRefused { status: 429 } => Fault::Unavailable,
        // 401/403/…: the origin refuses this runner; serving anyway would
        // override the origin's word.
        OriginError::BootRefused { .. } => Fault::Refused,
        // It answered, with something unusable: an author's error to show,
        // not to hide behind an older answer.
        OriginError::InvalidConfig(_)
        | OriginError::Malformed { .. }
        | OriginError::TooLarge { .. }
        | OriginError::BadStatus { .. }
        | OriginError::Layer { .. }
        | OriginError::ModuleNotFound { .. }
        | OriginError::AssetNotFound(_)
        | OriginError::BuildFailed(_)
        | OriginError::Cache(_) => Fault::Refused,
    }
}

/// A kept answer, as [`recall`] found it.
#[derive(Debug, Clone)]
pub struct KeptBoot {
    pub answer: BootAnswer,
    /// How old the answer is (zero if its time is ahead of the clock).
    pub age: Duration,
}

const ANSWER_PREFIX: &str = "answer:";
const TREE_PREFIX: &str = "tree:";
/// The record's first line; the inline layer's bytes follow it.
const RECORD_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    version: u32,
    saved_at_s: u64,
    /// The config as the origin's JSON would say it: validated again on
    /// the way back, as any answer is.
    config: serde_json::Value,
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn encode(answer: &BootAnswer, saved_at_s: u64) -> Bytes {
    let header = Header { version: RECORD_VERSION, saved_at_s, config: answer.config.to_json() };
    let mut record = BytesMut::from(&serde_json::to_vec(&header).expect("a header always serializes")[..]);
    record.extend_from_slice(b"\n");
    record.extend_from_slice(&answer.inline_layer);
    record.freeze()
}

fn decode(record: Bytes) -> Result<(BootAnswer, u64), String> {
    let newline = memchr::memchr(b'\n', &record).ok_or("no header line")?;
    let header: Header = serde_json::from_slice(&record[..newline]).map_err(|e| e.to_string())?;
    if header.version != RECORD_VERSION {
        return Err(format!("record version {}", header.version));
    }
    let json = serde_json::to_vec(&header.config).map_err(|e| e.to_string())?;
    let config = IsolateConfig::from_json(&json).map_err(|e| e.to_string())?;
    Ok((BootAnswer { config, inline_layer: record.slice(newline + 1..) }, header.saved_at_s))
}

/// Keeps `answer` as `deployment_id`'s last (now). A failure to keep it is
/// logged, never a failure of the boot.
pub async fn remember(cache: &DiskCache, namespace: &str, deployment_id: &str, answer: &BootAnswer) {
    let record = encode(answer, now_s());
    let id = format!("{ANSWER_PREFIX}{deployment_id}");
    if let Err(e) = cache.put(CacheKind::Boot, namespace, &id, &record).await {
        tracing::warn!(deployment_id, error = %e, "could not keep the boot answer");
    }
}

/// Keeps `deployment_id`'s asset tree, unless kept already (a deployment's
/// tree never changes).
pub async fn remember_tree(cache: &DiskCache, namespace: &str, deployment_id: &str, tree: &AssetTree) {
    let id = format!("{TREE_PREFIX}{deployment_id}");
    if cache.contains(CacheKind::Boot, namespace, &id) {
        return;
    }
    let json = match serde_json::to_vec(tree) {
        Ok(json) => Bytes::from(json),
        Err(e) => return tracing::warn!(deployment_id, error = %e, "could not keep the asset tree"),
    };
    if let Err(e) = cache.put(CacheKind::Boot, namespace, &id, &json).await {
        tracing::warn!(deployment_id, error = %e, "could not keep the asset tree");
    }
}

/// `deployment_id`'s kept answer, if there is one younger than `max_age`.
/// An unreadable record is removed (it would never read).
pub async fn recall(cache: &DiskCache, namespace: &str, deployment_id: &str, max_age: Duration) -> Option<KeptBoot> {
    if max_age.is_zero() {
        return None;
    }
    let id = format!("{ANSWER_PREFIX}{deployment_id}");
    let record = cache.get(CacheKind::Boot, namespace, &id).await?;
    let (answer, saved_at_s) = match decode(record) {
        Ok(decoded) => decoded,
        Err(e) => {
            tracing::warn!(deployment_id, error = %e, "kept boot answer unreadable: removed");
            cache.remove(CacheKind::Boot, namespace, &id);
            return None;
        }
    };
    let age = Duration::from_secs(now_s().saturating_sub(saved_at_s));
    (age < max_age).then_some(KeptBoot { answer, age })
}

/// `deployment_id`'s kept asset tree, if any.
pub async fn recall_tree(cache: &DiskCache, namespace: &str, deployment_id: &str) -> Option<AssetTree> {
    let id = format!("{TREE_PREFIX}{deployment_id}");
    let json = cache.get(CacheKind::Boot, namespace, &id).await?;
    match AssetTree::parse(&json) {
        Ok(tree) => Some(tree),
        Err(e) => {
            tracing::warn!(deployment_id, error = %e, "kept asset tree unreadable: removed");
            cache.remove(CacheKind::Boot, namespace, &id);
            None
        }
    }
}

/// Removes what is kept of `deployment_id` (the origin says it is gone).
pub fn forget(cache: &DiskCache, namespace: &str, deployment_id: &str) {
    cache.remove(CacheKind::Boot, namespace, &format!("{ANSWER_PREFIX}{deployment_id}"));
    cache.remove(CacheKind::Boot, namespace, &format!("{TREE_PREFIX}{deployment_id}"));
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::AssetEntry;

    fn answer(config: serde_json::Value, inline: &'static [u8]) -> BootAnswer {
        let config = IsolateConfig::from_json(config.to_string().as_bytes()).unwrap();
        BootAnswer { config, inline_layer: Bytes::from_static(inline) }
    }

    fn full_config() -> serde_json::Value {
        serde_json::json!({
            "entrypoint": "file:///src/main.ts",
            "layers": [
                { "kind": "eszip", "id": "zip-1" },
                { "kind": "bundle", "id": "inline", "specifier": "file:///src/main.ts" },
            ],
            "inline_layer": "inline",
            "envs": { "SECRET": "s3cret", "EMPTY": "" },
            "permissions": { "net": ["api.example.com", "db.internal:5432"] },
        })
    }

    #[test]
    fn a_config_round_trips_through_its_json() {
        for config in [
            full_config(),
            serde_json::json!({ "entrypoint": "file:///src/a.js", "layers": [
                { "kind": "bundle", "id": "a", "specifier": "file:///src/a.js" }] }),
            serde_json::json!({ "entrypoint": "file:///src/a.js", "permissions": { "net": false }, "layers": [
                { "kind": "bundle", "id": "a", "specifier": "file:///src/a.js" }] }),
        ] {
            let parsed = answer(config, b"").config;
            let again = IsolateConfig::from_json(parsed.to_json().to_string().as_bytes()).unwrap();
            assert_eq!(again, parsed);
        }
    }

    #[tokio::test]
    async fn an_answer_is_kept_recalled_within_its_age_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let day = Duration::from_secs(86_400);
        assert!(recall(&cache, "o", "d1", day).await.is_none(), "nothing kept yet");

        let kept = answer(full_config(), b"Deno.serve(() => new Response('hi'))");
        remember(&cache, "o", "d1", &kept).await;
        let recalled = recall(&cache, "o", "d1", day).await.expect("kept");
        assert_eq!(recalled.answer.config, kept.config);
        assert_eq!(recalled.answer.inline_layer, kept.inline_layer);
        assert!(recalled.age < Duration::from_secs(5));
        assert!(recall(&cache, "other", "d1", day).await.is_none(), "per origin");
        assert!(recall(&cache, "o", "d2", day).await.is_none(), "per deployment");
        assert!(recall(&cache, "o", "d1", Duration::ZERO).await.is_none(), "zero: off");

        // Env values are on disk: the runner's alone.
        let boots = dir.path().join("boots");
        for entry in std::fs::read_dir(&boots).unwrap() {
            use std::os::unix::fs::PermissionsExt;
            let mode = entry.unwrap().metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }

        // Older than the bound: not used.
        let old = encode(&kept, now_s() - 7200);
        cache.put(CacheKind::Boot, "o", "answer:d1", &old).await.unwrap();
        assert!(recall(&cache, "o", "d1", Duration::from_secs(3600)).await.is_none());
        assert!(recall(&cache, "o", "d1", day).await.is_some());

        let tree = AssetTree {
            entries: BTreeMap::from([
                (String::new(), AssetEntry::Directory),
                ("/a.txt".into(), AssetEntry::File { size: 1, hash: "h".into() }),
            ]),
        };
        remember_tree(&cache, "o", "d1", &tree).await;
        assert_eq!(recall_tree(&cache, "o", "d1").await, Some(tree));

        forget(&cache, "o", "d1");
        assert!(recall(&cache, "o", "d1", day).await.is_none());
        assert!(recall_tree(&cache, "o", "d1").await.is_none());
        assert_eq!(cache.total_bytes(), 0);
    }

    #[tokio::test]
    async fn a_damaged_record_is_removed_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(dir.path(), 1 << 20).unwrap();
        let day = Duration::from_secs(86_400);
        let bad_config = Bytes::from(format!(
            "{}\n",
            serde_json::json!({ "version": 1, "saved_at_s": now_s(), "config": { "entrypoint": "nope" } })
        ));
        for record in [Bytes::from_static(b"garbage"), bad_config] {
            cache.put(CacheKind::Boot, "o", "answer:d", &record).await.unwrap();
            assert!(recall(&cache, "o", "d", day).await.is_none());
            assert!(!cache.contains(CacheKind::Boot, "o", "answer:d"), "removed");
        }
    }

    #[test]
    fn only_faults_are_answered_from_the_kept_answer() {
        let cases = [
            (OriginError::Unreachable("connection refused".into()), Fault::Unavailable),
            (OriginError::Timeout { rpc: "boot", timeout_ms: 10 }, Fault::Unavailable),
            (OriginError::BootRefused { status: 500 }, Fault::Unavailable),
            (OriginError::BootRefused { status: 503 }, Fault::Unavailable),
            (OriginError::DeploymentNotFound, Fault::Gone),
            (OriginError::BootRefused { status: 404 }, Fault::Gone),
            (OriginError::BootRefused { status: 410 }, Fault::Gone),
            (OriginError::BootRefused { status: 401 }, Fault::Refused),
            (OriginError::BootRefused { status: 403 }, Fault::Refused),
            (OriginError::BootRefused { status: 429 }, Fault::Unavailable),
            (OriginError::BootRefused { status: 400 }, Fault::Refused),
            (
                OriginError::InvalidConfig(isocloud_protocol::ConfigError { field: "x".into(), message: "y".into() }),
                Fault::Refused,
            ),
            (OriginError::TooLarge { rpc: "boot", limit_bytes: 1 }, Fault::Refused),
        ];
        for (error, fault) in cases {
            assert_eq!(fault_of(&error), fault, "{error}");
        }
    }
}
