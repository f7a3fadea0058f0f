//! `launch`: a recovery point made into disks that can be started, either to test it
//! (the source keeps replicating) or to cut over to it (the source's replication ends for
//! good and its agent is told to stop).
//!
//! The point's images are copied (reflinked where the file system allows) into the
//! output directory, or an EBS point's snapshots downloaded there, never used in place,
//! so the point stays as it was; inside the
//! copies the agent is switched off ([`prepare`]); `--boot` starts them here under qemu
//! and checks their health ([`boot`]). Every launch is recorded in the catalog and in
//! `OUT/launch.json`.

mod boot;
mod ec2;
mod prepare;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use blockferry_storage::{CopyPolicy, Engine, FileStore, IoEngine};

pub use boot::BootOptions;
pub use ec2::{Ec2Kind, Ec2Options};

use crate::catalog::{
    ImageFormat, LaunchMode, LaunchRecord, LaunchedDisk, RecoveryPointRecord, now_ms,
};
use crate::status::StatusReport;

/// What to launch, where, and whether to boot it.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    pub data_dir: PathBuf,
    pub server: String,
    /// The point's epoch; the newest point when absent.
    pub epoch: Option<u64>,
    pub mode: LaunchMode,
    pub out: PathBuf,
    pub format: ImageFormat,
    pub boot: Option<BootOptions>,
    /// How EBS and EC2 are reached, for a point made of EBS snapshots or `--ec2`.
    pub aws: blockferry_storage::ebs::aws::AwsSettings,
    /// Make the launch into EBS volumes or an AMI too.
    pub ec2: Option<Ec2Options>,
}

/// The point `epoch` (or the newest) of `server`, with an error that says what to do
/// when there is none to launch.
pub(crate) fn pick_point(
    report: &StatusReport,
    server: &str,
    epoch: Option<u64>,
) -> anyhow::Result<RecoveryPointRecord> {
    let Some(status) = report.servers.iter().find(|s| s.server_id == server) else {
        bail!("no source server {server} in the catalog (see `blockferry-receiver status`)");
    };
    let point = match epoch {
        Some(epoch) => status.recovery_points.iter().find(|p| p.epoch == epoch),
        None => status.recovery_points.last(),
    };
    let Some(point) = point else {
        match epoch {
            Some(epoch) => bail!(
                "server {server} has no recovery point {epoch} (deleted, dropped by retention, or never cut); `points list --server {server}` shows the points there are"
            ),
            None => bail!(
                "server {server} has no recovery point to launch yet: points are cut every --recovery-interval-secs once its disks are in sync (see `status`)"
            ),
        }
    };
    let on_ebs = point.disks.iter().filter(|d| d.image.is_none()).count();
    if on_ebs != 0 && on_ebs != point.disks.len() {
        bail!(
            "recovery point {} of server {server} mixes EBS snapshots and image files; launch cannot make one launch of it",
            point.epoch
        );
    }
    Ok(point.clone())
}

