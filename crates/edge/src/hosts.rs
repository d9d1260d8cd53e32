//! The edge's copy of the control plane's host table, and the routing
//! feed's wire form that keeps it.
//!
//! The table holds what routing is made of — projects (name, production
//! deployment), ready deployments (their project), verified custom domains
//! (their project) — rather than every host, so a rename is one entry and a
//! million deployments hold one id each. [`HostTable::resolve`] applies the
//! control plane's own rules (`crates/controlplane/src/routing.rs`, whose
//! test `the_edges_table_answers_as_the_control_planes` holds the two to
//! the same answers): `<project>-<deployment id>.<base>` first, then
//! `<project>.<base>` (production), then a custom domain (its project's
//! production).

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One answer of the control plane's `GET /routing?since=G` (origin
/// listener): the whole table (`full`), or what changed after generation
/// `G`, as each subject is now. Every field is sent; unknown ones are
/// ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingUpdate {
    /// The routing generation this answer brings the table to.
    pub generation: i64,
    /// The table whole: what the edge held before is dropped.
    pub full: bool,
    /// Projects are `<name>.<base_domain>`.
    pub base_domain: String,
    /// Projects as they are now (created, renamed, promoted).
    pub projects: Vec<ProjectRoute>,
    pub deleted_projects: Vec<String>,
    /// `(deployment id, project id)` of deployments that are ready.
    pub deployments: Vec<(String, String)>,
    /// Deployments no longer ready (deleted, or their project was).
    pub deleted_deployments: Vec<String>,
    /// `(domain, project id)` of verified, attached custom domains outside
    /// the base domain.
    pub domains: Vec<(String, String)>,
    pub deleted_domains: Vec<String>,
}

