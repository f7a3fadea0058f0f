//! The EBS backend: each disk is staged into a local base copy (durable before any ack,
//! exactly as on the file backend) and turned into a chain of EBS snapshots, one per
//! recovery point.
//!
//! When a point is cut is [`crate::points`]'s to decide. At that instant every disk's
//! chain freezes its dirty blocks ([`freeze`]); the snapshots upload in the background
//! while replication goes on (the chains preserve the frozen bytes a new write would
//! overwrite), and the point is recorded in the catalog once every disk's snapshot is
//! complete ([`upload_point`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blockferry_storage::ebs::aws::{AwsEbs, AwsSettings};
use blockferry_storage::ebs::chain::{ChainSettings, Cut, SnapshotChain, SnapshotLabel};
use blockferry_storage::ebs::fake::FakeEbs;
use blockferry_storage::ebs::{AnyEbs, RetryPolicy};
use blockferry_storage::{BlockStore, FileStore};

use crate::apply::{ApplyPipeline, StagingDisk};
use crate::catalog::{Catalog, RecoveryPointRecord, SnapshotRecord, now_ms};

use crate::lock;

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
    /// (server, disk) → chain, shared by the disk's sessions in this process.
    chains: std::sync::Mutex<HashMap<(String, String), Arc<SnapshotChain>>>,
}

impl EbsStaging {
    pub(crate) fn client(&self) -> &Arc<AnyEbs> {
        &self.client
    }

    pub(crate) async fn connect(config: &EbsBackendConfig) -> Self {
        let client = match &config.connection {
            EbsConnection::Aws(settings) => AnyEbs::Aws(AwsEbs::connect(settings).await),
            EbsConnection::InMemory(fake) => AnyEbs::Fake(Arc::clone(fake)),
        };
        Self {
            client: Arc::new(client),
            settings: config.chain.clone(),
            chains: std::sync::Mutex::default(),
        }
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

/// What [`freeze`] did.
#[derive(Debug)]
pub(crate) enum Frozen {
    /// A write came after `through`, an upload still runs, or no disk is on EBS.
    NotNow,
    /// Nothing changed since the latest point, which stands for this one too.
    Unchanged,
    /// Each disk's cut, to upload.
    Cuts(Vec<(Arc<StagingDisk>, Cut)>),
}

/// Freezes every EBS disk's chain at the instant the pipeline is quiescent through
/// `through`.
pub(crate) fn freeze(pipeline: &ApplyPipeline, through: u64) -> Frozen {
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
        return Frozen::NotNow;
    }
    let cut_all = || {
        disks
            .iter()
            .filter_map(|(disk, chain)| Some((Arc::clone(disk), chain.cut()?)))
            .collect::<Vec<_>>()
    };
    match pipeline.if_quiescent(through, cut_all) {
        None => Frozen::NotNow,
        Some(cuts) if cuts.iter().all(|(_, c)| matches!(c, Cut::Unchanged(_))) => Frozen::Unchanged,
        Some(cuts) => Frozen::Cuts(cuts),
    }
}

/// Uploads the snapshots of one cut, disk after disk, and records the point once all are
/// complete. A failed disk's blocks go back into its dirty set; the point is not recorded
/// and the next cut carries its changes.
pub(crate) async fn upload_point(
    ebs: &EbsStaging,
    catalog: &Arc<Catalog>,
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
                image: None,
                copy: None,
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
                        image: None,
                        copy: None,
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
    let catalog = Arc::clone(catalog);
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
