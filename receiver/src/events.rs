//! Server events — `started`, `stalled`, `resumed`, each with a reason — written to the
//! log and appended to `<data-dir>/events.jsonl`, one JSON object per line, and read back
//! by the control API (`GET /v1/events`).
//!
//! `started` is recorded when a server's first session (or the first after a reinstall)
//! begins. `stalled`, `paused` and `resumed` come from a watcher that looks at every
//! server once a second: a server is stalled while it is disconnected or any of its disks
//! is STALLED, paused while an operator paused it and it is connected, and a change of
//! that verdict (or of its reason) is an event.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::catalog::{Catalog, now_ms};
use crate::registry::SessionRegistry;
use crate::status::StatusReport;

/// How often the watcher looks.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Most events one `read` returns.
pub const MAX_EVENTS_READ: usize = 10_000;

/// When the event file is rotated, and how much of it is kept.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    /// The live file is rotated (to `events.jsonl.1`, the older ones shifted) once it
    /// holds this many bytes…
    pub bytes: u64,
    /// …or once its first event is this old (ms).
    pub age_ms: u64,
    /// Rotated files kept; older ones are deleted.
    pub keep: usize,
    /// The newest events held in memory, from which most reads are answered.
    pub in_memory: usize,
}

impl Default for Rotation {
    /// 16 MiB or 7 days per file, 4 rotated files: at most 80 MiB of events.
    fn default() -> Self {
        Self {
            bytes: 16 << 20,
            age_ms: 7 * 24 * 3600 * 1000,
            keep: 4,
            in_memory: MAX_EVENTS_READ,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Started,
    Stalled,
    Paused,
    Resumed,
}

/// One line of `events.jsonl`. The keys are an interface, documented in the README.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Numbers every event of the data dir, from 1, without gaps.
    pub seq: u64,
    /// Unix milliseconds.
    pub time_ms: u64,
    pub server_id: String,
    pub event: EventKind,
    /// Machine-readable: `first_contact`, `agent_reinstalled`, `disconnected`,
    /// `staging_full`, `staging_missing`, `staging_error`, `no_progress`, `reconnected`,
    /// `progress`, `staging_space_available`, `staging_writable`, `staging_found`, `operator_request`.
    pub reason: String,
    /// For people.
    pub detail: String,
}

/// The event file of a data dir: appended by a writer thread of its own, so that
/// recording an event (from async code) never waits for the disk; rotated by size and
/// age; read back from the newest [`MAX_EVENTS_READ`] events held in memory, or from the
/// one file an index says holds the events asked for, never under the writer's lock.
#[derive(Debug)]
pub struct EventLog {
    dir: PathBuf,
    rotation: Rotation,
    shared: Arc<(Mutex<LogState>, Condvar)>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Debug)]
struct LogState {
    next_seq: u64,
    /// The newest events, oldest first.
    recent: VecDeque<Event>,
    /// Lines not yet written.
    pending: Vec<u8>,
    /// Per file, newest first (generation 0 is the live file): the first seq it holds.
    first_seqs: Vec<u64>,
    closing: bool,
}

fn file_of(dir: &Path, generation: usize) -> PathBuf {
    match generation {
        0 => dir.join("events.jsonl"),
        n => dir.join(format!("events.jsonl.{n}")),
    }
}

