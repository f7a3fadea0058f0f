//! EBS snapshots retired with their recovery points, waiting for their deletion in EC2.
//!
//! A point leaves the catalog and its snapshots that no remaining point names are queued
//! here in the same transaction; the retention loop deletes them (DeleteSnapshot) and
//! then forgets them. A crash or an EC2 outage in between leaves them queued, never
//! orphaned unseen, and a snapshot still named by a kept point is never queued.

use std::collections::BTreeSet;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{Catalog, CatalogError, RECOVERY_POINTS, RecoveryPointRecord, decode};

/// Snapshot id → the server whose point held it.
pub(super) const RETIRED_SNAPSHOTS: TableDefinition<&str, &str> =
    TableDefinition::new("retired_snapshots");

impl Catalog {
    /// Removes point `epoch` of `server_id` and queues for deletion the snapshots of it
    /// that no other point of the server names (an unchanged disk shares its snapshot
    /// with the point before). Returns the point and the snapshots queued; `None` if
    /// there was no such point.
    pub fn retire_recovery_point(
        &self,
        server_id: &str,
        epoch: u64,
    ) -> Result<Option<(RecoveryPointRecord, Vec<String>)>, CatalogError> {
        let txn = self.db.begin_write()?;
        let retired = {
            let mut points = txn.open_table(RECOVERY_POINTS)?;
            let removed = points.remove((server_id, epoch))?.map(|raw| {
                decode::<RecoveryPointRecord>(&format!("{server_id}@{epoch}"), raw.value())
            });
            match removed.transpose()? {
                None => None,
                Some(point) => {
                    let mut named = BTreeSet::new();
                    for entry in points.range((server_id, 0)..=(server_id, u64::MAX))? {
                        let (key, value) = entry?;
                        let other: RecoveryPointRecord =
                            decode(&format!("{server_id}@{}", key.value().1), value.value())?;
                        named.extend(other.disks.into_iter().map(|d| d.snapshot_id));
                    }
                    let doomed: Vec<String> = point
                        .disks
                        .iter()
                        .map(|d| d.snapshot_id.clone())
                        .filter(|id| !id.is_empty() && !named.contains(id))
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect();
                    let mut queue = txn.open_table(RETIRED_SNAPSHOTS)?;
                    for id in &doomed {
                        queue.insert(id.as_str(), server_id)?;
                    }
                    Some((point, doomed))
                }
            }
        };
        txn.commit()?;
        Ok(retired)
    }

    /// Snapshots waiting for their deletion: (snapshot id, server id).
    pub fn retired_snapshots(&self) -> Result<Vec<(String, String)>, CatalogError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RETIRED_SNAPSHOTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (id, server) = entry?;
            out.push((id.value().to_owned(), server.value().to_owned()));
        }
        Ok(out)
    }

    /// The snapshot is deleted in EC2: it leaves the queue.
    pub fn forget_retired_snapshot(&self, snapshot_id: &str) -> Result<(), CatalogError> {
        let txn = self.db.begin_write()?;
        txn.open_table(RETIRED_SNAPSHOTS)?.remove(snapshot_id)?;
        txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::SnapshotRecord;

    fn point(epoch: u64, snapshots: &[&str]) -> RecoveryPointRecord {
        RecoveryPointRecord {
            epoch,
            cut_at_ms: epoch,
            completed_at_ms: epoch,
            disks: snapshots
                .iter()
                .enumerate()
                .map(|(i, id)| SnapshotRecord {
                    disk: format!("d{i}"),
                    size: 1 << 30,
                    snapshot_id: (*id).to_owned(),
                    parent: None,
                    changed_blocks: 1,
                    image: None,
                    copy: None,
                })
                .collect(),
        }
    }

    #[test]
    fn a_snapshot_a_kept_point_shares_is_never_queued() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();
        // d1 did not change between points 1 and 2: both name snap-b.
        catalog
            .record_recovery_point("s", &point(1, &["snap-a", "snap-b"]))
            .unwrap();
        catalog
            .record_recovery_point("s", &point(2, &["snap-c", "snap-b"]))
            .unwrap();
        let (gone, queued) = catalog.retire_recovery_point("s", 1).unwrap().unwrap();
        assert_eq!(gone.epoch, 1);
        assert_eq!(queued, vec!["snap-a".to_owned()]);
        assert_eq!(
            catalog.retired_snapshots().unwrap(),
            vec![("snap-a".to_owned(), "s".to_owned())]
        );
        assert_eq!(catalog.recovery_points("s").unwrap().len(), 1);
        assert!(catalog.retire_recovery_point("s", 1).unwrap().is_none());
        catalog.forget_retired_snapshot("snap-a").unwrap();
        assert!(catalog.retired_snapshots().unwrap().is_empty());
        // The queue outlives a restart.
        let (_, queued) = catalog.retire_recovery_point("s", 2).unwrap().unwrap();
        assert_eq!(queued, vec!["snap-b".to_owned(), "snap-c".to_owned()]);
        drop(catalog);
        let catalog = Catalog::open(dir.path()).unwrap();
        assert_eq!(catalog.retired_snapshots().unwrap().len(), 2);
    }
}
