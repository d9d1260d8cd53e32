//! The runner's remote origins, one per (subhoster, rpc root), made on first
//! use and kept in a bounded map. The router (a verified token names the
//! pair) and the activity spool (a batch names the origin it came from)
//! share it: one rule for which roots a subhoster may use, one HTTP client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use isocloud_auth::Subhoster;
use url::Url;

use crate::{Origin, RemoteOrigin, RemoteOriginOptions};

/// A bound on distinct (kid, rpc root) origins kept. A subhoster's allowed
/// prefixes limit them already; this keeps a misconfigured wide prefix
/// from growing memory. Past it, an arbitrary one is forgotten (they are
/// stateless clients: the next use makes it again).
pub const MAX_REMOTE_ORIGINS: usize = 4096;

pub struct RemoteOrigins {
    subhosters: HashMap<String, Subhoster>,
    client: reqwest::Client,
    options: RemoteOriginOptions,
    /// Other roots that answer for a root (`--rpc-root-fallback`: the nodes
    /// of one control plane), tried when its connection cannot be made.
    fallbacks: HashMap<Url, Vec<Url>>,
    origins: Mutex<HashMap<(String, Url), Arc<RemoteOrigin>>>,
}

impl RemoteOrigins {
    /// For `subhosters` (already validated: see `SubhostVerifier::new`).
    pub fn new(subhosters: impl IntoIterator<Item = Subhoster>, options: RemoteOriginOptions) -> Self {
        Self {
            subhosters: subhosters.into_iter().map(|s| (s.kid.clone(), s)).collect(),
            client: RemoteOrigin::client(&options),
            options,
            fallbacks: HashMap::new(),
            origins: Mutex::new(HashMap::new()),
        }
    }

    /// `fallbacks` answer for `rpc_root` when it cannot be reached.
    pub fn with_fallbacks(mut self, rpc_root: Url, fallbacks: Vec<Url>) -> Self {
        if !fallbacks.is_empty() {
            self.fallbacks.insert(rpc_root, fallbacks);
        }
        self
    }

    /// The origin of `kid`'s RPCs at `rpc_root`: `None` unless `kid` is
    /// configured and may use that root ([`Subhoster::may_use_rpc_root`]).
    pub fn get(&self, kid: &str, rpc_root: &Url) -> Option<Arc<dyn Origin>> {
        let subhoster = self.subhosters.get(kid)?;
        if !subhoster.may_use_rpc_root(rpc_root) {
            return None;
        }
        let key = (kid.to_owned(), rpc_root.clone());
        let mut origins = self.origins.lock().expect("remote origins poisoned");
        if let Some(origin) = origins.get(&key) {
            return Some(origin.clone());
        }
        if origins.len() >= MAX_REMOTE_ORIGINS
            && let Some(forgotten) = origins.keys().next().cloned()
        {
            origins.remove(&forgotten);
        }
        let origin = Arc::new(RemoteOrigin::with_fallbacks(
            subhoster.kid.clone(),
            subhoster.secret.clone(),
            rpc_root.clone(),
            self.fallbacks.get(rpc_root).cloned().unwrap_or_default(),
            self.client.clone(),
            self.options.clone(),
        ));
        origins.insert(key, origin.clone());
        Some(origin)
    }

    /// The origin a [`RemoteOrigin`] of this registry calls itself
    /// (`<kid>@<rpc_root>`), under today's settings: an earlier run's
    /// spooled batch never goes where they would not send that
    /// subhoster's RPCs.
    pub fn by_name(&self, name: &str) -> Option<Arc<dyn Origin>> {
        let (kid, root) = name.split_once('@')?;
        let url = Url::parse(root).ok()?;
        // Only the normalised spelling a RemoteOrigin writes.
        if url.as_str() != root {
            return None;
        }
        self.get(kid, &url)
    }

    /// Origins kept now.
    pub fn len(&self) -> usize {
        self.origins.lock().expect("remote origins poisoned").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use isocloud_auth::Secret;

    use super::*;

    fn registry() -> RemoteOrigins {
        RemoteOrigins::new(
            [Subhoster {
                kid: "acme".into(),
                secret: Secret::from("s3cret"),
                rpc_root: Url::parse("http://origin.test/v0/").unwrap(),
                allowed_rpc_root_prefixes: vec!["http://tenants.test/".into()],
            }],
            RemoteOriginOptions::default(),
        )
    }

    fn named(registry: &RemoteOrigins, name: &str) -> Option<String> {
        registry.by_name(name).map(|origin| origin.name().to_owned())
    }

    #[test]
    fn a_subhosters_origins_are_its_default_root_and_its_prefixes_only() {
        let registry = registry();
        let name = "acme@http://origin.test/v0/";
        assert_eq!(named(&registry, name).as_deref(), Some(name), "the default root");
        let name = "acme@http://tenants.test/t1/v0/";
        assert_eq!(named(&registry, name).as_deref(), Some(name), "an allowed prefix");
        assert_eq!(named(&registry, "acme@http://elsewhere.test/v0/"), None, "not allowed");
        assert_eq!(named(&registry, "other@http://origin.test/v0/"), None, "not configured");
        assert_eq!(named(&registry, "acme@not a url"), None);
        assert_eq!(named(&registry, "acme@HTTP://origin.test/v0/"), None, "not the spelling an origin writes");
        assert_eq!(named(&registry, "apps"), None);
    }

    #[test]
    fn one_origin_per_pair_and_no_more_than_the_bound() {
        let registry = registry();
        let root = Url::parse("http://tenants.test/t1/").unwrap();
        let first = registry.get("acme", &root).unwrap();
        let again = registry.get("acme", &root).unwrap();
        assert!(Arc::ptr_eq(&first, &again), "made once, then found");
        for n in 0..MAX_REMOTE_ORIGINS + 10 {
            let root = Url::parse(&format!("http://tenants.test/t{n}/")).unwrap();
            assert!(registry.get("acme", &root).is_some());
        }
        assert_eq!(registry.len(), MAX_REMOTE_ORIGINS);
    }
}