impl RoutingUpdate {
    /// An update that changes nothing, at `generation`.
    pub fn unchanged(generation: i64, base_domain: &str) -> Self {
        Self {
            generation,
            full: false,
            base_domain: base_domain.to_owned(),
            projects: Vec::new(),
            deleted_projects: Vec::new(),
            deployments: Vec::new(),
            deleted_deployments: Vec::new(),
            domains: Vec::new(),
            deleted_domains: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectRoute {
    pub id: String,
    pub name: String,
    /// Its production deployment, if it has one.
    pub production: Option<String>,
}

#[derive(Debug)]
struct Project {
    name: String,
    production: Option<Box<str>>,
}

/// The host table, kept by [`RoutingUpdate`]s.
#[derive(Debug, Default)]
pub struct HostTable {
    /// `None` until the first full update: the edge knows no host yet.
    generation: Option<i64>,
    base_domain: String,
    /// Project id → name and production. The ids are shared (`Arc`) with
    /// the maps below.
    projects: HashMap<Arc<str>, Project>,
    project_by_name: HashMap<String, Arc<str>>,
    project_of_deployment: HashMap<Box<str>, Arc<str>>,
    domains: HashMap<String, Arc<str>>,
}

/// Why an update could not be applied; the follower then asks for the
/// table whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("a change past generation {0} arrived before any full table")]
    NoTable(i64),
    #[error("the base domain changed from {ours:?} to {theirs:?}")]
    BaseDomain { ours: String, theirs: String },
}

impl HostTable {
    /// The generation of the table held, `None` before the first one.
    pub fn generation(&self) -> Option<i64> {
        self.generation
    }

    pub fn base_domain(&self) -> &str {
        &self.base_domain
    }

    /// Projects, ready deployments and custom domains held.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.projects.len(), self.project_of_deployment.len(), self.domains.len())
    }

    /// Applies `update`: a full one replaces the table, a delta patches it
    /// (projects, then deployments, then domains, as the control plane's
    /// own table is patched). A delta needs a table of the same base domain.
    pub fn apply(&mut self, update: RoutingUpdate) -> Result<(), ApplyError> {
        if update.full {
            *self = HostTable { base_domain: update.base_domain.clone(), ..HostTable::default() };
        } else if self.generation.is_none() {
            return Err(ApplyError::NoTable(update.generation));
        } else if update.base_domain != self.base_domain {
            return Err(ApplyError::BaseDomain { ours: self.base_domain.clone(), theirs: update.base_domain });
        }
        for id in &update.deleted_projects {
            self.put_project(id, None);
        }
        for project in update.projects {
            let id = project.id.clone();
            self.put_project(&id, Some(project));
        }
        for id in &update.deleted_deployments {
            self.project_of_deployment.remove(id.as_str());
        }
        for (id, project) in update.deployments {
            let key = self.project_key(&project);
            self.project_of_deployment.insert(id.into(), key);
        }
        for domain in &update.deleted_domains {
            self.domains.remove(domain);
        }
        for (domain, project) in update.domains {
            let key = self.project_key(&project);
            self.domains.insert(domain, key);
        }
        self.generation = Some(update.generation);
        Ok(())
    }

    /// The shared copy of project id `id` (a new one if no entry holds it).
    fn project_key(&self, id: &str) -> Arc<str> {
        self.projects.get_key_value(id).map_or_else(|| Arc::from(id), |(key, _)| Arc::clone(key))
    }

    fn put_project(&mut self, id: &str, project: Option<ProjectRoute>) {
        let key = self.project_key(id);
        if let Some(old) = self.projects.remove(id)
            && self.project_by_name.get(&old.name).is_some_and(|owner| **owner == *id)
        {
            self.project_by_name.remove(&old.name);
        }
        if let Some(project) = project {
            self.project_by_name.insert(project.name.clone(), Arc::clone(&key));
            self.projects.insert(key, Project { name: project.name, production: project.production.map(Into::into) });
        }
    }

    /// The deployment serving `host` (lowercase, no port), if any.
    pub fn resolve(&self, host: &str) -> Option<&str> {
        let host = host.strip_suffix('.').unwrap_or(host);
        let under_base =
            host.strip_suffix(self.base_domain.as_str()).and_then(|rest| rest.strip_suffix('.')).filter(|_| {
                // An empty base domain (no table yet) has no names under it.
                !self.base_domain.is_empty()
            });
        if let Some(label) = under_base {
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

    /// The ready deployment whose host label is `label`
    /// (`<project>-<deployment id>`, split at the last `-`).
    fn deployment_of_label(&self, label: &str) -> Option<&str> {
        let (project, deployment) = label.rsplit_once('-')?;
        let (id, owner) = self.project_of_deployment.get_key_value(deployment)?;
        (self.projects.get(owner)?.name == project).then_some(&**id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(id: &str, name: &str, production: Option<&str>) -> ProjectRoute {
        ProjectRoute { id: id.into(), name: name.into(), production: production.map(Into::into) }
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
    }

    /// The control plane's routing test fixture (`routing.rs`), as a full
    /// update: the domains under the base domain are not sent.
    fn full() -> RoutingUpdate {
        RoutingUpdate {
            generation: 7,
            full: true,
            base_domain: "localhost".into(),
            projects: vec![
                project("p1", "hello", Some("aaaaaaaaaaaa")),
                project("p2", "my-app", None),
                project("p3", "hello-bbbbbbbbbbbb", Some("cccccccccccc")),
                project("p4", "other-eeeeeeeeeeee", Some("ffffffffffff")),
            ],
            deployments: pairs(&[
                ("aaaaaaaaaaaa", "p1"),
                ("bbbbbbbbbbbb", "p1"),
                ("dddddddddddd", "p2"),
                ("cccccccccccc", "p3"),
                ("ffffffffffff", "p4"),
            ]),
            domains: pairs(&[("www.example.com", "p1"), ("shop.example.com", "p2")]),
            ..RoutingUpdate::unchanged(7, "localhost")
        }
    }

    fn table() -> HostTable {
        let mut table = HostTable::default();
        table.apply(full()).unwrap();
        table
    }

    #[test]
    fn resolves_as_the_control_plane_does() {
        let t = table();
        assert_eq!(t.generation(), Some(7));
        for (host, expected) in [
            ("hello.localhost", Some("aaaaaaaaaaaa")),
            ("hello.localhost.", Some("aaaaaaaaaaaa")),
            ("hello-aaaaaaaaaaaa.localhost", Some("aaaaaaaaaaaa")),
            ("my-app-dddddddddddd.localhost", Some("dddddddddddd")),
            // The deployment comes first: an immutable URL is never taken over.
            ("hello-bbbbbbbbbbbb.localhost", Some("bbbbbbbbbbbb")),
            ("other-eeeeeeeeeeee.localhost", Some("ffffffffffff")),
            ("www.example.com", Some("aaaaaaaaaaaa")),
            ("my-app.localhost", None),
            ("shop.example.com", None),
            ("hello-dddddddddddd.localhost", None),
            ("hello-zzzzzzzzzzzz.localhost", None),
            ("a.hello.localhost", None),
            ("localhost", None),
            ("nope.localhost", None),
            ("example.com", None),
        ] {
            assert_eq!(t.resolve(host), expected, "{host}");
        }
    }

    #[test]
    fn an_empty_table_resolves_nothing() {
        let t = HostTable::default();
        assert_eq!(t.generation(), None);
        assert_eq!(t.resolve("hello.localhost"), None);
        assert_eq!(t.resolve(".hello"), None);
        assert_eq!(t.resolve(""), None);
    }

    #[test]
    fn deltas_patch_the_table_as_a_fresh_one_answers() {
        let mut kept = table();
        kept.apply(RoutingUpdate {
            generation: 9,
            full: false,
            base_domain: "localhost".into(),
            // Renamed and promoted; promoted; deleted.
            projects: vec![project("p1", "hi", Some("bbbbbbbbbbbb")), project("p2", "my-app", Some("gggggggggggg"))],
            deleted_projects: vec!["p4".into()],
            deployments: pairs(&[("gggggggggggg", "p2")]),
            deleted_deployments: vec!["ffffffffffff".into()],
            domains: pairs(&[("www.example.com", "p2"), ("new.example.com", "p1")]),
            deleted_domains: vec!["shop.example.com".into()],
        })
        .unwrap();
        let mut fresh = HostTable::default();
        fresh
            .apply(RoutingUpdate {
                generation: 9,
                full: true,
                base_domain: "localhost".into(),
                projects: vec![
                    project("p1", "hi", Some("bbbbbbbbbbbb")),
                    project("p2", "my-app", Some("gggggggggggg")),
                    project("p3", "hello-bbbbbbbbbbbb", Some("cccccccccccc")),
                ],
                deployments: pairs(&[
                    ("aaaaaaaaaaaa", "p1"),
                    ("bbbbbbbbbbbb", "p1"),
                    ("dddddddddddd", "p2"),
                    ("gggggggggggg", "p2"),
                    ("cccccccccccc", "p3"),
                ]),
                domains: pairs(&[("www.example.com", "p2"), ("new.example.com", "p1")]),
                ..RoutingUpdate::unchanged(9, "localhost")
            })
            .unwrap();
        let mut hosts = vec!["www.example.com".to_owned(), "shop.example.com".into(), "new.example.com".into()];
        for name in ["hello", "hi", "my-app", "hello-bbbbbbbbbbbb", "other-eeeeeeeeeeee"] {
            hosts.push(format!("{name}.localhost"));
            for id in ["aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc", "dddddddddddd", "ffffffffffff", "gggggggggggg"] {
                hosts.push(format!("{name}-{id}.localhost"));
            }
        }
        let mut routed = 0;
        for host in &hosts {
            assert_eq!(kept.resolve(host), fresh.resolve(host), "{host}");
            routed += usize::from(fresh.resolve(host).is_some());
        }
        assert!(routed >= 8, "the comparison covers routed hosts ({routed})");
        assert_eq!(kept.resolve("hello.localhost"), None, "the old name is gone");
        assert_eq!(kept.resolve("hi-aaaaaaaaaaaa.localhost"), Some("aaaaaaaaaaaa"), "immutable URLs follow the name");
        assert_eq!(kept.sizes(), fresh.sizes());
        assert_eq!(kept.generation(), Some(9));
    }

    #[test]
    fn a_delta_needs_a_table_of_its_base_domain() {
        let mut empty = HostTable::default();
        assert_eq!(empty.apply(RoutingUpdate::unchanged(3, "localhost")), Err(ApplyError::NoTable(3)));
        let mut t = table();
        let err = t.apply(RoutingUpdate::unchanged(8, "example.com")).unwrap_err();
        assert!(matches!(err, ApplyError::BaseDomain { .. }), "{err}");
        assert_eq!(t.generation(), Some(7), "a refused delta leaves the table as it was");
        assert_eq!(t.resolve("hello.localhost"), Some("aaaaaaaaaaaa"));
    }

    #[test]
    fn the_wire_form_requires_every_field_and_ignores_unknown_ones() {
        let json = serde_json::to_value(full()).unwrap();
        assert_eq!(serde_json::from_value::<RoutingUpdate>(json.clone()).unwrap(), full());
        let mut extra = json.clone();
        extra["certificates"] = serde_json::json!([]);
        assert_eq!(serde_json::from_value::<RoutingUpdate>(extra).unwrap(), full());
        let mut missing = json;
        missing.as_object_mut().unwrap().remove("deleted_domains");
        assert!(serde_json::from_value::<RoutingUpdate>(missing).is_err());
    }
}
