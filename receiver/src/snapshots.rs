//! The EBS backend: each disk is staged into a local base copy (durable before any ack,
//! exactly as on the file backend) and turned into a chain of EBS snapshots, one per
//! recovery point.
//!
//! A recovery point is cut at a consistent point of the server: when a barrier's epoch E
//! has been applied on every stream and no write of E+1 has been submitted (at the epoch
//! gate, or later while the server is idle). At that instant every disk's chain freezes
//! its dirty blocks; the snapshots upload in the background while replication goes on
//! (the chains preserve the frozen bytes a new write would overwrite), and the point is
//! recorded in the catalog once every disk's snapshot is complete. A new point is cut at
//! the first consistent point after `recovery_interval`, once every disk has finished its
//! initial sync and any rescan (an image in the middle of either is not a point anyone
//! could recover to).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use blockferry_storage::ebs::aws::{AwsEbs, AwsSettings};
use blockferry_storage::ebs::chain::{ChainSettings, Cut, SnapshotChain, SnapshotLabel};
use blockferry_storage::ebs::fake::FakeEbs;
use blockferry_storage::ebs::{AnyEbs, RetryPolicy};
use blockferry_storage::{BlockStore, FileStore};

use crate::apply::{ApplyPipeline, StagingDisk};
use crate::catalog::{Catalog, RecoveryPointRecord, SnapshotRecord, now_ms};

use crate::lock;

/// How long after a failed recovery point the next is tried, at least.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// Where the EBS backend's snapshots go.
#[derive(Debug, Clone)]
pub enum EbsConnection {
    /// The EBS direct API, through aws-sdk-ebs and the standard credential chain.
    Aws(AwsSettings),
    /// An in-memory EBS (the strict fake): the demo and tests.
    InMemory(Arc<FakeEbs>),
}

/// `run --backend ebs`.
#[derive(Debug, Clone)]
pub struct EbsBackendConfig {
    pub connection: EbsConnection,
    pub chain: ChainSettings,
    /// A recovery point is cut at the first consistent point this long after the previous
    /// one (zero: at every consistent point the previous upload allows).
    pub recovery_interval: Duration,
}

/// The receiver's EBS staging: the client and every disk's chain.
#[derive(Debug)]
pub(crate) struct EbsStaging {
    client: Arc<AnyEbs>,
    settings: ChainSettings,
    interval: Duration,
    catalog: Arc<Catalog>,
    /// (server, disk) → chain, shared by the disk's sessions in this process.
    chains: std::sync::Mutex<HashMap<(String, String), Arc<SnapshotChain>>>,
    /// Per server: bytes of its images that a broken session applied without making them
    /// durable. The agent sends them again (they are not acknowledged), but until then
    /// the images are not the state of any epoch, and no point may be cut. A server this
    /// process has not seen is unknown (absent): the previous process may have left such
    /// bytes.
    tainted: std::sync::Mutex<HashMap<String, HashMap<String, RangeSet>>>,
}

impl EbsStaging {
    pub(crate) async fn connect(config: &EbsBackendConfig, catalog: Arc<Catalog>) -> Self {
        let client = match &config.connection {
            EbsConnection::Aws(settings) => AnyEbs::Aws(AwsEbs::connect(settings).await),
            EbsConnection::InMemory(fake) => AnyEbs::Fake(Arc::clone(fake)),
        };
        Self {
            client: Arc::new(client),
            settings: config.chain.clone(),
            interval: config.recovery_interval,
            catalog,
            chains: std::sync::Mutex::default(),
            tainted: std::sync::Mutex::default(),
        }
    }

