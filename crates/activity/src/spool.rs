//! The on-disk spool of activity batches. A batch is written here — with its
//! `batch_id`, as one file, by write-to-temp-then-rename — before its first
//! delivery attempt, and deleted only after its origin answered 2xx. What a
//! retry sends is read back from that file, so a `batch_id` always comes with
//! the same events, across retries and across runner restarts.
//!
//! The spool is bounded in bytes. When a new batch does not fit, whole batches
//! give way in [`Tier`] order, oldest first: console output, then lifecycle
//! events; usage (and the notes that report drops) never. Batches are formed
//! per tier, so giving way never changes the content of a batch that has an
//! id. A batch being sent is not dropped under its delivery.
//!
//! Files are `<seq>.batch` (seq: 20 digits, so name order is age order);
//! `*.tmp` files are writes that never finished and are deleted on open.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use isocloud_protocol::{ActivityBatch, ActivityEvent, ActivityKind};
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};

/// The layout of a batch file; a file of another format is not sent.
const FORMAT: u32 = 1;
const BATCH_SUFFIX: &str = ".batch";
const TMP_SUFFIX: &str = ".tmp";
/// Held (flock) while a runner uses the spool: two runners on one state dir
/// would hand out the same sequence numbers and overwrite each other's batches.
const LOCK_FILE: &str = "lock";

/// How readily a batch gives way when the spool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Tier {
    /// Console output: the first to go, oldest first.
    Log,
    /// Lifecycle events (boot, limits, terminations): dropped, oldest first,
    /// only once no log batch is left to drop.
    Event,
    /// Usage (what the subhoster bills from) and drop notes: never dropped,
    /// even past the bound.
    Keep,
}

impl Tier {
    /// The tiers that give way, in the order they do.
    const EVICTION_ORDER: [Tier; 2] = [Tier::Log, Tier::Event];
}

/// The tier an event is batched and retained under. Exhaustive on purpose: a
/// new kind must be placed here, knowingly.
pub(crate) fn tier_of(kind: &ActivityKind) -> Tier {
    match kind {
        ActivityKind::Log { .. } => Tier::Log,
        // The subhoster bills from these; a lost one is lost money.
        ActivityKind::Usage { .. } => Tier::Keep,
        ActivityKind::Boot { .. }
        | ActivityKind::BootFailure { .. }
        | ActivityKind::UncaughtException { .. }
        | ActivityKind::CpuTimeLimit { .. }
        | ActivityKind::MemoryLimit { .. }
        | ActivityKind::Terminated { .. } => Tier::Event,
    }
}

/// The event's `type` on the wire, also the `kind` label of the drop metric.
pub(crate) fn kind_name(kind: &ActivityKind) -> &'static str {
    match kind {
        ActivityKind::Boot { .. } => "boot",
        ActivityKind::BootFailure { .. } => "boot_failure",
        ActivityKind::Log { .. } => "log",
        ActivityKind::UncaughtException { .. } => "uncaught_exception",
        ActivityKind::CpuTimeLimit { .. } => "cpu_time_limit",
        ActivityKind::MemoryLimit { .. } => "memory_limit",
        ActivityKind::Usage { .. } => "usage",
        ActivityKind::Terminated { .. } => "terminated",
    }
}

/// Events per kind name, in first-seen order.
pub(crate) type Kinds = Vec<(&'static str, u64)>;

pub(crate) fn count_kinds<'a>(kinds: impl IntoIterator<Item = &'a ActivityKind>) -> Kinds {
    let mut out: Kinds = Vec::new();
    for kind in kinds {
        let name = kind_name(kind);
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, count)) => *count += 1,
            None => out.push((name, 1)),
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the activity spool {} is in use by another runner (same --state-dir?)", dir.display())]
    Locked { dir: PathBuf },
    #[error("activity spool {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<SpoolError> for io::Error {
    fn from(e: SpoolError) -> Self {
        io::Error::other(e)
    }
}

