//! Which deployment serves a host: an in-memory table built from the
//! database, so the request path never waits on it. Rebuilt after every
//! change that moves routing and whenever another node bumped the routing
//! generation (see `ControlPlane::run_background`).

use std::collections::HashMap;

use crate::validate;

/// What a host routes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedHost {
    pub deployment_id: String,
    /// The host has a certificate ([`crate::ControlPlane::certificate_for`]
    /// finds one), so the runner redirects plain HTTP to HTTPS.
    pub has_certificate: bool,
}

/// One project as routing sees it.
#[derive(Debug, Clone)]
pub struct ProjectRoute {
    pub id: String,
    pub name: String,
    pub production_deployment_id: Option<String>,
}

#[derive(Debug, Default)]
pub struct RoutingTable {
    base_domain: String,
    /// Project name → production deployment id.
    production_by_name: HashMap<String, Option<String>>,
    /// Ready deployment id → its project's name.
    project_of_deployment: HashMap<String, String>,
    /// Verified custom domain → production deployment id of its project.
    custom_domains: HashMap<String, String>,
    /// Verified, attached domains that are not served because they are
    /// the base domain's names (reported by [`RoutingTable::collisions`]).
    shadowed_domains: Vec<String>,
}

impl RoutingTable {
    /// `deployments`: `(deployment id, project id)` of ready deployments;
    /// `domains`: `(domain, project id)` of verified, attached domains.
    pub fn build(
        base_domain: &str,
        projects: Vec<ProjectRoute>,
        deployments: Vec<(String, String)>,
        domains: Vec<(String, String)>,
    ) -> Self {
        let name_by_id: HashMap<&str, &ProjectRoute> = projects.iter().map(|p| (p.id.as_str(), p)).collect();
        let project_of_deployment = deployments
            .into_iter()
            .filter_map(|(deployment, project)| name_by_id.get(project.as_str()).map(|p| (deployment, p.name.clone())))
            .collect();
        // A custom domain at or under the base domain (possible only in data
        // from before `--base-domain` changed) never routes: those names are
        // the platform's.
        let (shadowed, domains): (Vec<_>, Vec<_>) =
            domains.into_iter().partition(|(domain, _)| validate::is_at_or_under(domain, base_domain));
        let custom_domains = domains
            .into_iter()
            .filter_map(|(domain, project)| {
                let production = name_by_id.get(project.as_str())?.production_deployment_id.clone()?;
                Some((domain, production))
            })
            .collect();
        let production_by_name =
            projects.iter().map(|p| (p.name.clone(), p.production_deployment_id.clone())).collect();
        let table = Self {
            base_domain: base_domain.to_owned(),
            production_by_name,
            project_of_deployment,
            custom_domains,
            shadowed_domains: shadowed.into_iter().map(|(domain, _)| domain).collect(),
        };
        // Reported, not resolved: which one should go is the operator's call.
        for collision in table.collisions() {
            tracing::warn!(target: "isocloud::controlplane", "{collision}");
        }
        table
    }

    /// Hosts that stored data gives two meanings: a project name of the
    /// deployment-host shape that is one of another project's deployment
    /// hosts (made before names of that shape were refused, or by editing
    /// the database), and a custom domain under the base domain (added
    /// before `--base-domain` changed). Sorted, one sentence each.
    pub fn collisions(&self) -> Vec<String> {
        let mut found: Vec<String> = self
            .production_by_name
            .keys()
            .filter_map(|name| {
                let deployment = self.deployment_of_label(name)?;
                let owner = self.project_of_deployment.get(deployment)?;
                Some(format!(
                    "host {name}.{base} is both project {name:?} and deployment {deployment} of project {owner:?}; \
                     the deployment is served (immutable URLs win): rename project {name:?}",
                    base = self.base_domain
                ))
            })
            .collect();
        found.extend(self.shadowed_domains.iter().map(|domain| {
            format!(
                "custom domain {domain} is at or under the base domain {base}, whose names isocloud assigns; \
                 it is not served: delete it",
                base = self.base_domain
            )
        }));
        found.sort();
        found
    }

    /// The deployment serving `host` (lowercase, no port), if any:
    /// `<project>-<deployment id>.<base>` → that deployment, first;
    /// `<project>.<base>` → production; a verified custom domain (never
    /// under the base domain) → its project's production. Project names
    /// cannot have the deployment-host shape ([`validate::project_name`]);
    /// where stored data still has one, the deployment wins, so an
    /// immutable URL is never taken over (see [`collisions`]).
    pub fn resolve(&self, host: &str) -> Option<&str> {
        let host = host.strip_suffix('.').unwrap_or(host);
        if let Some(label) = self.base_label(host) {
            if label.contains('.') {
                return None;
            }
            if let Some(deployment) = self.deployment_of_label(label) {
                return Some(deployment);
            }
            return self.production_by_name.get(label).and_then(Option::as_deref);
        }
        self.custom_domains.get(host).map(String::as_str)
    }

