//! The answer to "what is replicating, and how far along is it?" — for the `status`
//! command (table or JSON) and the admin socket. The JSON keys are an interface,
//! documented in the README.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, CatalogError, InventoryRecord};
use crate::registry::SessionRegistry;

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
    pub inventory: InventoryRecord,
    pub disks: Vec<DiskStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskStatus {
    pub name: String,
    pub size: u64,
    /// Bytes durably replicated (the initial-sync watermark until continuous replication).
    pub replicated_bytes: u64,
    pub sync_watermark: u64,
    pub state: String,
    pub reason: String,
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
}

impl StatusReport {
    pub(crate) fn build(
        catalog: &Catalog,
        live: Option<&SessionRegistry>,
    ) -> Result<Self, CatalogError> {
        let servers = catalog
            .servers()?
            .into_iter()
            .map(|(server, disks)| {
                let session = live.and_then(|r| r.session_of(&server.server_id));
                let view = session.as_ref().map(|s| s.live_view());
                ServerStatus {
                    connected: live.is_some_and(|r| r.is_connected(&server.server_id)),
                    streams: view.map_or(0, |v| v.streams),
                    lag_seconds: view.map(|v| v.lag_seconds),
                    backlog_bytes: view.and_then(|v| v.heartbeat).map(|h| h.backlog_bytes),
                    agent_rss_bytes: view.and_then(|v| v.heartbeat).map(|h| h.rss_bytes),
                    agent_cpu_percent: view
                        .and_then(|v| v.heartbeat)
                        .map(|h| f64::from(h.cpu_permille) / 10.0),
                    consistent_at: server.consistent_at_ms / 1000,
                    disks: disks
                        .into_iter()
                        .map(|d| DiskStatus {
                            replicated_bytes: d.sync_watermark,
                            sync_watermark: d.sync_watermark,
                            image: d.image.display().to_string(),
                            name: d.name,
                            size: d.size,
                            state: d.state,
                            reason: d.reason,
                            rescan_reason: (!d.rescan_reason.is_empty()).then_some(d.rescan_reason),
                            rescan_requested: d.rescan_requested,
                            last_rescan_reason: (!d.last_rescan_reason.is_empty())
                                .then_some(d.last_rescan_reason),
                            rescanned_bytes: d.rescanned_bytes,
                            resent_bytes: d.resent_bytes,
                        })
                        .collect(),
                    server_id: server.server_id,
                    agent_id: server.agent_id,
                    agent_version: server.agent_version,
                    first_seen: server.first_seen,
                    last_seen: server.last_seen,
                    durable_epoch: server.durable_epoch,
                    inventory: server.inventory,
                }
            })
            .collect();
        Ok(Self { servers })
    }

    /// A table for people.
    pub fn render_table(&self) -> String {
        if self.servers.is_empty() {
            return "no source servers have connected yet\n".to_owned();
        }
        let mut out = String::new();
        for s in &self.servers {
            let _ = writeln!(
                out,
                "server {}  host {}  agent {}  {}",
                s.server_id,
                if s.inventory.host_name.is_empty() {
                    "-"
                } else {
                    &s.inventory.host_name
                },
                s.agent_id,
                if s.connected {
                    "connected"
                } else {
                    "not connected"
                }
            );
            let _ = writeln!(
                out,
                "  {:<16} {:>12} {:>12} {:>7}  {:<14} {:<22} IMAGE",
                "DISK", "SIZE", "REPLICATED", "PCT", "STATE", "REASON"
            );
            for d in &s.disks {
                let pct = if d.size == 0 {
                    100.0
                } else {
                    d.replicated_bytes as f64 * 100.0 / d.size as f64
                };
                let _ = writeln!(
                    out,
                    "  {:<16} {:>12} {:>12} {:>6.1}%  {:<14} {:<22} {}",
                    d.name,
                    human_bytes(d.size),
                    human_bytes(d.replicated_bytes),
                    pct,
                    d.state,
                    d.reason,
                    d.image
                );
            }
        }
        out
    }
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
