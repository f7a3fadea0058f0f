//! `launch --ec2 volumes|ami`: the prepared copies written into EBS snapshots, then made
//! into EBS volumes (CreateVolume) or a machine image (RegisterImage) in EC2.
//!
//! An EBS point's copy goes up as a child of the point's own snapshot holding only the
//! blocks preparing changed (a few: the agent's unit, its state, the journal replay), so
//! the launch costs what preparing changed, not the disk. A file point's copy goes up
//! whole, zero blocks left out. The point's snapshots are never changed; the launch's
//! are new, tagged with the server, disk, point and launch mode. What fails half-way is
//! deleted again (volumes, then snapshots), so a failed launch leaves nothing billed.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use blockferry_storage::ebs::EbsClient;
use blockferry_storage::ebs::StartSnapshot;
use blockferry_storage::ebs::aws::AwsEbs;
use blockferry_storage::ebs::ec2::{CreateVolume, Ec2Images, RegisterImage, wait_for_state};
use blockferry_storage::ebs::image::upload_image;
use blockferry_storage::ebs::upload::UploadConfig;
use serde::{Deserialize, Serialize};

use crate::catalog::{LaunchMode, LaunchedDisk, RecoveryPointRecord};

/// What a launch makes in EC2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Ec2Kind {
    /// One EBS volume per disk, in `--availability-zone`, to attach to an instance.
    Volumes,
    /// A machine image (AMI) whose root device is the disk with the root file system
    /// and whose other devices are the other disks: launch instances from it.
    Ami,
}

/// `launch --ec2 …` and its settings.
#[derive(Debug, Clone)]
pub struct Ec2Options {
    pub kind: Ec2Kind,
    /// Required for volumes.
    pub availability_zone: Option<String>,
    pub volume_type: String,
    /// For an AMI: `x86_64` or `arm64`.
    pub architecture: String,
    /// For an AMI: `uefi`, `legacy-bios`, `uefi-preferred`; the instance type's default
    /// when absent.
    pub boot_mode: Option<String>,
    /// For an AMI; `blockferry-SERVER-rpEPOCH-MILLIS` by default.
    pub image_name: Option<String>,
    /// How long each snapshot, volume or image may take to become usable.
    pub wait: Duration,
}

/// What the launch made in EC2, for the record.
#[derive(Debug, Clone, Default)]
pub(crate) struct Made {
    pub image_id: Option<String>,
}

/// Everything made so far, deleted again when a later step fails.
#[derive(Default)]
struct Undo {
    snapshots: Vec<String>,
    volumes: Vec<String>,
}

impl Undo {
    async fn run(self, client: &AwsEbs) -> Vec<String> {
        let mut left = Vec::new();
        for volume in self.volumes {
            if let Err(err) = client.delete_volume(&volume).await {
                left.push(format!("volume {volume} ({err})"));
            }
        }
        for snapshot in self.snapshots {
            if let Err(err) = client.delete_snapshot(&snapshot).await {
                left.push(format!("snapshot {snapshot} ({err})"));
            }
        }
        left
    }
}

/// Device names of an AMI's disks, root first (Xen and Nitro both take `/dev/xvdX`).
fn device_name(position: usize) -> String {
    let letter = char::from(b'a' + u8::try_from(position % 26).expect("below 26"));
    format!("/dev/xvd{letter}")
}