/// Gauges the spool keeps current (the pool registers them).
#[derive(Clone, Default)]
pub(crate) struct SpoolGauges {
    pub bytes: Gauge,
    pub batches: Gauge,
}

/// A batch handed to one delivery attempt; it stays in the spool until
/// [`Spool::delivered`] or [`Spool::release`].
#[derive(Debug, Clone)]
pub(crate) struct Claimed {
    pub seq: u64,
    pub deployment_id: String,
    pub note: bool,
}

/// Events that left the spool undelivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Dropped {
    pub origin: String,
    pub deployment_id: String,
    pub kinds: Kinds,
}

#[derive(Debug)]
pub(crate) struct Pushed {
    /// `None` when the new batch itself had to give way.
    pub batch_id: Option<String>,
    /// Batches dropped to make room, oldest first (the new one last, if it).
    pub dropped: Vec<Dropped>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In the index (its bytes counted) but its file is not renamed into
    /// place yet: neither sent nor dropped.
    Writing,
    Ready,
    /// Under a delivery attempt: not dropped, so a send that succeeds is
    /// never also counted as dropped.
    Sending,
}

struct Entry {
    origin: String,
    deployment_id: String,
    tier: Tier,
    note: bool,
    bytes: u64,
    kinds: Kinds,
    state: State,
}

#[derive(Default)]
struct Index {
    entries: HashMap<u64, Entry>,
    by_origin: HashMap<String, BTreeSet<u64>>,
    by_tier: HashMap<Tier, BTreeSet<u64>>,
    bytes: u64,
    next_seq: u64,
}

impl Index {
    fn insert(&mut self, seq: u64, entry: Entry) {
        self.bytes += entry.bytes;
        self.by_origin.entry(entry.origin.clone()).or_default().insert(seq);
        self.by_tier.entry(entry.tier).or_default().insert(seq);
        self.entries.insert(seq, entry);
    }

    fn remove(&mut self, seq: u64) -> Option<Entry> {
        let entry = self.entries.remove(&seq)?;
        self.bytes -= entry.bytes;
        if let Some(seqs) = self.by_origin.get_mut(&entry.origin) {
            seqs.remove(&seq);
            if seqs.is_empty() {
                self.by_origin.remove(&entry.origin);
            }
        }
        if let Some(seqs) = self.by_tier.get_mut(&entry.tier) {
            seqs.remove(&seq);
        }
        Some(entry)
    }

    /// The oldest batch of `tier` that may be dropped now.
    fn oldest_droppable(&self, tier: Tier) -> Option<u64> {
        let seqs = self.by_tier.get(&tier)?;
        seqs.iter().copied().find(|seq| self.entries[seq].state == State::Ready)
    }
}

/// The file as written: the wire body under `batch`, plus what finding its
/// origin again and dropping it fairly need.
#[derive(Serialize)]
struct FileOut<'a> {
    format: u32,
    origin: &'a str,
    deployment_id: &'a str,
    tier: Tier,
    note: bool,
    batch: &'a ActivityBatch,
}

#[derive(Deserialize)]
struct FileIn {
    format: u32,
    origin: String,
    deployment_id: String,
    tier: Tier,
    note: bool,
    batch: ActivityBatch,
}

pub(crate) struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
    gauges: SpoolGauges,
    /// Keeps the flock for as long as the spool lives.
    _lock: File,
}

