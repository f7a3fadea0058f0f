//! The `blockferry-receiver` command line. `main.rs` only parses and calls [`run`]; each
//! group of commands has its file: `run`, `credentials` (tokens, agents, admins), `launch`
//! (points and launches), `operations` (settings, pause, rescan, disks), `aws` (flags).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use blockferry_storage::IoEngine;
use clap::{Parser, Subcommand};

use crate::admin::{self, AdminRequest, AdminResponse};
use crate::catalog::{Catalog, CatalogError, ServerSettings, SettingsChange};
use crate::demo::{self, DemoOptions, parse_size};
use crate::status::StatusReport;
use crate::{Receiver, ReceiverConfig};

mod aws;
mod credentials;
mod launch;
mod operations;
mod run;
pub use aws::*;
pub use credentials::{AdminCommand, AgentCommand, TokenCommand};
pub use launch::{LaunchArgs, PointsCommand};
pub use operations::{DiskCommand, SettingsCommand};
pub use run::{RunArgs, with_config_file};

#[derive(Debug, Parser)]
#[command(
    name = "blockferry-receiver",
    version,
    about = "blockferry receiver appliance"
)]
pub struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the receiver: replication listener on port 1500 (mutual TLS).
    Run(run::RunArgs),
    /// Enrollment tokens for new agents.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Provision agents offline.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Admin client certificates for the control API's operator endpoints.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Show source servers and disks: state, size, replicated bytes, watermark, image.
    Status {
        #[arg(long)]
        data_dir: PathBuf,
        /// Print JSON (keys documented in the README) instead of a table.
        #[arg(long)]
        json: bool,
        /// Print again every N seconds (default 2) until interrupted.
        #[arg(long, num_args = 0..=1, default_missing_value = "2", value_parser = clap::value_parser!(u64).range(1..=3600))]
        watch: Option<u64>,
    },
    /// Replication settings per source server (bandwidth limit), and the template
    /// for servers that connect later.
    #[command(subcommand)]
    Settings(SettingsCommand),
    /// Have an agent rescan a source server's disks by checksum (for changes no tracker
    /// saw): at its next session, or at once if it is connected.
    Rescan {
        #[arg(long)]
        data_dir: PathBuf,
        /// The source server id (as in `status`).
        #[arg(long)]
        server: String,
        /// Only this disk (default: every disk of the server).
        #[arg(long)]
        disk: Option<String>,
    },
    /// A disk's staging image, when the receiver cannot vouch for it (STALLED
    /// staging_missing) or the disk is gone: adopt the file that is there, start over,
    /// or forget the disk.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// A server's recovery points: list them, show one, delete one (file backend).
    #[command(subcommand)]
    Points(PointsCommand),
    /// Make launchable disks from a recovery point: copies of its images (or downloads
    /// of its EBS snapshots) in --out with the blockferry agent switched off inside them,
    /// to test the point or to cut over to it; with --ec2, EBS volumes or an AMI made of
    /// them too. Runs as root (it mounts the copies).
    Launch(launch::LaunchArgs),
    /// The launches recorded: when, of which point, where, and how the boot check went.
    Launches {
        #[arg(long)]
        data_dir: PathBuf,
        /// Only this source server.
        #[arg(long)]
        server: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Pause a source server's replication: its agent stops sending data, initial sync
    /// and rescan included, keeps heartbeating, and keeps tracking changes, which it
    /// sends on `resume`. Survives restarts of either side.
    Pause {
        #[arg(long)]
        data_dir: PathBuf,
        /// The source server id (as in `status`).
        #[arg(long)]
        server: String,
    },
    /// Download one disk of a recovery point (EBS backend) into a raw image, verifying
    /// every block's SHA-256.
    Restore {
        #[arg(long)]
        data_dir: PathBuf,
        /// The disk's name (as in `status`).
        #[arg(long)]
        disk: String,
        /// The source server id; needed only when several servers have a disk of that name.
        #[arg(long)]
        server: Option<String>,
        /// The recovery point's epoch (as in `status --json`); the latest by default.
        #[arg(long)]
        recovery_point: Option<u64>,
        /// The raw image to write (created; an existing file needs --overwrite).
        #[arg(long)]
        out: PathBuf,
        /// Replace `--out` if it exists.
        #[arg(long)]
        overwrite: bool,
        #[command(flatten)]
        aws: AwsArgs,
    },
    /// Resume a paused source server's replication where it stopped.
    Resume {
        #[arg(long)]
        data_dir: PathBuf,
        /// The source server id (as in `status`).
        #[arg(long)]
        server: String,
    },
    /// Replicate a generated image through a local receiver and agent, and verify it.
    Demo {
        /// Size of the generated source image (half random, half zeros): e.g. 256M, 1G.
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        size: u64,
        /// Keep everything in this directory instead of a temporary one.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Staging I/O engine: auto, uring, sync.
        #[arg(long, default_value = "auto")]
        io_engine: IoEngine,
        /// `ebs`: also stage into an in-memory EBS (the strict fake of the EBS direct
        /// APIs), and restore and check the recovery point's snapshot.
        #[arg(long, value_enum, default_value_t = Backend::File)]
        backend: Backend,
    },
}

/// Where the control API listens, if anywhere.
#[derive(Debug, Clone, Copy)]
pub struct Control(Option<SocketAddr>);

