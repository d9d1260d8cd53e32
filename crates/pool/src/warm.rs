//! Pre-started isolates: deno processes started before any deployment is
//! chosen for them, kept a few per sandbox profile and refilled in the
//! background, so a boot skips the process start (the larger part of a cold
//! start) and pays only for loading the tenant's own code.
//!
//! A profile is what deno fixes when it starts and a deployment decides:
//! `permissions.net` (deno's permissions cannot grow later). Everything else
//! a deployment brings (modules, assets, envs, the deno cache dir) reaches
//! the pre-started isolate when it is assigned. Deployments that need an
//! import map (remote modules, redirects) or set deno's own variables boot
//! the ordinary way ([`isocloud_sandbox::IsolateFiles::fits_blank`]).
//!
//! Pre-started isolates are outside `--max-isolates`: they are few (per
//! profile, times at most [`MAX_PROFILES`]) and hold no tenant code.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isocloud_egress::EgressProxy;
use isocloud_protocol::NetPermission;
use isocloud_sandbox::{Cgroups, IsolateFiles, SandboxPolicy, SandboxedCommand};
use isocloud_supervisor::{Isolate, IsolateLimits, Prestarted};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// Profiles kept warm at once; the least recently used one goes first.
pub(crate) const MAX_PROFILES: usize = 4;

/// How long after a failed pre-start a profile is not refilled: a host
/// that cannot start isolates should not be made to try in a loop.
const FAILURE_BACKOFF: Duration = Duration::from_secs(10);

pub(crate) struct Warm {
    per_profile: usize,
    policy: SandboxPolicy,
    instances_dir: PathBuf,
    start_timeout: Duration,
    limits: IsolateLimits,
    cgroups: Option<Arc<Cgroups>>,
    egress: Option<EgressProxy>,
    next_instance: Arc<AtomicU64>,
    profiles: Mutex<HashMap<String, Profile>>,
    closed: AtomicBool,
    waiting: Gauge,
    preloaded_packages: Counter,
}

/// A package set pre-started isolates are started with (its folder in the
/// runner's package store, held while the profile is kept).
#[derive(Clone)]
pub(crate) struct WarmPackages {
    pub key: String,
    pub dir: PathBuf,
    pub lease: Arc<dyn std::any::Any + Send + Sync>,
}

struct Profile {
    net: NetPermission,
    packages: Option<WarmPackages>,
    ready: VecDeque<Prestarted>,
    filling: usize,
    last_used: Instant,
    failed_at: Option<Instant>,
}

pub(crate) struct WarmOptions {
    pub per_profile: usize,
    pub policy: SandboxPolicy,
    pub instances_dir: PathBuf,
    pub start_timeout: Duration,
    pub limits: IsolateLimits,
    pub cgroups: Option<Arc<Cgroups>>,
    pub egress: Option<EgressProxy>,
    pub next_instance: Arc<AtomicU64>,
    /// `isocloud_prestarted_waiting`.
    pub waiting: Gauge,
    /// `isocloud_prestarted_preloaded_packages_total`.
    pub preloaded_packages: Counter,
}

/// The profile's name: deno's `--allow-net` as the runner would write it,
/// and the package set it starts with, if any.
fn profile_key(net: &NetPermission, packages: Option<&str>) -> String {
    let net = net_key(net);
    match packages {
        Some(set) => format!("{net} packages={set}"),
        None => net,
    }
}

fn net_key(net: &NetPermission) -> String {
    match net {
        NetPermission::All => "net=*".to_owned(),
        NetPermission::None => "net=-".to_owned(),
        NetPermission::Allow(hosts) => {
            let mut hosts = hosts.clone();
            hosts.sort();
            hosts.dedup();
            format!("net={}", hosts.join(","))
        }
    }
}

impl Warm {
    pub(crate) fn new(options: WarmOptions) -> Arc<Self> {
        Arc::new(Self {
            per_profile: options.per_profile,
            policy: options.policy,
            instances_dir: options.instances_dir,
            start_timeout: options.start_timeout,
            limits: options.limits,
            cgroups: options.cgroups,
            egress: options.egress,
            next_instance: options.next_instance,
            profiles: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            waiting: options.waiting,
            preloaded_packages: options.preloaded_packages,
        })
    }

