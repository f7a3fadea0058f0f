//! `blockferry-bench`: measurements that need a quiet machine, never run as tests (a
//! short `loadgen` run is, as a smoke test). `compare` (compare.rs) runs the standard
//! comparison with socat, cp and an rsync daemon; `loadgen` (loadgen.rs, plot.rs) many
//! simulated agents; `continuous` (continuous.rs) lag and footprint at fixed write
//! rates; `rescan` (rescan.rs) a rescan against a local rsync; `points` (points.rs) the
//! cost of a recovery point against a full copy. BENCHMARKS.md holds the
//! figures.
//!
//! `initial-sync` replicates a random (incompressible, all non-zero) image over loopback
//! mutual TLS into the file backend, durable at the end, and compares it with copying the
//! same image on the same file system with a final fdatasync — the lower bound of any
//! staging write path. Runs alternate between the two so that noise from a shared machine
//! falls on both, and the medians and their ratio are printed.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use blockferry_agent::{Agent, AgentConfig, Credentials, Volume};
use blockferry_receiver::demo::{ImageLayout, first_difference, generate_image, parse_size};
use blockferry_receiver::{Receiver, ReceiverConfig};
use blockferry_storage::IoEngine;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

mod compare;
mod continuous;
mod ebs_upload;
mod loadgen;
mod plot;
mod points;
mod rescan;
mod tracked;
mod tracking;

