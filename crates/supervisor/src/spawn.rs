//! An isolate process from its spawn until it serves: its output pumps, its
//! control listener, the task that reaps it and says why it died.

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isocloud_egress::EgressGrant;
use isocloud_protocol::LogLevel;
use isocloud_sandbox::{IsolateCgroup, IsolateFiles, SIGKILL, SandboxedCommand, signal_process_group};
use tokio::net::UnixListener;
use tokio::sync::{oneshot, watch};

use crate::control::{ControlContext, accept_control};
use crate::isolate::Meter;
use crate::lifetime::{Count, HELD, Lifetime, LifetimeOwner};
use crate::monitor::monitor;
use crate::output::{pump_output, strip_ansi};
use crate::{Isolate, IsolateHooks, IsolateLimits, IsolateState, StartError, Termination};

/// What V8 prints when its heap limit (`--max-old-space-size`) is reached.
const V8_OUT_OF_MEMORY: [&str; 2] = ["Reached heap limit", "heap out of memory"];

/// An isolate process between spawn and serving.
pub(crate) struct Spawned {
    pub(crate) pid: u32,
    pub(crate) termination: Arc<Mutex<Option<Termination>>>,
    pub(crate) state: watch::Receiver<IsolateState>,
    pub(crate) egress: Option<EgressGrant>,
    pub(crate) started_rx: oneshot::Receiver<crate::control::StartReport>,
    /// The harness's control connection, once it waits for an assignment
    /// (pre-started isolates only).
    pub(crate) waiting_rx: Option<oneshot::Receiver<crate::control::Waiting>>,
    pub(crate) stderr_tail: Arc<Mutex<String>>,
    /// Dropping it (a failed start, an unassigned pre-started isolate, the
    /// isolate's end) kills the process and ends its tasks.
    pub(crate) lifetime: LifetimeOwner,
    pub(crate) hooks: Arc<dyn IsolateHooks>,
}

