//! The `blockferry-receiver` command line. `main.rs` only parses and calls [`run`].

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
    Run {
        /// Data directory: CA, catalog, staging images, admin socket. Created if missing.
        #[arg(long)]
        data_dir: PathBuf,
        /// Replication listener address.
        #[arg(long, default_value = crate::DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Staging I/O engine: auto (io_uring, else sync with a warning), uring, sync.
        #[arg(long, default_value = "auto")]
        io_engine: IoEngine,
        /// io_uring writer threads, each with its own ring.
        #[arg(long, default_value_t = 1)]
        writer_threads: usize,
        /// Agents send a barrier (flush + durable watermark) after this many MiB.
        #[arg(long, default_value_t = 16)]
        barrier_interval_mib: u64,
        /// Streams (TLS connections) granted to one agent, 1 to 5.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(1..=5))]
        max_streams: u8,
        /// Control API (HTTPS: enrollment, renewal, status) address; "off" disables it.
        #[arg(long, default_value = "0.0.0.0:8443", value_parser = parse_control)]
        control: Control,
        /// Lifetime of agent certificates issued by the control API, in hours; agents
        /// renew well before it ends.
        #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=8760))]
        agent_cert_hours: u64,
        /// Prometheus metrics (plain HTTP, GET /metrics) address; "off" disables them.
        #[arg(long, default_value = crate::metrics::DEFAULT_METRICS, value_parser = parse_control)]
        metrics: Control,
        /// A disk with changes waiting and nothing made durable for this many seconds is
        /// STALLED (reason no_progress).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(5..=86400))]
        stall_after_secs: u64,
        /// Initial syncs and rescans running at once, all servers together; more wait as
        /// QUEUED. 0 is unlimited.
        #[arg(long, default_value_t = 0)]
        max_concurrent_syncs: usize,
        /// Where disks are staged: `file` (an image per disk in the data dir) or `ebs`
        /// (that image is a local base copy, and each recovery point becomes one EBS
        /// snapshot per disk, a chain of children, through the EBS direct APIs).
        #[arg(long, value_enum, default_value_t = Backend::File)]
        backend: Backend,
        /// The largest disk an agent may replicate, e.g. 16T; larger ones are refused.
        #[arg(long, default_value = "64T", value_parser = parse_size)]
        max_disk_size: u64,
        /// Receive buffers of all replication connections together, in MiB (about 1 MiB
        /// per stream in a session); connections beyond it are told to retry later.
        #[arg(long, default_value_t = crate::budget::DEFAULT_FRAME_BUFFER_MIB, value_parser = clap::value_parser!(u32).range(16..=1048576))]
        frame_buffer_mib: u32,
        /// File backend: recovery points as copies of the staging images under
        /// images/SERVER/points/EPOCH/: `auto` cuts them as reflinks where the staging
        /// file system shares extents (XFS, btrfs) and none elsewhere; `copy` falls back to
        /// a full copy of every image per point (its space, and a pause of the server's
        /// replication while it copies); `off` cuts none. (EBS: every point is a snapshot.)
        #[arg(long, value_enum, default_value_t = crate::points::FilePointMode::Auto)]
        recovery_points: crate::points::FilePointMode,
        /// A recovery point is cut at the first consistent point this many seconds after
        /// the previous one (0: as often as the previous point allows).
        #[arg(long, default_value_t = 600)]
        recovery_interval_secs: u64,
        /// How often the retention policies are enforced: points they drop are deleted
        /// (file backend) or their snapshots deleted in EC2 (EBS backend).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
        retention_check_secs: u64,
        #[command(flatten)]
        ebs: EbsArgs,
        #[command(flatten)]
        aws: AwsArgs,
    },
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
    Launch {
        #[arg(long)]
        data_dir: PathBuf,
        /// The source server id (as in `status`).
        #[arg(long)]
        server: String,
        /// The point's epoch (as `points list` shows); the newest point by default.
        #[arg(long)]
        recovery_point: Option<u64>,
        /// test: the source keeps replicating. cutover: the source's replication ends
        /// for good first (its agent is told to stop and refused from then on).
        #[arg(long, value_enum)]
        mode: crate::catalog::LaunchMode,
        /// Directory for DISK.img per disk, boot/, launch.json and console.log; created
        /// if missing, and refused if it holds a DISK.img already.
        #[arg(long)]
        out: PathBuf,
        /// raw: DISK.img, a reflink of the point where the file system allows. qcow2:
        /// DISK.qcow2, converted from the prepared raw copy.
        #[arg(long, value_enum, default_value_t = crate::catalog::ImageFormat::Raw)]
        format: crate::catalog::ImageFormat,
        /// Boot the launched disks here under qemu (KVM, else TCG with a warning) and
        /// check their health; exit status 1 when the check fails.
        #[arg(long)]
        boot: bool,
        /// With --boot: a TCP port in the guest that must answer (through a loopback
        /// port forward); without it the check is a login prompt on the serial console.
        #[arg(long, requires = "boot")]
        health_port: Option<u16>,
        /// With --boot: how long the guest has to pass the health check.
        #[arg(long, default_value_t = 300, requires = "boot")]
        boot_timeout_secs: u64,
        /// Also make the launch in EC2: `volumes` (one EBS volume per disk) or `ami` (a
        /// machine image, root disk first). The prepared copies are written into new
        /// snapshots first: an EBS point's as children of its snapshots holding only what
        /// preparing changed, a file point's whole.
        #[arg(long, value_enum)]
        ec2: Option<crate::launch::Ec2Kind>,
        /// With --ec2 volumes: the availability zone of the volumes (that of the instance
        /// they are for).
        #[arg(long, requires = "ec2", required_if_eq("ec2", "volumes"))]
        availability_zone: Option<String>,
        /// With --ec2: the EBS volume type of the volumes or the image's devices.
        #[arg(long, default_value = "gp3", requires = "ec2")]
        volume_type: String,
        /// With --ec2 ami: the image's architecture.
        #[arg(long, default_value = "x86_64", value_parser = ["x86_64", "arm64"])]
        architecture: String,
        /// With --ec2 ami: uefi, legacy-bios or uefi-preferred (the source's firmware);
        /// the instance type's default when absent.
        #[arg(long, value_parser = ["uefi", "legacy-bios", "uefi-preferred"], requires = "ec2")]
        boot_mode: Option<String>,
        /// With --ec2 ami: the image's name (unique in the region);
        /// blockferry-SERVER-rpEPOCH-MILLIS by default.
        #[arg(long, requires = "ec2")]
        image_name: Option<String>,
        /// With --ec2: how long each snapshot, volume or image may take to be ready.
        #[arg(long, default_value_t = 600, requires = "ec2")]
        ec2_wait_secs: u64,
        /// For a point of the EBS backend (its snapshots are downloaded), and for --ec2.
        #[command(flatten)]
        aws: AwsArgs,
    },
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

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (the only time its secret is shown).
    Create {
        #[arg(long)]
        data_dir: PathBuf,
        /// How long it stays valid: e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: std::time::Duration,
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100000))]
        uses: u32,
        /// The control API address agents should dial, HOST:PORT (default: this host's
        /// name, port 8443).
        #[arg(long)]
        address: Option<String>,
        /// Enroll only this source server id. Without --reinstall it must be new; without
        /// --server, the token enrolls any server id the receiver does not know yet.
        #[arg(long)]
        server: Option<String>,
        /// Re-enroll the existing server --server (a reinstall of its agent): its
        /// previous agent is revoked and its disks rescan instead of resyncing.
        #[arg(long, requires = "server")]
        reinstall: bool,
    },
    /// List tokens: id, created, expires, uses, state (never the secrets).
    List {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Revoke a token by the id `token list` shows.
    Revoke {
        #[arg(long)]
        data_dir: PathBuf,
        id: String,
    },
}

