//! Origins by settings: the options every remote origin gets, and finding an
//! origin again by its name for the activity spool after a restart.

use std::sync::Arc;

#[cfg(doc)]
use isocloud_origin::RemoteOrigin;
use isocloud_origin::{AppsOrigin, Origin, RemoteOriginOptions, RemoteOrigins};
use isocloud_pool::OriginResolver;

use crate::settings::{Mode, Settings};

/// What every remote origin of this runner is built with (the router's and
/// the resolver's alike).
pub fn remote_options(settings: &Settings) -> RemoteOriginOptions {
    RemoteOriginOptions {
        rpc_timeout_ms: settings.origin_timeout.as_millis() as u64,
        trust: settings.rpc_trust.clone(),
        ..RemoteOriginOptions::default()
    }
}

/// Finds the origin an earlier run's spooled batch names. Apps mode: `apps`.
/// Subhosting: `<kid>@<rpc_root>` (what [`RemoteOrigin`] calls itself),
/// through the router's own registry ([`RemoteOrigins::by_name`]): a
/// subhoster configured now and a root it may still use, so a batch never
/// goes where today's settings would not send that subhoster's RPCs.
pub fn resolver(
    mode: &Mode,
    remote: Option<Arc<RemoteOrigins>>,
    control_plane: Option<Arc<dyn Origin>>,
) -> OriginResolver {
    match mode {
        Mode::ControlPlane(_) => {
            let origin = control_plane.expect("the control plane is open before the pool");
            OriginResolver::new(move |name| (name == origin.name()).then(|| origin.clone()))
        }
        Mode::Apps(dir) => {
            let apps: Arc<dyn Origin> = Arc::new(AppsOrigin::new(dir.clone()));
            OriginResolver::new(move |name| (name == apps.name()).then(|| apps.clone()))
        }
        Mode::Subhost(_) => {
            let remote = remote.expect("subhosting has its registry of remote origins");
            OriginResolver::new(move |name| remote.by_name(name))
        }
    }
}

/// The registry of remote origins a subhosting runner routes to (none in
/// the other modes).
pub fn remote_origins(settings: &Settings) -> Option<Arc<RemoteOrigins>> {
    match &settings.mode {
        Mode::Subhost(subhosters) => {
            let mut registry = RemoteOrigins::new(subhosters.clone(), remote_options(settings));
            // Every subhoster's default root is `--rpc-root`.
            if let Some(root) = subhosters.first().map(|s| s.rpc_root.clone()) {
                registry = registry.with_fallbacks(root, settings.rpc_root_fallbacks.clone());
            }
            Some(Arc::new(registry))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use isocloud_auth::{Secret, Subhoster};
    use url::Url;

    use super::*;

    fn subhost_mode() -> Mode {
        Mode::Subhost(vec![Subhoster {
            kid: "acme".into(),
            secret: Secret::from("s3cret"),
            rpc_root: Url::parse("http://origin.test/v0/").unwrap(),
            allowed_rpc_root_prefixes: vec!["http://tenants.test/".into()],
        }])
    }

    fn resolve(mode: &Mode, name: &str) -> Option<String> {
        let remote = match mode {
            Mode::Subhost(subhosters) => {
                Some(Arc::new(RemoteOrigins::new(subhosters.clone(), RemoteOriginOptions::default())))
            }
            _ => None,
        };
        let resolver = resolver(mode, remote, None);
        resolver.resolve(name).map(|origin| origin.name().to_owned())
    }

    #[test]
    fn subhoster_origins_are_found_by_their_name_where_still_allowed() {
        let mode = subhost_mode();
        let name = "acme@http://origin.test/v0/";
        assert_eq!(resolve(&mode, name).as_deref(), Some(name), "the default root");
        let name = "acme@http://tenants.test/t1/v0/";
        assert_eq!(resolve(&mode, name).as_deref(), Some(name), "an allowed prefix");
        assert_eq!(resolve(&mode, "acme@http://elsewhere.test/v0/"), None, "not allowed (any more)");
        assert_eq!(resolve(&mode, "other@http://origin.test/v0/"), None, "not configured (any more)");
        assert_eq!(resolve(&mode, "acme@not a url"), None);
        assert_eq!(resolve(&mode, "apps"), None);
    }

    #[test]
    fn the_apps_origin_is_apps() {
        let dir = tempfile::tempdir().unwrap();
        let mode = Mode::Apps(dir.path().to_owned());
        assert_eq!(resolve(&mode, "apps").as_deref(), Some("apps"));
        assert_eq!(resolve(&mode, "acme@http://origin.test/v0/"), None);
    }
}