    fn interval_ms(&self) -> u64 {
        u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX)
    }

    /// A write of this session covers `[start, end)` of `disk`: those bytes are no longer
    /// left over from a broken session.
    pub(crate) fn written(&self, server_id: &str, disk: &str, start: u64, end: u64) {
        if let Some(ranges) = lock(&self.tainted)
            .get_mut(server_id)
            .and_then(|disks| disks.get_mut(disk))
        {
            ranges.remove(start, end);
        }
    }

    /// A session ended with these writes applied but not durable.
    pub(crate) fn left_over(
        &self,
        server_id: &str,
        writes: impl Iterator<Item = (String, u64, u64)>,
    ) {
        let mut tainted = lock(&self.tainted);
        // Unknown stays unknown.
        if let Some(disks) = tainted.get_mut(server_id) {
            for (disk, start, end) in writes {
                disks.entry(disk).or_default().insert(start, end);
            }
        }
    }

    /// The agent reported nothing unacknowledged: every byte it ever sent is durable,
    /// so nothing is left over.
    pub(crate) fn all_durable(&self, server_id: &str) {
        lock(&self.tainted).insert(server_id.to_owned(), HashMap::new());
    }

    fn clean(&self, server_id: &str) -> bool {
        lock(&self.tainted)
            .get(server_id)
            .is_some_and(|disks| disks.values().all(RangeSet::is_empty))
    }

    /// The staging store of `disk`: its base copy at `image`, and its chain (digest index
    /// beside the image).
    pub(crate) fn open_store(
        &self,
        server_id: &str,
        disk: &str,
        base: FileStore,
        image: &Path,
        size: u64,
    ) -> Result<BlockStore, Box<dyn std::error::Error + Send + Sync>> {
        let key = (server_id.to_owned(), disk.to_owned());
        let mut chains = lock(&self.chains);
        let chain = match chains.get(&key) {
            Some(chain) if chain.size() == size => Arc::clone(chain),
            _ => {
                let index = image.with_extension("ebs-index");
                let chain = Arc::new(
                    SnapshotChain::open(size, &index, self.settings.preserve_limit)
                        .map_err(|e| format!("server {server_id} disk {disk}: {e}"))?,
                );
                chains.insert(key, Arc::clone(&chain));
                chain
            }
        };
        Ok(BlockStore::Ebs { base, chain })
    }
}

/// One session's recovery-point schedule.
#[derive(Debug)]
pub(crate) struct RecoveryClock {
    ebs: Arc<EbsStaging>,
    server_id: String,
    /// Unix ms from which the next point may be cut.
    due_ms: Arc<std::sync::atomic::AtomicU64>,
    /// Per disk (Hello order): initial sync and rescan done, so its image can be a point.
    ready: std::sync::Mutex<Vec<bool>>,
    uploading: Arc<AtomicBool>,
    /// The epoch of the latest recorded point: a point is never cut twice at one epoch.
    last_epoch: std::sync::atomic::AtomicU64,
    /// Why the latest recovery point failed, until one succeeds.
    last_error: Arc<std::sync::Mutex<Option<String>>>,
}

impl RecoveryClock {
    /// Why the latest recovery point could not be made (None once one succeeds).
    pub(crate) fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    pub(crate) fn new(
        ebs: Arc<EbsStaging>,
        server_id: &str,
        ready: Vec<bool>,
    ) -> Result<Self, crate::catalog::CatalogError> {
        let latest = ebs.catalog.recovery_points(server_id)?.pop();
        let last_epoch = latest.as_ref().map_or(0, |p| p.epoch);
        let due_ms = latest.map_or(0, |p| p.cut_at_ms.saturating_add(ebs.interval_ms()));
        Ok(Self {
            ebs,
            server_id: server_id.to_owned(),
            due_ms: Arc::new(due_ms.into()),
            ready: std::sync::Mutex::new(ready),
            uploading: Arc::default(),
            last_epoch: last_epoch.into(),
            last_error: Arc::default(),
        })
    }

    /// Takes note of an agent heartbeat's backlog.
    pub(crate) fn heartbeat(&self, backlog_bytes: u64) {
        if backlog_bytes == 0 {
            self.ebs.all_durable(&self.server_id);
        }
    }

    /// Takes note of what a sealed epoch claims: initial-sync watermarks and finished
    /// rescans.
    pub(crate) fn sealed(
        &self,
        pipeline: &ApplyPipeline,
        progress: &[(u16, u64)],
        rescans: &[u16],
    ) {
        let mut ready = lock(&self.ready);
        for &(disk, watermark) in progress {
            let index = usize::from(disk);
            if let (Some(staging), Some(flag)) = (pipeline.disks().get(index), ready.get_mut(index))
            {
                // A finished sync with a rescan still to come stays not ready: the rescan
                // says so with its own barrier.
                *flag |= watermark >= staging.store.size()
                    && !staging.rescanning.load(Ordering::Relaxed);
            }
        }
        for &disk in rescans {
            if let Some(flag) = ready.get_mut(usize::from(disk)) {
                *flag = true;
            }
        }
    }