impl EventLog {
    /// Opens (creating, mode 0600) the event files of a data dir.
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        Self::open_with(data_dir, Rotation::default())
    }

    pub fn open_with(data_dir: &Path, rotation: Rotation) -> std::io::Result<Self> {
        let mut first_seqs = Vec::new();
        let mut recent = VecDeque::new();
        let mut last = 0;
        for generation in 0..=rotation.keep {
            let events = read_events(&file_of(data_dir, generation))?;
            if generation == 0 || !events.is_empty() {
                first_seqs.push(events.first().map_or(u64::MAX, |e| e.seq));
            }
            if let Some(e) = events.last() {
                last = last.max(e.seq);
            }
            if recent.len() < rotation.in_memory {
                for event in events.into_iter().rev() {
                    if recent.len() == rotation.in_memory {
                        break;
                    }
                    recent.push_front(event);
                }
            }
        }
        let live = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(file_of(data_dir, 0))?;
        let shared = Arc::new((
            Mutex::new(LogState {
                next_seq: last + 1,
                recent,
                pending: Vec::new(),
                first_seqs,
                closing: false,
            }),
            Condvar::new(),
        ));
        let writer = {
            let (shared, dir) = (Arc::clone(&shared), data_dir.to_owned());
            std::thread::Builder::new()
                .name("event-log".into())
                .spawn(move || write_events(&dir, live, &shared, rotation))?
        };
        Ok(Self {
            dir: data_dir.to_owned(),
            rotation,
            shared,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Records an event and logs it. Only memory is touched here; the writer thread
    /// appends it to the file. A failure to write the file is logged, not fatal: events
    /// report on replication, they must never stop it.
    pub fn record(&self, server_id: &str, event: EventKind, reason: &str, detail: &str) {
        match event {
            EventKind::Stalled => {
                tracing::warn!(server = server_id, reason, detail, "replication stalled")
            }
            EventKind::Started => {
                tracing::info!(server = server_id, reason, detail, "replication started")
            }
            EventKind::Paused => {
                tracing::info!(server = server_id, reason, detail, "replication paused")
            }
            EventKind::Resumed => {
                tracing::info!(server = server_id, reason, detail, "replication resumed")
            }
        }
        let (lock, wake) = &*self.shared;
        let mut state = crate::lock(lock);
        let record = Event {
            seq: state.next_seq,
            time_ms: now_ms(),
            server_id: server_id.to_owned(),
            event,
            reason: reason.to_owned(),
            detail: detail.to_owned(),
        };
        state.next_seq += 1;
        let mut line = serde_json::to_vec(&record).expect("events always serialize");
        line.push(b'\n');
        state.pending.extend_from_slice(&line);
        if state.recent.len() >= self.rotation.in_memory {
            state.recent.pop_front();
        }
        state.recent.push_back(record);
        wake.notify_one();
    }

    /// Events with `seq` above `after`, of `server` if given, oldest first, at most
    /// [`MAX_EVENTS_READ`].
    pub fn read(&self, after: u64, server: Option<&str>) -> std::io::Result<Vec<Event>> {
        let wanted = |e: &Event| e.seq > after && server.is_none_or(|s| e.server_id == s);
        let (in_memory, first_seqs) = {
            let state = crate::lock(&self.shared.0);
            let covered = state.recent.front().is_none_or(|e| e.seq <= after + 1);
            if covered {
                return Ok(state
                    .recent
                    .iter()
                    .filter(|e| wanted(e))
                    .take(MAX_EVENTS_READ)
                    .cloned()
                    .collect());
            }
            (
                state.recent.iter().cloned().collect::<Vec<_>>(),
                state.first_seqs.clone(),
            )
        };
        // Older than memory holds: from the oldest file that holds events after `after`
        // (rotated files never change), then on to the newer ones.
        let start = first_seqs
            .iter()
            .position(|&first| first <= after + 1)
            .unwrap_or(first_seqs.len().saturating_sub(1));
        let mut out = Vec::new();
        let oldest_in_memory = in_memory.first().map_or(u64::MAX, |e| e.seq);
        for generation in (0..=start).rev() {
            for event in read_events(&file_of(&self.dir, generation))? {
                if event.seq >= oldest_in_memory {
                    break;
                }
                if wanted(&event) {
                    out.push(event);
                    if out.len() == MAX_EVENTS_READ {
                        return Ok(out);
                    }
                }
            }
        }
        out.extend(
            in_memory
                .into_iter()
                .filter(|e| wanted(e))
                .take(MAX_EVENTS_READ - out.len()),
        );
        Ok(out)
    }
}

impl Drop for EventLog {
    /// Writes what is still pending before the log goes.
    fn drop(&mut self) {
        crate::lock(&self.shared.0).closing = true;
        self.shared.1.notify_one();
        if let Some(writer) = crate::lock(&self.writer).take() {
            let _ = writer.join();
        }
    }
}

/// The writer thread: appends pending lines (one write, then fdatasync), rotating the
/// live file when it is full or old.
fn write_events(
    dir: &Path,
    mut live: File,
    shared: &(Mutex<LogState>, Condvar),
    rotation: Rotation,
) {
    let (lock, wake) = shared;
    let mut live_bytes = live.metadata().map_or(0, |m| m.len());
    let mut live_started_ms = read_events(&file_of(dir, 0))
        .ok()
        .and_then(|e| e.first().map(|e| e.time_ms))
        .unwrap_or_else(now_ms);
    loop {
        let (lines, closing) = {
            let mut state = crate::lock(lock);
            while state.pending.is_empty() && !state.closing {
                state = wake.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            (std::mem::take(&mut state.pending), state.closing)
        };
        // Line by line into the live file, rotating it whenever it is full (so a burst
        // of events never makes one file much larger than the limit), one write per run
        // of lines: with O_APPEND, lines never interleave.
        let mut rest = &lines[..];
        while !rest.is_empty() {
            let old = now_ms().saturating_sub(live_started_ms) >= rotation.age_ms;
            if live_bytes > 0 && (live_bytes >= rotation.bytes || old) {
                match rotate(dir, rotation.keep) {
                    Ok(file) => {
                        live = file;
                        live_bytes = 0;
                        live_started_ms = now_ms();
                        let mut state = crate::lock(lock);
                        state.first_seqs.insert(0, u64::MAX);
                        state.first_seqs.truncate(rotation.keep + 1);
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot rotate the event file; appending to it")
                    }
                }
            }
            // As many whole lines as fit (at least one).
            let room = rotation.bytes.saturating_sub(live_bytes).max(1) as usize;
            let mut take = 0;
            for (i, &byte) in rest.iter().enumerate() {
                if byte == b'\n' {
                    if take > 0 && i + 1 > room {
                        break;
                    }
                    take = i + 1;
                }
            }
            let take = if take == 0 { rest.len() } else { take };
            let (chunk, after) = rest.split_at(take);
            rest = after;
            if live_bytes == 0 {
                let first = serde_json::from_slice::<Event>(
                    chunk.split(|&b| b == b'\n').next().unwrap_or_default(),
                )
                .map_or(u64::MAX, |e| e.seq);
                if let Some(slot) = crate::lock(lock).first_seqs.first_mut() {
                    *slot = first;
                }
            }
            match live.write_all(chunk).and_then(|()| live.sync_data()) {
                Ok(()) => live_bytes += chunk.len() as u64,
                Err(err) => {
                    tracing::warn!(path = %file_of(dir, 0).display(), error = %err, "cannot append to the event file");
                    break;
                }
            }
        }
        if closing && crate::lock(lock).pending.is_empty() {
            return;
        }
    }
}

/// Shifts `events.jsonl.N` to `.N+1` (dropping the oldest), the live file to `.1`, and
/// opens a new live file.
fn rotate(dir: &Path, keep: usize) -> std::io::Result<File> {
    let _ = std::fs::remove_file(file_of(dir, keep));
    for generation in (0..keep).rev() {
        match std::fs::rename(file_of(dir, generation), file_of(dir, generation + 1)) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err),
        }
    }
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(file_of(dir, 0))?;
    File::open(dir)?.sync_all()?;
    Ok(file)
}

/// Every event in the file. A line that does not parse (the torn last line of a crash)
/// is skipped.
pub fn read_events(path: &Path) -> std::io::Result<Vec<Event>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut events = Vec::new();
    for line in BufReader::new(file).lines() {
        if let Ok(event) = serde_json::from_str::<Event>(&line?) {
            events.push(event);
        }
    }
    Ok(events)
}

