//! `points` and `launch`: a server's recovery points, and launches of them.

use super::*;

/// The flags of `launch`.
#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The source server id (as in `status`).
    #[arg(long)]
    pub server: String,
    /// The point's epoch (as `points list` shows); the newest point by default.
    #[arg(long)]
    pub recovery_point: Option<u64>,
    /// test: the source keeps replicating. cutover: the source's replication ends
    /// for good first (its agent is told to stop and refused from then on).
    #[arg(long, value_enum)]
    pub mode: crate::catalog::LaunchMode,
    /// Directory for DISK.img per disk, boot/, launch.json and console.log; created
    /// if missing, and refused if it holds a DISK.img already.
    #[arg(long)]
    pub out: PathBuf,
    /// raw: DISK.img, a reflink of the point where the file system allows. qcow2:
    /// DISK.qcow2, converted from the prepared raw copy.
    #[arg(long, value_enum, default_value_t = crate::catalog::ImageFormat::Raw)]
    pub format: crate::catalog::ImageFormat,
    /// Boot the launched disks here under qemu (KVM, else TCG with a warning) and
    /// check their health; exit status 1 when the check fails.
    #[arg(long)]
    pub boot: bool,
    /// With --boot: a TCP port in the guest that must answer (through a loopback
    /// port forward); without it the check is a login prompt on the serial console.
    #[arg(long, requires = "boot")]
    pub health_port: Option<u16>,
    /// With --boot: how long the guest has to pass the health check.
    #[arg(long, default_value_t = 300, requires = "boot")]
    pub boot_timeout_secs: u64,
    /// Also make the launch in EC2: `volumes` (one EBS volume per disk) or `ami` (a
    /// machine image, root disk first). The prepared copies are written into new
    /// snapshots first: an EBS point's as children of its snapshots holding only what
    /// preparing changed, a file point's whole.
    #[arg(long, value_enum)]
    pub ec2: Option<crate::launch::Ec2Kind>,
    /// With --ec2 volumes: the availability zone of the volumes (that of the instance
    /// they are for).
    #[arg(long, requires = "ec2", required_if_eq("ec2", "volumes"))]
    pub availability_zone: Option<String>,
    /// With --ec2: the EBS volume type of the volumes or the image's devices.
    #[arg(long, default_value = "gp3", requires = "ec2")]
    pub volume_type: String,
    /// With --ec2 ami: the image's architecture.
    #[arg(long, default_value = "x86_64", value_parser = ["x86_64", "arm64"])]
    pub architecture: String,
    /// With --ec2 ami: uefi, legacy-bios or uefi-preferred (the source's firmware);
    /// the instance type's default when absent.
    #[arg(long, value_parser = ["uefi", "legacy-bios", "uefi-preferred"], requires = "ec2")]
    pub boot_mode: Option<String>,
    /// With --ec2 ami: the image's name (unique in the region);
    /// blockferry-SERVER-rpEPOCH-MILLIS by default.
    #[arg(long, requires = "ec2")]
    pub image_name: Option<String>,
    /// With --ec2: how long each snapshot, volume or image may take to be ready.
    #[arg(long, default_value_t = 600, requires = "ec2")]
    pub ec2_wait_secs: u64,
    /// For a point of the EBS backend (its snapshots are downloaded), and for --ec2.
    #[command(flatten)]
    pub aws: AwsArgs,
}