impl Spawned {
    pub(crate) fn spawn(
        mut command: SandboxedCommand,
        files: &IsolateFiles,
        hooks: Arc<dyn IsolateHooks>,
        limits: IsolateLimits,
        cgroup: Option<IsolateCgroup>,
        mut egress: Option<EgressGrant>,
    ) -> Result<Spawned, StartError> {
        let listener = UnixListener::bind(&files.control).map_err(StartError::Spawn)?;
        let listener_count = Count::new(&HELD.control_listeners);
        let network_namespace = command.network_namespace();
        // The child joins its cgroup before exec: deno's own start-up is
        // charged to the isolate, not to the runner.
        if let Some(cgroup) = &cgroup {
            let procs = cgroup
                .procs_file()
                .map_err(|e| StartError::Spawn(std::io::Error::other(format!("cannot open the memory cgroup: {e}"))))?;
            command.join_cgroup(procs);
        }
        let mut child = command.spawn().map_err(StartError::Spawn)?;
        let pid = child.id().ok_or_else(|| StartError::Spawn(std::io::Error::other("no pid")))?;
        // From here every end path goes through the lifetime: its owner's
        // drop kills the process group, its end stops the isolate's tasks.
        let (lifetime, owner) = Lifetime::new();
        // In its own network namespace the isolate reaches the egress proxy
        // only through a listener the runner puts there, at the proxy's own
        // address. Right away: the harness probes the proxy first thing (and
        // retries briefly).
        if network_namespace && let Some(grant) = &mut egress {
            let inside = isocloud_sandbox::netns::listen_inside(pid, grant.proxy_addr())
                .and_then(|listener| grant.serve_inside(listener));
            if let Err(e) = inside {
                let _ = signal_process_group(pid, SIGKILL);
                return Err(StartError::Spawn(std::io::Error::other(format!(
                    "cannot serve the egress proxy in the isolate's network namespace: {e}"
                ))));
            }
        }
        tracing::debug!(pid, dir = %files.dir.display(), "isolate process spawned");

        let stderr_tail = Arc::new(Mutex::new(String::new()));
        if let Some(stdout) = child.stdout.take() {
            lifetime.spawn_draining(pump_output(stdout, LogLevel::Info, hooks.clone(), None));
        }
        if let Some(stderr) = child.stderr.take() {
            lifetime.spawn_draining(pump_output(stderr, LogLevel::Error, hooks.clone(), Some(stderr_tail.clone())));
        }

        let (control, started_rx, waiting_rx) = ControlContext::new(hooks.clone(), lifetime.clone());
        lifetime.spawn(accept_control(listener, listener_count, control));

        let (state_tx, state_rx) = watch::channel(IsolateState::Running);
        let termination: Arc<Mutex<Option<Termination>>> = Arc::default();
        let exit_termination = termination.clone();
        let exit_stderr = stderr_tail.clone();
        // Not a task of the lifetime: it ends the lifetime, when the process
        // is gone — and when the lifetime ends first (its owner dropped), it
        // kills the process and still reaps it.
        tokio::spawn(async move {
            let _count = Count::new(&HELD.tasks);
            let waited = tokio::select! {
                waited = child.wait() => waited,
                () = lifetime.ended() => {
                    let _ = signal_process_group(pid, SIGKILL);
                    child.wait().await
                }
            };
            let status = match waited {
                Ok(status) => status.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            // Whatever the leader started goes with it.
            let _ = signal_process_group(pid, SIGKILL);
            // Why it died decides what in-flight requests are told: set it
            // before anyone can see the exit.
            let oom = cgroup.as_ref().is_some_and(IsolateCgroup::oom_killed)
                || V8_OUT_OF_MEMORY.iter().any(|m| exit_stderr.lock().expect("stderr tail poisoned").contains(m));
            if oom {
                let used_bytes =
                    cgroup.as_ref().and_then(IsolateCgroup::peak_bytes).unwrap_or(limits.memory_limit_bytes);
                exit_termination
                    .lock()
                    .expect("termination poisoned")
                    .get_or_insert(Termination::MemoryLimit { limit_bytes: limits.memory_limit_bytes, used_bytes });
            }
            drop(cgroup);
            tracing::debug!(pid, %status, "isolate process exited");
            let _ = state_tx.send(IsolateState::Exited(status));
            lifetime.end();
        });
        Ok(Spawned {
            pid,
            termination,
            state: state_rx,
            egress,
            started_rx,
            waiting_rx: Some(waiting_rx),
            stderr_tail,
            lifetime: owner,
            hooks,
        })
    }

    /// Becomes the [`Isolate`] of `files` and waits until the harness serves.
    pub(crate) async fn serve(
        self,
        files: IsolateFiles,
        start_timeout: Duration,
        limits: IsolateLimits,
    ) -> Result<Arc<Isolate>, StartError> {
        let Spawned { pid, termination, state, egress, mut started_rx, stderr_tail, lifetime, hooks, .. } = self;
        let isolate = Arc::new(Isolate {
            pid,
            files,
            idle: Mutex::new(Vec::new()),
            termination,
            meter: Meter::default(),
            egress,
            requests_started: AtomicU64::new(0),
            state,
            in_flight: AtomicUsize::new(0),
            started: Instant::now(),
            last_active_ms: AtomicU64::new(0),
            monitor: Arc::default(),
            _lifetime: lifetime,
            hooks,
        });
        let exited = isolate.state.clone();
        let started = |message: Result<crate::control::StartReport, oneshot::error::RecvError>| match message {
            Ok(Ok(())) => Ok(()),
            Ok(Err((code, message))) => Err(StartError::Failed { code, message }),
            Err(_) => Err(StartError::Exited { status: "control channel closed".into(), stderr: String::new() }),
        };
        let outcome = tokio::time::timeout(start_timeout, async {
            tokio::select! {
                message = &mut started_rx => started(message),
                status = exit_status(exited) => {
                    // The harness reports why it cannot start and exits right
                    // away; the exit may be seen first. Its reason is better.
                    match tokio::time::timeout(Duration::from_millis(250), &mut started_rx).await {
                        Ok(Ok(Err((code, message)))) => Err(StartError::Failed { code, message }),
                        _ => Err(StartError::Exited { status, stderr: String::new() }),
                    }
                }
            }
        })
        .await
        .unwrap_or(Err(StartError::Timeout(start_timeout)));

        match outcome {
            Ok(()) => {
                tokio::spawn(monitor(Arc::downgrade(&isolate), limits));
                Ok(isolate)
            }
            Err(mut error) => {
                isolate.kill();
                if let StartError::Exited { stderr, .. } = &mut error {
                    // Give the stderr pump a moment to drain what deno printed.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    *stderr = strip_ansi(&stderr_tail.lock().expect("stderr tail poisoned"));
                }
                Err(error)
            }
        }
    }
}

/// Resolves with the exit status once the process has exited.
pub(crate) async fn exit_status(mut state: watch::Receiver<IsolateState>) -> String {
    match state.wait_for(|s| matches!(s, IsolateState::Exited(_))).await.as_deref() {
        Ok(IsolateState::Exited(status)) => status.clone(),
        _ => String::new(),
    }
}
