//! The control socket: what the harness reports (readiness, start errors,
//! console lines, asset and manifest reads, waiting for an assignment) and
//! what the runner answers, one JSON object per line, within bounds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use isocloud_protocol::{ErrorCode, LogLevel};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::IsolateHooks;
use crate::lifetime::{Count, HELD, Lifetime, breach};
use crate::output::truncate_log;

/// Control lines longer than this are a broken or hostile harness: the
/// line is skipped (and the tenant told), the connection lives on. With
/// [`MAX_CONTROL_CONNECTIONS`] it bounds what one isolate's control socket
/// makes the runner buffer.
const MAX_CONTROL_LINE_BYTES: usize = 256 * 1024;
/// The harness opens one control connection and its sync-read worker a
/// second; more are refused, so a tenant cannot make the runner hold
/// descriptors and buffers for connections of its own.
const MAX_CONTROL_CONNECTIONS: usize = 4;
/// Distinct assets one isolate may have the runner fetch at once; a request
/// for a path already being fetched waits for that fetch.
const MAX_MATERIALIZING: usize = 16;

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum ControlMessage {
    Ready,
    /// A pre-started harness waits for its deployment on this connection.
    Waiting,
    StartError {
        code: String,
        message: String,
    },
    Log {
        level: String,
        message: String,
        request_id: Option<String>,
    },
    Materialize {
        id: u64,
        path: String,
    },
    /// The harness needs the asset manifest (deferred at boot).
    Tree {
        id: u64,
    },
}

fn parse_level(level: &str) -> LogLevel {
    match level {
        "debug" => LogLevel::Debug,
        "warning" => LogLevel::Warning,
        "error" => LogLevel::Error,
        _ => LogLevel::Info,
    }
}

fn parse_code(code: &str) -> ErrorCode {
    match code {
        "MODULE_NOT_FOUND" => ErrorCode::ModuleNotFound,
        _ => ErrorCode::IsolateStartFailed,
    }
}

/// What every control connection of one isolate shares.
#[derive(Clone)]
pub(crate) struct ControlContext {
    pub(crate) hooks: Arc<dyn IsolateHooks>,
    pub(crate) started: StartedSlot,
    pub(crate) waiting: WaitingSlot,
    /// Assets being fetched for this isolate, by path: a second request for
    /// one waits for the same fetch.
    pub(crate) materializing: Arc<Mutex<HashMap<String, Materializing>>>,
    pub(crate) lifetime: Lifetime,
}

pub(crate) type Materializing = Shared<BoxFuture<'static, Result<(), String>>>;

pub(crate) async fn accept_control(listener: UnixListener, _listener_count: Count, control: ControlContext) {
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONTROL_CONNECTIONS));
    while let Ok((stream, _)) = listener.accept().await {
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            drop(stream);
            breach(&HELD.control_connections_refused);
            control.hooks.log(
                LogLevel::Warning,
                format!(
                    "[isocloud] a control connection was refused: an isolate may hold at most \
                     {MAX_CONTROL_CONNECTIONS}"
                ),
                None,
            );
            continue;
        };
        let context = control.clone();
        control.lifetime.spawn(async move {
            let _permit = permit;
            serve_control(stream, context).await;
        });
    }
}

pub(crate) type StartedSlot = Arc<Mutex<Option<oneshot::Sender<Result<(), (ErrorCode, String)>>>>>;
/// Taken by the first connection that says it waits: the harness, before
/// any tenant code ran.
pub(crate) type WaitingSlot = Arc<Mutex<Option<oneshot::Sender<mpsc::Sender<Vec<u8>>>>>>;

/// Reads one control line into `line`, at most [`MAX_CONTROL_LINE_BYTES`].
/// `Ok(false)`: the connection ended. A longer line is skipped to its end
/// and reported as `Err(skipped bytes)`.
async fn read_control_line(reader: &mut (impl AsyncBufReadExt + Unpin), line: &mut Vec<u8>) -> Result<bool, usize> {
    line.clear();
    match reader.take(MAX_CONTROL_LINE_BYTES as u64).read_until(b'\n', line).await {
        Ok(0) | Err(_) => return Ok(false),
        Ok(_) if line.ends_with(b"\n") => return Ok(true),
        Ok(n) if n < MAX_CONTROL_LINE_BYTES => return Ok(false),
        Ok(_) => {}
    }
    // Over the bound: skip to the end of the line without holding it.
    let mut skipped = line.len();
    loop {
        let (done, used) = match reader.fill_buf().await {
            Ok([]) | Err(_) => return Ok(false),
            Ok(buffer) => match buffer.iter().position(|b| *b == b'\n') {
                Some(at) => (true, at + 1),
                None => (false, buffer.len()),
            },
        };
        reader.consume(used);
        skipped += used;
        if done {
            line.clear();
            return Err(skipped);
        }
    }
}