impl Spool {
    /// Opens (creating) the spool in `dir` and loads what an earlier run left:
    /// unfinished writes are deleted, unreadable files too (with a warning).
    pub(crate) fn open(dir: &Path, max_bytes: u64, gauges: SpoolGauges) -> Result<Self, SpoolError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| SpoolError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock =
            File::options().create(true).truncate(false).write(true).open(&lock_path).map_err(io_err(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(SpoolError::Locked { dir: dir.to_owned() }),
            Err(fs::TryLockError::Error(source)) => return Err(SpoolError::Io { path: lock_path, source }),
        }
        let mut index = Index::default();
        for item in fs::read_dir(dir).map_err(io_err(dir))? {
            let item = item.map_err(io_err(dir))?;
            let path = item.path();
            let Some(name) = item.file_name().to_str().map(str::to_owned) else { continue };
            if name.ends_with(TMP_SUFFIX) {
                // A write that died before its rename: never complete, never sent.
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some(seq) = name.strip_suffix(BATCH_SUFFIX).and_then(|s| s.parse::<u64>().ok()) else { continue };
            index.next_seq = index.next_seq.max(seq + 1);
            match load_entry(&path) {
                Ok(entry) => index.insert(seq, entry),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "unreadable activity batch deleted");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        let spool = Self { dir: dir.to_owned(), max_bytes, index: Mutex::new(index), gauges, _lock: lock };
        spool.publish(&spool.lock());
        Ok(spool)
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().expect("spool index poisoned")
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}{BATCH_SUFFIX}"))
    }

    fn publish(&self, index: &Index) {
        self.gauges.bytes.set(index.bytes as i64);
        self.gauges.batches.set(index.entries.len() as i64);
    }

    /// Gives `events` a `batch_id` and writes them as one batch, after making
    /// room under the bound. Blocking (a file write and fsync).
    pub(crate) fn push(
        &self,
        origin: &str,
        deployment_id: &str,
        tier: Tier,
        note: bool,
        events: Vec<ActivityEvent>,
    ) -> io::Result<Pushed> {
        let batch = ActivityBatch { batch_id: uuid::Uuid::new_v4().to_string(), events };
        let body = serde_json::to_vec(&FileOut { format: FORMAT, origin, deployment_id, tier, note, batch: &batch })?;
        let size = body.len() as u64;
        let kinds = count_kinds(batch.events.iter().map(|e| &e.kind));

        let (seq, admitted, victims) = {
            let mut index = self.lock();
            let seq = index.next_seq;
            index.next_seq += 1;
            let mut victims = Vec::new();
            let mut admitted = true;
            'make_room: for give_way in Tier::EVICTION_ORDER {
                while index.bytes + size > self.max_bytes {
                    match index.oldest_droppable(give_way) {
                        Some(old) => victims.push((old, index.remove(old).expect("indexed"))),
                        None if tier == give_way => {
                            // No older batch of its tier is left: the new one is
                            // the oldest remaining, so it goes.
                            admitted = false;
                            break 'make_room;
                        }
                        None => break,
                    }
                }
            }
            if admitted {
                let entry = Entry {
                    origin: origin.to_owned(),
                    deployment_id: deployment_id.to_owned(),
                    tier,
                    note,
                    bytes: size,
                    kinds: kinds.clone(),
                    state: State::Writing,
                };
                index.insert(seq, entry);
            }
            self.publish(&index);
            (seq, admitted, victims)
        };

        let mut dropped = Vec::with_capacity(victims.len() + 1);
        for (old, entry) in victims {
            let _ = fs::remove_file(self.path(old));
            dropped.push(Dropped { origin: entry.origin, deployment_id: entry.deployment_id, kinds: entry.kinds });
        }
        if !admitted {
            dropped.push(Dropped { origin: origin.to_owned(), deployment_id: deployment_id.to_owned(), kinds });
            return Ok(Pushed { batch_id: None, dropped });
        }
        let written = self.write_atomically(seq, &body);
        let mut index = self.lock();
        match written {
            Ok(()) => {
                if let Some(entry) = index.entries.get_mut(&seq) {
                    entry.state = State::Ready;
                }
                Ok(Pushed { batch_id: Some(batch.batch_id), dropped })
            }
            Err(e) => {
                index.remove(seq);
                self.publish(&index);
                Err(e)
            }
        }
    }

