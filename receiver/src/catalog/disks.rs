//! A server's disks in the catalog: each disk's record (image, size, watermark, state and
//! why), the operator's disk commands, and stalls.

use super::*;

/// What an operator does to one disk's record (`disk adopt | reset | forget`).
#[derive(Debug, Clone)]
pub enum DiskChange {
    /// The file now at the image's path is this disk's image, with this identity; what it
    /// holds is rescanned by checksum before it is trusted.
    Adopt(ImageId),
    /// Start over: a new empty image and a full initial sync.
    Reset,
    /// Remove the disk from the catalog (its image is dealt with by the caller).
    Forget,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskCommandError {
    #[error("source server {server} has no disk named {disk:?} (see `blockferry-receiver status`)")]
    NoSuchDisk { server: String, disk: String },
    #[error(
        "disk {disk} of source server {server} is in a live session; stop its agent first (or, to forget it, remove it from the agent's --disk list)"
    )]
    Connected { server: String, disk: String },
    #[error("{0}")]
    Image(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
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
    /// Why the disk must be rescanned, while a rescan is pending or running ("" when
    /// none): it survives reconnects until the agent's rescan is durable.
    #[serde(default)]
    pub rescan_reason: String,
    /// An operator asked for a rescan (`blockferry-receiver rescan`); taken by the next
    /// session.
    #[serde(default)]
    pub rescan_requested: bool,
    /// The reason of the latest rescan, kept after it completes ("" if there was none).
    #[serde(default)]
    pub last_rescan_reason: String,
    /// Bytes compared by checksum in the latest rescan.
    #[serde(default)]
    pub rescanned_bytes: u64,
    /// Bytes written to the disk (other than its initial sync) while the latest rescan
    /// ran: the blocks found different, plus changes made meanwhile.
    #[serde(default)]
    pub resent_bytes: u64,
    /// Why the disk cannot make progress whatever the agent does ("" when it can):
    /// `staging_full` or `staging_error` (a write or flush failed otherwise; both cleared
    /// by the next write made durable on it) or `staging_missing`
    /// (cleared once the image the catalog recorded is found again, or by an operator's
    /// `disk adopt` or `disk reset`).
    #[serde(default)]
    pub stall: String,
    /// What the stall is about, for people (the path of a missing image, say).
    #[serde(default)]
    pub stall_detail: String,
    /// Which file the staging image is; `None` until the first session that opens it
    /// (and for records of older receivers).
    #[serde(default)]
    pub image_id: Option<ImageId>,
}

/// The identity of a staging image: a random id kept beside it (`DISK.img.id`) and the
/// file it was created as. An image that is missing, or another file in its place (a
/// volume not mounted, a restore, a copy), does not have it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageId {
    pub uuid: String,
    /// `st_dev` and `st_ino` of a file; 0 and `st_rdev` of a block device.
    pub device: u64,
    pub inode: u64,
    /// The file's birth time (ns), 0 where the file system keeps none.
    #[serde(default)]
    pub born_ns: u64,
}

impl DiskRecord {
    /// A disk seen for the first time: nothing synced, its image at `image`.
    pub fn new(name: &str, size: u64, image: PathBuf) -> Self {
        Self {
            name: name.to_owned(),
            size,
            sync_watermark: 0,
            state: String::new(),
            reason: String::new(),
            image,
            updated: 0,
            rescan_reason: String::new(),
            rescan_requested: false,
            last_rescan_reason: String::new(),
            rescanned_bytes: 0,
            resent_bytes: 0,
            stall: String::new(),
            stall_detail: String::new(),
            image_id: None,
        }
    }

    pub fn sync_complete(&self) -> bool {
        self.sync_watermark >= self.size
    }