/// What the watcher tracks of a server: None while it replicates, else why not — a stall
/// reason, or `paused`.
fn condition(server: &crate::status::ServerStatus) -> Option<String> {
    server
        .stalled
        .clone()
        .or_else(|| (server.paused && server.connected).then(|| PAUSED.to_owned()))
}

const PAUSED: &str = "paused";

/// Watches every server once a second and records `stalled`, `paused` and `resumed`.
pub(crate) async fn watch(
    catalog: Arc<Catalog>,
    sessions: Arc<SessionRegistry>,
    events: Arc<EventLog>,
    shutdown: CancellationToken,
) {
    // What was last seen of each server: None while it replicates, else why not. The
    // first look only takes stock: a receiver that starts finds its agents not yet
    // reconnected, which is no news.
    let mut seen: Option<HashMap<String, Option<String>>> = None;
    loop {
        let (catalog_c, sessions_c) = (Arc::clone(&catalog), Arc::clone(&sessions));
        let report =
            tokio::task::spawn_blocking(move || StatusReport::build(&catalog_c, Some(&sessions_c)))
                .await;
        if let Ok(Ok(report)) = report {
            let now: HashMap<String, Option<String>> = report
                .servers
                .iter()
                .map(|s| (s.server_id.clone(), condition(s)))
                .collect();
            if let Some(before) = &seen {
                for server in &report.servers {
                    let was = before.get(&server.server_id).cloned().flatten();
                    announce(&events, server, was.as_deref());
                }
            }
            seen = Some(now);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(WATCH_INTERVAL) => {}
        }
    }
}

