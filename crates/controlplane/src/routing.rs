//! Which deployment serves a host: an in-memory table built from the
//! database at start, so the request path never waits on it, and then kept
//! by deltas: each change that moves routing names what it touched (a
//! project, a deployment, a domain) in the store's change log, and every
//! node applies the changes it has not seen (see
//! `ControlPlane::reload_routing`). A change costs the same at any size.

use std::collections::{BTreeSet, HashMap, HashSet};

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

#[derive(Debug)]
struct ProjectEntry {
    name: String,
    production: Option<String>,
}

#[derive(Debug, Default)]
pub struct RoutingTable {
    base_domain: String,
    /// Project id → its name and production deployment.
    projects: HashMap<String, ProjectEntry>,
    /// Project name → project id.
    project_by_name: HashMap<String, String>,
    /// Ready deployment id → its project's id.
    project_of_deployment: HashMap<String, String>,
    /// Project id → its ready deployments (to drop them with the project).
    deployments_of: HashMap<String, HashSet<String>>,
    /// Verified, attached custom domain → its project's id.
    domains: HashMap<String, String>,
    /// Verified, attached domains that are not served because they are
    /// the base domain's names (reported by [`RoutingTable::collisions`]).
    shadowed_domains: BTreeSet<String>,
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
        let mut table = Self { base_domain: base_domain.to_owned(), ..Self::default() };
        for project in projects {
            table.put_project(&project.id.clone(), Some(project));
        }
        for (deployment, project) in deployments {
            table.put_deployment(&deployment, Some(&project));
        }
        for (domain, project) in domains {
            table.put_domain(&domain, Some(&project));
        }
        // Reported, not resolved: which one should go is the operator's call.
        for collision in table.collisions() {
            tracing::warn!(target: "isocloud::controlplane", "{collision}");
        }
        table
    }

    /// Project `id` is now `project` (`None`: deleted, with its deployments).
    pub fn put_project(&mut self, id: &str, project: Option<ProjectRoute>) {
        if let Some(old) = self.projects.remove(id)
            && self.project_by_name.get(&old.name).is_some_and(|owner| owner == id)
        {
            self.project_by_name.remove(&old.name);
        }
        match project {
            Some(project) => {
                self.project_by_name.insert(project.name.clone(), id.to_owned());
                self.projects.insert(
                    id.to_owned(),
                    ProjectEntry { name: project.name, production: project.production_deployment_id },
                );
            }
            None => {
                for deployment in self.deployments_of.remove(id).unwrap_or_default() {
                    self.project_of_deployment.remove(&deployment);
                }
            }
        }
    }

    /// Deployment `id` is ready in `project` (`None`: not ready, or gone).
    pub fn put_deployment(&mut self, id: &str, project: Option<&str>) {
        if let Some(old) = self.project_of_deployment.remove(id)
            && let Some(set) = self.deployments_of.get_mut(&old)
        {
            set.remove(id);
            if set.is_empty() {
                self.deployments_of.remove(&old);
            }
        }
        if let Some(project) = project {
            self.project_of_deployment.insert(id.to_owned(), project.to_owned());
            self.deployments_of.entry(project.to_owned()).or_default().insert(id.to_owned());
        }
    }

    /// Custom domain `domain` routes to `project`'s production (`None`: not
    /// verified, not attached, or gone). One at or under the base domain
    /// (possible only in data from before `--base-domain` changed) never
    /// routes: those names are the platform's.
    pub fn put_domain(&mut self, domain: &str, project: Option<&str>) {
        self.domains.remove(domain);
        self.shadowed_domains.remove(domain);
        let Some(project) = project else { return };
        if validate::is_at_or_under(domain, &self.base_domain) {
            self.shadowed_domains.insert(domain.to_owned());
        } else {
            self.domains.insert(domain.to_owned(), project.to_owned());
        }
    }

    /// Hosts that stored data gives two meanings: a project name of the
    /// deployment-host shape that is one of another project's deployment
    /// hosts (made before names of that shape were refused, or by editing
    /// the database), and a custom domain under the base domain (added
    /// before `--base-domain` changed). Sorted, one sentence each.
    pub fn collisions(&self) -> Vec<String> {
        let mut found: Vec<String> = self
            .project_by_name
            .keys()
            .filter_map(|name| {
                let deployment = self.deployment_of_label(name)?;
                let owner = self.project_of(deployment)?;
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
            return self.production_of(self.project_by_name.get(label)?);
        }
        self.production_of(self.domains.get(host)?)
    }

    fn production_of(&self, project_id: &str) -> Option<&str> {
        self.projects.get(project_id)?.production.as_deref()
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
        let (id, owner) = self.project_of_deployment.get_key_value(deployment)?;
        (self.projects.get(owner)?.name == project).then_some(id.as_str())
    }

    /// The name of the project a ready deployment belongs to.
    pub fn project_of(&self, deployment_id: &str) -> Option<&str> {
        let project = self.project_of_deployment.get(deployment_id)?;
        self.projects.get(project).map(|p| p.name.as_str())
    }

    pub fn has_project(&self, id: &str) -> bool {
        self.projects.contains_key(id)
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

    /// Every host the tables below could answer, and some they must not.
    fn hosts() -> Vec<String> {
        let mut hosts: Vec<String> =
            ["www.example.com", "shop.example.com", "old.localhost", "localhost", "new.example.com"]
                .iter()
                .map(|h| (*h).to_owned())
                .collect();
        for project in ["hello", "hi", "my-app", "hello-bbbbbbbbbbbb", "other-eeeeeeeeeeee"] {
            hosts.push(format!("{project}.localhost"));
            for deployment in
                ["aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc", "dddddddddddd", "ffffffffffff", "gggggggggggg"]
            {
                hosts.push(format!("{project}-{deployment}.localhost"));
            }
        }
        hosts
    }

    #[test]
    fn a_table_kept_by_deltas_answers_as_one_built_afresh() {
        let mut kept = table();
        // Renamed, promoted, deleted, a new deployment, a domain moved, one
        // detached, one added: each applied as the change log names it.
        kept.put_project(
            "p1",
            Some(ProjectRoute {
                id: "p1".into(),
                name: "hi".into(),
                production_deployment_id: Some("bbbbbbbbbbbb".into()),
            }),
        );
        kept.put_deployment("gggggggggggg", Some("p2"));
        kept.put_project(
            "p2",
            Some(ProjectRoute {
                id: "p2".into(),
                name: "my-app".into(),
                production_deployment_id: Some("gggggggggggg".into()),
            }),
        );
        kept.put_project("p4", None);
        kept.put_domain("www.example.com", Some("p2"));
        kept.put_domain("shop.example.com", None);
        kept.put_domain("new.example.com", Some("p1"));
        kept.put_domain("old.localhost", None);

        let fresh = RoutingTable::build(
            "localhost",
            vec![
                ProjectRoute {
                    id: "p1".into(),
                    name: "hi".into(),
                    production_deployment_id: Some("bbbbbbbbbbbb".into()),
                },
                ProjectRoute {
                    id: "p2".into(),
                    name: "my-app".into(),
                    production_deployment_id: Some("gggggggggggg".into()),
                },
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
                ("gggggggggggg".into(), "p2".into()),
                ("cccccccccccc".into(), "p3".into()),
            ],
            vec![
                ("www.example.com".into(), "p2".into()),
                ("new.example.com".into(), "p1".into()),
                ("localhost".into(), "p1".into()),
            ],
        );
        let mut answered = 0;
        for host in hosts() {
            assert_eq!(kept.resolve(&host), fresh.resolve(&host), "{host}");
            answered += usize::from(fresh.resolve(&host).is_some());
        }
        assert!(answered >= 8, "the comparison covers routed hosts too ({answered})");
        for deployment in
            ["aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc", "dddddddddddd", "ffffffffffff", "gggggggggggg"]
        {
            assert_eq!(kept.project_of(deployment), fresh.project_of(deployment), "{deployment}");
        }
        assert_eq!(kept.collisions(), fresh.collisions());
        // The renamed project's old names are gone, its immutable URLs follow the new name.
        assert_eq!(kept.resolve("hello.localhost"), None);
        assert_eq!(kept.resolve("hi-aaaaaaaaaaaa.localhost"), Some("aaaaaaaaaaaa"));
        assert_eq!(kept.resolve("other-eeeeeeeeeeee.localhost"), None, "the deleted project's");
    }
}