    /// A pre-started isolate of `net`'s profile, if one is waiting. Then
    /// [`Warm::refill`] (after [`Warm::give_back`], if it did not fit).
    pub(crate) fn take(&self, net: &NetPermission, packages: Option<&str>) -> Option<Prestarted> {
        let mut profiles = self.profiles.lock().expect("warm pool poisoned");
        // A package set's profile exists only once a boot laid the set out.
        if packages.is_some() && !profiles.contains_key(&profile_key(net, packages)) {
            return None;
        }
        let profile = self.profile(&mut profiles, net, None, packages);
        let mut taken = None;
        while let Some(prestarted) = profile.ready.pop_front() {
            if prestarted.is_running() {
                taken = Some(prestarted);
                break;
            }
        }
        self.count(&profiles);
        taken
    }

    /// Gives back an isolate [`Warm::take`] returned and the deployment
    /// did not fit.
    pub(crate) fn give_back(&self, net: &NetPermission, packages: Option<&str>, prestarted: Prestarted) {
        let mut profiles = self.profiles.lock().expect("warm pool poisoned");
        if let Some(profile) = profiles.get_mut(&profile_key(net, packages))
            && !self.closed.load(Ordering::Acquire)
        {
            profile.ready.push_front(prestarted);
        }
        self.count(&profiles);
    }

    /// Pre-starts isolates in the background until `net`'s profile has its
    /// share (learning the profile if it is new).
    pub(crate) fn refill(self: &Arc<Self>, net: &NetPermission) {
        {
            let mut profiles = self.profiles.lock().expect("warm pool poisoned");
            self.profile(&mut profiles, net, None, None);
        }
        self.fill(&profile_key(net, None));
    }

    /// [`Warm::refill`] for built deployments of a package set (learned
    /// once a boot has laid the set out), or, with `packages` `None`, only if
    /// that set's profile is known already.
    pub(crate) fn refill_packages(self: &Arc<Self>, net: &NetPermission, key: &str, packages: Option<WarmPackages>) {
        let profile = profile_key(net, Some(key));
        {
            let mut profiles = self.profiles.lock().expect("warm pool poisoned");
            if packages.is_none() && !profiles.contains_key(&profile) {
                return;
            }
            self.profile(&mut profiles, net, packages, Some(key));
        }
        self.fill(&profile);
    }