/// A duration as a number and a unit: s, m, h or d.
fn parse_ttl(text: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and a unit, e.g. 30m, 1h, 7d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    if secs == 0 || secs > 365 * 86400 {
        return Err(format!("{text:?}: must be between 1s and 365d"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Issue a key and certificate for a new agent and write them, with the CA
    /// certificate, to a directory to copy to the source server.
    Issue {
        #[arg(long)]
        data_dir: PathBuf,
        /// The source server's name (its id at the receiver): 1-64 of A-Z a-z 0-9 . _ -
        #[arg(long)]
        name: String,
        /// Where to write agent.key (0600), agent.crt and ca.crt.
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = 365)]
        valid_days: u32,
    },
    /// Revoke an agent for good: its handshakes fail from now on and its live session is
    /// closed (at once when the receiver runs, at its next start otherwise).
    Revoke {
        #[arg(long)]
        data_dir: PathBuf,
        /// The agent id (as in `status`).
        agent_id: String,
    },
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

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Issue a key and an admin client certificate for an operator (or a monitoring
    /// system) and write them, with the CA certificate, to a directory.
    Issue {
        #[arg(long)]
        data_dir: PathBuf,
        /// Who holds it, for the logs: 1-64 of A-Z a-z 0-9 . _ -
        #[arg(long)]
        name: String,
        /// Where to write admin.key (0600), admin.crt and ca.crt.
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = 90)]
        valid_days: u32,
    },
    /// Revoke an admin certificate: its handshakes fail from now on.
    Revoke {
        #[arg(long)]
        data_dir: PathBuf,
        /// The admin id `admin issue` printed.
        admin_id: String,
    },
}

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run {
            data_dir,
            listen,
            io_engine,
            writer_threads,
            barrier_interval_mib,
            max_streams,
            control,
            agent_cert_hours,
            metrics,
            stall_after_secs,
            max_concurrent_syncs,
            backend,
            max_disk_size,
            frame_buffer_mib,
            recovery_points,
            retention_check_secs,
            recovery_interval_secs,
            ebs,
            aws,
        } => {
            if barrier_interval_mib == 0 {
                bail!("--barrier-interval-mib must be at least 1");
            }
            let mut config = ReceiverConfig::new(data_dir);
            config.listen = listen;
            config.io_engine = io_engine;
            config.writer_threads = writer_threads.max(1);
            config.barrier_interval = barrier_interval_mib << 20;
            config.max_streams = max_streams;
            config.control = control.0;
            config.agent_cert_lifetime = std::time::Duration::from_secs(agent_cert_hours * 3600);
            config.metrics = metrics.0;
            config.stall_after = std::time::Duration::from_secs(stall_after_secs);
            config.max_concurrent_syncs = max_concurrent_syncs;
            config.max_disk_size = max_disk_size;
            config.frame_buffer_mib = frame_buffer_mib;
            let recovery_interval = std::time::Duration::from_secs(recovery_interval_secs);
            config.recovery_points = recovery_points;
            config.recovery_interval = recovery_interval;
            config.retention_check = std::time::Duration::from_secs(retention_check_secs);
            if backend == Backend::Ebs {
                config.ebs = Some(ebs.config(&aws, recovery_interval)?);
            }
            let receiver = Receiver::start(config).await?;
            wait_for_signal().await;
            tracing::info!("shutting down: finishing sessions");
            receiver.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(AgentCommand::Issue {
            data_dir,
            name,
            out,
            valid_days,
        }) => {
            let identity = crate::pki::write_agent_credentials(
                &data_dir,
                &name,
                &out,
                time::Duration::days(i64::from(valid_days.max(1))),
            )?;
            println!(
                "issued agent {} for source server {}; credentials in {}",
                identity.agent_id,
                identity.server_id,
                out.display()
            );
            println!(
                "copy that directory to the source server and run: blockferry-agent run --receiver HOST:1500 --credentials DIR --disk /dev/sdX"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin(AdminCommand::Issue {
            data_dir,
            name,
            out,
            valid_days,
        }) => {
            let identity = crate::pki::write_admin_credentials(
                &data_dir,
                &name,
                &out,
                time::Duration::days(i64::from(valid_days.max(1))),
            )?;
            println!(
                "issued admin certificate {} for {}, valid {valid_days} days; credentials in {}",
                identity.admin_id,
                identity.name,
                out.display()
            );
            println!(
                "use: curl --cacert ca.crt --cert admin.crt --key admin.key --resolve blockferry-receiver:8443:ADDRESS https://blockferry-receiver:8443/v1/status"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin(AdminCommand::Revoke { data_dir, admin_id }) => {
            crate::pki::validate_name("admin id", &admin_id)?;
            revoke(&data_dir, &admin_id).await?;
            println!("revoked admin certificate {admin_id}; it is refused from now on");
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::Create {
            data_dir,
            ttl,
            uses,
            address,
            server,
            reinstall,
        }) => {
            use crate::control::TokenBinding;
            if let Some(server) = &server {
                crate::pki::validate_name("server id", server)?;
            }
            let binding = match (server, reinstall) {
                (None, _) => TokenBinding::AnyNewServer,
                (Some(id), false) => TokenBinding::NewServer(id),
                (Some(id), true) => TokenBinding::Reinstall(id),
            };
            let ca = crate::pki::CertificateAuthority::load_or_create(&data_dir)?;
            let address = match address {
                Some(address) => address,
                None => format!("{}:8443", crate::control::host_name()),
            };
            let what = match &binding {
                TokenBinding::AnyNewServer => "a new source server".to_owned(),
                TokenBinding::NewServer(id) => format!("new source server {id}"),
                TokenBinding::Reinstall(id) => {
                    format!("a reinstall of source server {id} (its agent will be revoked)")
                }
            };
            let (token, record) =
                crate::control::new_token(ca.fingerprint(), &address, ttl, uses, binding);
            let request = AdminRequest::AddToken {
                record: record.clone(),
            };
            admin_or_catalog(&data_dir, request, |catalog| {
                catalog.add_token(&record).map(|()| AdminResponse::Done)
            })
            .await?;
            println!("{token}");
            eprintln!(
                "token {} for {address}, enrolls {what}: valid {}, {uses} use(s). On the source server: blockferry-agent enroll --token TOKEN --state-dir /var/lib/blockferry-agent",
                record.id,
                humantime(ttl.as_secs())
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::List { data_dir }) => {
            let AdminResponse::Tokens(tokens) =
                admin_or_catalog(&data_dir, AdminRequest::ListTokens, |catalog| {
                    catalog.tokens().map(AdminResponse::Tokens)
                })
                .await?
            else {
                bail!("unexpected answer from the running receiver");
            };
            println!(
                "{:<18} {:>12} {:>12} {:>6}  STATE",
                "ID", "CREATED", "EXPIRES", "USED"
            );
            let now = crate::catalog::now();
            for t in tokens {
                let state = if t.revoked {
                    "revoked"
                } else if now >= t.expires {
                    "expired"
                } else if t.used >= t.uses {
                    "used"
                } else {
                    "valid"
                };
                println!(
                    "{:<18} {:>12} {:>12} {:>3}/{:<2}  {state}",
                    t.id, t.created, t.expires, t.used, t.uses
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::Revoke { data_dir, id }) => {
            let request = AdminRequest::RevokeToken { id: id.clone() };
            admin_or_catalog(&data_dir, request, |catalog| {
                catalog.revoke_token(&id).map(|found| {
                    if found {
                        AdminResponse::Done
                    } else {
                        AdminResponse::Error(format!("no token with id {id} (see `token list`)"))
                    }
                })
            })
            .await?;
            println!("token {id} revoked");
            Ok(ExitCode::SUCCESS)
        }
        Command::Agent(AgentCommand::Revoke { data_dir, agent_id }) => {
            crate::pki::validate_name("agent id", &agent_id)?;
            let answer = revoke(&data_dir, &agent_id).await?;
            match &answer.server_id {
                Some(server) => println!(
                    "revoked agent {agent_id} of source server {server}; {} live session(s) closed",
                    answer.sessions_closed
                ),
                None => println!(
                    "revoked agent {agent_id} (it never connected); its certificate is refused from now on"
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
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
                () = wait_for_signal() => return Ok(ExitCode::SUCCESS),
                () = tokio::time::sleep(std::time::Duration::from_secs(every)) => {}
            }
        },
        Command::Settings(SettingsCommand::Set {
            data_dir,
            server,
            default: _,
            bandwidth_mbps,
            retention,
        }) => {
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
        Command::Settings(SettingsCommand::Show { data_dir, json }) => {
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
        Command::Points(command) => points_command(command).await,
        Command::Launch {
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
        } => {
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
        Command::Disk(command) => {
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
        Command::Pause { data_dir, server } => pause(&data_dir, &server, true).await,
        Command::Resume { data_dir, server } => pause(&data_dir, &server, false).await,
        Command::Rescan {
            data_dir,
            server,
            disk,
        } => {
            let answer = rescan(&data_dir, server.clone(), disk).await?;
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

async fn points_command(command: PointsCommand) -> anyhow::Result<ExitCode> {
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

/// `pause` (`paused`) or `resume` (not `paused`) a server's replication.
async fn pause(data_dir: &std::path::Path, server: &str, paused: bool) -> anyhow::Result<ExitCode> {
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
async fn update_settings(
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
async fn revoke(data_dir: &std::path::Path, agent_id: &str) -> anyhow::Result<admin::RevokeAnswer> {
    let request = AdminRequest::RevokeAgent {
        agent_id: agent_id.to_owned(),
    };
    let answer = admin_or_catalog(data_dir, request, |catalog| {
        catalog.revoke_agent(agent_id).map(|server_id| {
            AdminResponse::Revoked(admin::RevokeAnswer {
                server_id,
                sessions_closed: 0,
            })
        })
    })
    .await?;
    match answer {
        AdminResponse::Revoked(answer) => Ok(answer),
        other => bail!("unexpected answer from the running receiver: {other:?}"),
    }
}

/// Through the running receiver, or in the catalog directly when none runs.
async fn rescan(
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

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    File,
    Ebs,
}

/// How the EBS direct API is reached. Credentials come from the standard chain
/// (environment, profile, instance role).
#[derive(Debug, Clone, clap::Args)]
pub struct AwsArgs {
    /// AWS region (default: the standard chain, e.g. AWS_REGION or the instance's).
    #[arg(long)]
    ebs_region: Option<String>,
    /// Endpoint override, e.g. a VPC endpoint or a local emulator (AWS_ENDPOINT_URL_EBS
    /// and AWS_ENDPOINT_URL are read too).
    #[arg(long)]
    ebs_endpoint_url: Option<String>,
    /// EC2 endpoint override (DeleteSnapshot, for retention), e.g. a VPC endpoint of EC2
    /// or a local emulator (AWS_ENDPOINT_URL_EC2 and AWS_ENDPOINT_URL are read too).
    #[arg(long)]
    ec2_endpoint_url: Option<String>,
    /// Seconds one EBS request attempt may take before it is retried.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    ebs_attempt_timeout_secs: u64,
}

impl AwsArgs {
    fn settings(&self) -> blockferry_storage::ebs::aws::AwsSettings {
        blockferry_storage::ebs::aws::AwsSettings {
            region: self.ebs_region.clone(),
            endpoint_url: self.ebs_endpoint_url.clone(),
            ec2_endpoint_url: self.ec2_endpoint_url.clone(),
            attempt_timeout: Some(std::time::Duration::from_secs(
                self.ebs_attempt_timeout_secs,
            )),
        }
    }
}

/// How `--backend ebs` makes its snapshots.
#[derive(Debug, Clone, clap::Args)]
pub struct EbsArgs {
    /// KMS key (ARN) that encrypts each chain's first snapshot; children inherit it.
    #[arg(long)]
    ebs_kms_key_arn: Option<String>,
    /// A tag on every snapshot, KEY=VALUE; repeatable. Each snapshot is also tagged with
    /// its source server, disk and recovery point.
    #[arg(long = "ebs-tag", value_parser = parse_tag)]
    ebs_tags: Vec<(String, String)>,
    /// Minutes a pending snapshot may go without a request before EBS fails it (10 to
    /// 4320).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u32).range(10..=4320))]
    ebs_snapshot_timeout_minutes: u32,
    /// Block uploads in flight per disk (EBS needs about 100 for 500 MB/s).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1000))]
    ebs_concurrency: u32,
    /// MiB of consistent-point blocks kept in memory per disk while its snapshot uploads
    /// and writes go on (beyond it, writes to blocks not yet uploaded wait).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=65536))]
    ebs_preserve_mib: u64,
}

impl EbsArgs {
    fn config(
        &self,
        aws: &AwsArgs,
        recovery_interval: std::time::Duration,
    ) -> anyhow::Result<crate::snapshots::EbsBackendConfig> {
        Ok(crate::snapshots::EbsBackendConfig {
            connection: crate::snapshots::EbsConnection::Aws(aws.settings()),
            chain: blockferry_storage::ebs::chain::ChainSettings {
                upload: blockferry_storage::ebs::upload::UploadConfig {
                    concurrency: self.ebs_concurrency as usize,
                    ..Default::default()
                },
                kms_key_arn: self.ebs_kms_key_arn.clone(),
                tags: self.ebs_tags.clone(),
                timeout_minutes: self.ebs_snapshot_timeout_minutes,
                preserve_limit: usize::try_from(self.ebs_preserve_mib << 20)
                    .context("--ebs-preserve-mib is too large")?,
            },
            recovery_interval,
        })
    }
}

fn parse_tag(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    if key.is_empty() || key.len() > 127 || value.len() > 255 {
        return Err(format!(
            "{text:?}: EBS tag keys are 1 to 127 characters, values at most 255"
        ));
    }
    if key.starts_with("aws:") || key.starts_with("blockferry:") {
        return Err(format!(
            "{text:?}: keys starting with aws: or blockferry: are reserved"
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}
