//! Recovery points in the catalog: each point's disks (EBS snapshots or image copies),
//! recorded once cut, listed, and deleted.

use super::*;

/// Evidence that every staging store of a session was flushed after the writes a barrier
/// covers. Only flush proofs make one.
/// A crash-consistent point of all of a server's disks, held as one EBS snapshot per disk.
/// The keys are an interface (status JSON), documented in the README.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPointRecord {
    /// The server's consistent epoch the point was cut at; its id.
    pub epoch: u64,
    /// Unix ms of the cut, and of the completion of its last snapshot.
    pub cut_at_ms: u64,
    pub completed_at_ms: u64,
    pub disks: Vec<SnapshotRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub disk: String,
    pub size: u64,
    pub snapshot_id: String,
    /// The snapshot this one is a child of (none for a chain's first).
    pub parent: Option<String>,
    /// Blocks written to this snapshot; 0 when the disk did not change since the previous
    /// point (whose snapshot this point shares).
    pub changed_blocks: u32,
    /// File backend: the point's image (`snapshot_id` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// File backend: how the image was made, `reflink` or `copy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<String>,
}

impl SnapshotRecord {
    /// Where the disk's point is: its snapshot, or its image file.
    pub fn location(&self) -> String {
        match &self.image {
            Some(image) => image.display().to_string(),
            None => self.snapshot_id.clone(),
        }
    }
}

impl Catalog {
    /// Removes recovery point `epoch` of `server_id` from the catalog; returns it, if it
    /// was there. Its copies (images, snapshots) are the caller's to delete, after.
    pub fn delete_recovery_point(
        &self,
        server_id: &str,
        epoch: u64,
    ) -> Result<Option<RecoveryPointRecord>, CatalogError> {
        let txn = self.db.begin_write()?;
        let removed = {
            let mut table = txn.open_table(RECOVERY_POINTS)?;
            let removed = table.remove((server_id, epoch))?;
            match removed {
                Some(raw) => Some(decode::<RecoveryPointRecord>(
                    &format!("{server_id}@{epoch}"),
                    raw.value(),
                )?),
                None => None,
            }
        };
        txn.commit()?;
        Ok(removed)
    }

    /// Records a recovery point whose every snapshot is complete.
    pub fn record_recovery_point(
        &self,
        server_id: &str,
        point: &RecoveryPointRecord,
    ) -> Result<(), CatalogError> {
        let txn = self.db.begin_write()?;
        txn.open_table(RECOVERY_POINTS)?
            .insert((server_id, point.epoch), encode(point).as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// A server's recovery points, oldest first.
    pub fn recovery_points(
        &self,
        server_id: &str,
    ) -> Result<Vec<RecoveryPointRecord>, CatalogError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RECOVERY_POINTS)?;
        let mut out = Vec::new();
        for entry in table.range((server_id, 0)..=(server_id, u64::MAX))? {
            let (key, value) = entry?;
            out.push(decode(
                &format!("{server_id}@{}", key.value().1),
                value.value(),
            )?);
        }
        Ok(out)
    }
}
