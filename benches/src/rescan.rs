//! `rescan`: bringing a replica up to date after scattered changes nobody tracked.
//!
//! A random image is replicated once (untimed). Then, per run, 1% of its 4 KiB blocks
//! change at scattered places and three things are timed, in turns: blockferry's rescan by
//! checksum (agent and receiver in this process, over loopback mTLS, durable at the end),
//! `rsync --inplace --no-whole-file -B 4096` bringing a copy up to date on the same file
//! system, and simply reading both images (what any comparison must at least do). Medians
//! of time and bytes on the wire are printed with ratios.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use blockferry_agent::{Agent, AgentConfig, Volume};
use blockferry_receiver::demo::{ImageLayout, first_difference, generate_image};
use blockferry_receiver::status::human_bytes;
use tokio_util::sync::CancellationToken;

use crate::{ReceiverOptions, local_pair, median};

pub(crate) struct Measured {
    pub(crate) time: Duration,
    pub(crate) wire: u64,
}

pub async fn run(size: u64, runs: usize, percent: f64, dir: Option<PathBuf>) -> anyhow::Result<()> {
    if Command::new("rsync").arg("--version").output().is_err() {
        bail!("rsync is not installed; it is the baseline: apt-get install rsync");
    }
    let base = dir.unwrap_or_else(|| PathBuf::from("/var/tmp"));
    std::fs::create_dir_all(&base)?;
    let work = tempfile::Builder::new()
        .prefix("blockferry-bench")
        .tempdir_in(&base)?;
    let source = work.path().join("source.img");
    let copy = work.path().join("rsync-copy.img");
    println!(
        "generating a {}-byte random image in {}",
        size,
        work.path().display()
    );
    generate_image(
        &source,
        size,
        ImageLayout {
            random_fraction: 1.0,
            region: 8 << 20,
            seed: 7,
        },
    )?;
    std::fs::copy(&source, &copy).context("making the rsync copy")?;

    let data = work.path().join("receiver");
    let options = ReceiverOptions {
        io_engine: blockferry_storage::IoEngine::Auto,
        barrier_interval: 16 << 20,
    };
    let (receiver, agent_config, volumes) = local_pair(&source, &data, options).await?;
    println!("initial sync (not timed)");
    Agent::new(&volumes)
        .run(&agent_config, &volumes, CancellationToken::new())
        .await?;
    let staging = data.join("images/bench/disk0.img");

    let blocks = size / 4096;
    let changed_blocks = ((blocks as f64) * percent / 100.0).round().max(1.0) as u64;
    let (mut ours, mut theirs, mut reads) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        change_blocks(&source, blocks, changed_blocks, 0x5eed + run as u64)?;
        // Turns: who goes first changes each run, so cache and noise fall on both.
        let (a, b) = if run % 2 == 1 {
            (
                blockferry_rescan(&agent_config, &volumes).await?,
                rsync(&source, &copy)?,
            )
        } else {
            let r = rsync(&source, &copy)?;
            (blockferry_rescan(&agent_config, &volumes).await?, r)
        };
        let read = read_both(&source, &staging)?;
        if let Some(at) = first_difference(&source, &staging)? {
            bail!("the staging copy differs from the source at byte {at}");
        }
        if let Some(at) = first_difference(&source, &copy)? {
            bail!("the rsync copy differs from the source at byte {at}");
        }
        println!(
            "run {run}: blockferry {:.2} s ({}), rsync {:.2} s ({}), read both {:.2} s",
            a.time.as_secs_f64(),
            human_bytes(a.wire),
            b.time.as_secs_f64(),
            human_bytes(b.wire),
            read.as_secs_f64()
        );
        ours.push(a);
        theirs.push(b);
        reads.push(read);
    }
    receiver.shutdown().await;

    let changed = changed_blocks * 4096;
    let med = |v: &[Measured]| {
        let mut t: Vec<Duration> = v.iter().map(|m| m.time).collect();
        let mut w: Vec<Duration> = v.iter().map(|m| Duration::from_nanos(m.wire)).collect();
        (median(&mut t), median(&mut w).as_nanos() as u64)
    };
    let ((our_time, our_wire), (their_time, their_wire)) = (med(&ours), med(&theirs));
    let read = median(&mut reads);
    println!();
    println!(
        "rescan of {} random with {percent}% of its 4 KiB blocks changed ({}), {runs} runs (medians):",
        human_bytes(size),
        human_bytes(changed)
    );
    println!(
        "  {:<44} {:>8} {:>12} {:>14}",
        "", "time", "on the wire", "time / read"
    );
    println!(
        "  {:<44} {:>7.2}s {:>12} {:>14}",
        "lower bound: read both images",
        read.as_secs_f64(),
        "-",
        "1.00"
    );
    println!(
        "  {:<44} {:>7.2}s {:>12} {:>14.2}",
        "blockferry rescan (loopback mTLS, durable)",
        our_time.as_secs_f64(),
        human_bytes(our_wire),
        our_time.as_secs_f64() / read.as_secs_f64()
    );
    println!(
        "  {:<44} {:>7.2}s {:>12} {:>14.2}",
        "rsync --inplace --no-whole-file -B 4096",
        their_time.as_secs_f64(),
        human_bytes(their_wire),
        their_time.as_secs_f64() / read.as_secs_f64()
    );
    println!(
        "  blockferry is {:.2}x the speed of rsync, with {:.2}x its bytes on the wire",
        their_time.as_secs_f64() / our_time.as_secs_f64(),
        our_wire as f64 / their_wire.max(1) as f64
    );
    Ok(())
}

