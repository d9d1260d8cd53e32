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
        let custom_domains = domains
            .into_iter()
            .filter_map(|(domain, project)| {
                let production = name_by_id.get(project.as_str())?.production_deployment_id.clone()?;
                Some((domain, production))
            })
            .collect();
        let production_by_name =
            projects.iter().map(|p| (p.name.clone(), p.production_deployment_id.clone())).collect();
        Self { base_domain: base_domain.to_owned(), production_by_name, project_of_deployment, custom_domains }
    }

    /// The deployment serving `host` (lowercase, no port), if any:
    /// `<project>.<base>` → production; `<project>-<deployment id>.<base>` →
    /// that deployment; a verified custom domain → its project's production.
    pub fn resolve(&self, host: &str) -> Option<&str> {
        let host = host.strip_suffix('.').unwrap_or(host);
        if let Some(label) = host.strip_suffix(self.base_domain.as_str()).and_then(|rest| rest.strip_suffix('.')) {
            if label.contains('.') {
                return None;
            }
            // A project's own name wins over a `<project>-<id>` reading.
            if let Some(Some(production)) = self.production_by_name.get(label) {
                return Some(production);
            }
            let (project, deployment) = label.rsplit_once('-')?;
            if !validate::is_deployment_id(deployment) {
                return None;
            }
            return match self.project_of_deployment.get_key_value(deployment) {
                Some((id, owner)) if owner == project => Some(id.as_str()),
                _ => None,
            };
        }
        self.custom_domains.get(host).map(String::as_str)
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
                // A project whose name reads like another's deployment host.
                ProjectRoute {
                    id: "p3".into(),
                    name: "hello-bbbbbbbbbbbb".into(),
                    production_deployment_id: Some("cccccccccccc".into()),
                },
            ],
            vec![
                ("aaaaaaaaaaaa".into(), "p1".into()),
                ("bbbbbbbbbbbb".into(), "p1".into()),
                ("dddddddddddd".into(), "p2".into()),
                ("cccccccccccc".into(), "p3".into()),
            ],
            vec![("www.example.com".into(), "p1".into()), ("shop.example.com".into(), "p2".into())],
        )
    }

    #[test]
    fn resolves_in_documented_order() {
        let t = table();
        assert_eq!(t.resolve("hello.localhost"), Some("aaaaaaaaaaaa"));
        assert_eq!(t.resolve("hello.localhost."), Some("aaaaaaaaaaaa"));
        assert_eq!(t.resolve("hello-aaaaaaaaaaaa.localhost"), Some("aaaaaaaaaaaa"));
        assert_eq!(t.resolve("my-app-dddddddddddd.localhost"), Some("dddddddddddd"));
        // The project name comes first.
        assert_eq!(t.resolve("hello-bbbbbbbbbbbb.localhost"), Some("cccccccccccc"));
        assert_eq!(t.resolve("www.example.com"), Some("aaaaaaaaaaaa"));
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
