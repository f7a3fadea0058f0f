//! `blockferry-agent`: parse arguments, start logging, run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use blockferry_agent::nbd::{NbdListen, SyncMode};
use blockferry_agent::{Agent, AgentConfig, Credentials, Outcome, ProgressMode, Volume};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "blockferry-agent",
    version,
    about = "blockferry replication agent"
)]
struct Cli {
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll with the receiver using a token from `blockferry-receiver token create`:
    /// verifies the receiver against the CA fingerprint in the token, generates this
    /// agent's key (it never leaves the state dir) and stores the issued certificate.
    Enroll {
        /// The token, as printed by `token create`.
        #[arg(long)]
        token: String,
        /// The control API's HOST:PORT, if not the address in the token.
        #[arg(long)]
        receiver: Option<String>,
        /// Where to keep the key (agent.key, 0600), certificates and enrollment.json.
        #[arg(long)]
        state_dir: PathBuf,
        /// This source server's id (default: its machine-id or DMI product UUID).
        #[arg(long)]
        server_id: Option<String>,
    },
    /// Replicate volumes to a receiver until stopped.
    Run {
        /// The receiver's replication address, HOST:PORT (port 1500 by default). Not
        /// needed after `enroll`: it is read from the state dir.
        #[arg(long)]
        receiver: Option<String>,
        /// Directory holding agent.key (mode 0600), agent.crt and ca.crt, as written by
        /// `blockferry-receiver agent issue`. Not needed after `enroll` (the state dir
        /// holds them).
        #[arg(long)]
        credentials: Option<PathBuf>,
        /// A volume to replicate: a block device or image file, as PATH (named after its
        /// last path component) or NAME=PATH. Repeat for more disks (at most 50).
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        /// Exit with status 0 once every disk's initial sync is durable at the receiver.
        #[arg(long)]
        exit_when_synced: bool,
        /// Progress display: auto (bar on a terminal, log lines otherwise), log, quiet.
        #[arg(long, default_value = "auto", value_parser = parse_progress)]
        progress: ProgressMode,
        /// TLS connections to the receiver, 1 to 5; every block always travels on the
        /// same one. The receiver may grant fewer.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=5))]
        streams: u8,
        /// Serve each disk as an NBD export named after it, at unix:PATH (mode 0600,
        /// only this user, root and --nbd-allow-uid may connect) or HOST:PORT (needs
        /// --nbd-insecure-tcp); writes through it are replicated.
        #[arg(long)]
        nbd_listen: Option<NbdListen>,
        /// Also let this uid use the NBD tap's Unix socket (it becomes the socket's owner).
        #[arg(long)]
        nbd_allow_uid: Option<u32>,
        /// Allow the NBD tap on TCP, which has no authentication: every local user (and,
        /// off loopback, every host that reaches the port) can then read and write the
        /// replicated volumes.
        #[arg(long)]
        nbd_insecure_tcp: bool,
        /// When an NBD FLUSH or FUA write is answered: async (once on the source volume)
        /// or sync (once durable at the receiver: zero RPO, one round trip per flush).
        #[arg(long, default_value = "async")]
        sync_mode: SyncMode,
        /// Capture buffer: changes are sent from memory up to this many MiB; beyond it
        /// they are re-read from the volume.
        #[arg(long, default_value_t = 256)]
        buffer_mib: usize,
        /// Under a sustained workload, cut a crash-consistent point at least this often
        /// (milliseconds). A quiet workload gets one as soon as its changes are sent.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
        epoch_interval_ms: u64,
        /// Directory for the clean-shutdown state record (`agent-state`). With it, a
        /// clean stop (SIGTERM, SIGINT) saves what is not yet at the receiver and the next
        /// start resumes without a rescan; without it, every start rescans by checksum.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Rescan every disk by checksum at start, whatever the state record says: for
        /// writes made to a volume while the agent was not running.
        #[arg(long)]
        rescan: bool,
        /// At a clean stop, how long to keep sending changes (seconds) before saving the
        /// rest in the state record.
        #[arg(long, default_value_t = 30)]
        drain_timeout_secs: u64,
        /// How the agent learns what changed: auto (block-layer tracking for block
        /// devices, the tap for image files), block, tap (only writes through the NBD tap),
        /// none (periodic rescans).
        #[arg(long, default_value = "auto")]
        capture: blockferry_agent::tracking::CaptureMode,
        /// Where block tracking reads the kernel's completed requests: auto (an ftrace
        /// instance of the agent's own, else perf events), ftrace, or perf.
        #[arg(long, default_value = "auto")]
        trace_source: blockferry_agent::blocktrace::TraceSource,
        /// Where changes cannot be tracked (--capture none, or block tracking that cannot
        /// start), rescan every disk by checksum this often (seconds).
        #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(60..=604800))]
        rescan_interval_secs: u64,
        /// Block tracking: auto (cut crash-consistent points by freezing the file systems
        /// mounted on the replicated disks for a moment) or off (never freeze; points
        /// are not crash-consistent and no recovery point is cut).
        #[arg(long, default_value = "auto")]
        freeze: blockferry_agent::freeze::FreezeMode,
        /// Longest the file systems stay frozen for one point (milliseconds); a point
        /// that needs longer is given up.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=10000))]
        freeze_timeout_ms: u64,
        /// While the disks change, cut a frozen point this often (seconds).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
        freeze_interval_secs: u64,
    },
}

fn parse_progress(s: &str) -> Result<ProgressMode, String> {
    match s {
        "auto" => Ok(ProgressMode::Auto),
        "log" => Ok(ProgressMode::Log),
        "quiet" => Ok(ProgressMode::Quiet),
        _ => Err(format!(
            "unknown progress mode {s:?}: expected auto, log or quiet"
        )),
    }
}

