//! `tracked`: block-tracked replication of a loop device written by fio at fixed rates.
//! The agent runs as its own process (`blockferry-agent run --capture block`), so its CPU
//! and memory are its own; the receiver runs in this process, so that its durable epoch
//! can be read cheaply. An idle window first gives the agent's CPU baseline.
//!
//! Lag: every 20 ms a marker (a sequence number in a 4 KiB block of the device's last
//! MiB, which fio does not touch) is written with O_DIRECT; its lag runs from the write's
//! completion until it is durable at the receiver. A watcher sees the marker in the
//! staging image, reads the server's durable epoch D then, and counts the marker durable
//! once the durable epoch reaches D + 2: the epoch it was applied in is D + 1 or, while a
//! sealed epoch is being flushed, D + 2. The figure is therefore an upper bound, coarse by
//! the watcher's 5 ms poll.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use blockferry_receiver::{Receiver, ReceiverConfig};

use crate::continuous::{peak_rss_of, proc_cpu};

const MARKER_EVERY: Duration = Duration::from_millis(20);
const POLL_EVERY: Duration = Duration::from_millis(5);
const MARKER_SLOTS: u64 = 256;
const MARKER_REGION: u64 = MARKER_SLOTS * 4096;
const MAGIC: u64 = 0x626c_6b66_6572_7279;
/// The goal for the agent process at 10 MiB/s.
const CPU_GOAL_PERCENT: f64 = 5.0;