/// Launches a point; the record says what was made and, with `--boot`, whether it booted.
pub async fn launch(options: &LaunchOptions) -> anyhow::Result<LaunchRecord> {
    let server = options.server.as_str();
    crate::pki::validate_name("server id", server)?;
    let started_at_ms = now_ms();
    let report = crate::cli::status(&options.data_dir).await?;
    let point = pick_point(&report, server, options.epoch)?;
    // Everything that can refuse the launch is checked, and the copies made and prepared,
    // before a cutover, which cannot be undone.
    if blockferry_util::durable::euid() != 0 {
        return Err(prepare::PrepareError::NotRoot.into());
    }
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("creating the launch directory {}", options.out.display()))?;
    for disk in &point.disks {
        for name in [format!("{}.img", disk.disk), format!("{}.qcow2", disk.disk)] {
            let taken = options.out.join(name);
            if taken.exists() {
                bail!(
                    "{} exists (an earlier launch?): choose another --out; nothing was launched",
                    taken.display()
                );
            }
        }
    }
    if let Some(ec2) = &options.ec2
        && ec2.kind == Ec2Kind::Volumes
        && ec2.availability_zone.is_none()
    {
        bail!(
            "--ec2 volumes needs --availability-zone (the zone of the instance the volumes are for); nothing was launched"
        );
    }
    let on_ebs = point.disks.iter().all(|d| d.image.is_none());
    let copied = if on_ebs {
        download(options, &point).await?
    } else {
        copy_files(options, &point).await?
    };
    // Into EC2, an EBS point's copies go up as children of its snapshots holding what
    // preparing changes: these digests say what that is.
    let parents = if options.ec2.is_some() && on_ebs {
        let images: Vec<PathBuf> = copied.iter().map(|d| d.image.clone()).collect();
        let digests = tokio::task::spawn_blocking(move || {
            images
                .iter()
                .map(|image| blockferry_storage::ebs::image::block_digests(image).map(Some))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
        match digests {
            Ok(digests) => digests,
            Err(err) => {
                remove_copies(&copied);
                return Err(anyhow::Error::new(err).context("reading the downloaded copies"));
            }
        }
    } else {
        vec![None; copied.len()]
    };
    finish(options, point, copied, parents, started_at_ms).await
}

fn remove_copies(disks: &[LaunchedDisk]) {
    for disk in disks {
        let _ = std::fs::remove_file(&disk.image);
    }
}

/// An EBS point: every disk's snapshot downloaded into `OUT/DISK.img`, each block's
/// checksum verified; the snapshots stay as they are.
async fn download(
    options: &LaunchOptions,
    point: &RecoveryPointRecord,
) -> anyhow::Result<Vec<LaunchedDisk>> {
    let server = options.server.as_str();
    let client = crate::snapshots::aws_client(&options.aws).await;
    let mut disks: Vec<LaunchedDisk> = Vec::new();
    for disk in &point.disks {
        let image = options.out.join(format!("{}.img", disk.disk));
        let restored = blockferry_storage::ebs::restore::restore(
            std::sync::Arc::clone(&client),
            &disk.snapshot_id,
            disk.size,
            &image,
            blockferry_storage::ebs::RetryPolicy::default(),
        )
        .await;
        if let Err(err) = restored {
            let _ = std::fs::remove_file(&image);
            for made in &disks {
                let _ = std::fs::remove_file(&made.image);
            }
            return Err(anyhow::Error::new(err).context(format!(
                "downloading disk {} of recovery point {} of server {server} from snapshot {}; nothing was launched",
                disk.disk, point.epoch, disk.snapshot_id
            )));
        }
        disks.push(LaunchedDisk {
            disk: disk.disk.clone(),
            image,
            copy: "download".to_owned(),
            format: ImageFormat::Raw,
            snapshot_id: None,
            volume_id: None,
            device: None,
        });
    }
    Ok(disks)
}

/// A file point: every disk's image copied into `OUT/DISK.img`.
async fn copy_files(
    options: &LaunchOptions,
    point: &RecoveryPointRecord,
) -> anyhow::Result<Vec<LaunchedDisk>> {
    let server = options.server.as_str();
    let engine = Engine::start(IoEngine::Sync, 1).context("starting the I/O engine")?;
    let mut stores = Vec::new();
    for disk in &point.disks {
        let Some(image) = disk.image.clone() else {
            bail!(
                "disk {} of recovery point {} of server {server} has no image",
                disk.disk,
                point.epoch
            );
        };
        let file = FileStore::open_file(&image).map_err(|e| {
            anyhow::anyhow!(
                "recovery point {} of server {server} cannot be read (deleted meanwhile?): {e}",
                point.epoch
            )
        })?;
        let store = FileStore::from_file(file, &image, disk.size, engine.clone())?;
        stores.push((disk.disk.clone(), store));
    }
    // Opened files outlive a deletion: the point is launched whole if it was still listed
    // once all of them were open.
    let listed = crate::cli::status(&options.data_dir).await?;
    if pick_point(&listed, server, Some(point.epoch)).is_err() {
        bail!(
            "recovery point {} of server {server} was deleted while the launch opened it; launch another (`points list`)",
            point.epoch
        );
    }
    let out = options.out.clone();
    let copied = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<LaunchedDisk>> {
        let mut disks: Vec<LaunchedDisk> = Vec::new();
        for (disk, store) in &stores {
            let image = out.join(format!("{disk}.img"));
            let copy = match store.copy_point(&image, CopyPolicy::ReflinkOrFull) {
                Ok(copy) => copy,
                Err(err) => {
                    // Unprepared copies must not be left to boot (see below).
                    for made in &disks {
                        let _ = std::fs::remove_file(&made.image);
                    }
                    return Err(anyhow::Error::new(err).context(format!(
                        "copying disk {disk} into {}; nothing was launched",
                        image.display()
                    )));
                }
            };
            disks.push(LaunchedDisk {
                disk: disk.clone(),
                image,
                copy: copy.kind.name().to_owned(),
                format: ImageFormat::Raw,
                snapshot_id: None,
                volume_id: None,
                device: None,
            });
        }
        Ok(disks)
    })
    .await??;
    Ok(copied)
}