    /// Cuts a recovery point at epoch `epoch` if one is due, every disk is ready, and no
    /// write after sequence `through` (the last write of `epoch`, all of them completed)
    /// has been submitted; then starts its upload.
    pub(crate) fn maybe_cut(&self, pipeline: &ApplyPipeline, through: u64, epoch: u64) {
        if self.uploading.load(Ordering::Acquire)
            || !self.ebs.clean(&self.server_id)
            || epoch <= self.last_epoch.load(Ordering::Relaxed)
            || now_ms() < self.due_ms.load(Ordering::Relaxed)
        {
            return;
        }
        // A failed staging write is missing from the images: no point holds them.
        if pipeline.failure().is_some() || !lock(&self.ready).iter().all(|&ready| ready) {
            return;
        }
        let disks: Vec<(Arc<StagingDisk>, Arc<SnapshotChain>)> = pipeline
            .disks()
            .iter()
            .filter_map(|d| match &d.store {
                BlockStore::Ebs { chain, .. } => Some((Arc::clone(d), Arc::clone(chain))),
                _ => None,
            })
            .collect();
        // A previous session's upload may still run on these chains.
        if disks.is_empty() || disks.iter().any(|(_, chain)| chain.uploading()) {
            return;
        }
        let cut_all = || {
            disks
                .iter()
                .filter_map(|(disk, chain)| Some((Arc::clone(disk), chain.cut()?)))
                .collect::<Vec<_>>()
        };
        let Some(cuts) = pipeline.if_quiescent(through, cut_all) else {
            return;
        };
        let cut_at_ms = now_ms();
        if cuts.iter().all(|(_, c)| matches!(c, Cut::Unchanged(_))) {
            // Nothing changed since the latest point: it stands for this one too.
            return;
        }
        self.uploading.store(true, Ordering::Release);
        self.last_epoch.store(epoch, Ordering::Relaxed);
        self.due_ms.store(
            cut_at_ms.saturating_add(self.ebs.interval_ms()),
            Ordering::Relaxed,
        );
        let (ebs, server_id, uploading, last_error, due_ms) = (
            Arc::clone(&self.ebs),
            self.server_id.clone(),
            Arc::clone(&self.uploading),
            Arc::clone(&self.last_error),
            Arc::clone(&self.due_ms),
        );
        tokio::spawn(async move {
            let result = upload_point(&ebs, &server_id, epoch, cut_at_ms, cuts).await;
            if result.is_err() {
                // Not at once again: a denied or failing service is not hammered.
                let retry = ebs
                    .interval
                    .clamp(RETRY_AFTER_FAILURE, Duration::from_secs(300));
                due_ms.store(
                    now_ms().saturating_add(u64::try_from(retry.as_millis()).unwrap_or(u64::MAX)),
                    Ordering::Relaxed,
                );
            }
            *lock(&last_error) = result.err();
            uploading.store(false, Ordering::Release);
        });
    }
}

