//! One running isolate: its process, the HTTP connections into it, and the
//! control channel out of it.
//!
//! This crate owns an isolate from spawn to exit: it starts the
//! [`SandboxedCommand`](isocloud_sandbox::SandboxedCommand) the sandbox
//! built, waits until the harness says it serves (or why it cannot) — or,
//! for a pre-started isolate, until the harness waits for its deployment,
//! which [`Prestarted::assign`] hands it over the control socket — forwards
//! requests over keep-alive HTTP/1.1 connections on the isolate's unix
//! socket, relays the harness's reports (console output with request ids,
//! asset reads) to [`IsolateHooks`], and notices when the process exits. It
//! must not decide which deployment runs or for how long (the pool does),
//! and it never talks to an origin itself.
//!
//! Its modules, one concern each: `spawn` (the process from spawn until it
//! serves), `isolate` (a running isolate, its connections and counters),
//! `prestart` (isolates waiting for a deployment), `control` (the control
//! socket), `output` (stdout and stderr lines), `monitor` (CPU and memory
//! limits), `lifetime` (what ends with an isolate), `error`.

#![forbid(unsafe_code)]

mod control;
mod error;
mod isolate;
mod lifetime;
mod monitor;
mod output;
mod prestart;
mod spawn;

pub use error::{ForwardError, StartError, Termination};
pub use isolate::{
    CPU_BUDGET_CAP_PERCENT, CPU_SAMPLE_BUSY, CPU_SAMPLE_IDLE, CPU_WARM_UP_REQUESTS, InFlight, Isolate, IsolateBody,
    IsolateHooks, IsolateLimits, IsolateState, RequestBody, Reserved, UsageTotals,
};
pub use lifetime::{Held, held};
pub use output::{MAX_LOG_MESSAGE_BYTES, truncate_log};
pub use prestart::Prestarted;
