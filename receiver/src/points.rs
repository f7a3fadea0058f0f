//! Recovery points, whichever the backend: when a point may be cut, and the cut itself.
//!
//! A point is cut at a consistent point of the server: epoch E applied on every stream
//! and no write of E+1 submitted, either at the epoch gate (the streams wait there) or
//! later while the server is idle (new writes are held off for the cut). It is cut at the
//! first such point `interval` after the previous one, once every disk has finished its
//! initial sync and any rescan, and only while the images hold nothing that a broken
//! session applied without making durable ([`Leftovers`]): a point is never a torn mix.
//!
//! - **EBS**: the chains freeze their dirty blocks and upload snapshots in the background
//!   (see [`crate::snapshots`]).
//! - **Files**: each image is copied into `<images>/<server>/points/<epoch>/<disk>.img`, a
//!   reflink where the staging file system shares extents (XFS, btrfs), else (with
//!   `--recovery-points copy`) a full copy; the point is recorded once every copy is
//!   durable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use blockferry_storage::ebs::EbsClient;
use blockferry_storage::{BlockStore, CopyPolicy, StoreError};

use crate::apply::ApplyPipeline;
use crate::catalog::{Catalog, RecoveryPointRecord, SnapshotRecord, now_ms};
use crate::lock;
use crate::snapshots::EbsStaging;

/// How long after a failed recovery point the next is tried, at least.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// Which recovery points the file backend cuts (`run --recovery-points`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FilePointMode {
    /// Reflinks where the staging file system has them (XFS, btrfs); none elsewhere.
    Auto,
    /// Reflinks, else a full copy of every image at each point: as much space as the
    /// data and, while it copies, a pause of the server's replication.
    Copy,
    /// No recovery points.
    Off,
}

/// Where the receiver's recovery points go.
#[derive(Debug)]
pub(crate) enum PointTarget {
    Ebs(Arc<EbsStaging>),
    Files {
        images_dir: PathBuf,
        policy: CopyPolicy,
    },
}

/// The receiver's recovery points: where they go, how often, and what no point may hold.
#[derive(Debug)]
pub(crate) struct RecoveryPoints {
    target: PointTarget,
    catalog: Arc<Catalog>,
    interval: Duration,
    leftovers: Leftovers,
}

impl RecoveryPoints {
    pub(crate) fn new(target: PointTarget, catalog: Arc<Catalog>, interval: Duration) -> Self {
        Self {
            target,
            catalog,
            interval,
            leftovers: Leftovers::default(),
        }
    }

    pub(crate) fn leftovers(&self) -> &Leftovers {
        &self.leftovers
    }

    /// Deletes the points of `server_id` that its retention policy no longer keeps at
    /// `now_ms`; returns the epochs deleted. An EBS point's snapshots that no kept point
    /// names are queued in the catalog, and deleted by [`Self::delete_retired`].
    pub(crate) fn enforce_retention(
        &self,
        server_id: &str,
        now_ms: u64,
    ) -> Result<Vec<u64>, String> {
        let chain = |e: crate::catalog::CatalogError| blockferry_util::error_chain(&e);
        let policy = self.catalog.retention(server_id).map_err(chain)?;
        let points = self.catalog.recovery_points(server_id).map_err(chain)?;
        let cuts: Vec<(u64, u64)> = points.iter().map(|p| (p.epoch, p.cut_at_ms)).collect();
        let keep = policy.keep(&cuts, now_ms);
        let mut deleted = Vec::new();
        for point in points.iter().filter(|p| !keep.contains(&p.epoch)) {
            self.delete(server_id, point.epoch)?;
            deleted.push(point.epoch);
        }
        if !deleted.is_empty() {
            tracing::info!(server = %server_id, ?deleted, %policy, "recovery points past their retention deleted");
        }
        Ok(deleted)
    }

    /// Deletes recovery point `epoch` of `server_id` (see [`delete_point`]).
    pub(crate) fn delete(&self, server_id: &str, epoch: u64) -> Result<bool, String> {
        delete_point(&self.catalog, server_id, epoch).map(|p| p.is_some())
    }