/// Prepares the copies, converts them, cuts over, boots and records.
async fn finish(
    options: &LaunchOptions,
    point: RecoveryPointRecord,
    copied: Vec<LaunchedDisk>,
    parents: Vec<Option<Vec<[u8; 32]>>>,
    started_at_ms: u64,
) -> anyhow::Result<LaunchRecord> {
    let server = options.server.as_str();
    let images: Vec<(String, PathBuf)> = copied
        .iter()
        .map(|d| (d.disk.clone(), d.image.clone()))
        .collect();
    let out = options.out.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare::prepare(&images, &out)).await?;
    let prepared = match prepared {
        Ok(prepared) => prepared,
        Err(err) => {
            // A copy whose agent is still on would replicate back over its source with
            // the source's own certificate: it must not be left to boot.
            remove_copies(&copied);
            return Err(anyhow::Error::new(err).context(format!(
                "preparing recovery point {} of server {server}; the copies were deleted",
                point.epoch
            )));
        }
    };
    if options.boot.is_some() && prepared.boot.is_none() {
        bail!(
            "the launched root file system of server {server} has no kernel in /boot (vmlinuz-*): it cannot be booted here; the prepared images are in {} (launch again without --boot, into another --out, to record a launch)",
            options.out.display()
        );
    }
    let mut copied = copied;
    // Before the conversion (it reads the raw copies), the boot (it writes to them) and
    // the cutover (a launch that failed leaves the source replicating).
    let mut image_id = None;
    if let Some(ec2) = &options.ec2 {
        let root_disk = prepared
            .root_disk
            .clone()
            .context("prepare found the root file system")?;
        let made = ec2::into_ec2(
            options,
            ec2,
            &point,
            &mut copied,
            parents,
            &root_disk,
            started_at_ms,
        )
        .await?;
        image_id = made.image_id;
    }
    if options.format == ImageFormat::Qcow2 {
        let raw = copied.clone();
        copied = tokio::task::spawn_blocking(move || to_qcow2(raw)).await??;
    }
    if options.mode == LaunchMode::Cutover {
        // After the copies: a launch that failed leaves the source replicating. The point
        // is the newest the operator saw; stop the source's applications and wait for a
        // point after their last write before a cutover.
        let ended = cut_over(&options.data_dir, server).await?;
        println!(
            "server {server} cut over: its replication is over; {}",
            if ended {
                "its connected agent was told to stop"
            } else {
                "its agent is told to stop when it next connects"
            }
        );
    }
    let mut record = LaunchRecord {
        number: 0,
        server_id: server.to_owned(),
        mode: options.mode,
        epoch: point.epoch,
        out: options.out.clone(),
        started_at_ms,
        finished_at_ms: 0,
        disks: copied,
        prepared: prepared.changes,
        boot: None,
        image_id,
    };
    if let Some(boot_options) = &options.boot {
        let Some(files) = prepared.boot else {
            bail!("checked above: the launched root has a kernel");
        };
        let disks: Vec<(PathBuf, ImageFormat)> = record
            .disks
            .iter()
            .map(|d| (d.image.clone(), d.format))
            .collect();
        let out = options.out.clone();
        let boot_options = boot_options.clone();
        record.boot = Some(
            tokio::task::spawn_blocking(move || boot::boot(&files, &disks, &out, &boot_options))
                .await??,
        );
    }
    record.finished_at_ms = now_ms();
    record.number = record_launch(&options.data_dir, &record).await?;
    let json = serde_json::to_vec_pretty(&record)?;
    let path = options.out.join("launch.json");
    blockferry_util::durable::write_atomic(&path, &json, 0o644)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(record)
}

