//! The receiver's transactional store (redb, `<data-dir>/catalog.redb`): source servers,
//! their disks, and per-disk initial-sync watermarks.
//!
//! Durability order (invariant 1): a watermark is recorded only with a
//! [`DurableEvidence`], which can only be built from the flush proofs of the staging
//! stores; redb's commit is itself durable (fsync) before it returns.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use blockferry_proto::{DiskState, Hello, Inventory};
use blockferry_storage::Flushed;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::pki::AgentIdentity;

/// server id → [`ServerRecord`] as JSON.
const SERVERS: TableDefinition<&str, &[u8]> = TableDefinition::new("servers");
/// (server id, disk name) → [`DiskRecord`] as JSON.
const DISKS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("disks");

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(
        "the catalog at {path} is in use by another process (is a receiver running on this data dir?)"
    )]
    Locked { path: PathBuf },
    #[error("cannot open the catalog at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("catalog transaction failed")]
    Storage(#[from] redb::Error),
    #[error("catalog record for {key} is corrupt")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for CatalogError {
            fn from(e: $t) -> Self {
                Self::Storage(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A source server as the receiver knows it. JSON field names are part of the status
/// interface.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerRecord {
    pub server_id: String,
    /// The agent installation that last connected for this server.
    pub agent_id: String,
    pub agent_version: String,
    pub inventory: InventoryRecord,
    /// Unix seconds.
    pub first_seen: u64,
    pub last_seen: u64,
    /// The server's consistent epoch: the highest epoch made durable on all of its
    /// streams and disks. Epochs continue across sessions.
    pub durable_epoch: u64,
    /// Unix milliseconds when `durable_epoch` became durable (0: never).
    #[serde(default)]
    pub consistent_at_ms: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct InventoryRecord {
    pub host_name: String,
    pub host_id: String,
    pub cpus: Vec<CpuRecord>,
    pub ram_bytes: u64,
    pub os: String,
    pub disks: Vec<DiskSpecRecord>,
    pub private_ips: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CpuRecord {
    pub model: String,
    pub cores: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskSpecRecord {
    pub name: String,
    pub size: u64,
}

impl From<&Inventory> for InventoryRecord {
    fn from(inv: &Inventory) -> Self {
        Self {
            host_name: inv.host_name.clone(),
            host_id: inv.host_id.clone(),
            cpus: inv
                .cpus
                .iter()
                .map(|c| CpuRecord {
                    model: c.model.clone(),
                    cores: c.cores,
                })
                .collect(),
            ram_bytes: inv.ram_bytes,
            os: inv.os.clone(),
            disks: inv
                .disks
                .iter()
                .map(|d| DiskSpecRecord {
                    name: d.name.clone(),
                    size: d.size,
                })
                .collect(),
            private_ips: inv.private_ips.clone(),
        }
    }
}

/// One staging disk. JSON field names are part of the status interface.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskRecord {
    pub name: String,
    pub size: u64,
    /// Bytes of the initial sync durably in place.
    pub sync_watermark: u64,
    /// One of the DESIGN states: INITIAL_SYNC, CONTINUOUS, DISCONNECTED, …
    pub state: String,
    /// Why the disk entered its state: first_contact, disk_resized, …
    pub reason: String,
    /// The staging image (file or block device).
    pub image: PathBuf,
    /// Unix seconds.
    pub updated: u64,
}

impl DiskRecord {
    pub fn sync_complete(&self) -> bool {
        self.sync_watermark >= self.size
    }

    pub fn disk_state(&self) -> DiskState {
        match self.state.as_str() {
            "INITIATING" => DiskState::INITIATING,
            "CONTINUOUS" => DiskState::CONTINUOUS,
            "RESCAN" => DiskState::RESCAN,
            "BACKLOG" => DiskState::BACKLOG,
            "STALLED" => DiskState::STALLED,
            "DISCONNECTED" => DiskState::DISCONNECTED,
            "PAUSED" => DiskState::PAUSED,
            _ => DiskState::INITIAL_SYNC,
        }
    }

    fn set_state(&mut self, state: DiskState, reason: &str) {
        self.state = state.name().to_owned();
        self.reason = reason.to_owned();
        self.updated = now();
    }
}

/// Evidence that every staging store of a session was flushed after the writes a barrier
/// covers. Only flush proofs make one.
#[derive(Debug)]
pub struct DurableEvidence {
    _flushed: Vec<Flushed>,
}

impl DurableEvidence {
    pub fn new(flushed: Vec<Flushed>) -> Self {
        Self { _flushed: flushed }
    }
}

#[derive(Debug)]
pub struct Catalog {
    db: Database,
}

impl Catalog {
    /// Opens (creating if needed) the catalog in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, CatalogError> {
        let path = data_dir.join("catalog.redb");
        let db = Database::create(&path).map_err(|source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => CatalogError::Locked { path: path.clone() },
            source => CatalogError::Open {
                path: path.clone(),
                source,
            },
        })?;
        let txn = db.begin_write()?;
        txn.open_table(SERVERS)?;
        txn.open_table(DISKS)?;
        txn.commit()?;
        Ok(Self { db })
    }

    /// Records a new session of `identity`: the server's inventory, and each disk of the
    /// Hello, created or resumed. Returns the server's consistent epoch and the disks in
    /// Hello order. A disk whose size changed starts its initial sync again into the
    /// resized image.
    pub fn register_session(
        &self,
        identity: &AgentIdentity,
        hello: &Hello,
        images_dir: &Path,
    ) -> Result<(u64, Vec<DiskRecord>), CatalogError> {
        let txn = self.db.begin_write()?;
        let mut disks_out = Vec::with_capacity(hello.disks.len());
        let durable_epoch;
        {
            let mut servers = txn.open_table(SERVERS)?;
            let now = now();
            let previous: Option<ServerRecord> = match servers.get(identity.server_id.as_str())? {
                Some(raw) => Some(decode(&identity.server_id, raw.value())?),
                None => None,
            };
            let record = ServerRecord {
                server_id: identity.server_id.clone(),
                agent_id: identity.agent_id.clone(),
                agent_version: hello.agent_version.clone(),
                inventory: InventoryRecord::from(&hello.inventory),
                first_seen: previous.as_ref().map_or(now, |p| p.first_seen),
                last_seen: now,
                durable_epoch: previous.as_ref().map_or(0, |p| p.durable_epoch),
                consistent_at_ms: previous.as_ref().map_or(0, |p| p.consistent_at_ms),
            };
            durable_epoch = record.durable_epoch;
            servers.insert(identity.server_id.as_str(), encode(&record).as_slice())?;

            let mut disks = txn.open_table(DISKS)?;
            for spec in &hello.disks {
                let key = (identity.server_id.as_str(), spec.name.as_str());
                let existing: Option<DiskRecord> = match disks.get(key)? {
                    Some(raw) => Some(decode(&spec.name, raw.value())?),
                    None => None,
                };
                let mut disk = match existing {
                    Some(d) if d.size == spec.size => d,
                    Some(mut d) => {
                        d.size = spec.size;
                        d.sync_watermark = 0;
                        d.set_state(DiskState::INITIAL_SYNC, "disk_resized");
                        d
                    }
                    None => {
                        let mut d = DiskRecord {
                            name: spec.name.clone(),
                            size: spec.size,
                            sync_watermark: 0,
                            state: String::new(),
                            reason: String::new(),
                            image: images_dir
                                .join(&identity.server_id)
                                .join(format!("{}.img", spec.name)),
                            updated: 0,
                        };
                        d.set_state(DiskState::INITIAL_SYNC, "first_contact");
                        d
                    }
                };
                if disk.sync_complete() {
                    if disk.disk_state() != DiskState::CONTINUOUS {
                        disk.set_state(DiskState::CONTINUOUS, "reconnected");
                    }
                } else if disk.disk_state() != DiskState::INITIAL_SYNC {
                    disk.set_state(DiskState::INITIAL_SYNC, "reconnected");
                }
                disks.insert(key, encode(&disk).as_slice())?;
                disks_out.push(disk);
            }
        }
        txn.commit()?;
        Ok((durable_epoch, disks_out))
    }

    /// Records that `epoch` is durable for `server_id`, with the initial-sync progress the
    /// barrier claimed (disk name, watermark). Watermarks only move forward.
    pub fn record_durable(
        &self,
        _evidence: DurableEvidence,
        server_id: &str,
        epoch: u64,
        progress: &[(String, u64)],
    ) -> Result<(), CatalogError> {
        let txn = self.db.begin_write()?;
        {
            let mut servers = txn.open_table(SERVERS)?;
            let server = match servers.get(server_id)? {
                Some(raw) => Some(decode::<ServerRecord>(server_id, raw.value())?),
                None => None,
            };
            if let Some(mut server) = server {
                server.durable_epoch = server.durable_epoch.max(epoch);
                server.consistent_at_ms = now_ms();
                servers.insert(server_id, encode(&server).as_slice())?;
            }
            let mut disks = txn.open_table(DISKS)?;
            for (name, watermark) in progress {
                let key = (server_id, name.as_str());
                let disk = match disks.get(key)? {
                    Some(raw) => Some(decode::<DiskRecord>(name, raw.value())?),
                    None => None,
                };
                let Some(mut disk) = disk else { continue };
                let watermark = (*watermark).min(disk.size);
                if watermark <= disk.sync_watermark {
                    continue;
                }
                disk.sync_watermark = watermark;
                disk.updated = now();
                if disk.sync_complete() {
                    disk.set_state(DiskState::CONTINUOUS, "initial_sync_complete");
                }
                disks.insert(key, encode(&disk).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Marks the disks of a server whose session ended.
    pub fn mark_disconnected(
        &self,
        server_id: &str,
        disk_names: &[String],
        reason: &str,
    ) -> Result<(), CatalogError> {
        let txn = self.db.begin_write()?;
        {
            let mut disks = txn.open_table(DISKS)?;
            for name in disk_names {
                let key = (server_id, name.as_str());
                let disk = match disks.get(key)? {
                    Some(raw) => Some(decode::<DiskRecord>(name, raw.value())?),
                    None => None,
                };
                if let Some(mut disk) = disk {
                    disk.set_state(DiskState::DISCONNECTED, reason);
                    disks.insert(key, encode(&disk).as_slice())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Every server with its disks, ordered by server id and disk name.
    pub fn servers(&self) -> Result<Vec<(ServerRecord, Vec<DiskRecord>)>, CatalogError> {
        let txn = self.db.begin_read()?;
        let servers = txn.open_table(SERVERS)?;
        let disks = txn.open_table(DISKS)?;
        let mut out = Vec::new();
        for entry in servers.iter()? {
            let (key, value) = entry?;
            let server: ServerRecord = decode(key.value(), value.value())?;
            let mut server_disks = Vec::new();
            let id = server.server_id.as_str();
            for entry in disks.range((id, "")..)? {
                let (key, value) = entry?;
                let (disk_server, disk_name) = key.value();
                if disk_server != id {
                    break;
                }
                server_disks.push(decode(disk_name, value.value())?);
            }
            out.push((server, server_disks));
        }
        Ok(out)
    }

    pub fn disk(&self, server_id: &str, name: &str) -> Result<Option<DiskRecord>, CatalogError> {
        let txn = self.db.begin_read()?;
        let disks = txn.open_table(DISKS)?;
        let raw = disks.get((server_id, name))?;
        raw.map(|raw| decode(name, raw.value())).transpose()
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("catalog records always serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, raw: &[u8]) -> Result<T, CatalogError> {
    serde_json::from_slice(raw).map_err(|source| CatalogError::Corrupt {
        key: key.to_owned(),
        source,
    })
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