async fn serve_control(stream: UnixStream, control: ControlContext) {
    let _count = Count::new(&HELD.control_connections);
    let (read, mut write) = stream.into_split();
    let (reply_tx, mut reply_rx) = mpsc::channel::<Vec<u8>>(64);
    control.lifetime.spawn(async move {
        while let Some(line) = reply_rx.recv().await {
            if write.write_all(&line).await.is_err() {
                break;
            }
        }
    });
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        match read_control_line(&mut reader, &mut line).await {
            Ok(true) => {}
            Ok(false) => break,
            Err(skipped) => {
                breach(&HELD.control_messages_dropped);
                control.hooks.log(
                    LogLevel::Warning,
                    format!(
                        "[isocloud] a control message of {skipped} bytes was dropped: the bound is \
                         {MAX_CONTROL_LINE_BYTES} bytes"
                    ),
                    None,
                );
                continue;
            }
        }
        let message = match serde_json::from_slice::<ControlMessage>(&line) {
            Ok(message) => message,
            Err(e) => {
                tracing::debug!(error = %e, "ignoring a malformed control message");
                continue;
            }
        };
        match message {
            ControlMessage::Waiting => {
                if let Some(tx) = control.waiting.lock().expect("waiting slot poisoned").take() {
                    let _ = tx.send(reply_tx.clone());
                }
            }
            ControlMessage::Ready => {
                if let Some(tx) = control.started.lock().expect("started slot poisoned").take() {
                    let _ = tx.send(Ok(()));
                }
            }
            ControlMessage::StartError { code, message } => {
                if let Some(tx) = control.started.lock().expect("started slot poisoned").take() {
                    let _ = tx.send(Err((parse_code(&code), truncate_log(message))));
                }
            }
            ControlMessage::Log { level, message, request_id } => {
                let request_id = request_id.filter(|id| id.len() <= 128);
                control.hooks.log(parse_level(&level), truncate_log(message), request_id)
            }
            // The manifest is deduplicated and bounded like asset reads (a
            // path is never empty, so "" is the tree's own key).
            ControlMessage::Tree { id } => answer(&control, &reply_tx, id, String::new()),
            ControlMessage::Materialize { id, path } => answer(&control, &reply_tx, id, path),
        }
    }
}

/// The fetch of `path` for this isolate: the one already running, a new one
/// while fewer than [`MAX_MATERIALIZING`] run, else a refusal.
/// Fetches `path` (`""`: the manifest) for the harness and sends it the
/// answer to its call `id`, in a task of the isolate's lifetime.
fn answer(control: &ControlContext, reply_tx: &mpsc::Sender<Vec<u8>>, id: u64, path: String) {
    let job = materialize_once(control, path);
    let reply_tx = reply_tx.clone();
    control.lifetime.spawn(async move {
        let reply = match job.await {
            Ok(()) => serde_json::json!({ "id": id, "ok": true }),
            Err(error) => serde_json::json!({ "id": id, "ok": false, "error": error }),
        };
        let mut line = serde_json::to_vec(&reply).expect("json value");
        line.push(b'\n');
        let _ = reply_tx.send(line).await;
    });
}

/// `""`: the asset manifest itself ([`IsolateHooks::load_tree`]).
fn materialize_once(control: &ControlContext, path: String) -> Materializing {
    let mut running = control.materializing.lock().expect("materializing poisoned");
    if let Some(job) = running.get(&path) {
        return job.clone();
    }
    if running.len() >= MAX_MATERIALIZING || path.len() > 4096 {
        breach(&HELD.materialize_refused);
        let refusal = format!("too many asset reads at once (at most {MAX_MATERIALIZING}); try again");
        return futures_util::future::ready(Err(refusal)).boxed().shared();
    }
    let fetch = if path.is_empty() { control.hooks.load_tree() } else { control.hooks.materialize(path.clone()) };
    let table = control.materializing.clone();
    let key = path.clone();
    let job = async move {
        let _count = Count::new(&HELD.materializing);
        let result = fetch.await;
        table.lock().expect("materializing poisoned").remove(&key);
        result
    }
    .boxed()
    .shared();
    running.insert(path, job.clone());
    job
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_overlong_control_line_is_skipped_and_the_next_one_read() {
        let mut input = vec![b'x'; MAX_CONTROL_LINE_BYTES * 3];
        input.extend_from_slice(b"\n{\"op\":\"ready\"}\n");
        let mut reader = BufReader::new(&input[..]);
        let mut line = Vec::new();
        let skipped = read_control_line(&mut reader, &mut line).await.unwrap_err();
        assert_eq!(skipped, MAX_CONTROL_LINE_BYTES * 3 + 1);
        assert_eq!(read_control_line(&mut reader, &mut line).await, Ok(true));
        assert_eq!(line, b"{\"op\":\"ready\"}\n");
        assert_eq!(read_control_line(&mut reader, &mut line).await, Ok(false));
    }

    #[tokio::test]
    async fn a_line_cut_off_by_the_end_of_the_connection_is_not_a_message() {
        let mut reader = BufReader::new(&b"{\"op\":\"rea"[..]);
        let mut line = Vec::new();
        assert_eq!(read_control_line(&mut reader, &mut line).await, Ok(false));
    }
}