/// Converts the prepared raw copies to qcow2 (durable before the raw ones go).
fn to_qcow2(disks: Vec<LaunchedDisk>) -> anyhow::Result<Vec<LaunchedDisk>> {
    let mut converted = Vec::with_capacity(disks.len());
    for disk in disks {
        let qcow2 = disk.image.with_extension("qcow2");
        let out = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&disk.image)
            .arg(&qcow2)
            .output()
            .context("running qemu-img (the appliance installs qemu-utils)")?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&qcow2);
            bail!(
                "converting disk {} to qcow2: {}",
                disk.disk,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::fs::File::open(&qcow2)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", qcow2.display()))?;
        std::fs::remove_file(&disk.image)
            .with_context(|| format!("removing {}", disk.image.display()))?;
        converted.push(LaunchedDisk {
            image: qcow2,
            format: ImageFormat::Qcow2,
            ..disk
        });
    }
    Ok(converted)
}

/// Through the running receiver (which ends the live session), or in the catalog.
/// Whether a live session was ended.
async fn cut_over(data_dir: &Path, server: &str) -> anyhow::Result<bool> {
    use crate::admin::{AdminRequest, AdminResponse};
    let request = AdminRequest::CutOver {
        server_id: server.to_owned(),
    };
    let answer = crate::cli::admin_or_catalog(data_dir, request, |catalog| {
        catalog.cut_over(server).map(|c| AdminResponse::CutOver {
            at_ms: c.at_ms,
            session_ended: false,
        })
    })
    .await?;
    match answer {
        AdminResponse::CutOver { session_ended, .. } => Ok(session_ended),
        other => bail!("unexpected answer from the running receiver: {other:?}"),
    }
}

async fn record_launch(data_dir: &Path, record: &LaunchRecord) -> anyhow::Result<u64> {
    use crate::admin::{AdminRequest, AdminResponse};
    let request = AdminRequest::RecordLaunch {
        record: record.clone(),
    };
    let answer = crate::cli::admin_or_catalog(data_dir, request, |catalog| {
        catalog.record_launch(record).map(AdminResponse::Launched)
    })
    .await?;
    match answer {
        AdminResponse::Launched(number) => Ok(number),
        other => bail!("unexpected answer from the running receiver: {other:?}"),
    }
}

/// Every launch recorded, of one server or all.
pub async fn launches(data_dir: &Path, server: Option<&str>) -> anyhow::Result<Vec<LaunchRecord>> {
    use crate::admin::{AdminRequest, AdminResponse};
    let request = AdminRequest::ListLaunches {
        server_id: server.map(str::to_owned),
    };
    let answer = crate::cli::admin_or_catalog(data_dir, request, |catalog| {
        catalog.launches(server).map(AdminResponse::Launches)
    })
    .await?;
    match answer {
        AdminResponse::Launches(records) => Ok(records),
        other => bail!("unexpected answer from the running receiver: {other:?}"),
    }
}
