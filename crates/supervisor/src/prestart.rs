//! Pre-started isolates: deno up and the harness waiting on its control
//! socket before a deployment is chosen; [`Prestarted::assign`] hands it one.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use isocloud_egress::EgressGrant;
use isocloud_protocol::LogLevel;
use isocloud_protocol::harness::{Assignment, RunnerMessage};
use isocloud_sandbox::{IsolateCgroup, IsolateFiles, SIGKILL, SandboxedCommand, signal_process_group};
use tokio::sync::mpsc;

use crate::output::strip_ansi;
use crate::spawn::{Spawned, exit_status};
use crate::{Isolate, IsolateHooks, IsolateLimits, IsolateState, StartError};

/// An isolate process started before a deployment was chosen for it: deno
/// is up, the harness evaluated and waiting on its control socket. The
/// pool keeps a few per sandbox profile, so a boot skips the process start.
/// Dropped unassigned, it is killed and its files removed.
pub struct Prestarted {
    spawned: Option<Spawned>,
    control: Option<mpsc::Sender<Vec<u8>>>,
    hooks: Arc<LateHooks>,
    files: IsolateFiles,
    preloaded_packages: u32,
}

impl Prestarted {
    /// Its blank files ([`IsolateFiles::prepare_blank`]).
    pub fn files(&self) -> &IsolateFiles {
        &self.files
    }

    /// Packages of its bound set whose entry modules the harness loaded
    /// (read and compiled, not evaluated) before it waited.
    pub fn preloaded_packages(&self) -> u32 {
        self.preloaded_packages
    }

    pub fn pid(&self) -> Option<u32> {
        self.spawned.as_ref().map(|s| s.pid)
    }

    /// Still waiting (not exited meanwhile).
    pub fn is_running(&self) -> bool {
        self.spawned.as_ref().is_some_and(|s| matches!(*s.state.borrow(), IsolateState::Running))
    }

    /// Its egress proxy credentials, to be named after the deployment.
    pub fn egress(&self) -> Option<&EgressGrant> {
        self.spawned.as_ref().and_then(|s| s.egress.as_ref())
    }

    /// Gives it a deployment: `files` are its files filled with the
    /// deployment ([`IsolateFiles::fill`]), `assignment` what the harness
    /// is told ([`IsolateFiles::assignment`]). Waits, for at most
    /// `start_timeout`, until the tenant's code serves.
    pub async fn assign(
        mut self,
        files: IsolateFiles,
        hooks: Arc<dyn IsolateHooks>,
        assignment: Assignment,
        start_timeout: Duration,
        limits: IsolateLimits,
    ) -> Result<Arc<Isolate>, StartError> {
        let _ = self.hooks.0.set(hooks);
        let line = RunnerMessage::Assign(assignment).to_line();
        let control = self.control.take().expect("a prestarted isolate has its control connection");
        let spawned = self.spawned.take().expect("assigned once");
        if control.send(line).await.is_err() {
            let _ = signal_process_group(spawned.pid, SIGKILL);
            let _ = std::fs::remove_dir_all(&files.dir);
            return Err(StartError::Exited { status: "control channel closed".into(), stderr: String::new() });
        }
        // From here the isolate (and its Drop) own the process and its files.
        spawned.serve(files, start_timeout, limits).await
    }
}

impl Drop for Prestarted {
    fn drop(&mut self) {
        if let Some(spawned) = &self.spawned {
            let _ = signal_process_group(spawned.pid, SIGKILL);
            let _ = std::fs::remove_dir_all(&self.files.dir);
        }
    }
}

/// The hooks of a pre-started isolate, known once it is assigned. Before,
/// only the harness runs, and what it prints goes to the runner's log.
#[derive(Default)]
struct LateHooks(std::sync::OnceLock<Arc<dyn IsolateHooks>>);

impl IsolateHooks for LateHooks {
    fn log(&self, level: LogLevel, message: String, request_id: Option<String>) {
        match self.0.get() {
            Some(hooks) => hooks.log(level, message, request_id),
            None => tracing::debug!(target: "isocloud::prestart", ?level, "{message}"),
        }
    }

    fn materialize(&self, tree_path: String) -> BoxFuture<'static, Result<(), String>> {
        match self.0.get() {
            Some(hooks) => hooks.materialize(tree_path),
            None => Box::pin(async { Err("no deployment yet".to_owned()) }),
        }
    }

    fn load_tree(&self) -> BoxFuture<'static, Result<(), String>> {
        match self.0.get() {
            Some(hooks) => hooks.load_tree(),
            None => Box::pin(async { Err("no deployment yet".to_owned()) }),
        }
    }
}

impl Isolate {
    /// Spawns `command` (of [`SandboxedCommand::blank`] files) and waits, for
    /// at most `start_timeout`, until its harness waits for a deployment:
    /// deno has started, the harness is compiled and evaluated. What is left
    /// for [`Prestarted::assign`] is the tenant's own code.
    pub async fn prestart(
        command: SandboxedCommand,
        files: IsolateFiles,
        start_timeout: Duration,
        limits: IsolateLimits,
        cgroup: Option<IsolateCgroup>,
        egress: Option<EgressGrant>,
    ) -> Result<Prestarted, StartError> {
        let hooks = Arc::new(LateHooks::default());
        let mut spawned = Spawned::spawn(command, &files, hooks.clone(), limits, cgroup, egress)?;
        let mut waiting_rx = spawned.waiting_rx.take().expect("a fresh spawn has its waiting slot");
        let outcome = tokio::time::timeout(start_timeout, async {
            tokio::select! {
                control = &mut waiting_rx => control.map_err(|_| StartError::Exited {
                    status: "control channel closed".into(),
                    stderr: String::new(),
                }),
                status = exit_status(spawned.state.clone()) => Err(StartError::Exited { status, stderr: String::new() }),
            }
        })
        .await
        .unwrap_or(Err(StartError::Timeout(start_timeout)));
        let mut prestarted = Prestarted { spawned: Some(spawned), control: None, hooks, files, preloaded_packages: 0 };
        match outcome {
            Ok(waiting) => {
                prestarted.control = Some(waiting.reply);
                prestarted.preloaded_packages = waiting.preloaded_packages;
                Ok(prestarted)
            }
            Err(mut error) => {
                if let (StartError::Exited { stderr, .. }, Some(spawned)) = (&mut error, &prestarted.spawned) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    *stderr = strip_ansi(&spawned.stderr_tail.lock().expect("stderr tail poisoned"));
                }
                Err(error)
            }
        }
    }
}
