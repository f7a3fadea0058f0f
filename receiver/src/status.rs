//! The answer to "what is replicating, and how far along is it?" — for the `status`
//! command (table or JSON) and the admin socket. The JSON keys are an interface,
//! documented in the README.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use blockferry_proto::DiskState;

use crate::catalog::{Catalog, CatalogError, InventoryRecord};
use crate::registry::SessionRegistry;

/// Every state a disk can be in, as status and metrics name them.
pub const DISK_STATES: [&str; 9] = [
    "INITIATING",
    "INITIAL_SYNC",
    "CONTINUOUS",
    "RESCAN",
    "BACKLOG",
    "STALLED",
    "DISCONNECTED",
    "PAUSED",
    "QUEUED",
];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub servers: Vec<ServerStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServerStatus {
    pub server_id: String,
    pub agent_id: String,
    pub agent_version: String,
    /// Whether a session is live now (always false when read without a running receiver).
    pub connected: bool,
    /// Streams (TLS connections) of the live session; 0 when not connected.
    pub streams: u8,
    /// Unix seconds.
    pub first_seen: u64,
    pub last_seen: u64,
    /// The consistent epoch: every write of every epoch up to it is durable on all of
    /// the server's disks, a crash-consistent point.
    pub durable_epoch: u64,
    /// Unix seconds when `durable_epoch` became durable (0: never).
    pub consistent_at: u64,
    /// Age in seconds of the newest consistent point while changes are pending, 0 when
    /// nothing is pending; null when not connected (the receiver cannot know).
    pub lag_seconds: Option<f64>,
    /// From the agent's latest heartbeat (null when not connected or before the first):
    /// bytes changed and not yet durable here, the agent's resident memory, and its CPU
    /// use in percent of one core.
    pub backlog_bytes: Option<u64>,
    pub agent_rss_bytes: Option<u64>,
    pub agent_cpu_percent: Option<f64>,
    /// Bytes per second received from the agent over the last 10 s (null when not
    /// connected).
    pub receive_rate_bytes_per_second: Option<f64>,
    /// The bandwidth limit set for this server (`settings set`), megabits per second;
    /// 0 is unlimited.
    pub bandwidth_mbps: u64,
    /// Estimated seconds until every disk is CONTINUOUS: what is left to sync or send,
    /// at the measured rate (null when unknown: not connected, or nothing measured).
    pub eta_seconds: Option<f64>,
    /// Why the server is not replicating, if it is not: `disconnected`, `staging_full`,
    /// `staging_error`, `no_progress`. Null while it replicates (or is paused).
    pub stalled: Option<String>,
    /// An operator paused the server's replication (`pause`); its connected disks show
    /// PAUSED until `resume`.
    pub paused: bool,
    pub inventory: InventoryRecord,
    pub disks: Vec<DiskStatus>,
    /// The EBS backend's recovery points, oldest first: each a crash-consistent point of
    /// all the server's disks, one snapshot per disk (empty on the file backend).
    #[serde(default)]
    pub recovery_points: Vec<crate::catalog::RecoveryPointRecord>,
    /// Why the latest recovery point could not be made (EBS backend; null once one
    /// succeeds, and when not connected). Its changes go into the next point.
    #[serde(default)]
    pub recovery_point_error: Option<String>,
    /// Unix ms when the server was cut over to its launched copy (`launch --mode
    /// cutover`): its replication is over and its agent is refused. Null until then.
    #[serde(default)]
    pub cut_over_at_ms: Option<u64>,
    /// The agent's change tracking (null when not connected, or from an agent that does
    /// not report it).
    #[serde(default)]
    pub tracking: Option<TrackingStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskStatus {
    pub name: String,
    pub size: u64,
    /// Bytes durably replicated (the initial-sync watermark until continuous replication).
    pub replicated_bytes: u64,
    pub sync_watermark: u64,
    /// One of INITIATING, INITIAL_SYNC, CONTINUOUS, RESCAN, BACKLOG, STALLED,
    /// DISCONNECTED, PAUSED, QUEUED.
    pub state: String,
    pub reason: String,
    /// While QUEUED for an initial-sync or rescan slot: the place in line, 1 is next.
    pub queue_position: Option<usize>,
    /// Bytes changed on the source and not yet durable here, from the agent's latest
    /// heartbeat (null when not connected or before the first).
    pub backlog_bytes: Option<u64>,
    pub image: String,
    /// Why the disk is being rescanned by checksum (null when it is not): first_contact,
    /// unclean_shutdown, agent_reinstalled, disk_added, disk_resized, state_mismatch,
    /// operator_request.
    pub rescan_reason: Option<String>,
    /// An operator asked for a rescan that the agent has not started yet.
    pub rescan_requested: bool,
    /// The reason of the latest rescan, also after it completed (null if none ever ran).
    pub last_rescan_reason: Option<String>,
    /// Bytes the latest rescan compared by checksum so far.
    pub rescanned_bytes: u64,
    /// Bytes written to the disk while the latest rescan ran: the blocks it found
    /// different, plus changes made meanwhile.
    pub resent_bytes: u64,
    /// The EBS snapshot of the disk in the latest recovery point (null on the file
    /// backend, or before the first point).
    #[serde(default)]
    pub snapshot_id: Option<String>,
    /// What a staging stall is about, e.g. which image is missing and why (null when
    /// the disk is not stalled by its staging storage).
    #[serde(default)]
    pub stall_detail: Option<String>,
    /// How the agent learns of the disk's changes, from its latest heartbeat: `block`
    /// (block-layer tracking), `tap` (only writes through its NBD tap), `rescans`
    /// (`--capture none`: periodic rescans), `tracking_unavailable` (block tracking
    /// cannot start: periodic rescans). Null when not connected.
    #[serde(default)]
    pub capture: Option<String>,
}

/// What an agent's block tracking and freezes did since the agent started, from its
/// latest heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrackingStatus {
    /// Completed writes, discards and write-zeroes seen at the block layer.
    pub writes: u64,
    /// Block-layer events the kernel dropped; each made every disk rescan
    /// (`tracking_lost`).
    pub lost_events: u64,
    /// Crash-consistent points cut under a file-system freeze, and attempts given up.
    pub frozen_points: u64,
    pub freeze_failures: u64,
    /// How long the file systems stayed frozen: the last freeze, and the longest (ms).
    pub last_freeze_ms: f64,
    pub max_freeze_ms: f64,
}

