//! Operations on replicated servers and their disks: settings, pause and resume,
//! rescans, and the disk commands for images the receiver cannot vouch for.

use super::*;

#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Accept the file now at the disk's image path as its staging image (after a
    /// restore, or a move to another volume); it is rescanned by checksum before it is
    /// trusted.
    Adopt {
        #[arg(long)]
        data_dir: PathBuf,
        /// The source server id (as in `status`).
        #[arg(long)]
        server: String,
        /// The disk's name (as in `status`).
        #[arg(long)]
        disk: String,
    },
    /// Start the disk over: its watermark is forgotten, the image moved aside (kept as
    /// IMAGE.reset-TIME) and the agent syncs the disk in full at its next session.
    Reset {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        server: String,
        #[arg(long)]
        disk: String,
        /// Delete the old image instead of keeping it aside.
        #[arg(long)]
        delete_image: bool,
    },
    /// Remove a disk the server no longer replicates from the catalog (it no longer
    /// counts toward the 50 disks of its server); its image is moved aside (kept as
    /// IMAGE.forgotten-TIME).
    Forget {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        server: String,
        #[arg(long)]
        disk: String,
        /// Delete the image instead of keeping it aside.
        #[arg(long)]
        delete_image: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SettingsCommand {
    /// Set the bandwidth limit of one server (applied at once to a connected agent), or
    /// the template default copied to servers at their first connection.
    Set {
        #[arg(long)]
        data_dir: PathBuf,
        /// The source server id (as in `status`).
        #[arg(long, conflicts_with = "default", required_unless_present = "default")]
        server: Option<String>,
        /// Set the template for servers that connect later instead.
        #[arg(long)]
        default: bool,
        /// The agent's bandwidth limit, all streams together, in megabits per second
        /// (10^6 bit/s); 0 is unlimited.
        #[arg(long, required_unless_present = "retention")]
        bandwidth_mbps: Option<u64>,
        /// Which recovery points are kept: tiers EVERY:FOR, e.g. 10m:1h,1h:24h,1d:7d (the
        /// default): one point per EVERY for the last FOR; the newest is always kept.
        #[arg(long)]
        retention: Option<crate::retention::RetentionPolicy>,
    },
    /// Show the template and every server's settings.
    Show {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn settings(command: SettingsCommand) -> anyhow::Result<ExitCode> {
    match command {
        SettingsCommand::Set {
            data_dir,
            server,
            default: _,
            bandwidth_mbps,
            retention,
        } => {
            if let Some(server) = &server {
                crate::pki::validate_name("server id", server)?;
            }
            let change = SettingsChange {
                bandwidth_mbps,
                paused: None,
                retention: retention.clone(),
            };
            let answer = update_settings(&data_dir, server.as_deref(), change).await?;
            if let Some(retention) = &retention {
                match &server {
                    None => {
                        println!("template retention: {retention} (for servers without their own)")
                    }
                    Some(server) => println!("server {server}: recovery points kept: {retention}"),
                }
            }
            let Some(bandwidth_mbps) = bandwidth_mbps else {
                return Ok(ExitCode::SUCCESS);
            };
            let limit = if bandwidth_mbps == 0 {
                "unlimited".to_owned()
            } else {
                format!("{bandwidth_mbps} Mbit/s")
            };
            match (&server, answer) {
                (None, _) => println!(
                    "template bandwidth limit: {limit} (for servers that connect from now on)"
                ),
                (
                    Some(server),
                    AdminResponse::SettingsSet {
                        applied_live: true, ..
                    },
                ) => {
                    println!("server {server}: bandwidth limit {limit}, applied to its agent now")
                }
                (Some(server), _) => println!(
                    "server {server}: bandwidth limit {limit}, applied when its agent connects"
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        SettingsCommand::Show { data_dir, json } => {
            let answer = admin_or_catalog(&data_dir, AdminRequest::ListSettings, |catalog| {
                catalog.all_settings().map(|(default, servers)| {
                    AdminResponse::Settings(admin::SettingsList { default, servers })
                })
            })
            .await?;
            let AdminResponse::Settings(list) = answer else {
                bail!("unexpected answer from the running receiver: {answer:?}");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let limit = |s: &ServerSettings| {
                    if s.bandwidth_mbps == 0 {
                        "unlimited".to_owned()
                    } else {
                        format!("{} Mbit/s", s.bandwidth_mbps)
                    }
                };
                let retention = |s: &ServerSettings, otherwise: &str| {
                    s.retention
                        .as_ref()
                        .map_or_else(|| otherwise.to_owned(), ToString::to_string)
                };
                println!(
                    "{:<24} {:<16} {:<7} RETENTION",
                    "SERVER", "BANDWIDTH", "PAUSED"
                );
                println!(
                    "{:<24} {:<16} {:<7} {}",
                    "(template)",
                    limit(&list.default),
                    "-",
                    retention(
                        &list.default,
                        &format!(
                            "{} (built in)",
                            crate::retention::RetentionPolicy::default()
                        )
                    )
                );
                for (server, settings) in &list.servers {
                    println!(
                        "{server:<24} {:<16} {:<7} {}",
                        limit(settings),
                        if settings.paused { "yes" } else { "no" },
                        retention(settings, "(template)")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub(super) async fn disk(command: DiskCommand) -> anyhow::Result<ExitCode> {
    use crate::staging::DiskAction;
    let (data_dir, server, disk, action, delete_image) = match command {
        DiskCommand::Adopt {
            data_dir,
            server,
            disk,
        } => (data_dir, server, disk, DiskAction::Adopt, false),
        DiskCommand::Reset {
            data_dir,
            server,
            disk,
            delete_image,
        } => (data_dir, server, disk, DiskAction::Reset, delete_image),
        DiskCommand::Forget {
            data_dir,
            server,
            disk,
            delete_image,
        } => (data_dir, server, disk, DiskAction::Forget, delete_image),
    };
    crate::pki::validate_name("server id", &server)?;
    crate::pki::validate_name("disk name", &disk)?;
    let request = AdminRequest::Disk {
        server_id: server.clone(),
        disk: disk.clone(),
        action,
        delete_image,
    };
    let answer = admin_or_catalog(&data_dir, request, |catalog| {
        crate::staging::disk_command(catalog, &server, &disk, action, delete_image)
            .map(AdminResponse::Disk)
    })
    .await?;
    let AdminResponse::Disk(done) = answer else {
        bail!("unexpected answer from the running receiver: {answer:?}");
    };
    let aside = match &done.moved_to {
        Some(path) => format!("; the old image is kept as {}", path.display()),
        None => String::new(),
    };
    match action {
        DiskAction::Adopt => println!(
            "disk {disk} of server {server}: {} adopted; the agent rescans it by checksum at its next session",
            done.image.display()
        ),
        DiskAction::Reset => println!(
            "disk {disk} of server {server}: reset; the agent syncs it in full at its next session{aside}"
        ),
        DiskAction::Forget => {
            println!("disk {disk} of server {server}: forgotten{aside}")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `pause` (`paused`) or `resume` (not `paused`) a server's replication.
pub(super) async fn pause(
    data_dir: &std::path::Path,
    server: &str,
    paused: bool,
) -> anyhow::Result<ExitCode> {
    let change = SettingsChange {
        bandwidth_mbps: None,
        paused: Some(paused),
        retention: None,
    };
    let answer = update_settings(data_dir, Some(server), change).await?;
    let live = matches!(
        answer,
        AdminResponse::SettingsSet {
            applied_live: true,
            ..
        }
    );
    match (paused, live) {
        (true, true) => println!(
            "server {server}: replication paused; its agent stopped sending now and keeps tracking changes"
        ),
        (true, false) => println!(
            "server {server}: replication paused; its agent will send nothing when it connects"
        ),
        (false, true) => println!(
            "server {server}: replication resumed; its agent is sending what changed meanwhile"
        ),
        (false, false) => {
            println!("server {server}: replication resumed; its agent replicates when it connects")
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Through the running receiver (which tells a connected agent at once), or in the
/// catalog directly when none runs.
pub(super) async fn update_settings(
    data_dir: &std::path::Path,
    server_id: Option<&str>,
    change: SettingsChange,
) -> anyhow::Result<AdminResponse> {
    let request = AdminRequest::UpdateSettings {
        server_id: server_id.map(str::to_owned),
        change: change.clone(),
    };
    admin_or_catalog(data_dir, request, |catalog| {
        catalog
            .update_settings(server_id, change.clone())
            .map(|settings| AdminResponse::SettingsSet {
                settings,
                applied_live: false,
            })
    })
    .await
}

/// Through the running receiver, or in the catalog directly when none runs.
pub(super) async fn rescan(
    data_dir: &std::path::Path,
    server_id: String,
    disk: Option<String>,
) -> anyhow::Result<admin::RescanAnswer> {
    let request = AdminRequest::Rescan {
        server_id: server_id.clone(),
        disk: disk.clone(),
    };
    let answer = admin_or_catalog(data_dir, request, |catalog| {
        catalog
            .request_rescan(&server_id, disk.as_deref())
            .map(|disks| {
                AdminResponse::Rescan(admin::RescanAnswer {
                    disks,
                    connected: false,
                })
            })
    })
    .await?;
    match answer {
        AdminResponse::Rescan(answer) => Ok(answer),
        other => bail!("unexpected answer from the running receiver: {other:?}"),
    }
}