/// A new agent process's view: no state record, so an operator-requested rescan.
pub(crate) async fn blockferry_rescan(
    config: &AgentConfig,
    volumes: &[Volume],
) -> anyhow::Result<Measured> {
    let mut config = config.clone();
    config.rescan = true;
    let agent = Agent::new(volumes);
    // On stderr, so that a profiler's timeline can be cut to the rescan.
    eprintln!("blockferry rescan: start");
    let started = Instant::now();
    let report = agent
        .run(&config, volumes, CancellationToken::new())
        .await?;
    let time = started.elapsed();
    eprintln!("blockferry rescan: end ({:.2} s)", time.as_secs_f64());
    let stats = agent.stats();
    if stats.rescanned_bytes.load(Ordering::Relaxed) == 0 {
        bail!("the agent did not rescan");
    }
    Ok(Measured {
        time,
        wire: report.wire_bytes + stats.received_bytes.load(Ordering::Relaxed),
    })
}

fn rsync(source: &Path, copy: &Path) -> anyhow::Result<Measured> {
    rsync_to(source, copy.as_os_str(), copy)
}

/// `rsync --inplace --no-whole-file -B 4096` of `source` to `destination` (a path, or a
/// daemon's `rsync://` URL) whose data lands in `copy`, then fsync of `copy`: rsync
/// itself does not make its writes durable, and ours are.
pub(crate) fn rsync_to(
    source: &Path,
    destination: &std::ffi::OsStr,
    copy: &Path,
) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let out = Command::new("rsync")
        // --ignore-times: the delta transfer always runs, as for an image whose
        // modification time changed; rsync's quick check would otherwise skip a file
        // changed within the second its copy was last written.
        .args([
            "--inplace",
            "--no-whole-file",
            "--ignore-times",
            "-B",
            "4096",
            "--stats",
        ])
        .arg(source)
        .arg(destination)
        .output()
        .context("running rsync")?;
    if !out.status.success() {
        bail!("rsync failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    File::open(copy)?.sync_all()?;
    Ok(Measured {
        time: started.elapsed(),
        wire: rsync_wire_bytes(&String::from_utf8_lossy(&out.stdout)),
    })
}

/// Bytes sent plus received, from the totals of `rsync --stats`.
pub(crate) fn rsync_wire_bytes(stats: &str) -> u64 {
    let field = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .map_or(0, |n| n.replace(',', "").parse().unwrap_or(0))
    };
    field("Total bytes sent:") + field("Total bytes received:")
}

pub(crate) fn read_both(a: &Path, b: &Path) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut buf = vec![0u8; 8 << 20];
    for path in [a, b] {
        let mut file = File::open(path)?;
        while file.read(&mut buf)? > 0 {}
    }
    Ok(started.elapsed())
}

pub(crate) fn change_blocks(path: &Path, blocks: u64, count: u64, seed: u64) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let mut x = (seed << 1) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < count {
        chosen.insert(next() % blocks);
    }
    let mut data = vec![0u8; 4096];
    for block in chosen {
        for chunk in data.chunks_mut(8) {
            chunk.copy_from_slice(&next().to_le_bytes());
        }
        file.write_all_at(&data, block * 4096)?;
    }
    file.sync_all()?;
    Ok(())
}