impl StatusReport {
    pub(crate) fn build(
        catalog: &Catalog,
        live: Option<&SessionRegistry>,
    ) -> Result<Self, CatalogError> {
        let (template, own_settings) = catalog.all_settings()?;
        let settings_of = |server_id: &str| {
            own_settings
                .iter()
                .find(|(id, _)| id == server_id)
                .map_or_else(|| template.clone(), |(_, s)| s.clone())
        };
        let servers = catalog
            .servers()?
            .into_iter()
            .map(|(server, disks)| {
                let recovery_points = catalog.recovery_points(&server.server_id)?;
                let cut_over_at_ms = catalog.cut_over_of(&server.server_id)?.map(|c| c.at_ms);
                let session = live.and_then(|r| r.session_of(&server.server_id));
                let view = session.as_ref().map(|s| s.live_view());
                let connected = live.is_some_and(|r| r.is_connected(&server.server_id));
                let heartbeat = view.as_ref().and_then(|v| v.heartbeat.clone());
                let settings = settings_of(&server.server_id);
                let disks: Vec<DiskStatus> = disks
                    .into_iter()
                    .map(|d| {
                        // Heartbeats name disks by their place in the session's Hello; a
                        // disk the live session does not carry is not replicating.
                        let position = view.as_ref().and_then(|v| v.disk_index(&d.name));
                        let beat = heartbeat.as_ref().zip(position).and_then(|(h, position)| {
                            h.disks
                                .iter()
                                .find(|b| usize::from(b.disk) == position)
                                .copied()
                        });
                        // (A session claimed but not yet published knows no disks yet.)
                        let disk_connected = connected && (view.is_none() || position.is_some());
                        let queue_position = live
                            .filter(|_| disk_connected)
                            .and_then(|r| r.slots.position(&server.server_id, &d.name));
                        let (state, reason) = effective_state(
                            &d,
                            disk_connected,
                            settings.paused,
                            view.as_ref().is_some_and(|v| {
                                v.no_progress
                                    || (v.idle_too_long
                                        && matches!(
                                            d.disk_state(),
                                            DiskState::INITIAL_SYNC | DiskState::RESCAN
                                        ))
                            }),
                            queue_position,
                            beat.map(|b| b.state),
                        );
                        // Nothing is verifiably replicated in an image the receiver cannot
                        // vouch for; the watermark is kept for when it is back.
                        let missing = d.stall == crate::catalog::STAGING_MISSING;
                        DiskStatus {
                            replicated_bytes: if missing { 0 } else { d.sync_watermark },
                            stall_detail: (!d.stall_detail.is_empty())
                                .then(|| d.stall_detail.clone()),
                            sync_watermark: d.sync_watermark,
                            image: d.image.display().to_string(),
                            backlog_bytes: beat.map(|b| b.backlog_bytes),
                            queue_position,
                            state,
                            reason,
                            size: d.size,
                            rescan_reason: (!d.rescan_reason.is_empty()).then_some(d.rescan_reason),
                            rescan_requested: d.rescan_requested,
                            last_rescan_reason: (!d.last_rescan_reason.is_empty())
                                .then_some(d.last_rescan_reason),
                            rescanned_bytes: d.rescanned_bytes,
                            resent_bytes: d.resent_bytes,
                            snapshot_id: recovery_points.last().and_then(|p| {
                                p.disks
                                    .iter()
                                    .find(|s| s.disk == d.name && !s.snapshot_id.is_empty())
                                    .map(|s| s.snapshot_id.clone())
                            }),
                            capture: heartbeat.as_ref().zip(position).and_then(|(h, position)| {
                                h.tracking
                                    .as_ref()?
                                    .disks
                                    .iter()
                                    .find(|c| usize::from(c.disk) == position)
                                    .map(|c| c.mode.name().to_owned())
                            }),
                            name: d.name,
                        }
                    })
                    .collect();
                let rate = view.as_ref().map(|v| v.receive_rate);
                let backlog_bytes = heartbeat.as_ref().map(|h| h.backlog_bytes);
                // A staging failure outranks a disconnection: the agent reconnects and
                // fails again until space returns, which is the news.
                let stalled = disks
                    .iter()
                    .find(|d| d.state == "STALLED")
                    .map(|d| d.reason.clone())
                    .or_else(|| (!connected).then(|| "disconnected".to_owned()));
                // What is left: unsynced bytes, what is being rescanned, and the backlog.
                let left: u64 = disks
                    .iter()
                    .map(|d| {
                        let unsynced = d.size.saturating_sub(d.replicated_bytes);
                        let rescan = if d.rescan_reason.is_some() {
                            d.size.saturating_sub(d.rescanned_bytes)
                        } else {
                            0
                        };
                        unsynced.max(rescan)
                    })
                    .sum::<u64>()
                    + backlog_bytes.unwrap_or(0);
                let eta_seconds = match rate {
                    _ if left == 0 && connected => Some(0.0),
                    _ if settings.paused => None,
                    Some(rate) if rate > 0.0 => Some(left as f64 / rate),
                    _ => None,
                };
                Ok(ServerStatus {
                    connected,
                    streams: view.as_ref().map_or(0, |v| v.streams),
                    lag_seconds: view.as_ref().map(|v| v.lag_seconds),
                    backlog_bytes,
                    agent_rss_bytes: heartbeat.as_ref().map(|h| h.rss_bytes),
                    agent_cpu_percent: heartbeat.as_ref().map(|h| f64::from(h.cpu_permille) / 10.0),
                    tracking: heartbeat
                        .as_ref()
                        .and_then(|h| h.tracking.as_ref())
                        .map(|t| TrackingStatus {
                            writes: t.writes,
                            lost_events: t.lost,
                            frozen_points: t.frozen_points,
                            freeze_failures: t.freeze_failures,
                            last_freeze_ms: t.last_freeze_us as f64 / 1e3,
                            max_freeze_ms: t.max_freeze_us as f64 / 1e3,
                        }),
                    receive_rate_bytes_per_second: rate,
                    bandwidth_mbps: settings.bandwidth_mbps,
                    eta_seconds,
                    stalled,
                    paused: settings.paused,
                    consistent_at: server.consistent_at_ms / 1000,
                    disks,
                    server_id: server.server_id,
                    agent_id: server.agent_id,
                    agent_version: server.agent_version,
                    first_seen: server.first_seen,
                    last_seen: server.last_seen,
                    durable_epoch: server.durable_epoch,
                    inventory: server.inventory,
                    recovery_points,
                    cut_over_at_ms,
                    recovery_point_error: view
                        .as_ref()
                        .and_then(|v| v.recovery_point_error.clone()),
                })
            })
            .collect::<Result<_, CatalogError>>()?;
        Ok(Self { servers })
    }

