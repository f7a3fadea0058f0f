//! `run`: the receiver itself, from its flags, until SIGTERM or SIGINT.

use super::*;

/// The flags of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Data directory: CA, catalog, staging images, admin socket. Created if missing.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Replication listener address.
    #[arg(long, default_value = crate::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Staging I/O engine: auto (io_uring, else sync with a warning), uring, sync.
    #[arg(long, default_value = "auto")]
    pub io_engine: IoEngine,
    /// io_uring writer threads, each with its own ring.
    #[arg(long, default_value_t = 1)]
    pub writer_threads: usize,
    /// Agents send a barrier (flush + durable watermark) after this many MiB.
    #[arg(long, default_value_t = 16)]
    pub barrier_interval_mib: u64,
    /// Streams (TLS connections) granted to one agent, 1 to 5.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub max_streams: u8,
    /// Control API (HTTPS: enrollment, renewal, status) address; "off" disables it.
    #[arg(long, default_value = "0.0.0.0:8443", value_parser = parse_control)]
    pub control: Control,
    /// Lifetime of agent certificates issued by the control API, in hours; agents
    /// renew well before it ends.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=8760))]
    pub agent_cert_hours: u64,
    /// Prometheus metrics (plain HTTP, GET /metrics) address; "off" disables them.
    #[arg(long, default_value = crate::metrics::DEFAULT_METRICS, value_parser = parse_control)]
    pub metrics: Control,
    /// A disk with changes waiting and nothing made durable for this many seconds is
    /// STALLED (reason no_progress).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(5..=86400))]
    pub stall_after_secs: u64,
    /// Initial syncs and rescans running at once, all servers together; more wait as
    /// QUEUED. 0 is unlimited.
    #[arg(long, default_value_t = 0)]
    pub max_concurrent_syncs: usize,
    /// Where disks are staged: `file` (an image per disk in the data dir) or `ebs`
    /// (that image is a local base copy, and each recovery point becomes one EBS
    /// snapshot per disk, a chain of children, through the EBS direct APIs).
    #[arg(long, value_enum, default_value_t = Backend::File)]
    pub backend: Backend,
    /// The largest disk an agent may replicate, e.g. 16T; larger ones are refused.
    #[arg(long, default_value = "64T", value_parser = parse_size)]
    pub max_disk_size: u64,
    /// Receive buffers of all replication connections together, in MiB (about 1 MiB
    /// per stream in a session); connections beyond it are told to retry later.
    #[arg(long, default_value_t = crate::budget::DEFAULT_FRAME_BUFFER_MIB, value_parser = clap::value_parser!(u32).range(16..=1048576))]
    pub frame_buffer_mib: u32,
    /// File backend: recovery points as copies of the staging images under
    /// images/SERVER/points/EPOCH/: `auto` cuts them as reflinks where the staging
    /// file system shares extents (XFS, btrfs) and none elsewhere; `copy` falls back to
    /// a full copy of every image per point (its space, and a pause of the server's
    /// replication while it copies); `off` cuts none. (EBS: every point is a snapshot.)
    #[arg(long, value_enum, default_value_t = crate::points::FilePointMode::Auto)]
    pub recovery_points: crate::points::FilePointMode,
    /// A recovery point is cut at the first consistent point this many seconds after
    /// the previous one (0: as often as the previous point allows).
    #[arg(long, default_value_t = 600)]
    pub recovery_interval_secs: u64,
    /// How often the retention policies are enforced: points they drop are deleted
    /// (file backend) or their snapshots deleted in EC2 (EBS backend).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub retention_check_secs: u64,
    #[command(flatten)]
    pub ebs: EbsArgs,
    #[command(flatten)]
    pub aws: AwsArgs,
}

pub(super) async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let RunArgs {
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
        recovery_interval_secs,
        retention_check_secs,
        ebs,
        aws,
    } = args;
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

pub(super) async fn wait_for_signal() {
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