/// Uploads the snapshots of one cut, disk after disk, and records the point once all are
/// complete. A failed disk's blocks go back into its dirty set; the point is not recorded
/// and the next cut carries its changes.
async fn upload_point(
    ebs: &EbsStaging,
    server_id: &str,
    epoch: u64,
    cut_at_ms: u64,
    cuts: Vec<(Arc<StagingDisk>, Cut)>,
) -> Result<(), String> {
    let started = std::time::Instant::now();
    let mut snapshots = Vec::new();
    let mut failed = None;
    for (disk, cut) in cuts {
        let BlockStore::Ebs { base, chain } = &disk.store else {
            continue;
        };
        match cut {
            Cut::Unchanged(id) => snapshots.push(SnapshotRecord {
                disk: disk.name.clone(),
                size: base.size(),
                snapshot_id: id,
                parent: None,
                changed_blocks: 0,
            }),
            Cut::Started if failed.is_some() => chain.abandon_cut(),
            Cut::Started => {
                let label = SnapshotLabel {
                    server_id: server_id.to_owned(),
                    disk: disk.name.clone(),
                    epoch,
                };
                match chain
                    .upload(Arc::clone(&ebs.client), base, &ebs.settings, &label)
                    .await
                {
                    Ok(done) => snapshots.push(SnapshotRecord {
                        disk: disk.name.clone(),
                        size: base.size(),
                        snapshot_id: done.id,
                        parent: done.parent,
                        changed_blocks: done.changed_blocks,
                    }),
                    Err(err) => {
                        tracing::warn!(
                            server = %server_id,
                            disk = %disk.name,
                            epoch,
                            error = %err,
                            "the recovery point's snapshot failed; its changes go into the next point"
                        );
                        failed = Some(format!("recovery point {epoch}, disk {}: {err}", disk.name));
                    }
                }
            }
        }
    }
    if let Some(failure) = failed {
        return Err(failure);
    }
    let point = RecoveryPointRecord {
        epoch,
        cut_at_ms,
        completed_at_ms: now_ms(),
        disks: snapshots,
    };
    let catalog = Arc::clone(&ebs.catalog);
    let server = server_id.to_owned();
    let recorded = tokio::task::spawn_blocking(move || {
        catalog
            .record_recovery_point(&server, &point)
            .map(|()| point)
    })
    .await;
    let failure = match recorded {
        Ok(Ok(point)) => {
            tracing::info!(
                server = %server_id,
                epoch,
                seconds = started.elapsed().as_secs_f64(),
                snapshots = ?point.disks.iter().map(|d| d.snapshot_id.as_str()).collect::<Vec<_>>(),
                "recovery point recorded"
            );
            return Ok(());
        }
        Ok(Err(err)) => blockferry_util::error_chain(&err),
        Err(err) => err.to_string(),
    };
    tracing::error!(server = %server_id, epoch, error = %failure, "cannot record the recovery point");
    Err(format!(
        "recovery point {epoch}: recording it in the catalog: {failure}"
    ))
}

/// What `restore` wrote.
#[derive(Debug, Clone)]
pub struct Restored {
    pub server_id: String,
    pub epoch: u64,
    pub snapshot_id: String,
    pub size: u64,
    pub blocks: u64,
}

