//! What the catalog records as durable (invariant 1): watermarks and consistent epochs
//! only with the flush proofs of the staging stores, agent checkpoints, and rescans asked
//! for and their progress.

use super::*;

/// A rescan's counters at a durable barrier, and whether the agent claimed it complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RescanProgress {
    pub disk: String,
    pub rescanned_bytes: u64,
    pub resent_bytes: u64,
    pub done: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RescanRequestError {
    #[error("no source server {0} in the catalog (see `blockferry-receiver status`)")]
    NoSuchServer(String),
    #[error("source server {server} has no disk named {disk:?}")]
    NoSuchDisk { server: String, disk: String },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

#[derive(Debug)]
pub struct DurableEvidence {
    _flushed: Vec<Flushed>,
}

impl DurableEvidence {
    pub fn new(flushed: Vec<Flushed>) -> Self {
        Self { _flushed: flushed }
    }
}

/// An epoch committed durable by [`Catalog::record_durable`], which only takes it with the
/// flush proofs of the staging stores: what a session needs to tell its agent `Durable`.
#[derive(Debug)]
pub struct DurableRecord {
    epoch: u64,
    completed: Vec<String>,
}

impl DurableRecord {
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Disks whose initial sync or rescan this epoch completed.
    pub fn completed(&self) -> &[String] {
        &self.completed
    }

    /// A record for the session core's unit tests, which have no staging stores.
    #[cfg(test)]
    pub(crate) fn for_test(epoch: u64) -> Self {
        Self {
            epoch,
            completed: Vec::new(),
        }
    }
}

impl Catalog {
    /// Records the chain id of the state an agent is about to save at a clean shutdown.
    /// Durable when this returns.
    pub fn record_checkpoint(
        &self,
        server_id: &str,
        series: &[u8; 16],
        seq: u64,
    ) -> Result<(), CatalogError> {
        let txn = self.db.begin_write()?;
        {
            let mut servers = txn.open_table(SERVERS)?;
            let server = match servers.get(server_id)? {
                Some(raw) => Some(decode::<ServerRecord>(server_id, raw.value())?),
                None => None,
            };
            if let Some(mut server) = server {
                server.checkpoint = Some(ChainId {
                    series: series_hex(series),
                    seq,
                });
                servers.insert(server_id, encode(&server).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Asks for a rescan of `disk` (or every disk) of `server_id` at the agent's next
    /// session. Returns the disks marked; an unknown server or disk is an error.
    pub fn request_rescan(
        &self,
        server_id: &str,
        disk: Option<&str>,
    ) -> Result<Vec<String>, RescanRequestError> {
        let txn = self.db.begin_write().map_err(CatalogError::from)?;
        let mut marked = Vec::new();
        {
            let servers = txn.open_table(SERVERS).map_err(CatalogError::from)?;
            if servers
                .get(server_id)
                .map_err(CatalogError::from)?
                .is_none()
            {
                return Err(RescanRequestError::NoSuchServer(server_id.to_owned()));
            }
            let mut disks = txn.open_table(DISKS).map_err(CatalogError::from)?;
            let mut records = Vec::new();
            for entry in disks.range((server_id, "")..).map_err(CatalogError::from)? {
                let (key, value) = entry.map_err(CatalogError::from)?;
                let (disk_server, name) = key.value();
                if disk_server != server_id {
                    break;
                }
                if disk.is_none_or(|d| d == name) {
                    records.push(decode::<DiskRecord>(name, value.value())?);
                }
            }
            if records.is_empty() {
                return Err(RescanRequestError::NoSuchDisk {
                    server: server_id.to_owned(),
                    disk: disk.unwrap_or_default().to_owned(),
                });
            }
            for mut record in records {
                record.rescan_requested = true;
                record.updated = now();
                disks
                    .insert(
                        (server_id, record.name.as_str()),
                        encode(&record).as_slice(),
                    )
                    .map_err(CatalogError::from)?;
                marked.push(record.name);
            }
        }
        txn.commit().map_err(CatalogError::from)?;
        Ok(marked)
    }

    /// Records that `epoch` is durable for `server_id`, with the initial-sync progress the
    /// barrier claimed (disk name, watermark). Watermarks only move forward. A stall of a
    /// disk in `written` (disks with writes in the epoch) is over.
    pub fn record_durable(
        &self,
        _evidence: DurableEvidence,
        server_id: &str,
        epoch: u64,
        progress: &[(String, u64)],
        rescans: &[RescanProgress],
        written: &[String],
    ) -> Result<DurableRecord, CatalogError> {
        let txn = self.db.begin_write()?;
        // Disks whose initial sync or rescan this epoch completed.
        let mut completed = Vec::new();
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
                    if disk.rescan_reason.is_empty() {
                        disk.set_state(DiskState::CONTINUOUS, "initial_sync_complete");
                        completed.push(disk.name.clone());
                    } else {
                        let reason = disk.rescan_reason.clone();
                        disk.set_state(DiskState::RESCAN, &reason);
                    }
                }
                disks.insert(key, encode(&disk).as_slice())?;
            }
            for rescan in rescans {
                let key = (server_id, rescan.disk.as_str());
                let disk = match disks.get(key)? {
                    Some(raw) => Some(decode::<DiskRecord>(&rescan.disk, raw.value())?),
                    None => None,
                };
                let Some(mut disk) = disk else { continue };
                disk.rescanned_bytes = rescan.rescanned_bytes;
                disk.resent_bytes = rescan.resent_bytes;
                if rescan.done && !disk.rescan_reason.is_empty() {
                    disk.rescan_reason.clear();
                    if disk.sync_complete() {
                        disk.set_state(DiskState::CONTINUOUS, "rescan_complete");
                        completed.push(disk.name.clone());
                    }
                }
                disks.insert(key, encode(&disk).as_slice())?;
            }
            for name in written {
                let key = (server_id, name.as_str());
                let disk = match disks.get(key)? {
                    Some(raw) => Some(decode::<DiskRecord>(name, raw.value())?),
                    None => None,
                };
                // A missing image is not cured by writes to whatever is there now.
                if let Some(mut disk) =
                    disk.filter(|d| !d.stall.is_empty() && d.stall != STAGING_MISSING)
                {
                    disk.stall.clear();
                    disk.stall_detail.clear();
                    disk.updated = now();
                    disks.insert(key, encode(&disk).as_slice())?;
                }
            }
        }
        txn.commit()?;
        Ok(DurableRecord { epoch, completed })
    }
}