/// Records the change, if any, between what a server was (`was`: its [`condition`]) and
/// what it is.
fn announce(events: &EventLog, server: &crate::status::ServerStatus, was: Option<&str>) {
    match (was, condition(server).as_deref()) {
        (None, None) => {}
        (Some(old), Some(new)) if old == new => {}
        (_, Some(PAUSED)) => events.record(
            &server.server_id,
            EventKind::Paused,
            "operator_request",
            "an operator paused replication; the agent tracks changes and sends them on resume",
        ),
        (_, Some(reason)) => {
            let detail = match reason {
                "disconnected" => "the agent is not connected".to_owned(),
                "staging_full" => {
                    "the staging file system is full; free space on the receiver".to_owned()
                }
                "staging_error" => {
                    "the staging disk failed a write or a flush; check the receiver's disk (dmesg)".to_owned()
                }
                "staging_missing" => {
                    "a staging image is missing or not the recorded one; see `status`, then bring it back or run `disk adopt` or `disk reset`".to_owned()
                }
                "no_progress" => {
                    "changes are waiting and nothing became durable for the stall time".to_owned()
                }
                other => other.to_owned(),
            };
            events.record(&server.server_id, EventKind::Stalled, reason, &detail);
        }
        (Some(old), None) => {
            let reason = match old {
                PAUSED => "operator_request",
                "disconnected" => "reconnected",
                "staging_full" => "staging_space_available",
                "staging_error" => "staging_writable",
                "staging_missing" => "staging_found",
                _ => "progress",
            };
            let detail = if old == PAUSED {
                "an operator resumed replication".to_owned()
            } else {
                format!("was stalled: {old}")
            };
            events.record(&server.server_id, EventKind::Resumed, reason, &detail);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_numbered_across_reopens_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        log.record("db-01", EventKind::Started, "first_contact", "x");
        log.record("db-02", EventKind::Stalled, "disconnected", "y");
        drop(log);
        // A crash in the middle of a line.
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.path().join("events.jsonl"))
            .unwrap();
        file.write_all(b"{\"seq\":3,\"ti").unwrap();
        file.write_all(b"\n").unwrap();
        let log = EventLog::open(dir.path()).unwrap();
        log.record("db-01", EventKind::Resumed, "reconnected", "z");
        let all = log.read(0, None).unwrap();
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(all[2].event, EventKind::Resumed);
        let db01 = log.read(1, Some("db-01")).unwrap();
        assert_eq!(db01.len(), 1);
        assert_eq!(db01[0].reason, "reconnected");
    }

    /// The audit's L5: events.jsonl grew without bound and was read whole, under the
    /// lock every `record` waits on, for each `/v1/events`.
    #[test]
    fn the_event_file_is_rotated_and_read_back_from_memory_or_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let rotation = Rotation {
            bytes: 4 << 10,
            age_ms: u64::MAX,
            keep: 3,
            in_memory: 50,
        };
        let log = EventLog::open_with(dir.path(), rotation).unwrap();
        for i in 0..500 {
            let server = if i % 2 == 0 { "even" } else { "odd" };
            log.record(server, EventKind::Stalled, "no_progress", "x");
        }
        // From memory: the newest, in order.
        let newest = log.read(480, None).unwrap();
        assert_eq!(
            newest.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (481..=500).collect::<Vec<_>>()
        );
        drop(log);
        let mut total = 0;
        for name in [
            "events.jsonl",
            "events.jsonl.1",
            "events.jsonl.2",
            "events.jsonl.3",
        ] {
            total += std::fs::metadata(dir.path().join(name)).unwrap().len();
        }
        assert!(
            !dir.path().join("events.jsonl.4").exists(),
            "more files kept than asked"
        );
        assert!(total <= 4 * ((4 << 10) + 2048), "{total} bytes kept");

        // Reopened: numbering goes on, and older events come from the rotated files.
        let log = EventLog::open_with(dir.path(), rotation).unwrap();
        log.record("even", EventKind::Resumed, "progress", "y");
        let all = log.read(0, None).unwrap();
        let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
        assert_eq!(*seqs.last().unwrap(), 501);
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "a gap or disorder: {seqs:?}"
        );
        assert!(seqs[0] > 1, "the oldest events were rotated away");
        let odd = log.read(seqs[0] + 10, Some("odd")).unwrap();
        assert!(
            !odd.is_empty()
                && odd
                    .iter()
                    .all(|e| e.server_id == "odd" && e.seq > seqs[0] + 10)
        );
    }
}