/// Writes each prepared copy in `disks` into a snapshot, then makes volumes or an AMI;
/// `parents[i]` is the digests of disk i's copy before preparing (an EBS point), absent
/// for a file point. Fills in each disk's snapshot, volume and device.
pub(crate) async fn into_ec2(
    options: &super::LaunchOptions,
    ec2: &Ec2Options,
    point: &RecoveryPointRecord,
    disks: &mut [LaunchedDisk],
    parents: Vec<Option<Vec<[u8; 32]>>>,
    root_disk: &str,
    started_at_ms: u64,
) -> anyhow::Result<Made> {
    let client = Arc::new(AwsEbs::connect(&options.aws).await);
    let mut undo = Undo::default();
    match make(
        &client,
        options,
        ec2,
        point,
        disks,
        parents,
        root_disk,
        started_at_ms,
        &mut undo,
    )
    .await
    {
        Ok(made) => Ok(made),
        Err(err) => {
            let left = std::mem::take(&mut undo).run(&client).await;
            let cleanup = if left.is_empty() {
                "what it made in EC2 was deleted again".to_owned()
            } else {
                format!("delete these by hand: {}", left.join(", "))
            };
            for disk in disks.iter_mut() {
                disk.snapshot_id = None;
                disk.volume_id = None;
                disk.device = None;
            }
            Err(err.context(format!(
                "launching recovery point {} of server {} into EC2 failed; the prepared images stay in {}; {cleanup}",
                point.epoch,
                options.server,
                options.out.display()
            )))
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn make(
    client: &Arc<AwsEbs>,
    options: &super::LaunchOptions,
    ec2: &Ec2Options,
    point: &RecoveryPointRecord,
    disks: &mut [LaunchedDisk],
    parents: Vec<Option<Vec<[u8; 32]>>>,
    root_disk: &str,
    started_at_ms: u64,
    undo: &mut Undo,
) -> anyhow::Result<Made> {
    let server = options.server.as_str();
    let mode = match options.mode {
        LaunchMode::Test => "test",
        LaunchMode::Cutover => "cutover",
    };
    let tags = |disk: &str| {
        vec![
            ("blockferry:server".to_owned(), server.to_owned()),
            ("blockferry:disk".to_owned(), disk.to_owned()),
            (
                "blockferry:recovery-point".to_owned(),
                point.epoch.to_string(),
            ),
            ("blockferry:launch".to_owned(), mode.to_owned()),
        ]
    };
    for (disk, parent_digests) in disks.iter_mut().zip(parents) {
        let source = point
            .disks
            .iter()
            .find(|d| d.disk == disk.disk)
            .with_context(|| format!("disk {} is not in the point", disk.disk))?;
        let parent = parent_digests.is_some().then(|| source.snapshot_id.clone());
        let request = StartSnapshot {
            volume_size_gib: source.size.div_ceil(1 << 30).max(1),
            parent,
            description: format!(
                "blockferry launch ({mode}) of {server} disk {} recovery point {}",
                disk.disk, point.epoch
            ),
            tags: tags(&disk.disk),
            kms_key_arn: None,
            timeout_minutes: 60,
            client_token: uuid::Uuid::new_v4().to_string(),
        };
        let snapshot = upload_image(
            Arc::clone(client),
            &disk.image,
            parent_digests,
            request,
            UploadConfig::default(),
        )
        .await
        .with_context(|| format!("writing disk {} into an EBS snapshot", disk.disk))?;
        undo.snapshots.push(snapshot.id.clone());
        tracing::info!(
            server, disk = %disk.disk, snapshot = %snapshot.id,
            blocks = snapshot.changed_blocks, parent = ?snapshot.parent,
            "launch snapshot completed"
        );
        disk.snapshot_id = Some(snapshot.id);
    }
    for disk in disks.iter() {
        let snapshot = disk.snapshot_id.as_deref().expect("set above");
        wait_for_state(
            &format!("snapshot {snapshot}"),
            "completed",
            ec2.wait,
            || client.snapshot_state(snapshot),
        )
        .await?;
    }
    match ec2.kind {
        Ec2Kind::Volumes => {
            let zone = ec2
                .availability_zone
                .clone()
                .context("--ec2 volumes needs --availability-zone")?;
            for disk in disks.iter_mut() {
                let snapshot = disk.snapshot_id.clone().expect("set above");
                let volume = client
                    .create_volume(CreateVolume {
                        snapshot,
                        availability_zone: zone.clone(),
                        volume_type: ec2.volume_type.clone(),
                        tags: tags(&disk.disk),
                    })
                    .await
                    .with_context(|| format!("creating the volume of disk {}", disk.disk))?;
                undo.volumes.push(volume.clone());
                disk.volume_id = Some(volume);
            }
            for disk in disks.iter() {
                let volume = disk.volume_id.as_deref().expect("set above");
                wait_for_state(&format!("volume {volume}"), "available", ec2.wait, || {
                    client.volume_state(volume)
                })
                .await?;
            }
            Ok(Made::default())
        }
        Ec2Kind::Ami => {
            // The root file system's disk first: it is the boot device.
            let mut order: Vec<usize> = (0..disks.len()).collect();
            order.sort_by_key(|&i| disks[i].disk != root_disk);
            let mut mappings = Vec::new();
            for (position, &i) in order.iter().enumerate() {
                let device = device_name(position);
                mappings.push((
                    device.clone(),
                    disks[i].snapshot_id.clone().expect("set above"),
                ));
                disks[i].device = Some(device);
            }
            let name = ec2.image_name.clone().unwrap_or_else(|| {
                format!("blockferry-{server}-rp{}-{started_at_ms}", point.epoch)
            });
            let image = client
                .register_image(RegisterImage {
                    name: name.clone(),
                    description: format!(
                        "blockferry launch ({mode}) of {server} recovery point {}",
                        point.epoch
                    ),
                    architecture: ec2.architecture.clone(),
                    boot_mode: ec2.boot_mode.clone(),
                    disks: mappings,
                    volume_type: ec2.volume_type.clone(),
                    tags: tags(root_disk),
                })
                .await
                .with_context(|| format!("registering the image {name}"))?;
            Ok(Made {
                image_id: Some(image),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_named_root_first() {
        assert_eq!(device_name(0), "/dev/xvda");
        assert_eq!(device_name(1), "/dev/xvdb");
        assert_eq!(device_name(25), "/dev/xvdz");
    }
}