pub(super) async fn launch(args: LaunchArgs) -> anyhow::Result<ExitCode> {
    let LaunchArgs {
        data_dir,
        server,
        recovery_point,
        mode,
        out,
        format,
        boot,
        health_port,
        boot_timeout_secs,
        ec2,
        availability_zone,
        volume_type,
        architecture,
        boot_mode,
        image_name,
        ec2_wait_secs,
        aws,
    } = args;
    let ec2 = ec2.map(|kind| crate::launch::Ec2Options {
        kind,
        availability_zone,
        volume_type,
        architecture,
        boot_mode,
        image_name,
        wait: std::time::Duration::from_secs(ec2_wait_secs),
    });
    let options = crate::launch::LaunchOptions {
        data_dir,
        server,
        epoch: recovery_point,
        mode,
        out,
        format,
        boot: boot.then(|| crate::launch::BootOptions {
            health_port,
            timeout: std::time::Duration::from_secs(boot_timeout_secs),
        }),
        aws: aws.settings(),
        ec2,
    };
    let record = crate::launch::launch(&options).await?;
    println!(
        "launch {} of server {} ({}): recovery point {} into {}",
        record.number,
        record.server_id,
        record.mode,
        record.epoch,
        record.out.display()
    );
    for disk in &record.disks {
        println!(
            "  {}: {} ({}, {})",
            disk.disk,
            disk.image.display(),
            disk.format.name(),
            disk.copy
        );
        if let Some(snapshot) = &disk.snapshot_id {
            println!(
                "    in EC2: snapshot {snapshot}{}{}",
                disk.volume_id
                    .as_deref()
                    .map(|v| format!(", volume {v}"))
                    .unwrap_or_default(),
                disk.device
                    .as_deref()
                    .map(|d| format!(", device {d}"))
                    .unwrap_or_default()
            );
        }
    }
    if let Some(image) = &record.image_id {
        println!("  in EC2: machine image {image}");
    }
    for change in &record.prepared {
        println!("  prepared: {change}");
    }
    match &record.boot {
        Some(boot) if boot.healthy => {
            println!(
                "  boot ({}): healthy after {} s: {}",
                boot.accelerator, boot.seconds, boot.detail
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(boot) => {
            eprintln!(
                "  boot ({}): NOT healthy after {} s: {} (console: {})",
                boot.accelerator,
                boot.seconds,
                boot.detail,
                record.out.join("console.log").display()
            );
            Ok(ExitCode::FAILURE)
        }
        None => Ok(ExitCode::SUCCESS),
    }
}

#[derive(Debug, Subcommand)]
pub enum PointsCommand {
    /// Every recovery point, oldest first, of every server or of one.
    List {
        #[arg(long)]
        data_dir: PathBuf,
        /// Only this source server (as in `status`).
        #[arg(long)]
        server: Option<String>,
        /// Print JSON (as `status --json`'s `recovery_points`).
        #[arg(long)]
        json: bool,
    },
    /// One recovery point: when it was cut and where each disk's copy is.
    Show {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        server: String,
        /// The point's epoch (as `points list` shows).
        #[arg(long)]
        epoch: u64,
        #[arg(long)]
        json: bool,
    },
    /// Delete a recovery point of the file backend (its images and its record); EBS
    /// points are kept.
    Delete {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        server: String,
        #[arg(long)]
        epoch: u64,
    },
}

pub(super) async fn points_command(command: PointsCommand) -> anyhow::Result<ExitCode> {
    use crate::catalog::RecoveryPointRecord;
    let ago = |ms: u64| crate::catalog::now_ms().saturating_sub(ms) / 1000;
    let describe = |point: &RecoveryPointRecord| {
        point
            .disks
            .iter()
            .map(|d| match &d.copy {
                Some(copy) => format!("{}={} ({copy})", d.disk, d.location()),
                None => format!("{}={}", d.disk, d.location()),
            })
            .collect::<Vec<_>>()
            .join("  ")
    };
    match command {
        PointsCommand::List {
            data_dir,
            server,
            json,
        } => {
            let report = status(&data_dir).await?;
            let servers: Vec<_> = report
                .servers
                .iter()
                .filter(|s| server.as_deref().is_none_or(|id| s.server_id == id))
                .collect();
            if let (Some(id), true) = (&server, servers.is_empty()) {
                bail!("no source server {id} in the catalog (see `blockferry-receiver status`)");
            }
            if json {
                let points: std::collections::BTreeMap<&str, &Vec<RecoveryPointRecord>> = servers
                    .iter()
                    .map(|s| (s.server_id.as_str(), &s.recovery_points))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&points)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<24} {:>8} {:>10}  DISKS",
                "SERVER", "EPOCH", "CUT (s ago)"
            );
            for s in servers {
                for point in &s.recovery_points {
                    println!(
                        "{:<24} {:>8} {:>10}  {}",
                        s.server_id,
                        point.epoch,
                        ago(point.cut_at_ms),
                        describe(point)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PointsCommand::Show {
            data_dir,
            server,
            epoch,
            json,
        } => {
            let report = status(&data_dir).await?;
            let point = report
                .servers
                .iter()
                .find(|s| s.server_id == server)
                .with_context(|| format!("no source server {server} in the catalog"))?
                .recovery_points
                .iter()
                .find(|p| p.epoch == epoch)
                .with_context(|| {
                    format!("server {server} has no recovery point {epoch}; `points list` shows its points")
                })?;
            if json {
                println!("{}", serde_json::to_string_pretty(point)?);
            } else {
                println!(
                    "server {server}, recovery point {epoch}: cut {}s ago, complete {}s ago",
                    ago(point.cut_at_ms),
                    ago(point.completed_at_ms)
                );
                for disk in &point.disks {
                    println!(
                        "  {}  {} bytes  {}{}",
                        disk.disk,
                        disk.size,
                        disk.location(),
                        disk.copy
                            .as_ref()
                            .map(|c| format!(" ({c})"))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        PointsCommand::Delete {
            data_dir,
            server,
            epoch,
        } => {
            crate::pki::validate_name("server id", &server)?;
            let request = AdminRequest::DeletePoint {
                server_id: server.clone(),
                epoch,
            };
            let answer = admin_or_catalog(&data_dir, request, |catalog| {
                crate::points::delete_point(catalog, &server, epoch)
                    .map(AdminResponse::PointDeleted)
                    .map_err(std::io::Error::other)
            })
            .await?;
            match answer {
                AdminResponse::PointDeleted(Some(_)) => {
                    println!("deleted recovery point {epoch} of server {server}");
                    Ok(ExitCode::SUCCESS)
                }
                AdminResponse::PointDeleted(None) => bail!(
                    "server {server} has no recovery point {epoch}; `points list` shows its points"
                ),
                other => bail!("unexpected answer from the running receiver: {other:?}"),
            }
        }
    }
}