/// The exit status of an agent whose server was cut over: replication is over for good.
const EXIT_FINISHED: u8 = 3;

fn main() -> ExitCode {
    limit_allocator_retention();
    let cli = Cli::parse();
    blockferry_util::logging::init(cli.log_json);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Enroll {
            token,
            receiver,
            state_dir,
            server_id,
        } => {
            let server_id = server_id.unwrap_or_else(blockferry_agent::inventory::host_id);
            if server_id.is_empty() {
                anyhow::bail!(
                    "this machine has no machine-id or DMI product UUID; pass --server-id"
                );
            }
            let enrollment = blockferry_agent::enroll::enroll(
                &token,
                receiver.as_deref(),
                &server_id,
                &state_dir,
            )
            .await
            .context("enrolling")?;
            println!(
                "enrolled as agent {} of source server {}; replicating to {}",
                enrollment.agent_id, enrollment.server_id, enrollment.receiver
            );
            println!(
                "next: blockferry-agent run --state-dir {} --disk /dev/sdX",
                state_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            receiver,
            credentials,
            disks,
            exit_when_synced,
            progress,
            streams,
            nbd_listen,
            nbd_allow_uid,
            nbd_insecure_tcp,
            sync_mode,
            buffer_mib,
            epoch_interval_ms,
            state_dir,
            rescan,
            drain_timeout_secs,
            capture,
            trace_source,
            rescan_interval_secs,
            freeze,
            freeze_timeout_ms,
            freeze_interval_secs,
        } => {
            if let Some(dir) = &state_dir {
                blockferry_util::durable::ensure_private_dir(dir, "agent state")
                    .context("the state dir cannot hold the agent's keys and state")?;
            }
            let enrollment = match &state_dir {
                Some(dir) => blockferry_agent::enroll::Enrollment::load(dir)
                    .with_context(|| format!("reading the enrollment in {}", dir.display()))?,
                None => None,
            };
            let credentials = match (credentials, &state_dir, &enrollment) {
                (Some(dir), _, _) => dir,
                (None, Some(dir), Some(_)) => dir.clone(),
                _ => anyhow::bail!(
                    "no credentials: pass --credentials DIR, or enroll first (blockferry-agent enroll --token TOKEN --state-dir DIR) and pass --state-dir DIR"
                ),
            };
            let receiver = match (receiver, &enrollment) {
                (Some(receiver), _) => receiver,
                (None, Some(enrollment)) => enrollment.receiver.clone(),
                (None, None) => anyhow::bail!(
                    "no receiver: pass --receiver HOST:1500, or enroll first and pass --state-dir"
                ),
            };
            let credentials = Credentials::load(&credentials)
                .with_context(|| format!("loading credentials from {}", credentials.display()))?;
            let volumes = Volume::open_all(&disks)?;
            let mut config = AgentConfig::new(receiver, credentials);
            config.exit_when_synced = exit_when_synced;
            config.progress = progress;
            config.streams = streams;
            config.epoch_interval = std::time::Duration::from_millis(epoch_interval_ms);
            config.rescan = rescan;
            config.drain_timeout = std::time::Duration::from_secs(drain_timeout_secs);
            config.capture = capture;
            config.trace_source = trace_source;
            config.rescan_interval = std::time::Duration::from_secs(rescan_interval_secs);
            config.freeze = freeze;
            config.freeze_timeout = std::time::Duration::from_millis(freeze_timeout_ms);
            config.freeze_interval = std::time::Duration::from_secs(freeze_interval_secs);
            config.state_dir = state_dir;
            let shutdown = CancellationToken::new();
            spawn_signal_handler(shutdown.clone());
            let agent = Agent::with_buffer(&volumes, buffer_mib << 20);
            if let Some(listen) = &nbd_listen {
                let access = blockferry_agent::nbd::NbdAccess {
                    allow_uid: nbd_allow_uid,
                    insecure_tcp: nbd_insecure_tcp,
                };
                blockferry_agent::nbd::serve(
                    listen,
                    &access,
                    agent.capture().clone(),
                    sync_mode,
                    shutdown.clone(),
                )
                .await
                .context("starting the NBD tap")?;
            }
            let report = agent.run(&config, &volumes, shutdown).await?;
            tracing::info!(
                payload_bytes = report.payload_bytes,
                zero_fill_bytes = report.zero_fill_bytes,
                wire_bytes = report.wire_bytes,
                sessions = report.sessions,
                elapsed_s = report.elapsed.as_secs_f64(),
                outcome = ?report.outcome,
                "agent finished"
            );
            Ok(match report.outcome {
                Outcome::Synced | Outcome::Shutdown | Outcome::Checkpointed(_) => ExitCode::SUCCESS,
                Outcome::Closed(_) => ExitCode::FAILURE,
                // Distinct, so that systemd's RestartPreventExitStatus keeps it stopped.
                Outcome::Finished(_) => ExitCode::from(EXIT_FINISHED),
            })
        }
    }
}

/// The agent's footprint target is a quarter GiB on busy servers. glibc keeps one arena
/// per thread that ever allocated, and raises its mmap threshold after large buffers are
/// freed, so freed I/O buffers stay resident; measured, that was ~100 MiB on top of the
/// capture buffer under a 2 GiB write burst. A fixed threshold and two arenas give the
/// memory back.
fn limit_allocator_retention() {
    // SAFETY: mallopt only adjusts allocator parameters; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// SIGTERM (systemctl stop) and SIGINT (Ctrl-C) stop the agent cleanly; a second one
/// stops it at once (without a state record, so the next start rescans).
fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stopping (a second signal stops at once)");
        shutdown.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("stopping at once: no state record, the next start rescans");
        std::process::exit(130);
    });
}