    /// Enforces every server's retention policy now, and then every `every` until
    /// `stop`.
    pub(crate) async fn retention_loop(
        self: Arc<Self>,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let points = Arc::clone(&self);
            let _ = tokio::task::spawn_blocking(move || {
                let servers = match points.catalog.servers() {
                    Ok(servers) => servers,
                    Err(e) => {
                        tracing::warn!(error = %blockferry_util::error_chain(&e), "cannot read the servers for retention");
                        return;
                    }
                };
                for (server, _) in servers {
                    if let Err(why) = points.enforce_retention(&server.server_id, now_ms()) {
                        tracing::warn!(server = %server.server_id, error = %why, "cannot delete recovery points past their retention");
                    }
                }
            })
            .await;
            if let PointTarget::Ebs(ebs) = &self.target {
                self.delete_retired(ebs).await;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Deletes in EC2 the snapshots retired with their points; what fails stays queued
    /// for the next round.
    async fn delete_retired(&self, ebs: &EbsStaging) {
        let catalog = Arc::clone(&self.catalog);
        let queued = match tokio::task::spawn_blocking(move || catalog.retired_snapshots()).await {
            Ok(Ok(queued)) => queued,
            Ok(Err(e)) => {
                tracing::warn!(error = %blockferry_util::error_chain(&e), "cannot read the EBS snapshots to delete");
                return;
            }
            Err(_) => return,
        };
        for (snapshot, server) in queued {
            match ebs.client().delete_snapshot(&snapshot).await {
                Ok(()) => {
                    let catalog = Arc::clone(&self.catalog);
                    let id = snapshot.clone();
                    match tokio::task::spawn_blocking(move || catalog.forget_retired_snapshot(&id))
                        .await
                    {
                        Ok(Ok(())) => {
                            tracing::info!(%server, %snapshot, "EBS snapshot past its retention deleted")
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(%server, %snapshot, error = %blockferry_util::error_chain(&e), "EBS snapshot deleted but still queued; deleting it again is harmless")
                        }
                        Err(_) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(%server, %snapshot, error = %e, "cannot delete an EBS snapshot past its retention; it stays queued for the next check");
                }
            }
        }
    }

    fn interval_ms(&self) -> u64 {
        u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Per server: bytes of its images that a broken session applied without making them
/// durable. The agent sends them again (they were not acknowledged), but until then the
/// images are not the state of any epoch, and no point may be cut. A server this process
/// has not seen is unknown (absent): the previous process may have left such bytes.
#[derive(Debug, Default)]
pub(crate) struct Leftovers {
    tainted: std::sync::Mutex<HashMap<String, HashMap<String, RangeSet>>>,
}

impl Leftovers {
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

    /// The agent reported nothing unacknowledged (or the server is new): every byte it
    /// ever sent is durable, so nothing is left over.
    pub(crate) fn all_durable(&self, server_id: &str) {
        lock(&self.tainted).insert(server_id.to_owned(), HashMap::new());
    }

    pub(crate) fn clean(&self, server_id: &str) -> bool {
        lock(&self.tainted)
            .get(server_id)
            .is_some_and(|disks| disks.values().all(RangeSet::is_empty))
    }
}

/// Deletes recovery point `epoch` of `server_id`: from the catalog first (so that no one
/// launches it any more), then its images; an EBS point's snapshots that no other point
/// names are queued for deletion in EC2. `None` if there was no such point.
pub fn delete_point(
    catalog: &Catalog,
    server_id: &str,
    epoch: u64,
) -> Result<Option<RecoveryPointRecord>, String> {
    let chain = |e: crate::catalog::CatalogError| blockferry_util::error_chain(&e);
    let points = catalog.recovery_points(server_id).map_err(chain)?;
    let Some(point) = points.iter().find(|p| p.epoch == epoch) else {
        return Ok(None);
    };
    if point.disks.iter().any(|d| !d.snapshot_id.is_empty()) {
        // The next EBS point is uploaded as children of the newest one's snapshots:
        // deleting them would break every later point. (Retention always keeps it.)
        if points.last().is_some_and(|newest| newest.epoch == epoch) {
            return Err(format!(
                "recovery point {epoch} is the newest of server {server_id}: the next EBS point is built on its snapshots, so it is kept; delete it once a newer point exists"
            ));
        }
        // EBS: the snapshots no other point names are queued; the running receiver's
        // retention loop deletes them in EC2.
        return catalog
            .retire_recovery_point(server_id, epoch)
            .map(|retired| retired.map(|(point, _)| point))
            .map_err(chain);
    }
    let removed = catalog
        .delete_recovery_point(server_id, epoch)
        .map_err(chain)?;
    // A crash between the two leaves a directory no point names; the server's next
    // session removes it.
    let dirs: std::collections::BTreeSet<&Path> = point
        .disks
        .iter()
        .filter_map(|d| d.image.as_deref()?.parent())
        .collect();
    for dir in dirs {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("deleting {}: {e}", dir.display())),
        }
    }
    Ok(removed)
}

/// Where the file backend keeps a server's points.
pub(crate) fn points_dir(images_dir: &Path, server_id: &str) -> PathBuf {
    images_dir.join(server_id).join("points")
}

/// One session's recovery-point schedule.
#[derive(Debug)]
pub(crate) struct RecoveryClock {
    points: Arc<RecoveryPoints>,
    server_id: String,
    /// Unix ms from which the next point may be cut.
    due_ms: Arc<AtomicU64>,
    /// Per disk (Hello order): initial sync and rescan done, so its image can be a point.
    ready: std::sync::Mutex<Vec<bool>>,
    /// A point is being cut (or uploaded): the next waits.
    busy: Arc<AtomicBool>,
    /// The epoch of the latest recorded point: a point is never cut twice at one epoch.
    last_epoch: Arc<AtomicU64>,
    /// Why the latest recovery point failed, until one succeeds.
    last_error: Arc<std::sync::Mutex<Option<String>>>,
}

impl RecoveryClock {
    pub(crate) fn new(
        points: Arc<RecoveryPoints>,
        server_id: &str,
        ready: Vec<bool>,
    ) -> Result<Self, crate::catalog::CatalogError> {
        let recorded = points.catalog.recovery_points(server_id)?;
        if let PointTarget::Files { images_dir, .. } = &points.target {
            tidy(images_dir, server_id, &recorded);
        }
        let latest = recorded.last();
        let last_epoch = latest.map_or(0, |p| p.epoch);
        let due_ms = latest.map_or(0, |p| p.cut_at_ms.saturating_add(points.interval_ms()));
        Ok(Self {
            points,
            server_id: server_id.to_owned(),
            due_ms: Arc::new(due_ms.into()),
            ready: std::sync::Mutex::new(ready),
            busy: Arc::default(),
            last_epoch: Arc::new(last_epoch.into()),
            last_error: Arc::default(),
        })
    }

    /// Why the latest recovery point could not be made (None once one succeeds).
    pub(crate) fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    /// Takes note of an agent heartbeat's backlog.
    pub(crate) fn heartbeat(&self, backlog_bytes: u64) {
        if backlog_bytes == 0 {
            self.points.leftovers.all_durable(&self.server_id);
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

    /// Whether a point may be cut at `epoch` now, the images and the schedule allowing.
    fn due(&self, pipeline: &ApplyPipeline, epoch: u64) -> bool {
        !self.busy.load(Ordering::Acquire)
            && self.points.leftovers.clean(&self.server_id)
            && epoch > self.last_epoch.load(Ordering::Relaxed)
            && now_ms() >= self.due_ms.load(Ordering::Relaxed)
            // A failed staging write is missing from the images: no point holds them.
            && pipeline.failure().is_none()
            && lock(&self.ready).iter().all(|&ready| ready)
    }

    /// At the epoch gate: every write up to sequence `through` (the last of `epoch`) has
    /// completed and the streams wait, so no write of the next epoch can start.
    pub(crate) async fn cut_at_gate(&self, pipeline: &ApplyPipeline, through: u64, epoch: u64) {
        match &self.points.target {
            PointTarget::Ebs(ebs) => {
                if self.due(pipeline, epoch) {
                    self.cut_ebs(ebs, pipeline, through, epoch);
                }
            }
            PointTarget::Files { images_dir, policy } => {
                if self.due(pipeline, epoch) {
                    self.cut_files(images_dir, *policy, pipeline, epoch).await;
                }
            }
        }
    }

    /// While the server is idle at `epoch` (every write up to `through` completed):
    /// new writes are held off for the cut.
    pub(crate) async fn cut_idle(&self, pipeline: &ApplyPipeline, through: u64, epoch: u64) {
        if !self.due(pipeline, epoch) {
            return;
        }
        match &self.points.target {
            PointTarget::Ebs(ebs) => self.cut_ebs(ebs, pipeline, through, epoch),
            PointTarget::Files { images_dir, policy } => {
                let Some(_held) = pipeline.quiesce(through).await else {
                    return;
                };
                self.cut_files(images_dir, *policy, pipeline, epoch).await;
            }
        }
    }

    fn cut_ebs(&self, ebs: &Arc<EbsStaging>, pipeline: &ApplyPipeline, through: u64, epoch: u64) {
        if !self.try_start() {
            return;
        }
        let cuts = match crate::snapshots::freeze(pipeline, through) {
            crate::snapshots::Frozen::Cuts(cuts) => cuts,
            crate::snapshots::Frozen::NotNow | crate::snapshots::Frozen::Unchanged => {
                self.busy.store(false, Ordering::Release);
                return;
            }
        };
        let cut_at_ms = self.started(epoch);
        let (ebs, catalog, server_id) = (
            Arc::clone(ebs),
            Arc::clone(&self.points.catalog),
            self.server_id.clone(),
        );
        let finish = self.finisher();
        tokio::spawn(async move {
            let result =
                crate::snapshots::upload_point(&ebs, &catalog, &server_id, epoch, cut_at_ms, cuts)
                    .await;
            finish(result);
        });
    }

    /// Copies every image into the point's directory, then records the point. The
    /// caller holds writes off until it returns.
    async fn cut_files(
        &self,
        images_dir: &Path,
        policy: CopyPolicy,
        pipeline: &ApplyPipeline,
        epoch: u64,
    ) {
        if !self.try_start() {
            return;
        }
        let stores: Vec<(String, Arc<crate::apply::StagingDisk>)> = pipeline
            .disks()
            .iter()
            .map(|d| (d.name.clone(), Arc::clone(d)))
            .collect();
        let cut_at_ms = self.started(epoch);
        let dir = points_dir(images_dir, &self.server_id);
        let catalog = Arc::clone(&self.points.catalog);
        let server_id = self.server_id.clone();
        let copied = tokio::task::spawn_blocking(move || {
            copy_point(&dir, epoch, &stores, policy).and_then(|disks| {
                let point = RecoveryPointRecord {
                    epoch,
                    cut_at_ms,
                    completed_at_ms: now_ms(),
                    disks,
                };
                catalog
                    .record_recovery_point(&server_id, &point)
                    .map_err(|e| {
                        let _ = std::fs::remove_dir_all(dir.join(epoch.to_string()));
                        format!(
                            "recording it in the catalog: {}",
                            blockferry_util::error_chain(&e)
                        )
                    })
                    .map(|()| point)
            })
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let result = match copied {
            Ok(point) => {
                tracing::info!(
                    server = %self.server_id,
                    epoch,
                    seconds = (now_ms().saturating_sub(cut_at_ms)) as f64 / 1000.0,
                    copies = ?point.disks.iter().map(|d| d.copy.as_deref().unwrap_or("")).collect::<Vec<_>>(),
                    "recovery point recorded"
                );
                Ok(())
            }
            Err(why) => Err(format!("recovery point {epoch}: {why}")),
        };
        (self.finisher())(result);
    }

    /// Claims the clock for a cut; false if one runs.
    fn try_start(&self) -> bool {
        self.busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Records that a cut at `epoch` goes ahead (the clock is claimed); returns its time.
    fn started(&self, epoch: u64) -> u64 {
        let cut_at_ms = now_ms();
        self.last_epoch.store(epoch, Ordering::Relaxed);
        self.due_ms.store(
            cut_at_ms.saturating_add(self.points.interval_ms()),
            Ordering::Relaxed,
        );
        cut_at_ms
    }

    /// What ends a cut: its error kept for status (and logged when it is new), the next
    /// one not tried at once after a failure.
    fn finisher(&self) -> impl FnOnce(Result<(), String>) + Send + 'static {
        let (busy, last_error, due_ms, interval, server_id) = (
            Arc::clone(&self.busy),
            Arc::clone(&self.last_error),
            Arc::clone(&self.due_ms),
            self.points.interval,
            self.server_id.clone(),
        );
        move |result| {
            if let Err(why) = &result {
                // Not at once again: a denied or failing service is not hammered.
                let retry = interval.clamp(RETRY_AFTER_FAILURE, Duration::from_secs(300));
                due_ms.store(
                    now_ms().saturating_add(u64::try_from(retry.as_millis()).unwrap_or(u64::MAX)),
                    Ordering::Relaxed,
                );
                let mut last = lock(&last_error);
                if last.as_deref() != Some(why.as_str()) {
                    tracing::warn!(server = %server_id, error = %why, "cannot cut a recovery point; replication goes on");
                }
                *last = Some(why.clone());
            } else {
                *lock(&last_error) = None;
            }
            busy.store(false, Ordering::Release);
        }
    }
}

/// Copies every disk's image into `<dir>/<epoch>/`, through a `.partial` directory that
/// is renamed once every copy is durable: a crash leaves no half point under a real name.
fn copy_point(
    dir: &Path,
    epoch: u64,
    disks: &[(String, Arc<crate::apply::StagingDisk>)],
    policy: CopyPolicy,
) -> Result<Vec<SnapshotRecord>, String> {
    blockferry_util::durable::ensure_private_dir(dir, "recovery points")
        .map_err(|e| e.to_string())?;
    let partial = dir.join(format!("{epoch}.partial"));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir(&partial).map_err(|e| format!("creating {}: {e}", partial.display()))?;
    let mut records = Vec::with_capacity(disks.len());
    for (name, disk) in disks {
        let BlockStore::File(store) = &disk.store else {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(format!("disk {name} is not staged in a file"));
        };
        let copy = match store.copy_point(&partial.join(format!("{name}.img")), policy) {
            Ok(copy) => copy,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&partial);
                return Err(match err {
                    StoreError::NoReflink { .. } => format!(
                        "disk {name}: {err}; recovery points on this file system need `run --recovery-points copy` (a full copy of every image per point), or stage on XFS or btrfs"
                    ),
                    err => format!("disk {name}: {}", blockferry_util::error_chain(&err)),
                });
            }
        };
        records.push(SnapshotRecord {
            disk: name.clone(),
            size: store.size(),
            snapshot_id: String::new(),
            parent: None,
            changed_blocks: 0,
            image: Some(dir.join(epoch.to_string()).join(format!("{name}.img"))),
            copy: Some(copy.kind.name().to_owned()),
        });
    }
    let done = dir.join(epoch.to_string());
    let _ = std::fs::remove_dir_all(&done);
    std::fs::rename(&partial, &done)
        .and_then(|()| std::fs::File::open(dir)?.sync_all())
        .map_err(|e| format!("renaming {} into place: {e}", partial.display()))?;
    Ok(records)
}

/// Removes what a crash left in a server's points directory: half-made points, and
/// points made but never recorded.
fn tidy(images_dir: &Path, server_id: &str, recorded: &[RecoveryPointRecord]) {
    let Ok(entries) = std::fs::read_dir(points_dir(images_dir, server_id)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let keep = name
            .parse::<u64>()
            .is_ok_and(|epoch| recorded.iter().any(|p| p.epoch == epoch));
        if !keep {
            tracing::info!(server = %server_id, point = %name, "removing a recovery point that was never recorded");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
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
    use super::*;

    fn ebs_point(epoch: u64, snapshot: &str) -> RecoveryPointRecord {
        RecoveryPointRecord {
            epoch,
            cut_at_ms: epoch,
            completed_at_ms: epoch,
            disks: vec![SnapshotRecord {
                disk: "d0".into(),
                size: 1 << 30,
                snapshot_id: snapshot.into(),
                parent: None,
                changed_blocks: 1,
                image: None,
                copy: None,
            }],
        }
    }

    /// `points delete` of an EBS point queues its snapshots for deletion, but never the
    /// newest point's: the next point is uploaded as children of them.
    #[test]
    fn the_newest_ebs_point_is_not_deleted_and_an_older_one_is_queued() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();
        catalog
            .record_recovery_point("s", &ebs_point(1, "snap-1"))
            .unwrap();
        catalog
            .record_recovery_point("s", &ebs_point(2, "snap-2"))
            .unwrap();
        let why = delete_point(&catalog, "s", 2).unwrap_err();
        assert!(why.contains("newest"), "{why}");
        assert_eq!(catalog.recovery_points("s").unwrap().len(), 2);
        assert!(catalog.retired_snapshots().unwrap().is_empty());
        let gone = delete_point(&catalog, "s", 1).unwrap().unwrap();
        assert_eq!(gone.epoch, 1);
        assert_eq!(
            catalog.retired_snapshots().unwrap(),
            vec![("snap-1".to_owned(), "s".to_owned())]
        );
        assert!(delete_point(&catalog, "s", 1).unwrap().is_none());
    }

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

    #[test]
    fn a_broken_sessions_leftovers_hold_points_back_until_written_again() {
        let leftovers = Leftovers::default();
        // A server this process has not seen: the previous one may have left bytes.
        assert!(!leftovers.clean("srv"));
        leftovers.written("srv", "d0", 0, 1 << 30);
        assert!(!leftovers.clean("srv"));
        leftovers.left_over("srv", [("d0".to_owned(), 0, 100)].into_iter());
        assert!(!leftovers.clean("srv"), "unknown stays unknown");
        // The agent says everything is durable: nothing is left over.
        leftovers.all_durable("srv");
        assert!(leftovers.clean("srv"));
        // A session breaks with two writes applied but not durable.
        leftovers.left_over(
            "srv",
            [("d0".to_owned(), 4096, 8192), ("d1".to_owned(), 0, 512)].into_iter(),
        );
        assert!(!leftovers.clean("srv"));
        leftovers.written("srv", "d0", 0, 6000);
        leftovers.written("srv", "d1", 0, 512);
        assert!(
            !leftovers.clean("srv"),
            "d0 4096..6000 was written again, 6000..8192 not yet"
        );
        leftovers.written("srv", "d0", 6000, 8192);
        assert!(leftovers.clean("srv"));
        assert!(!leftovers.clean("other"));
    }

    #[test]
    fn what_a_crash_left_among_the_points_is_removed_and_recorded_points_stay() {
        let dir = tempfile::tempdir().unwrap();
        let points = points_dir(dir.path(), "srv");
        for name in ["7", "9", "12.partial", "13"] {
            std::fs::create_dir_all(points.join(name)).unwrap();
        }
        let recorded = |epoch| RecoveryPointRecord {
            epoch,
            cut_at_ms: 0,
            completed_at_ms: 0,
            disks: Vec::new(),
        };
        tidy(dir.path(), "srv", &[recorded(7), recorded(9)]);
        let mut left: Vec<String> = std::fs::read_dir(&points)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["7", "9"]);
    }
}