    fn write_atomically(&self, seq: u64, body: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!("{seq:020}{TMP_SUFFIX}"));
        let write = || -> io::Result<()> {
            let mut file = File::create(&tmp)?;
            file.write_all(body)?;
            // Data before the rename, so a crash cannot leave the final name
            // pointing at an empty or short file.
            file.sync_data()?;
            fs::rename(&tmp, self.path(seq))
        };
        let result = write();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Makes the renames of earlier pushes durable (one fsync of the folder).
    pub(crate) fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    /// The oldest batch of `origin` not already being sent, claimed for one
    /// delivery attempt.
    pub(crate) fn claim_next(&self, origin: &str) -> Option<Claimed> {
        let mut index = self.lock();
        let seq = index.by_origin.get(origin)?.iter().copied().find(|s| index.entries[s].state == State::Ready)?;
        let entry = index.entries.get_mut(&seq).expect("indexed");
        entry.state = State::Sending;
        Some(Claimed { seq, deployment_id: entry.deployment_id.clone(), note: entry.note })
    }

    /// The batch exactly as written. Blocking.
    pub(crate) fn read(&self, seq: u64) -> io::Result<ActivityBatch> {
        Ok(read_file(&self.path(seq))?.batch)
    }

    /// A failed attempt: the batch waits for the next one (and may now be dropped).
    pub(crate) fn release(&self, seq: u64) {
        if let Some(entry) = self.lock().entries.get_mut(&seq) {
            entry.state = State::Ready;
        }
    }

    /// The origin has it: the batch leaves the spool.
    pub(crate) fn delivered(&self, seq: u64) {
        let mut index = self.lock();
        if index.remove(seq).is_some() {
            self.publish(&index);
            drop(index);
            let _ = fs::remove_file(self.path(seq));
        }
    }

    /// A batch that cannot be sent (its file went missing or bad): removed,
    /// and described so its loss can be counted.
    pub(crate) fn forget(&self, seq: u64) -> Option<Dropped> {
        let mut index = self.lock();
        let entry = index.remove(seq)?;
        self.publish(&index);
        drop(index);
        let _ = fs::remove_file(self.path(seq));
        Some(Dropped { origin: entry.origin, deployment_id: entry.deployment_id, kinds: entry.kinds })
    }

    /// Whether `origin` has batches waiting or being sent.
    pub(crate) fn has_batches(&self, origin: &str) -> bool {
        let index = self.lock();
        index.by_origin.get(origin).is_some_and(|seqs| seqs.iter().any(|s| index.entries[s].state != State::Writing))
    }

    /// The origins with batches waiting or being sent.
    pub(crate) fn origins(&self) -> Vec<String> {
        let index = self.lock();
        index
            .by_origin
            .iter()
            .filter(|(_, seqs)| seqs.iter().any(|s| index.entries[s].state != State::Writing))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Batches per origin, waiting or being sent.
    pub(crate) fn batches_of(&self, origin: &str) -> usize {
        self.lock().by_origin.get(origin).map_or(0, BTreeSet::len)
    }

    /// (origin, deployment) pairs with an undelivered drop note.
    pub(crate) fn notes(&self) -> HashSet<(String, String)> {
        let index = self.lock();
        index.entries.values().filter(|e| e.note).map(|e| (e.origin.clone(), e.deployment_id.clone())).collect()
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

fn read_file(path: &Path) -> io::Result<FileIn> {
    let file: FileIn = serde_json::from_slice(&fs::read(path)?)?;
    if file.format != FORMAT {
        return Err(io::Error::other(format!("format {} (this runner writes {FORMAT})", file.format)));
    }
    Ok(file)
}

fn load_entry(path: &Path) -> io::Result<Entry> {
    let bytes = fs::metadata(path)?.len();
    let file = read_file(path)?;
    let batch = file.batch;
    Ok(Entry {
        origin: file.origin,
        deployment_id: file.deployment_id,
        tier: file.tier,
        note: file.note,
        bytes,
        kinds: count_kinds(batch.events.iter().map(|e| &e.kind)),
        state: State::Ready,
    })
}

#[cfg(test)]
mod tests;