/// Downloads disk `disk` of a recovery point (the latest by default) into the raw image
/// `out`, verifying every block's checksum. `server_id` may be left out when one server
/// alone has a disk of that name. The points come from `status` (the running receiver's,
/// or the catalog's when none runs).
pub async fn restore(
    report: &crate::status::StatusReport,
    client: Arc<AnyEbs>,
    server_id: Option<&str>,
    disk: &str,
    epoch: Option<u64>,
    out: &Path,
) -> anyhow::Result<Restored> {
    use anyhow::Context as _;
    let servers: Vec<&crate::status::ServerStatus> = report
        .servers
        .iter()
        .filter(|s| server_id.is_none_or(|id| s.server_id == id))
        .filter(|s| s.disks.iter().any(|d| d.name == disk))
        .collect();
    let server = match servers.as_slice() {
        [one] => *one,
        [] => match server_id {
            Some(id) => anyhow::bail!("server {id} has no disk named {disk}; `status` lists them"),
            None => anyhow::bail!("no server has a disk named {disk}; `status` lists them"),
        },
        many => anyhow::bail!(
            "servers {} all have a disk named {disk}; name one with --server",
            many.iter()
                .map(|s| s.server_id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let server_id = server.server_id.clone();
    let points = &server.recovery_points;
    let point = match epoch {
        Some(epoch) => points.iter().find(|p| p.epoch == epoch).with_context(|| {
            format!(
                "server {server_id} has no recovery point {epoch}; it has {}",
                list_epochs(points)
            )
        })?,
        None => points.last().with_context(|| {
            format!(
                "server {server_id} has no recovery point yet (the first is cut once every \
                 disk has finished its initial sync, on a receiver run with --backend ebs)"
            )
        })?,
    };
    let snapshot = point
        .disks
        .iter()
        .find(|d| d.disk == disk)
        .with_context(|| {
            format!(
                "recovery point {} of server {server_id} holds no disk {disk}",
                point.epoch
            )
        })?;
    let blocks = blockferry_storage::ebs::restore::restore(
        client,
        &snapshot.snapshot_id,
        snapshot.size,
        out,
        RetryPolicy::default(),
    )
    .await
    .with_context(|| {
        format!(
            "restoring disk {disk} of server {server_id}, recovery point {}, from snapshot {}",
            point.epoch, snapshot.snapshot_id
        )
    })?;
    Ok(Restored {
        server_id,
        epoch: point.epoch,
        snapshot_id: snapshot.snapshot_id.clone(),
        size: snapshot.size,
        blocks,
    })
}

fn list_epochs(points: &[RecoveryPointRecord]) -> String {
    if points.is_empty() {
        return "none".into();
    }
    points
        .iter()
        .map(|p| p.epoch.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The client `restore` uses: the real service, reached as `settings` say.
pub async fn aws_client(settings: &AwsSettings) -> Arc<AnyEbs> {
    Arc::new(AnyEbs::Aws(AwsEbs::connect(settings).await))
}

/// Byte ranges, merged.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct RangeSet(std::collections::BTreeMap<u64, u64>);

impl RangeSet {
    pub(crate) fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        // Swallow every range that touches [start, end).
        let touching: Vec<(u64, u64)> = self
            .0
            .range(..=end)
            .rev()
            .take_while(|&(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.0.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    pub(crate) fn remove(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let overlapping: Vec<(u64, u64)> = self
            .0
            .range(..end)
            .rev()
            .take_while(|&(_, &e)| e > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in overlapping {
            self.0.remove(&s);
            if s < start {
                self.0.insert(s, start);
            }
            if e > end {
                self.0.insert(end, e);
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::RangeSet;

    #[test]
    fn ranges_merge_and_split() {
        let mut set = RangeSet::default();
        set.insert(10, 20);
        set.insert(30, 40);
        set.insert(20, 30);
        assert_eq!(set.0.iter().collect::<Vec<_>>(), [(&10, &40)]);
        set.remove(15, 25);
        assert_eq!(set.0.iter().collect::<Vec<_>>(), [(&10, &15), (&25, &40)]);
        set.remove(0, 12);
        set.remove(39, 100);
        assert_eq!(set.0.iter().collect::<Vec<_>>(), [(&12, &15), (&25, &39)]);
        set.insert(5, 5);
        set.remove(12, 39);
        assert!(set.is_empty());
    }
}

#[cfg(test)]
mod taint_tests {
    use super::*;

    #[tokio::test]
    async fn a_broken_sessions_leftovers_hold_points_back_until_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Arc::new(Catalog::open(dir.path()).unwrap());
        let config = EbsBackendConfig {
            connection: EbsConnection::InMemory(Arc::new(FakeEbs::new())),
            chain: ChainSettings::default(),
            recovery_interval: Duration::ZERO,
        };
        let ebs = EbsStaging::connect(&config, catalog).await;
        // A server this process has not seen: the previous one may have left bytes.
        assert!(!ebs.clean("srv"));
        ebs.written("srv", "d0", 0, 1 << 30);
        assert!(!ebs.clean("srv"));
        ebs.left_over("srv", [("d0".to_owned(), 0, 100)].into_iter());
        assert!(!ebs.clean("srv"), "unknown stays unknown");
        // The agent says everything is durable: nothing is left over.
        ebs.all_durable("srv");
        assert!(ebs.clean("srv"));
        // A session breaks with two writes applied but not durable.
        ebs.left_over(
            "srv",
            [("d0".to_owned(), 4096, 8192), ("d1".to_owned(), 0, 512)].into_iter(),
        );
        assert!(!ebs.clean("srv"));
        ebs.written("srv", "d0", 0, 6000);
        ebs.written("srv", "d1", 0, 512);
        assert!(
            !ebs.clean("srv"),
            "d0 4096..6000 was written again, 6000..8192 not yet"
        );
        ebs.written("srv", "d0", 6000, 8192);
        assert!(ebs.clean("srv"));
        assert!(!ebs.clean("other"));
    }
}