    /// What `host` is under the base domain (`a.b` of `a.b.<base>`), if it
    /// is under it.
    fn base_label<'h>(&self, host: &'h str) -> Option<&'h str> {
        host.strip_suffix(self.base_domain.as_str()).and_then(|rest| rest.strip_suffix('.'))
    }

    /// The ready deployment whose host label is `label`
    /// (`<project>-<deployment id>`, split at the last `-`).
    fn deployment_of_label(&self, label: &str) -> Option<&str> {
        let (project, deployment) = label.rsplit_once('-')?;
        if !validate::is_deployment_id(deployment) {
            return None;
        }
        match self.project_of_deployment.get_key_value(deployment) {
            Some((id, owner)) if owner == project => Some(id.as_str()),
            _ => None,
        }
    }

    /// The name of the project a ready deployment belongs to.
    pub fn project_of(&self, deployment_id: &str) -> Option<&str> {
        self.project_of_deployment.get(deployment_id).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RoutingTable {
        RoutingTable::build(
            "localhost",
            vec![
                ProjectRoute {
                    id: "p1".into(),
                    name: "hello".into(),
                    production_deployment_id: Some("aaaaaaaaaaaa".into()),
                },
                ProjectRoute { id: "p2".into(), name: "my-app".into(), production_deployment_id: None },
                // Stored data the API now refuses: a project whose name is
                // another's deployment host, and one of that shape that
                // collides with nothing.
                ProjectRoute {
                    id: "p3".into(),
                    name: "hello-bbbbbbbbbbbb".into(),
                    production_deployment_id: Some("cccccccccccc".into()),
                },
                ProjectRoute {
                    id: "p4".into(),
                    name: "other-eeeeeeeeeeee".into(),
                    production_deployment_id: Some("ffffffffffff".into()),
                },
            ],
            vec![
                ("aaaaaaaaaaaa".into(), "p1".into()),
                ("bbbbbbbbbbbb".into(), "p1".into()),
                ("dddddddddddd".into(), "p2".into()),
                ("cccccccccccc".into(), "p3".into()),
                ("ffffffffffff".into(), "p4".into()),
            ],
            vec![
                ("www.example.com".into(), "p1".into()),
                ("shop.example.com".into(), "p2".into()),
                // Added before the base domain changed to `localhost`.
                ("old.localhost".into(), "p1".into()),
                ("localhost".into(), "p1".into()),
            ],
        )
    }

    #[test]
    fn resolves_in_documented_order() {
        let t = table();
        assert_eq!(t.resolve("hello.localhost"), Some("aaaaaaaaaaaa"));
        assert_eq!(t.resolve("hello.localhost."), Some("aaaaaaaaaaaa"));
        assert_eq!(t.resolve("hello-aaaaaaaaaaaa.localhost"), Some("aaaaaaaaaaaa"));
        assert_eq!(t.resolve("my-app-dddddddddddd.localhost"), Some("dddddddddddd"));
        // The deployment comes first: an immutable URL is never taken over.
        assert_eq!(t.resolve("hello-bbbbbbbbbbbb.localhost"), Some("bbbbbbbbbbbb"));
        // A name of that shape that is no deployment's host still serves.
        assert_eq!(t.resolve("other-eeeeeeeeeeee.localhost"), Some("ffffffffffff"));
        assert_eq!(t.resolve("www.example.com"), Some("aaaaaaaaaaaa"));
    }

    #[test]
    fn reports_each_host_with_two_meanings() {
        let collisions = table().collisions();
        assert_eq!(collisions.len(), 3, "{collisions:#?}");
        assert!(collisions[0].starts_with("custom domain localhost is at or under the base domain localhost"));
        assert!(collisions[1].starts_with("custom domain old.localhost is at or under"));
        assert!(
            collisions[2].starts_with(
                "host hello-bbbbbbbbbbbb.localhost is both project \"hello-bbbbbbbbbbbb\" and deployment \
                 bbbbbbbbbbbb of project \"hello\""
            ),
            "{}",
            collisions[2]
        );
    }

    #[test]
    fn knows_each_ready_deployments_project() {
        let t = table();
        assert_eq!(t.project_of("bbbbbbbbbbbb"), Some("hello"));
        assert_eq!(t.project_of("dddddddddddd"), Some("my-app"));
        assert_eq!(t.project_of("zzzzzzzzzzzz"), None);
    }

    #[test]
    fn refuses_what_does_not_route() {
        let t = table();
        for host in [
            "my-app.localhost",              // no production
            "shop.example.com",              // its project has no production
            "hello-dddddddddddd.localhost",  // another project's deployment
            "my-app-aaaaaaaaaaaa.localhost", // likewise
            "hello-zzzzzzzzzzzz.localhost",  // no such deployment
            "old.localhost",                 // a stored custom domain under the base domain
            "a.hello.localhost",
            "localhost",
            "nope.localhost",
            "other.example.com",
            "example.com",
        ] {
            assert_eq!(t.resolve(host), None, "{host}");
        }
    }
}