    /// A table for people: a line per server, then its disks.
    pub fn render_table(&self) -> String {
        if self.servers.is_empty() {
            return "no source servers have connected yet\n".to_owned();
        }
        let mut out = String::new();
        // Hosts report the inventory: it is escaped at ingest, and again here for records
        // an older receiver stored.
        let shown = |text: &str| blockferry_util::text::printable(text).into_owned();
        for s in &self.servers {
            let host = if s.inventory.host_name.is_empty() {
                "-".to_owned()
            } else {
                shown(&s.inventory.host_name)
            };
            let lag = s.lag_seconds.map_or("-".to_owned(), |l| format!("{l:.1}s"));
            let rate = s
                .receive_rate_bytes_per_second
                .map_or("-".to_owned(), |r| format!("{}/s", human_bytes(r as u64)));
            let eta = s.eta_seconds.map_or("-".to_owned(), duration);
            let limit = if s.bandwidth_mbps == 0 {
                "unlimited".to_owned()
            } else {
                format!("{} Mbit/s", s.bandwidth_mbps)
            };
            let _ = writeln!(
                out,
                "server {}  host {host}  agent {}  {}",
                s.server_id,
                s.agent_id,
                match &s.stalled {
                    None if s.paused => "paused by an operator".to_owned(),
                    None => "replicating".to_owned(),
                    Some(reason) if s.paused => format!("stalled: {reason} (and paused)"),
                    Some(reason) => format!("stalled: {reason}"),
                }
            );
            let _ = writeln!(
                out,
                "  lag {lag}  rate {rate}  limit {limit}  eta {eta}  backlog {}",
                s.backlog_bytes.map_or("-".to_owned(), human_bytes)
            );
            let _ = writeln!(
                out,
                "  {:<16} {:<13} {:>7} {:>12} {:>12} {:<24} IMAGE",
                "DISK", "STATE", "PCT", "SIZE", "BACKLOG", "REASON"
            );
            for d in &s.disks {
                let _ = writeln!(
                    out,
                    "  {:<16} {:<13} {:>6.1}% {:>12} {:>12} {:<24} {}",
                    d.name,
                    d.state,
                    d.progress_percent(),
                    human_bytes(d.size),
                    d.backlog_bytes.map_or("-".to_owned(), human_bytes),
                    match d.queue_position {
                        Some(position) => format!("{} #{position}", d.reason),
                        None => d.reason.clone(),
                    },
                    d.image
                );
            }
            let captures: Vec<String> = s
                .disks
                .iter()
                .filter_map(|d| Some(format!("{} {}", d.name, d.capture.as_deref()?)))
                .collect();
            if !captures.is_empty() {
                let _ = writeln!(out, "  capture: {}", captures.join(", "));
            }
            if let Some(t) = s
                .tracking
                .as_ref()
                .filter(|t| t.writes > 0 || t.frozen_points + t.freeze_failures > 0)
            {
                let _ = writeln!(
                    out,
                    "  tracking: {} writes seen, {} events lost; {} frozen points ({} given up), last freeze {:.1} ms, longest {:.1} ms",
                    t.writes,
                    t.lost_events,
                    t.frozen_points,
                    t.freeze_failures,
                    t.last_freeze_ms,
                    t.max_freeze_ms
                );
            }
            if let Some(at) = s.cut_over_at_ms {
                let _ = writeln!(
                    out,
                    "  CUT OVER {}s ago: replication is over, its agent is refused",
                    crate::catalog::now_ms().saturating_sub(at) / 1000
                );
            }
            if let Some(error) = &s.recovery_point_error {
                let _ = writeln!(out, "  recovery point FAILED: {}", shown(error));
            }
            if let Some(latest) = s.recovery_points.last() {
                let _ = writeln!(
                    out,
                    "  recovery points {}  latest: epoch {} cut {}s ago  {}",
                    s.recovery_points.len(),
                    latest.epoch,
                    crate::catalog::now_ms().saturating_sub(latest.cut_at_ms) / 1000,
                    latest
                        .disks
                        .iter()
                        .map(|d| format!("{}={}", d.disk, d.location()))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
            }
        }
        out
    }
}

/// Seconds as `1h02m`, `3m05s` or `12s`.
fn duration(secs: f64) -> String {
    let secs = secs.round() as u64;
    match secs {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

impl DiskStatus {
    /// Initial sync progress, 0 to 100.
    pub fn progress_percent(&self) -> f64 {
        if self.size == 0 {
            100.0
        } else {
            self.replicated_bytes as f64 * 100.0 / self.size as f64
        }
    }
}

/// The state a disk is in now: what the catalog recorded, refined by what only the live
/// session knows. In order: a staging failure stalls the disk whatever else holds; a
/// disk without a session is DISCONNECTED; a connected disk of a paused server is
/// PAUSED; a disk waiting for a sync slot is QUEUED; a session without durable progress
/// while changes wait is STALLED; a disk whose first bytes are not durable yet is INITIATING;
/// an initial sync or rescan shows as such; a disk whose changes outrun the link (the
/// agent re-reads them from the volume) is in BACKLOG.
fn effective_state(
    disk: &crate::catalog::DiskRecord,
    connected: bool,
    paused: bool,
    no_progress: bool,
    queue_position: Option<usize>,
    agent_view: Option<DiskState>,
) -> (String, String) {
    let recorded = disk.disk_state();
    let (state, reason) = if !disk.stall.is_empty() {
        (DiskState::STALLED, disk.stall.as_str())
    } else if !connected {
        (DiskState::DISCONNECTED, disk.reason.as_str())
    } else if paused {
        (DiskState::PAUSED, "operator_request")
    } else if queue_position.is_some() {
        (DiskState::QUEUED, "waiting_for_slot")
    } else if no_progress {
        (DiskState::STALLED, "no_progress")
    } else if recorded == DiskState::INITIAL_SYNC && disk.sync_watermark == 0 {
        (DiskState::INITIATING, disk.reason.as_str())
    } else if recorded != DiskState::CONTINUOUS {
        (recorded, disk.reason.as_str())
    } else if agent_view == Some(DiskState::BACKLOG) {
        (DiskState::BACKLOG, "changes_above_bandwidth")
    } else {
        (recorded, disk.reason.as_str())
    };
    (state.name().to_owned(), reason.to_owned())
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