#[derive(Parser)]
#[command(name = "blockferry-bench", about = "blockferry benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Initial sync of a random image over loopback mTLS vs. a local copy + fdatasync.
    InitialSync {
        /// Image size, e.g. 512M, 2G.
        #[arg(long, default_value = "2G", value_parser = parse_size)]
        size: u64,
        /// Runs of each side (alternating); medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Directory on the file system to measure (default: a temp dir under /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Staging I/O engine: auto, uring, sync.
        #[arg(long, default_value = "auto")]
        io_engine: IoEngine,
        /// The receiver's barrier interval (flush + durable watermark), MiB.
        #[arg(long, default_value_t = 16)]
        barrier_interval_mib: u64,
    },
    /// Continuous replication: random 4-64 KiB writes through the in-process capture at
    /// fixed rates; lag (captured -> durable at a consistent point), agent CPU and RSS,
    /// receiver CPU. The receiver runs as its own process (the blockferry-receiver
    /// binary beside this one: cargo build --release -p blockferry-receiver).
    Continuous {
        /// Write rates in MiB/s, comma-separated.
        #[arg(long, default_value = "10,50,200", value_delimiter = ',')]
        rates: Vec<u64>,
        /// Seconds per rate.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Size of the replicated disk.
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        size: u64,
        /// Directory on the file system to measure (default: a temp dir under /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// The standard comparison in one go: initial sync (random, then half zeros) vs. a
    /// socat TLS 1.3 pipe and cp + fsync; rescan vs. an rsync daemon and reading both
    /// images. Alternating runs, medians, ratios, and the suite's targets checked. Needs
    /// socat and rsync (apt-get install socat rsync).
    Compare {
        /// Image size, e.g. 1G, 4G.
        #[arg(long, default_value = "4G", value_parser = parse_size)]
        size: u64,
        /// Runs of each contender (alternating); medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Percentage of 4 KiB blocks changed before each rescan, scattered.
        #[arg(long, default_value_t = 1.0)]
        changed_percent: f64,
        /// Directory on the file system to measure (default: a temp dir under /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// The EBS snapshot uploader against the in-memory fake with a fixed latency per
    /// PUT: throughput per concurrency level, beside the ceiling that latency allows.
    EbsUpload {
        /// Blocks of 512 KiB per run.
        #[arg(long, default_value_t = 2000)]
        blocks: u32,
        /// Latency of each PUT, milliseconds.
        #[arg(long, default_value_t = 100)]
        latency_ms: u64,
        /// Concurrency levels, comma-separated.
        #[arg(long, default_value = "1,16,64,128", value_delimiter = ',')]
        concurrency: Vec<usize>,
    },
    /// Many simulated agents (the agent library, each with its own certificate and
    /// disks) against one receiver: initial sync, then continuous writes; throughput,
    /// lag, CPU, memory and bytes on the wire, as a table, JSON and a PNG plot.
    Loadgen {
        /// Simulated agents (source servers).
        #[arg(long, default_value_t = 4)]
        agents: usize,
        /// Disks per agent.
        #[arg(long, default_value_t = 2)]
        disks: usize,
        /// TLS streams per agent (the receiver grants at most 5).
        #[arg(long, default_value_t = 4)]
        streams: u8,
        /// Size of each disk image, e.g. 64M, 1G.
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        size: u64,
        /// Fraction of each image that is zeros (0 to 1), spread in 1 MiB regions.
        #[arg(long, default_value_t = 0.0)]
        zero_fraction: f64,
        /// Continuous phase: MiB/s of writes per agent.
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        /// Smallest write, bytes (a multiple of 512), e.g. 4K.
        #[arg(long, default_value = "4K", value_parser = parse_size)]
        min_write: u64,
        /// Largest write, bytes (a multiple of 512), e.g. 64K.
        #[arg(long, default_value = "64K", value_parser = parse_size)]
        max_write: u64,
        /// Where writes land: uniform, sequential, zipf.
        #[arg(long, value_enum, default_value = "uniform")]
        pattern: loadgen::Pattern,
        /// Seconds of continuous writes.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// An external receiver (HOST:PORT) instead of one started here; needs
        /// --credentials.
        #[arg(long)]
        receiver: Option<String>,
        /// With --receiver: a directory holding agent-000, agent-001, … each an agent
        /// credentials directory (`blockferry-receiver agent issue --out`).
        #[arg(long)]
        credentials: Option<PathBuf>,
        /// Directory for images and the local receiver's data (default: a temp dir under
        /// /var/tmp, removed afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also draw throughput and lag over time into this PNG file.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// How often throughput and lag are sampled, milliseconds.
        #[arg(long, default_value_t = 100)]
        sample_ms: u64,
    },
    /// Cutting a file-backend recovery point (the receiver's copy: a reflink, or the full
    /// copy fallback) vs. cp --reflink=never + fsync of the same image: time and space,
    /// on --dir's file system and (as root, with mkfs.xfs) a loop-mounted XFS.
    Points {
        /// Image size, e.g. 256M, 2G.
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        size: u64,
        /// Runs of each side (alternating); medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Directory on the file system to measure (default: a temp dir under /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Rescan by checksum after scattered untracked changes vs. rsync --inplace
    /// --no-whole-file on the same data, and vs. reading both images (the lower bound).
    Rescan {
        /// Image size, e.g. 1G, 4G.
        #[arg(long, default_value = "4G", value_parser = parse_size)]
        size: u64,
        /// Runs (each changes a new 1% of the blocks); medians are reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Percentage of 4 KiB blocks changed per run, scattered.
        #[arg(long, default_value_t = 1.0)]
        changed_percent: f64,
        /// Directory on the file system to measure (default: a temp dir under /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Block-tracked replication of a loop device written by fio at fixed rates: the
    /// agent process's CPU (beside its idle CPU) and the lag from a write's completion
    /// to its durability at the receiver (p50, p99, max). Needs root and fio, and the
    /// release blockferry-agent binary beside this one.
    Tracked {
        /// Write rates to measure, MiB/s.
        #[arg(long, value_delimiter = ',', default_value = "10,50")]
        rates: Vec<u64>,
        /// Seconds per rate.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Size of the loop device.
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        size: u64,
        /// Where the loop device's backing file lives (default /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// What block-layer tracking costs a writer: fio 4 KiB random writes (O_DIRECT) to a
    /// loop device untracked, tracked by the agent's tracker through each source (its
    /// ftrace instance, perf rings), and with --bpf by a bpftrace program on the same
    /// tracepoint; then the tracker's CPU at 10 MiB/s through each source.
    /// Needs root, fio (and bpftrace for --bpf).
    Tracking {
        /// Size of the loop device.
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        size: u64,
        /// Seconds per fio run.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// Rounds; each runs every mode once, in turn.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Where the loop device's backing file lives (default /var/tmp).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Also measure a bpftrace program that sets bits in a map.
        #[arg(long)]
        bpf: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    let runtime = tokio::runtime::Runtime::new()?;
    match command {
        Command::InitialSync {
            size,
            runs,
            dir,
            io_engine,
            barrier_interval_mib,
        } => {
            let receiver = ReceiverOptions {
                io_engine,
                barrier_interval: barrier_interval_mib.max(1) << 20,
            };
            runtime.block_on(initial_sync(size, runs.max(1), dir, receiver))
        }
        Command::Continuous {
            rates,
            seconds,
            size,
            dir,
        } => runtime.block_on(continuous::run(&rates, seconds, size, dir)),
        Command::Loadgen {
            agents,
            disks,
            streams,
            size,
            zero_fraction,
            rate,
            min_write,
            max_write,
            pattern,
            seconds,
            receiver,
            credentials,
            dir,
            json,
            plot,
            sample_ms,
        } => {
            let options = loadgen::Options {
                agents,
                disks,
                streams,
                size,
                zero_fraction,
                rate,
                min_write,
                max_write,
                pattern,
                seconds,
                receiver,
                credentials,
                dir,
                json,
                plot,
                sample_every: Duration::from_millis(sample_ms.max(10)),
            };
            runtime.block_on(loadgen::run(options)).map(drop)
        }
        Command::EbsUpload {
            blocks,
            latency_ms,
            concurrency,
        } => runtime.block_on(ebs_upload::run(
            blocks.max(1),
            Duration::from_millis(latency_ms),
            &concurrency,
        )),
        Command::Compare {
            size,
            runs,
            changed_percent,
            dir,
        } => runtime.block_on(compare::run(size, runs.max(1), changed_percent, dir)),
        Command::Points { size, runs, dir } => points::run_bench(size, runs.max(1), dir),
        Command::Rescan {
            size,
            runs,
            changed_percent,
            dir,
        } => runtime.block_on(rescan::run(size, runs.max(1), changed_percent, dir)),
        Command::Tracking {
            size,
            seconds,
            rounds,
            dir,
            bpf,
        } => tracking::run(size, seconds.max(1), rounds.max(1), dir, bpf),
        Command::Tracked {
            rates,
            seconds,
            size,
            dir,
        } => runtime.block_on(tracked::run(&rates, seconds.max(1), size, dir)),
    }
}

#[derive(Debug, Clone, Copy)]
struct ReceiverOptions {
    io_engine: IoEngine,
    barrier_interval: u64,
}

async fn initial_sync(
    size: u64,
    runs: usize,
    dir: Option<PathBuf>,
    receiver: ReceiverOptions,
) -> anyhow::Result<()> {
    let base = dir.unwrap_or_else(|| PathBuf::from("/var/tmp"));
    std::fs::create_dir_all(&base)?;
    let work = tempfile::Builder::new()
        .prefix("blockferry-bench")
        .tempdir_in(&base)?;
    let source = work.path().join("source.img");
    println!(
        "generating a {size}-byte random image in {}",
        work.path().display()
    );
    generate_image(
        &source,
        size,
        ImageLayout {
            random_fraction: 1.0,
            region: 8 << 20,
            seed: 42,
        },
    )?;

    let mut copy_times = Vec::new();
    let mut sync_times = Vec::new();
    for run in 1..=runs {
        let copy = time_copy(&source, &work.path().join("copy.img"))?;
        let sync = time_blockferry(&source, &work.path().join("receiver"), receiver).await?;
        println!(
            "run {run}: copy+fdatasync {:.2} GB/s, blockferry {:.2} GB/s",
            gbps(size, copy),
            gbps(size, sync)
        );
        copy_times.push(copy);
        sync_times.push(sync);
    }
    let (copy, sync) = (median(&mut copy_times), median(&mut sync_times));
    println!();
    println!(
        "initial sync, {} random, durable, loopback mTLS, {runs} runs (medians):",
        blockferry_receiver::status::human_bytes(size)
    );
    println!(
        "  baseline  copy + fdatasync      {:>6.2} GB/s  ({:.2} s)",
        gbps(size, copy),
        copy.as_secs_f64()
    );
    println!(
        "  blockferry agent -> receiver    {:>6.2} GB/s  ({:.2} s)",
        gbps(size, sync),
        sync.as_secs_f64()
    );
    println!(
        "  ratio blockferry / baseline     {:>6.2}",
        copy.as_secs_f64() / sync.as_secs_f64()
    );
    println!(
        "  peak RSS of this process (agent and receiver together): {} MiB",
        peak_rss_mib()
    );
    Ok(())
}

/// Locks a mutex, also after a panic elsewhere: the data are measurements, still usable.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn gbps(size: u64, d: Duration) -> f64 {
    size as f64 / d.as_secs_f64() / 1e9
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The baseline: read the image and write a copy on the same file system, then fdatasync.
fn time_copy(source: &Path, target: &Path) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut input = File::open(source)?;
    let mut output = File::create(target)?;
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        output.write_all(&buf[..n])?;
    }
    output.sync_data()?;
    let elapsed = started.elapsed();
    std::fs::remove_file(target)?;
    Ok(elapsed)
}

/// A receiver on loopback in `data`, and the configuration of an agent (server "bench")
/// that replicates `source` to it as disk0 and exits once synced.
async fn local_pair(
    source: &Path,
    data: &Path,
    options: ReceiverOptions,
) -> anyhow::Result<(Receiver, AgentConfig, Vec<Volume>)> {
    let mut config = ReceiverConfig::new(data);
    config.listen = "127.0.0.1:0".parse()?;
    config.io_engine = options.io_engine;
    config.barrier_interval = options.barrier_interval;
    let receiver = Receiver::start(config).await?;
    let creds_dir = data.join("agent-credentials");
    blockferry_receiver::pki::write_agent_credentials(
        data,
        "bench",
        &creds_dir,
        time::Duration::days(1),
    )?;
    let volumes = Volume::open_all(&[format!("disk0={}", source.display())])?;
    let mut agent_config = AgentConfig::new(
        receiver.local_addr().to_string(),
        Credentials::load(&creds_dir)?,
    );
    agent_config.exit_when_synced = true;
    Ok((receiver, agent_config, volumes))
}

/// A fresh receiver and agent; timed from the agent's start until the last barrier is
/// durable. The staging copy is verified (outside the timing).
async fn time_blockferry(
    source: &Path,
    data: &Path,
    options: ReceiverOptions,
) -> anyhow::Result<Duration> {
    let _ = std::fs::remove_dir_all(data);
    let (receiver, agent_config, volumes) = local_pair(source, data, options).await?;
    let started = Instant::now();
    Agent::new(&volumes)
        .run(&agent_config, &volumes, CancellationToken::new())
        .await?;
    let elapsed = started.elapsed();
    receiver.shutdown().await;
    let staging = data.join("images/bench/disk0.img");
    if let Some(at) = first_difference(source, &staging).context("verifying the staging copy")? {
        bail!("the staging copy differs from the source at byte {at}");
    }
    std::fs::remove_dir_all(data)?;
    Ok(elapsed)
}

fn peak_rss_mib() -> u64 {
    // SAFETY: rusage is plain old data, valid when zeroed; getrusage only writes into the
    // struct we pass, and RUSAGE_SELF is always a valid target.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    u64::try_from(usage.ru_maxrss).unwrap_or(0) / 1024
}