    /// `net`'s profile, made the most recently used (created if new, the
    /// least recently used one going if there are too many).
    fn profile<'a>(
        &self,
        profiles: &'a mut HashMap<String, Profile>,
        net: &NetPermission,
        packages: Option<WarmPackages>,
        packages_key: Option<&str>,
    ) -> &'a mut Profile {
        let key = profile_key(net, packages_key);
        if !profiles.contains_key(&key) {
            profiles.insert(
                key.clone(),
                Profile {
                    net: net.clone(),
                    packages,
                    ready: VecDeque::new(),
                    filling: 0,
                    last_used: Instant::now(),
                    failed_at: None,
                },
            );
            evict_beyond(profiles, MAX_PROFILES, &key);
        }
        let profile = profiles.get_mut(&key).expect("inserted above");
        profile.last_used = Instant::now();
        profile
    }

    /// Publishes how many isolates wait now, over every profile.
    fn count(&self, profiles: &HashMap<String, Profile>) {
        self.waiting.set(profiles.values().map(|p| p.ready.len() as i64).sum());
    }

    /// Kills every waiting isolate; none is started again.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let drained: Vec<Profile> =
            self.profiles.lock().expect("warm pool poisoned").drain().map(|(_, profile)| profile).collect();
        drop(drained);
    }

    fn fill(self: &Arc<Self>, key: &str) {
        let (net, packages) = {
            let mut profiles = self.profiles.lock().expect("warm pool poisoned");
            let Some(profile) = profiles.get_mut(key) else { return };
            if self.closed.load(Ordering::Acquire)
                || profile.failed_at.is_some_and(|at| at.elapsed() < FAILURE_BACKOFF)
                || profile.ready.len() + profile.filling >= self.per_profile
            {
                return;
            }
            profile.filling += 1;
            (profile.net.clone(), profile.packages.clone())
        };
        let warm = self.clone();
        let key = key.to_owned();
        tokio::spawn(async move {
            let result = warm.prestart(&net, packages.as_ref()).await;
            let mut profiles = warm.profiles.lock().expect("warm pool poisoned");
            let Some(profile) = profiles.get_mut(&key) else { return };
            profile.filling = profile.filling.saturating_sub(1);
            match result {
                Ok(prestarted) if !warm.closed.load(Ordering::Acquire) => {
                    profile.failed_at = None;
                    warm.preloaded_packages.inc_by(u64::from(prestarted.preloaded_packages()));
                    profile.ready.push_back(prestarted);
                    warm.count(&profiles);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(profile = key, error = %e, "cannot pre-start an isolate; boots start their own");
                    profile.failed_at = Some(Instant::now());
                    return;
                }
            }
            drop(profiles);
            warm.fill(&key);
        });
    }

    async fn prestart(&self, net: &NetPermission, packages: Option<&WarmPackages>) -> Result<Prestarted, String> {
        let instance = self.next_instance.fetch_add(1, Ordering::Relaxed);
        let dir = self.instances_dir.join(format!("{instance}-prestarted"));
        // Named after its deployment when it gets one.
        let (grant, route) = crate::boot::egress_grant(self.egress.as_ref(), "(pre-started)", net);
        let files = {
            let dir = dir.clone();
            let policy = self.policy.clone();
            let route = route.clone();
            let packages = packages.cloned();
            tokio::task::spawn_blocking(move || {
                let mut files = IsolateFiles::prepare_blank(&dir, &policy, route.as_ref())?;
                // Started with the set bound and deno's flags for it: a
                // built deployment of that set then loads only its own code.
                if let Some(packages) = packages {
                    files.add_project(Some(&packages.dir), &[])?;
                    if let Some(project) = files.project.as_mut() {
                        project.packages_key = Some(packages.key);
                        project.lease = Some(packages.lease);
                    }
                }
                Ok::<_, isocloud_sandbox::SandboxError>(files)
            })
            .await
            .map_err(|e| e.to_string())?
        };
        let files = match files {
            Ok(files) => files,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.to_string());
            }
        };
        let command = SandboxedCommand::blank(&self.policy, &files, net, route.as_ref());
        let cgroup = match &self.cgroups {
            Some(cgroups) => match cgroups.create(&instance.to_string(), self.limits.memory_limit_bytes) {
                Ok(cgroup) => Some(cgroup),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(format!("cannot create the memory cgroup: {e}"));
                }
            },
            None => None,
        };
        match Isolate::prestart(command, files, self.start_timeout, self.limits, cgroup, grant).await {
            Ok(prestarted) => Ok(prestarted),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e.to_string())
            }
        }
    }
}

/// Drops the least recently used profiles but `keep` (killing their
/// isolates) until at most `max` remain.
fn evict_beyond(profiles: &mut HashMap<String, Profile>, max: usize, keep: &str) {
    while profiles.len() > max {
        let Some(oldest) = profiles
            .iter()
            .filter(|(key, _)| *key != keep)
            .min_by_key(|(_, p)| p.last_used)
            .map(|(key, _)| key.clone())
        else {
            return;
        };
        profiles.remove(&oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_named_by_net_permission_whatever_the_order() {
        assert_eq!(profile_key(&NetPermission::All, None), "net=*");
        assert_eq!(profile_key(&NetPermission::None, None), "net=-");
        assert_eq!(profile_key(&NetPermission::None, Some("ab12")), "net=- packages=ab12");
        let a = NetPermission::Allow(vec!["b.example:443".into(), "a.example".into()]);
        let b = NetPermission::Allow(vec!["a.example".into(), "b.example:443".into(), "a.example".into()]);
        assert_eq!(profile_key(&a, None), profile_key(&b, None));
        assert_ne!(profile_key(&a, None), profile_key(&NetPermission::All, None));
    }
}
