//! Server events — `started`, `stalled`, `resumed`, each with a reason — written to the
//! log and appended to `<data-dir>/events.jsonl`, one JSON object per line, and read back
//! by the control API (`GET /v1/events`).
//!
//! `started` is recorded when a server's first session (or the first after a reinstall)
//! begins. `stalled`, `paused` and `resumed` come from a watcher that looks at every
//! server once a second: a server is stalled while it is disconnected or any of its disks
//! is STALLED, paused while an operator paused it and it is connected, and a change of
//! that verdict (or of its reason) is an event.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
    /// `staging_full`, `staging_error`, `no_progress`, `reconnected`, `progress`,
    /// `staging_space_available`, `operator_request`.
    pub reason: String,
    /// For people.
    pub detail: String,
}

#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    file: Mutex<File>,
    next_seq: AtomicU64,
}

impl EventLog {
    /// Opens (creating, mode 0600) the event file of a data dir.
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let path = data_dir.join("events.jsonl");
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        let last = read_events(&path)?.last().map_or(0, |e| e.seq);
        Ok(Self {
            path,
            file: Mutex::new(file),
            next_seq: AtomicU64::new(last + 1),
        })
    }

    /// Appends an event and logs it. A failure to write the file is logged, not fatal:
    /// events report on replication, they must never stop it.
    pub fn record(&self, server_id: &str, event: EventKind, reason: &str, detail: &str) {
        let mut file = crate::lock(&self.file);
        let record = Event {
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            time_ms: now_ms(),
            server_id: server_id.to_owned(),
            event,
            reason: reason.to_owned(),
            detail: detail.to_owned(),
        };
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
        let mut line = serde_json::to_vec(&record).expect("events always serialize");
        line.push(b'\n');
        // One write per line: with O_APPEND, lines never interleave.
        if let Err(err) = file.write_all(&line).and_then(|()| file.sync_data()) {
            tracing::warn!(path = %self.path.display(), error = %err, "cannot append to the event file");
        }
    }

    /// Events with `seq` above `after`, of `server` if given, oldest first, at most
    /// [`MAX_EVENTS_READ`].
    pub fn read(&self, after: u64, server: Option<&str>) -> std::io::Result<Vec<Event>> {
        let _writer = crate::lock(&self.file);
        Ok(read_events(&self.path)?
            .into_iter()
            .filter(|e| e.seq > after && server.is_none_or(|s| e.server_id == s))
            .take(MAX_EVENTS_READ)
            .collect())
    }
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
                "staging_full" | "staging_error" => "staging_space_available",
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
}