    /// Why the agent must rescan this disk now.
    pub fn rescan(&self) -> RescanReason {
        if self.rescan_reason.is_empty() {
            RescanReason::NONE
        } else {
            // A reason written by a newer receiver is still a reason to rescan.
            RescanReason::from_name(&self.rescan_reason).unwrap_or(RescanReason::STATE_MISMATCH)
        }
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

    pub(super) fn set_state(&mut self, state: DiskState, reason: &str) {
        self.state = state.name().to_owned();
        self.reason = reason.to_owned();
        self.updated = now();
    }
}

impl Catalog {
    /// Records that a disk cannot make progress for `reason` (e.g. `staging_full`), until
    /// a write to it is made durable again.
    pub fn mark_stalled(
        &self,
        server_id: &str,
        disk: &str,
        reason: &str,
        detail: &str,
    ) -> Result<(), CatalogError> {
        let txn = self.db.begin_write()?;
        {
            let mut disks = txn.open_table(DISKS)?;
            let key = (server_id, disk);
            let record = match disks.get(key)? {
                Some(raw) => Some(decode::<DiskRecord>(disk, raw.value())?),
                None => None,
            };
            if let Some(mut record) = record {
                record.stall = reason.to_owned();
                record.stall_detail = detail.to_owned();
                record.updated = now();
                disks.insert(key, encode(&record).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Records the staging images a session opened: new identities (`stamped`), and the
    /// end of a `staging_missing` stall for every disk in `found` (its recorded image is
    /// back). One transaction, before the session's Welcome.
    pub fn record_images(
        &self,
        server_id: &str,
        stamped: &[(String, ImageId)],
        found: &[String],
    ) -> Result<(), CatalogError> {
        let txn = self.db.begin_write()?;
        {
            let mut disks = txn.open_table(DISKS)?;
            let names = stamped.iter().map(|(n, _)| n).chain(found);
            for name in names {
                let key = (server_id, name.as_str());
                let record = match disks.get(key)? {
                    Some(raw) => Some(decode::<DiskRecord>(name, raw.value())?),
                    None => None,
                };
                let Some(mut record) = record else { continue };
                if let Some((_, id)) = stamped.iter().find(|(n, _)| n == name) {
                    record.image_id = Some(id.clone());
                }
                if record.stall == STAGING_MISSING {
                    record.stall.clear();
                    record.stall_detail.clear();
                }
                record.updated = now();
                disks.insert(key, encode(&record).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Does `change` to the record of disk `name` of `server_id`, in one transaction,
    /// and returns the record as it was before.
    pub fn change_disk(
        &self,
        server_id: &str,
        name: &str,
        change: DiskChange,
    ) -> Result<DiskRecord, DiskCommandError> {
        let txn = self.db.begin_write().map_err(CatalogError::from)?;
        let before = {
            let mut disks = txn.open_table(DISKS).map_err(CatalogError::from)?;
            let key = (server_id, name);
            let record = match disks.get(key).map_err(CatalogError::from)? {
                Some(raw) => decode::<DiskRecord>(name, raw.value())?,
                None => {
                    return Err(DiskCommandError::NoSuchDisk {
                        server: server_id.to_owned(),
                        disk: name.to_owned(),
                    });
                }
            };
            let mut after = record.clone();
            let remove = matches!(change, DiskChange::Forget);
            match change {
                DiskChange::Adopt(id) => {
                    after.image_id = Some(id);
                    after.stall.clear();
                    after.stall_detail.clear();
                    // Whatever the adopted file holds is compared with the source before
                    // anything of it is trusted again.
                    if after.sync_watermark > 0 {
                        after.rescan_reason = RescanReason::STAGING_ADOPTED.name().to_owned();
                        after.last_rescan_reason = after.rescan_reason.clone();
                        after.rescanned_bytes = 0;
                        after.resent_bytes = 0;
                    }
                    after.updated = now();
                }
                DiskChange::Reset => {
                    after.image_id = None;
                    after.sync_watermark = 0;
                    after.stall.clear();
                    after.stall_detail.clear();
                    after.rescan_reason.clear();
                    after.rescan_requested = false;
                    after.set_state(DiskState::INITIAL_SYNC, "staging_reset");
                }
                DiskChange::Forget => {}
            }
            if remove {
                disks.remove(key).map_err(CatalogError::from)?;
            } else {
                disks
                    .insert(key, encode(&after).as_slice())
                    .map_err(CatalogError::from)?;
            }
            record
        };
        txn.commit().map_err(CatalogError::from)?;
        Ok(before)
    }

    pub fn disk(&self, server_id: &str, name: &str) -> Result<Option<DiskRecord>, CatalogError> {
        let txn = self.db.begin_read()?;
        let disks = txn.open_table(DISKS)?;
        let raw = disks.get((server_id, name))?;
        raw.map(|raw| decode(name, raw.value())).transpose()
    }
}
