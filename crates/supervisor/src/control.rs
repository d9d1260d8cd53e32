//! The control socket: what the harness reports (readiness, start errors,
//! console lines, asset and manifest reads, waiting for an assignment) and
//! what the runner answers, one JSON object per line, within bounds. The
//! messages are declared in [`isocloud_protocol::harness`]; this module is
//! their transport: connections, lines, and what each message makes happen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use isocloud_protocol::harness::{HarnessMessage, MAX_LINE_BYTES, MAX_PATH_BYTES, MAX_REQUEST_ID_BYTES, RunnerMessage};
use isocloud_protocol::{ErrorCode, LogLevel};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::IsolateHooks;
use crate::lifetime::{Count, HELD, Lifetime, breach};
use crate::output::truncate_log;

/// The harness opens one control connection and its sync-read worker a
/// second; more are refused, so a tenant cannot make the runner hold
/// descriptors and buffers for connections of its own. With
/// [`MAX_LINE_BYTES`] (a longer line is skipped, the tenant told, the
/// connection lives on) it bounds what one isolate's control socket makes
/// the runner buffer.
const MAX_CONTROL_CONNECTIONS: usize = 4;
/// Distinct assets one isolate may have the runner fetch at once; a request
/// for a path already being fetched waits for that fetch.
const MAX_MATERIALIZING: usize = 16;

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

impl ControlContext {
    /// The context of a fresh isolate, with the receivers of its harness's
    /// first start report (`ready` or `start_error`) and of its `waiting`.
    pub(crate) fn new(
        hooks: Arc<dyn IsolateHooks>,
        lifetime: Lifetime,
    ) -> (Self, oneshot::Receiver<StartReport>, oneshot::Receiver<Waiting>) {
        let (started_tx, started_rx) = oneshot::channel();
        let (waiting_tx, waiting_rx) = oneshot::channel();
        let control = Self {
            hooks,
            started: Arc::new(Mutex::new(Some(started_tx))),
            waiting: Arc::new(Mutex::new(Some(waiting_tx))),
            materializing: Arc::default(),
            lifetime,
        };
        (control, started_rx, waiting_rx)
    }
}

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

/// A harness's first start report: `ready`, or `start_error`'s code and message.
pub(crate) type StartReport = Result<(), (ErrorCode, String)>;
pub(crate) type StartedSlot = Arc<Mutex<Option<oneshot::Sender<StartReport>>>>;
/// Taken by the first connection that says it waits: the harness, before
/// any tenant code ran.
pub(crate) type WaitingSlot = Arc<Mutex<Option<oneshot::Sender<Waiting>>>>;

/// A pre-started harness's `waiting`: where to send its assignment, and
/// what it loaded before it waited.
pub(crate) struct Waiting {
    pub(crate) reply: mpsc::Sender<Vec<u8>>,
    pub(crate) preloaded_packages: u32,
}

/// Reads one control line into `line`, at most [`MAX_LINE_BYTES`] (its
/// newline included).
/// `Ok(false)`: the connection ended. A longer line is skipped to its end
/// and reported as `Err(skipped bytes)`.
async fn read_control_line(reader: &mut (impl AsyncBufReadExt + Unpin), line: &mut Vec<u8>) -> Result<bool, usize> {
    line.clear();
    match reader.take(MAX_LINE_BYTES as u64).read_until(b'\n', line).await {
        Ok(0) | Err(_) => return Ok(false),
        Ok(_) if line.ends_with(b"\n") => return Ok(true),
        Ok(n) if n < MAX_LINE_BYTES => return Ok(false),
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
                         {MAX_LINE_BYTES} bytes"
                    ),
                    None,
                );
                continue;
            }
        }
        // Whatever is not a message (unknown op, a field missing or of the
        // wrong type, not UTF-8) is the harness's own breakage: ignored.
        let message = match HarnessMessage::parse(&line) {
            Ok(message) => message,
            Err(e) => {
                tracing::debug!(error = %e, "ignoring a malformed control message");
                continue;
            }
        };
        match message {
            HarnessMessage::Waiting { preloaded_packages } => {
                if let Some(tx) = control.waiting.lock().expect("waiting slot poisoned").take() {
                    let _ = tx.send(Waiting { reply: reply_tx.clone(), preloaded_packages });
                }
            }
            HarnessMessage::Ready => {
                if let Some(tx) = control.started.lock().expect("started slot poisoned").take() {
                    let _ = tx.send(Ok(()));
                }
            }
            HarnessMessage::StartError { code, message } => {
                if let Some(tx) = control.started.lock().expect("started slot poisoned").take() {
                    let _ = tx.send(Err((code, truncate_log(message))));
                }
            }
            HarnessMessage::Log { level, message, request_id } => {
                let request_id = request_id.filter(|id| id.len() <= MAX_REQUEST_ID_BYTES);
                control.hooks.log(level, truncate_log(message), request_id)
            }
            // The manifest is deduplicated and bounded like asset reads (a
            // path is never empty, so "" is the tree's own key).
            HarnessMessage::Tree { id } => answer(&control, &reply_tx, id, String::new()),
            HarnessMessage::Materialize { id, path } => answer(&control, &reply_tx, id, path),
        }
    }
}

