//! Origins by settings: the options every remote origin gets, and finding an
//! origin again by its name for the activity spool after a restart.

use std::sync::Arc;

use isocloud_origin::{AppsOrigin, Origin, RemoteOrigin, RemoteOriginOptions};
use isocloud_pool::OriginResolver;
use url::Url;

use crate::settings::{Mode, Settings};

/// What every remote origin of this runner is built with (the router's and
/// the resolver's alike).
pub fn remote_options(settings: &Settings) -> RemoteOriginOptions {
    RemoteOriginOptions { rpc_timeout_ms: settings.origin_timeout.as_millis() as u64, ..RemoteOriginOptions::default() }
}

/// Finds the origin an earlier run's spooled batch names. Apps mode: `apps`.
/// Subhosting: `<kid>@<rpc_root>` (what [`RemoteOrigin`] calls itself),
/// honoured only for a subhoster configured now and an rpc root it may still
/// use — its default, or under an allowed prefix, as token verification
/// checks — so a batch never goes somewhere today's settings would not send
/// that subhoster's RPCs. Its own instances: origins are stateless clients,
/// and the sink keys deliveries by name.
pub fn resolver(mode: &Mode, options: RemoteOriginOptions, control_plane: Option<Arc<dyn Origin>>) -> OriginResolver {
    match mode {
        Mode::ControlPlane(_) => {
            let origin = control_plane.expect("the control plane is open before the pool");
            OriginResolver::new(move |name| (name == origin.name()).then(|| origin.clone()))
        }
        Mode::Apps(dir) => {
            let apps: Arc<dyn Origin> = Arc::new(AppsOrigin::new(dir.clone()));
            OriginResolver::new(move |name| (name == apps.name()).then(|| apps.clone()))
        }
        Mode::Subhost(subhosters) => {
            let subhosters = subhosters.clone();
            let client = RemoteOrigin::client(&options);
            OriginResolver::new(move |name| {
                subhosters.iter().find_map(|subhoster| {
                    let root = name.strip_prefix(subhoster.kid.as_str())?.strip_prefix('@')?;
                    let url = Url::parse(root).ok()?;
                    // The rule token verification applies: this subhoster's own roots only.
                    if !subhoster.may_use_rpc_root(&url) || url.as_str() != root {
                        return None;
                    }
                    let origin = RemoteOrigin::new(
                        subhoster.kid.clone(),
                        subhoster.secret.clone(),
                        url,
                        client.clone(),
                        options.clone(),
                    );
                    Some(Arc::new(origin) as Arc<dyn Origin>)
                })
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use isocloud_auth::{Secret, Subhoster};

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
        let resolver = resolver(mode, RemoteOriginOptions::default(), None);
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