fn parse_control(text: &str) -> Result<Control, String> {
    if text == "off" {
        return Ok(Control(None));
    }
    text.parse()
        .map(|addr| Control(Some(addr)))
        .map_err(|e| format!("{text:?} is not HOST:PORT or \"off\": {e}"))
}

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => run::run(args).await,
        Command::Agent(command) => credentials::agent(command).await,
        Command::Admin(command) => credentials::admin(command).await,
        Command::Token(command) => credentials::token(command).await,
        Command::Status {
            data_dir,
            json,
            watch,
        } => loop {
            let report = status(&data_dir).await?;
            if watch.is_some() && !json {
                // Clear the screen and go home, as watch(1) does.
                print!("\x1b[2J\x1b[H");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render_table());
            }
            let Some(every) = watch else {
                return Ok(ExitCode::SUCCESS);
            };
            tokio::select! {
                () = run::wait_for_signal() => return Ok(ExitCode::SUCCESS),
                () = tokio::time::sleep(std::time::Duration::from_secs(every)) => {}
            }
        },
        Command::Settings(command) => operations::settings(command).await,
        Command::Restore {
            data_dir,
            disk,
            server,
            recovery_point,
            out,
            overwrite,
            aws,
        } => {
            if out.exists() && !overwrite {
                bail!("{} exists; pass --overwrite to replace it", out.display());
            }
            let report = status(&data_dir).await?;
            let client = crate::snapshots::aws_client(&aws.settings()).await;
            let restored = crate::snapshots::restore(
                &report,
                client,
                server.as_deref(),
                &disk,
                recovery_point,
                &out,
            )
            .await?;
            println!(
                "restored disk {disk} of server {} at recovery point {} (snapshot {}): {} blocks, {} into {}",
                restored.server_id,
                restored.epoch,
                restored.snapshot_id,
                restored.blocks,
                crate::status::human_bytes(restored.size),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Points(command) => launch::points_command(command).await,
        Command::Launch(args) => launch::launch(args).await,
        Command::Launches {
            data_dir,
            server,
            json,
        } => {
            let records = crate::launch::launches(&data_dir, server.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&records)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<24} {:>3} {:<8} {:>8}  {:<10} OUT",
                "SERVER", "N", "MODE", "EPOCH", "BOOT"
            );
            for r in &records {
                let boot = match &r.boot {
                    Some(b) if b.healthy => format!("healthy/{}", b.accelerator),
                    Some(b) => format!("FAILED/{}", b.accelerator),
                    None => "-".into(),
                };
                println!(
                    "{:<24} {:>3} {:<8} {:>8}  {:<10} {}",
                    r.server_id,
                    r.number,
                    r.mode,
                    r.epoch,
                    boot,
                    r.out.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Disk(command) => operations::disk(command).await,
        Command::Pause { data_dir, server } => operations::pause(&data_dir, &server, true).await,
        Command::Resume { data_dir, server } => operations::pause(&data_dir, &server, false).await,
        Command::Rescan {
            data_dir,
            server,
            disk,
        } => {
            let answer = operations::rescan(&data_dir, server.clone(), disk).await?;
            println!(
                "rescan requested for {} of server {server}: {}",
                answer.disks.join(", "),
                if answer.connected {
                    "the agent is reconnecting to start it now"
                } else {
                    "it starts when the agent next connects"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            size,
            data_dir,
            io_engine,
            backend,
        } => {
            demo::run(DemoOptions {
                size,
                data_dir,
                io_engine,
                ebs: backend == Backend::Ebs,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Asks the running receiver, or reads the catalog directly when none runs.
pub(crate) async fn status(data_dir: &std::path::Path) -> anyhow::Result<StatusReport> {
    if !data_dir.join("catalog.redb").exists() {
        bail!(
            "{} is not a receiver data dir (no catalog.redb)",
            data_dir.display()
        );
    }
    match admin::request(data_dir, &AdminRequest::Status).await {
        Ok(Some(AdminResponse::Status(report))) => return Ok(report),
        Ok(Some(AdminResponse::Error(err))) => bail!("the running receiver answered: {err}"),
        Ok(Some(other)) => bail!("unexpected answer from the running receiver: {other:?}"),
        Ok(None) => {}
        Err(err) => {
            return Err(err).context("asking the running receiver through its admin socket");
        }
    }
    match Catalog::open(data_dir) {
        Ok(catalog) => Ok(StatusReport::build(&catalog, None)?),
        Err(err @ CatalogError::Locked { .. }) => {
            Err(err).context("a receiver holds the catalog but its admin socket does not answer")
        }
        Err(err) => Err(err.into()),
    }
}

/// Asks the running receiver, or does `offline` on the catalog when none runs; an
/// `Error` answer either way becomes the command's error.
pub(crate) async fn admin_or_catalog<E: std::error::Error + Send + Sync + 'static>(
    data_dir: &std::path::Path,
    request: AdminRequest,
    offline: impl FnOnce(&Catalog) -> Result<AdminResponse, E>,
) -> anyhow::Result<AdminResponse> {
    if !data_dir.join("catalog.redb").exists() {
        bail!(
            "{} is not a receiver data dir (no catalog.redb)",
            data_dir.display()
        );
    }
    let answer = match admin::request(data_dir, &request).await {
        Ok(Some(answer)) => answer,
        Ok(None) => offline(&Catalog::open(data_dir)?)?,
        Err(err) => {
            return Err(err).context("asking the running receiver through its admin socket");
        }
    };
    match answer {
        AdminResponse::Error(err) => bail!("{err}"),
        answer => Ok(answer),
    }
}

fn humantime(secs: u64) -> String {
    match secs {
        s if s % 86400 == 0 => format!("{}d", s / 86400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}