/// Fetches `path` (`""`: the manifest) for the harness and sends it the
/// answer to its call `id`, in a task of the isolate's lifetime.
fn answer(control: &ControlContext, reply_tx: &mpsc::Sender<Vec<u8>>, id: u64, path: String) {
    let job = materialize_once(control, path);
    let reply_tx = reply_tx.clone();
    control.lifetime.spawn(async move {
        let _ = reply_tx.send(RunnerMessage::answer(id, job.await).to_line()).await;
    });
}

/// The fetch of `path` for this isolate (`""`: the asset manifest itself,
/// [`IsolateHooks::load_tree`]): the one already running, a new one while
/// fewer than [`MAX_MATERIALIZING`] run, else a refusal.
fn materialize_once(control: &ControlContext, path: String) -> Materializing {
    let mut running = control.materializing.lock().expect("materializing poisoned");
    if let Some(job) = running.get(&path) {
        return job.clone();
    }
    if running.len() >= MAX_MATERIALIZING || path.len() > MAX_PATH_BYTES {
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
    use std::time::Duration;

    use isocloud_protocol::harness::{Assignment, NodeServers, RunnerMessage};
    use tokio::io::Lines;
    use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

    use super::*;
    use crate::lifetime::LifetimeOwner;

    #[tokio::test]
    async fn an_overlong_control_line_is_skipped_and_the_next_one_read() {
        let mut input = vec![b'x'; MAX_LINE_BYTES * 3];
        input.extend_from_slice(b"\n{\"op\":\"ready\"}\n");
        let mut reader = BufReader::new(&input[..]);
        let mut line = Vec::new();
        let skipped = read_control_line(&mut reader, &mut line).await.unwrap_err();
        assert_eq!(skipped, MAX_LINE_BYTES * 3 + 1);
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

    /// Hooks that record what the control socket relays. Asset reads of
    /// `/slow…` never finish, of `/missing` fail, of anything else succeed.
    #[derive(Default)]
    struct Recorder {
        logs: Mutex<Vec<(LogLevel, String, Option<String>)>>,
        fetches: Mutex<Vec<String>>,
    }

    impl IsolateHooks for Recorder {
        fn log(&self, level: LogLevel, message: String, request_id: Option<String>) {
            self.logs.lock().unwrap().push((level, message, request_id));
        }

        fn materialize(&self, tree_path: String) -> BoxFuture<'static, Result<(), String>> {
            self.fetches.lock().unwrap().push(tree_path.clone());
            if tree_path.starts_with("/slow") {
                futures_util::future::pending().boxed()
            } else if tree_path == "/missing" {
                futures_util::future::ready(Err("no such asset".to_owned())).boxed()
            } else {
                futures_util::future::ready(Ok(())).boxed()
            }
        }

        fn load_tree(&self) -> BoxFuture<'static, Result<(), String>> {
            self.fetches.lock().unwrap().push(String::new());
            futures_util::future::ready(Ok(())).boxed()
        }
    }

    /// One control connection served as the runner serves it; this end is
    /// the harness's.
    struct Harness {
        hooks: Arc<Recorder>,
        write: OwnedWriteHalf,
        replies: Lines<BufReader<OwnedReadHalf>>,
        started: oneshot::Receiver<StartReport>,
        waiting: oneshot::Receiver<Waiting>,
        _owner: LifetimeOwner,
    }

    fn connect() -> Harness {
        let (runner, harness) = UnixStream::pair().unwrap();
        let hooks = Arc::new(Recorder::default());
        let (lifetime, owner) = Lifetime::new();
        let (control, started, waiting) = ControlContext::new(hooks.clone(), lifetime.clone());
        lifetime.spawn(serve_control(runner, control));
        let (read, write) = harness.into_split();
        Harness { hooks, write, replies: BufReader::new(read).lines(), started, waiting, _owner: owner }
    }

    fn log_line(message: &str) -> Vec<u8> {
        format!("{{\"op\":\"log\",\"level\":\"info\",\"message\":\"{message}\",\"request_id\":null}}\n").into_bytes()
    }

    impl Harness {
        async fn send(&mut self, bytes: &[u8]) {
            self.write.write_all(bytes).await.unwrap();
        }

        /// Sends a console line and waits until the hooks have it: every
        /// line sent before it has been handled (one connection's lines are
        /// handled in order).
        async fn sync(&mut self, marker: &str) {
            self.send(&log_line(marker)).await;
            let seen = async {
                while !self.hooks.logs.lock().unwrap().iter().any(|(_, message, _)| message == marker) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(10), seen).await.expect("the marker line is relayed");
        }

        fn messages(&self) -> Vec<String> {
            self.hooks.logs.lock().unwrap().iter().map(|(_, message, _)| message.clone()).collect()
        }

        async fn reply(&mut self) -> RunnerMessage {
            let line = tokio::time::timeout(Duration::from_secs(10), self.replies.next_line())
                .await
                .expect("an answer in time")
                .unwrap()
                .expect("the connection is open");
            serde_json::from_str(&line).unwrap()
        }

        async fn call(&mut self, line: &str) -> RunnerMessage {
            self.send(format!("{line}\n").as_bytes()).await;
            self.reply().await
        }
    }

    fn refused(id: u64) -> RunnerMessage {
        RunnerMessage::answer(id, Err("too many asset reads at once (at most 16); try again".into()))
    }

    #[tokio::test]
    async fn malformed_lines_are_ignored_and_the_connection_lives_on() {
        let mut harness = connect();
        // The probe: a well-formed line is relayed, a call answered.
        harness.sync("before").await;
        assert_eq!(
            harness.call(r#"{"op":"materialize","id":1,"path":"/a.txt"}"#).await,
            RunnerMessage::answer(1, Ok(()))
        );

        let mut malformed: Vec<Vec<u8>> = [
            // Unknown op, no op, the runner's own ops.
            r#"{"op":"shutdown"}"#,
            r#"{"level":"info","message":"no op"}"#,
            r#"{"op":"assign","entrypoint":"file:///src/evil.ts"}"#,
            r#"{"op":"answer","id":1,"ok":true}"#,
            // Missing fields.
            r#"{"op":"log","level":"info"}"#,
            r#"{"op":"log","message":"no level"}"#,
            r#"{"op":"materialize","path":"/no-id"}"#,
            r#"{"op":"materialize","id":2}"#,
            r#"{"op":"tree"}"#,
            r#"{"op":"start_error","message":"no code"}"#,
            // Wrong types.
            r#"{"op":["ready"]}"#,
            r#"{"op":"log","level":1,"message":"level is a number"}"#,
            r#"{"op":"log","level":"info","message":{"a":1}}"#,
            r#"{"op":"log","level":"info","message":"id is a number","request_id":5}"#,
            r#"{"op":"materialize","id":"3","path":"/id-is-a-string"}"#,
            r#"{"op":"materialize","id":-4,"path":"/negative"}"#,
            r#"{"op":"tree","id":1e3}"#,
            r#"{"op":"start_error","code":7,"message":"code is a number"}"#,
            // Not a message at all.
            "",
            "ready",
            "[1,2,3]",
            r#"{"op":"ready"} trailing"#,
        ]
        .iter()
        .map(|line| format!("{line}\n").into_bytes())
        .collect();
        // Not UTF-8: inside a string, and bare.
        malformed.push(b"{\"op\":\"log\",\"level\":\"info\",\"message\":\"\xff\xfe\"}\n".to_vec());
        malformed.push(b"\xc3\x28\x00\x01\n".to_vec());
        for line in &malformed {
            harness.send(line).await;
        }
        harness.sync("after").await;

        // Nothing of it reached the hooks, nothing was fetched, no start
        // was reported, nobody waits.
        assert_eq!(harness.messages(), ["before", "after"]);
        assert_eq!(*harness.hooks.fetches.lock().unwrap(), ["/a.txt"]);
        assert!(matches!(harness.started.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        assert!(matches!(harness.waiting.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        // And the connection still serves.
        assert_eq!(harness.call(r#"{"op":"tree","id":9}"#).await, RunnerMessage::answer(9, Ok(())));
        harness.send(b"{\"op\":\"ready\"}\n").await;
        let started = tokio::time::timeout(Duration::from_secs(10), &mut harness.started).await.unwrap();
        assert_eq!(started.unwrap(), Ok(()));
    }

    #[tokio::test]
    async fn a_line_over_the_bound_is_skipped_and_the_tenant_told() {
        let mut harness = connect();
        let dropped_before = crate::held().control_messages_dropped;
        // At the bound (newline included) a line is read; the message is
        // then cut to the log bound.
        let frame = log_line("").len();
        let at_bound = log_line(&"a".repeat(MAX_LINE_BYTES - frame));
        assert_eq!(at_bound.len(), MAX_LINE_BYTES);
        harness.send(&at_bound).await;
        harness.sync("at the bound").await;
        let messages = harness.messages();
        assert_eq!(messages.len(), 2);
        assert!(
            messages[0].starts_with("aaa")
                && messages[0].ends_with(&format!("[isocloud: truncated, {} bytes in all]", MAX_LINE_BYTES - frame))
        );

        // One byte over: skipped, and said so.
        let over = log_line(&"b".repeat(MAX_LINE_BYTES - frame + 1));
        harness.send(&over).await;
        // Megabytes without a newline in sight, then one.
        let mut huge = vec![b'{'; 3 * 1024 * 1024];
        huge.push(b'\n');
        harness.send(&huge).await;
        harness.sync("after").await;
        let messages = harness.messages();
        assert_eq!(
            messages[2..],
            [
                format!(
                    "[isocloud] a control message of {} bytes was dropped: the bound is {MAX_LINE_BYTES} bytes",
                    MAX_LINE_BYTES + 1
                ),
                format!(
                    "[isocloud] a control message of {} bytes was dropped: the bound is {MAX_LINE_BYTES} bytes",
                    huge.len()
                ),
                "after".to_owned(),
            ]
        );
        assert_eq!(harness.hooks.logs.lock().unwrap()[2].0, LogLevel::Warning);
        assert!(crate::held().control_messages_dropped >= dropped_before + 2);
    }

    #[tokio::test]
    async fn a_flood_of_lines_is_relayed_whole_and_in_order() {
        let mut harness = connect();
        let mut flood = Vec::new();
        for i in 0..20_000 {
            flood.extend_from_slice(&log_line(&format!("line {i}")));
        }
        harness.send(&flood).await;
        harness.sync("done").await;
        let messages = harness.messages();
        assert_eq!(messages.len(), 20_001);
        assert!(messages[..20_000].iter().enumerate().all(|(i, message)| *message == format!("line {i}")));
    }

    #[tokio::test]
    async fn request_ids_over_the_bound_are_dropped_and_the_line_kept() {
        let mut harness = connect();
        for id in ["r".repeat(MAX_REQUEST_ID_BYTES), "r".repeat(MAX_REQUEST_ID_BYTES + 1)] {
            harness
                .send(
                    format!("{{\"op\":\"log\",\"level\":\"warning\",\"message\":\"m\",\"request_id\":\"{id}\"}}\n")
                        .as_bytes(),
                )
                .await;
        }
        harness.sync("done").await;
        let logs = harness.hooks.logs.lock().unwrap().clone();
        assert_eq!(logs[0], (LogLevel::Warning, "m".to_owned(), Some("r".repeat(MAX_REQUEST_ID_BYTES))));
        assert_eq!(logs[1], (LogLevel::Warning, "m".to_owned(), None));
    }

    #[tokio::test]
    async fn a_flood_of_asset_reads_is_bounded() {
        let mut harness = connect();
        // The probe: reads that succeed and fail are answered as such.
        assert_eq!(
            harness.call(r#"{"op":"materialize","id":1,"path":"/a.txt"}"#).await,
            RunnerMessage::answer(1, Ok(()))
        );
        assert_eq!(
            harness.call(r#"{"op":"materialize","id":2,"path":"/missing"}"#).await,
            RunnerMessage::answer(2, Err("no such asset".into()))
        );
        // A path over the bound is refused unfetched.
        let long = format!("/{}", "p".repeat(MAX_PATH_BYTES));
        assert_eq!(harness.call(&format!(r#"{{"op":"materialize","id":3,"path":"{long}"}}"#)).await, refused(3));

        // As many reads as may run at once, never finishing; a second read
        // of one of their paths waits for the same fetch.
        let mut reads = String::new();
        for i in 0..MAX_MATERIALIZING {
            reads.push_str(&format!("{{\"op\":\"materialize\",\"id\":{},\"path\":\"/slow/{i}\"}}\n", 100 + i));
        }
        reads.push_str("{\"op\":\"materialize\",\"id\":99,\"path\":\"/slow/0\"}\n");
        harness.send(reads.as_bytes()).await;
        // The rest of the flood is refused at once, in order.
        let mut flood = String::new();
        for i in 0..500 {
            flood.push_str(&format!("{{\"op\":\"materialize\",\"id\":{},\"path\":\"/slow/more/{i}\"}}\n", 1000 + i));
        }
        harness.send(flood.as_bytes()).await;
        // (Each answer is sent by a task of its own: in any order.)
        let mut answered = Vec::new();
        for _ in 0..500 {
            let reply = harness.reply().await;
            let RunnerMessage::Answer { id, .. } = reply else { panic!("{reply:?}") };
            assert_eq!(reply, refused(id));
            answered.push(id);
        }
        answered.sort_unstable();
        assert_eq!(answered, (1000..1500).collect::<Vec<_>>());
        assert_eq!(
            harness.hooks.fetches.lock().unwrap().len(),
            2 + MAX_MATERIALIZING,
            "only the reads let through ran"
        );
        // The manifest, too, waits for room.
        assert_eq!(harness.call(r#"{"op":"tree","id":7}"#).await, refused(7));
        // Nothing else was answered meanwhile, and the connection still
        // relays lines.
        harness.sync("done").await;
        assert!(tokio::time::timeout(Duration::from_millis(50), harness.replies.next_line()).await.is_err());
    }

    #[tokio::test]
    async fn the_first_start_report_counts_and_waiting_gets_the_assignment() {
        let mut harness = connect();
        harness.send(b"{\"op\":\"start_error\",\"code\":\"CPU_TIME_LIMIT\",\"message\":\"boom\"}\n").await;
        harness.send(b"{\"op\":\"ready\"}\n").await;
        harness.send(b"{\"op\":\"waiting\",\"preloaded_packages\":2}\n{\"op\":\"waiting\"}\n").await;
        harness.sync("done").await;
        // A harness cannot name a code of the runner's.
        assert_eq!((&mut harness.started).await.unwrap(), Err((ErrorCode::IsolateStartFailed, "boom".to_owned())));
        // The connection that waits is where the assignment goes.
        let waiting = (&mut harness.waiting).await.unwrap();
        assert_eq!(waiting.preloaded_packages, 2, "the first waiting is the one that counts");
        let control = waiting.reply;
        let assignment = RunnerMessage::Assign(Assignment {
            entrypoint: "file:///src/main.ts".into(),
            src_root: "/src".into(),
            tree_path: "/isocloud/tree.json".into(),
            tree_deferred: true,
            envs: [("GREETING".to_owned(), "hi\nthere".to_owned())].into(),
            node_servers: NodeServers::Always,
        });
        control.send(assignment.to_line()).await.unwrap();
        assert_eq!(harness.reply().await, assignment);
    }
}