struct LoopDevice(String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

struct Child(std::process::Child);

impl Drop for Child {
    /// A clean stop first, so that the agent removes its trace instance; killed after
    /// 10 s if it has not stopped.
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One rate's figures.
struct Phase {
    mib_per_s: f64,
    agent_cpu_percent: f64,
    lags: Vec<Duration>,
    markers: u64,
}

pub async fn run(
    rates: &[u64],
    seconds: u64,
    size: u64,
    dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    if size <= MARKER_REGION * 2 {
        bail!("--size must be larger than {} bytes", MARKER_REGION * 2);
    }
    let base = dir.unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let work = tempfile::Builder::new()
        .prefix("blockferry-bench")
        .tempdir_in(&base)
        .with_context(|| format!("a temp dir in {}", base.display()))?;
    let backing = work.path().join("tracked.img");
    std::fs::File::create(&backing)?.set_len(size)?;
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
        .context("losetup (util-linux) is needed")?;
    if !out.status.success() {
        bail!(
            "cannot attach a loop device (needs root): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let device = LoopDevice(String::from_utf8(out.stdout)?.trim().to_owned());

    let data = work.path().join("receiver");
    let mut config = ReceiverConfig::new(&data);
    config.listen = "127.0.0.1:0".parse()?;
    let receiver = Receiver::start(config).await?;
    let creds = work.path().join("creds");
    blockferry_receiver::pki::write_agent_credentials(
        &data,
        "bench",
        &creds,
        time::Duration::days(1),
    )?;
    let binary = std::env::current_exe()?.with_file_name("blockferry-agent");
    if !binary.exists() {
        bail!(
            "{} is missing: build it first (cargo build --release -p blockferry-agent)",
            binary.display()
        );
    }
    let agent = Child(
        Command::new(&binary)
            .args([
                "run",
                "--progress",
                "quiet",
                "--capture",
                "block",
                "--freeze",
                "off",
            ])
            .arg("--receiver")
            .arg(receiver.local_addr().to_string())
            .arg("--credentials")
            .arg(&creds)
            .arg("--disk")
            .arg(format!("bench={}", device.0))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the agent")?,
    );
    let pid = agent.0.id();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let status = receiver.status()?;
        let continuous = status
            .servers
            .first()
            .is_some_and(|s| s.connected && s.disks.iter().all(|d| d.state == "CONTINUOUS"));
        if continuous {
            break;
        }
        if Instant::now() > deadline {
            bail!("the agent did not finish its initial sync: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let image = data.join("images").join("bench").join("bench.img");
    println!(
        "block-tracked replication of {} ({}), fio 64 KiB random writes (O_DIRECT) at fixed rates, {seconds} s each; agent pid {pid} (--capture block --freeze off), receiver in this process",
        device.0,
        blockferry_receiver::status::human_bytes(size)
    );

    let idle = {
        let (cpu0, t0) = (proc_cpu(pid), Instant::now());
        tokio::time::sleep(Duration::from_secs(seconds.min(5))).await;
        (proc_cpu(pid) - cpu0) / t0.elapsed().as_secs_f64() * 100.0
    };
    println!(
        "{:>8} {:>10} {:>9} {:>10} {:>10} {:>10} {:>8}",
        "MiB/s", "written/s", "agent %", "lag p50", "lag p99", "lag max", "markers"
    );
    println!(
        "{:>8} {:>10} {:>9.2} {:>10} {:>10} {:>10} {:>8}",
        "idle", "-", idle, "-", "-", "-", "-"
    );
    let mut at_10 = None;
    for &rate in rates {
        // A loss of block-layer events (the kernel drops one now and then, see
        // agent/src/blocktrace.rs) makes the agent rescan the whole disk, which is not
        // the cost being measured: such a phase is reported and measured again.
        let mut attempts = 0;
        let phase = loop {
            attempts += 1;
            let before = lost_events(&receiver).await?;
            let phase = measure(&receiver, &device.0, &image, size, rate, seconds, pid).await?;
            // Heartbeats (every 5 s) report a loss; the rescan it causes must be over
            // before the next phase.
            tokio::time::sleep(Duration::from_secs(6)).await;
            wait_continuous(&receiver).await?;
            let lost = lost_events(&receiver).await?.saturating_sub(before);
            if lost == 0 || attempts == MAX_ATTEMPTS {
                if lost > 0 {
                    println!(
                        "{rate:>8} MiB/s: block-layer events were lost in every attempt; the figure below includes a rescan"
                    );
                }
                break phase;
            }
            println!(
                "{rate:>8} MiB/s: {lost} block-layer event losses made the agent rescan (attempt {attempts}); measuring again"
            );
        };
        let mut lags = phase.lags.clone();
        lags.sort();
        let pick = |q: f64| {
            lags.get(((lags.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or_default()
        };
        println!(
            "{:>8} {:>9.1}M {:>9.2} {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>8}",
            rate,
            phase.mib_per_s,
            phase.agent_cpu_percent,
            pick(0.5).as_secs_f64() * 1e3,
            pick(0.99).as_secs_f64() * 1e3,
            lags.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            format!("{}/{}", lags.len(), phase.markers)
        );
        if rate == 10 {
            at_10 = Some(phase.agent_cpu_percent);
        }
    }
    println!(
        "agent peak RSS {}",
        peak_rss_of(pid).map_or("-".into(), blockferry_receiver::status::human_bytes)
    );
    if let Some(cpu) = at_10 {
        println!(
            "agent process CPU at 10 MiB/s: {cpu:.2}% of a core (idle {idle:.2}%); goal <= {CPU_GOAL_PERCENT}%: {}",
            if cpu <= CPU_GOAL_PERCENT {
                "met"
            } else {
                "MISSED"
            }
        );
    }
    drop(agent);
    receiver.shutdown().await;
    Ok(())
}

/// Attempts at a rate before a figure that includes a rescan is reported.
const MAX_ATTEMPTS: u32 = 4;

/// Losses of block-layer events the agent has reported in its heartbeats (waiting for
/// a heartbeat after a reconnect).
async fn lost_events(receiver: &Receiver) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = receiver.status()?;
        if let Some(t) = status.servers.first().and_then(|s| s.tracking.as_ref()) {
            return Ok(t.lost_events);
        }
        if Instant::now() > deadline {
            bail!("the agent sent no heartbeat with its tracking counters: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the agent is connected and every disk is CONTINUOUS again.
async fn wait_continuous(receiver: &Receiver) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let status = receiver.status()?;
        if status
            .servers
            .first()
            .is_some_and(|s| s.connected && s.disks.iter().all(|d| d.state == "CONTINUOUS"))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the agent did not return to CONTINUOUS: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    receiver: &Receiver,
    device: &str,
    image: &Path,
    size: u64,
    rate: u64,
    seconds: u64,
    pid: u32,
) -> anyhow::Result<Phase> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let marker_region = size - MARKER_REGION;
    let markers = std::thread::spawn({
        let (device, stop) = (device.to_owned(), Arc::clone(&stop));
        move || -> anyhow::Result<u64> {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&device)?;
            let mut raw = vec![0u8; 8192];
            let at = raw.as_ptr().align_offset(4096);
            let block = &mut raw[at..at + 4096];
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                block[..8].copy_from_slice(&MAGIC.to_le_bytes());
                block[8..16].copy_from_slice(&seq.to_le_bytes());
                file.write_all_at(block, marker_region + (seq % MARKER_SLOTS) * 4096)?;
                if tx.send((seq, Instant::now())).is_err() {
                    break;
                }
                std::thread::sleep(MARKER_EVERY);
            }
            Ok(seq)
        }
    });
    let fio = std::thread::spawn({
        let device = device.to_owned();
        move || -> anyhow::Result<f64> {
            let out = Command::new("fio")
                .args([
                    "--name=w",
                    "--rw=randwrite",
                    "--bs=64k",
                    "--direct=1",
                    "--ioengine=psync",
                    "--time_based=1",
                    "--output-format=json",
                ])
                .arg(format!("--filename={device}"))
                .arg(format!("--size={}", size - MARKER_REGION))
                .arg(format!("--runtime={seconds}"))
                .arg(format!("--rate={rate}m"))
                .output()
                .context("fio is needed: apt-get install fio")?;
            if !out.status.success() {
                bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            Ok(json["jobs"][0]["write"]["bw_bytes"].as_f64().unwrap_or(0.0) / f64::from(1 << 20))
        }
    });
    let image_file = std::fs::File::open(image)?;
    let (cpu0, t0) = (proc_cpu(pid), Instant::now());
    let mut cpu_window = None;
    // (seq, completed at, durable epoch to wait for once seen)
    let mut pending: Vec<(u64, Instant, Option<u64>)> = Vec::new();
    let mut lags = Vec::new();
    let writing_until = t0 + Duration::from_secs(seconds);
    let give_up = writing_until + Duration::from_secs(60);
    let mut slot = vec![0u8; 16];
    loop {
        while let Ok(marker) = rx.try_recv() {
            pending.push((marker.0, marker.1, None));
        }
        let now = Instant::now();
        if now >= writing_until && !stop.load(Ordering::Relaxed) {
            stop.store(true, Ordering::Relaxed);
            cpu_window = Some((proc_cpu(pid) - cpu0) / t0.elapsed().as_secs_f64() * 100.0);
        }
        if (stop.load(Ordering::Relaxed) && pending.is_empty() && markers.is_finished())
            || now > give_up
        {
            break;
        }
        // The images first, then the durable epoch: a marker seen is applied in an epoch
        // after the one read next, so the target is never too early.
        let seen: Vec<bool> = pending
            .iter()
            .map(|&(seq, _, target)| {
                target.is_none() && {
                    let offset = marker_region + (seq % MARKER_SLOTS) * 4096;
                    image_file.read_exact_at(&mut slot, offset).is_ok()
                        && slot[..8] == MAGIC.to_le_bytes()
                        && u64::from_le_bytes(slot[8..16].try_into().expect("8 bytes")) >= seq
                }
            })
            .collect();
        let durable = receiver
            .status()?
            .servers
            .first()
            .map_or(0, |s| s.durable_epoch);
        let mut seen = seen.into_iter();
        pending.retain_mut(|(_, completed, target)| {
            if seen.next() == Some(true) {
                *target = Some(durable + 2);
            }
            match target {
                Some(target) if durable >= *target => {
                    lags.push(completed.elapsed());
                    false
                }
                _ => true,
            }
        });
        tokio::time::sleep(POLL_EVERY).await;
    }
    let markers = markers.join().expect("the marker thread")?;
    let mib_per_s = fio.join().expect("the fio thread")?;
    Ok(Phase {
        mib_per_s,
        agent_cpu_percent: cpu_window.unwrap_or_default(),
        lags,
        markers,
    })
}
