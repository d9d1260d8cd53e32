//! Which deployment serves a host: an in-memory table built from the
//! database at start, so the request path never waits on it, and then kept
//! by deltas: each change that moves routing names what it touched (a
//! project, a deployment, a domain) in the store's change log, and every
//! node applies the changes it has not seen (see
//! `ControlPlane::reload_routing`). A change costs the same at any size.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

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
    /// Project id → its name and production deployment. The ids are shared
    /// (`Arc`) with the maps below: a million deployments hold one copy of
    /// each project's id.
    projects: HashMap<Arc<str>, ProjectEntry>,
    /// Project name → project id.
    project_by_name: HashMap<String, Arc<str>>,
    /// Ready deployment id → its project's id. A deleted project's
    /// deployments leave by changes of their own (the store notes each).
    project_of_deployment: HashMap<Box<str>, Arc<str>>,
    /// Verified, attached custom domain → its project's id.
    domains: HashMap<String, Arc<str>>,
    /// Verified, attached domains that are not served because they are
    /// the base domain's names (reported by [`RoutingTable::collisions`]).
    shadowed_domains: BTreeSet<String>,
}

impl RoutingTable {
    /// `deployments`: `(deployment id, project id)` of ready deployments;
    /// `domains`: `(domain, project id)` of verified, attached domains.
    #[cfg(test)]
    pub fn build(
        base_domain: &str,
        projects: Vec<ProjectRoute>,
        deployments: Vec<(String, String)>,
        domains: Vec<(String, String)>,
    ) -> Self {
        let mut table = Self::new(base_domain);
        for project in projects {
            table.put_project(&project.id.clone(), Some(project));
        }
        for (deployment, project) in deployments {
            table.put_deployment(&deployment, Some(&project));
        }
        for (domain, project) in domains {
            table.put_domain(&domain, Some(&project));
        }
        table.report_collisions();
        table
    }

    /// An empty table for `base_domain`, to be filled with the `put_*`s.
    pub fn new(base_domain: &str) -> Self {
        Self { base_domain: base_domain.to_owned(), ..Self::default() }
    }

    /// Logs [`RoutingTable::collisions`]: reported, not resolved (which one
    /// should go is the operator's call).
    pub fn report_collisions(&self) {
        for collision in self.collisions() {
            tracing::warn!(target: "isocloud::controlplane", "{collision}");
        }
    }

    /// The shared copy of project id `id` (a new one if no entry holds it).
    fn project_key(&self, id: &str) -> Arc<str> {
        self.projects.get_key_value(id).map_or_else(|| Arc::from(id), |(key, _)| Arc::clone(key))
    }

    /// Project `id` is now `project` (`None`: deleted; its deployments and
    /// domains route nowhere from now, and leave by their own changes).
    pub fn put_project(&mut self, id: &str, project: Option<ProjectRoute>) {
        let key = self.project_key(id);
        if let Some(old) = self.projects.remove(id)
            && self.project_by_name.get(&old.name).is_some_and(|owner| **owner == *id)
        {
            self.project_by_name.remove(&old.name);
        }
        if let Some(project) = project {
            debug_assert_eq!(project.id, id, "a project's route is put under its own id");
            self.project_by_name.insert(project.name.clone(), Arc::clone(&key));
            self.projects
                .insert(key, ProjectEntry { name: project.name, production: project.production_deployment_id });
        }
    }

    /// Deployment `id` is ready in `project` (`None`: not ready, or gone).
    pub fn put_deployment(&mut self, id: &str, project: Option<&str>) {
        match project {
            Some(project) => {
                let key = self.project_key(project);
                self.project_of_deployment.insert(id.into(), key);
            }
            None => {
                self.project_of_deployment.remove(id);
            }
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
            let key = self.project_key(project);
            self.domains.insert(domain.to_owned(), key);
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
        (self.projects.get(owner)?.name == project).then_some(&**id)
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
        // A deleted project's deployments leave by changes of their own.
        kept.put_project("p4", None);
        kept.put_deployment("ffffffffffff", None);
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
