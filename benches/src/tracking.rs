//! `tracking`: what block-layer change tracking costs a writer. fio writes 4 KiB random
//! blocks with O_DIRECT to a loop device while nothing tracks it, while the agent's
//! tracker ([`blockferry_agent::blocktrace`] on `block_rq_complete`) drains it through
//! each of its sources (its own ftrace instance, perf rings), and, with `--bpf`, while a bpftrace program sets bits in a map on the same
//! tracepoint (the in-kernel alternative, for comparison). Rounds alternate between the
//! modes so that a shared machine's noise falls on all of them; medians are printed. A
//! second fio job writes at a fixed 10 MiB/s, to measure the tracker's own CPU at a
//! steady rate.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use blockferry_agent::blocktrace::{Change, Placement, TraceSource, Tracker};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Off,
    Ftrace,
    PerfRing,
    Bpf,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Ftrace => "ftrace (blockferry)",
            Self::PerfRing => "perf ring (blockferry)",
            Self::Bpf => "bpf map (bpftrace)",
        }
    }
}

/// One fio run: IOPS and the 99th percentile of completion latency, µs.
#[derive(Debug, Clone, Copy)]
struct FioResult {
    iops: f64,
    p99_us: f64,
    mib_per_s: f64,
}

struct LoopDevice(String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn fio(device: &str, seconds: u64, rate: Option<&str>) -> anyhow::Result<FioResult> {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=w",
        "--rw=randwrite",
        "--bs=4k",
        "--direct=1",
        "--ioengine=psync",
        "--time_based=1",
        "--output-format=json",
    ])
    .arg(format!("--filename={device}"))
    .arg(format!("--runtime={seconds}"));
    if let Some(rate) = rate {
        cmd.arg(format!("--rate={rate}"));
    }
    let out = cmd.output().context("fio is needed: apt-get install fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio's JSON")?;
    let write = &json["jobs"][0]["write"];
    Ok(FioResult {
        iops: write["iops"].as_f64().unwrap_or(0.0),
        p99_us: write["clat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1000.0,
        mib_per_s: write["bw_bytes"].as_f64().unwrap_or(0.0) / f64::from(1 << 20),
    })
}

/// CPU seconds the calling thread has used.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through the pointer, alive for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// What the tracker did during a run: samples, losses, CPU seconds, bytes reported.
#[derive(Debug, Default, Clone, Copy)]
struct Drained {
    samples: u64,
    lost: u64,
    cpu: f64,
    bytes: u64,
}

/// Tracks `placement` on a thread of its own until `stop`.
fn track(
    placement: Placement,
    source: TraceSource,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<Drained>> {
    let mut tracker = Tracker::start_with(&[placement], 256, source)
        .with_context(|| format!("starting the block tracker ({source:?})"))?;
    Ok(std::thread::spawn(move || {
        let started = thread_cpu();
        let mut bytes = 0;
        while !stop.load(Ordering::Relaxed) {
            tracker.wait(Duration::from_millis(100));
            tracker.drain(|change| {
                if let Change::Written { len, .. } = change {
                    bytes += len;
                }
            });
        }
        tracker.drain(|_| {});
        let (samples, kernel_lost, unseen) = tracker.counts();
        let lost = kernel_lost + unseen;
        Drained {
            samples,
            lost,
            cpu: thread_cpu() - started,
            bytes,
        }
    }))
}

/// Runs fio once under `mode`.
fn round(
    mode: Mode,
    device: &str,
    placement: Placement,
    seconds: u64,
    rate: Option<&str>,
) -> anyhow::Result<(FioResult, Option<Drained>)> {
    match mode {
        Mode::Off => Ok((fio(device, seconds, rate)?, None)),
        Mode::Ftrace | Mode::PerfRing => {
            let source = if mode == Mode::Ftrace {
                TraceSource::Ftrace
            } else {
                TraceSource::Perf
            };
            let stop = Arc::new(AtomicBool::new(false));
            let thread = track(placement, source, Arc::clone(&stop))?;
            let result = fio(device, seconds, rate);
            stop.store(true, Ordering::Relaxed);
            let drained = thread
                .join()
                .map_err(|_| anyhow::anyhow!("the tracker thread panicked"))?;
            Ok((result?, Some(drained)))
        }
        Mode::Bpf => {
            let program = format!(
                "tracepoint:block:block_rq_complete /args.dev == {} && args.nr_sector > 0/ {{ @d[args.sector / 512] = @d[args.sector / 512] | (1 << ((args.sector / 8) % 64)); }} END {{ clear(@d); }}",
                placement.disk_dev
            );
            let mut bpf = Command::new("bpftrace")
                .args(["-e", &program])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("bpftrace is needed for --bpf: apt-get install bpftrace")?;
            // bpftrace attaches within a few seconds.
            std::thread::sleep(Duration::from_secs(4));
            let result = fio(device, seconds, rate);
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(bpf.id() as i32, libc::SIGINT) };
            let _ = bpf.wait();
            Ok((result?, None))
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

pub fn run(
    size: u64,
    seconds: u64,
    rounds: usize,
    dir: Option<PathBuf>,
    bpf: bool,
) -> anyhow::Result<()> {
    let base = dir.unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let work =
        tempfile::tempdir_in(&base).with_context(|| format!("a temp dir in {}", base.display()))?;
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
    let placement = Placement::of(Path::new(&device.0))?;
    let mut modes = vec![Mode::Off, Mode::Ftrace, Mode::PerfRing];
    if bpf {
        modes.push(Mode::Bpf);
    }
    println!(
        "fio 4 KiB random writes, O_DIRECT, queue depth 1, on {} ({} on {}), {seconds} s per run, {rounds} rounds alternating",
        device.0,
        blockferry_receiver::status::human_bytes(size),
        base.display()
    );
    let mut results: Vec<Vec<FioResult>> = vec![Vec::new(); modes.len()];
    let mut drained: Vec<(Mode, Drained)> = Vec::new();
    for r in 0..rounds {
        for (i, &mode) in modes.iter().enumerate() {
            let (result, tracked) = round(mode, &device.0, placement, seconds, None)?;
            eprintln!(
                "round {}: {:<24} {:>9.0} IOPS  p99 {:>8.1} µs",
                r + 1,
                mode.name(),
                result.iops,
                result.p99_us
            );
            results[i].push(result);
            drained.extend(tracked.map(|t| (mode, t)));
        }
    }
    let off_iops = median(results[0].iter().map(|r| r.iops).collect());
    let off_p99 = median(results[0].iter().map(|r| r.p99_us).collect());
    println!(
        "{:<24} {:>10} {:>12} {:>10} {:>10}",
        "mode", "IOPS", "p99 µs", "IOPS/off", "p99/off"
    );
    for (i, &mode) in modes.iter().enumerate() {
        let iops = median(results[i].iter().map(|r| r.iops).collect());
        let p99 = median(results[i].iter().map(|r| r.p99_us).collect());
        println!(
            "{:<24} {:>10.0} {:>12.1} {:>10.3} {:>10.3}",
            mode.name(),
            iops,
            p99,
            iops / off_iops.max(1.0),
            p99 / off_p99.max(1.0)
        );
    }
    for source in [Mode::Ftrace, Mode::PerfRing] {
        let runs = drained.iter().filter(|(m, _)| *m == source).map(|(_, d)| d);
        let (samples, lost, cpu) = runs.fold((0, 0, 0.0), |(s, l, c), d| {
            (s + d.samples, l + d.lost, c + d.cpu)
        });
        println!(
            "tracker, {}: {samples} samples, {lost} lost, {:.2} µs of CPU per sample",
            source.name(),
            cpu * 1e6 / samples.max(1) as f64
        );
    }

    // The tracker's own CPU at a steady 10 MiB/s of 4 KiB writes, through each source.
    for source in [Mode::Ftrace, Mode::PerfRing] {
        let (steady, tracked) = round(source, &device.0, placement, seconds, Some("10m"))?;
        let tracked = tracked.unwrap_or_default();
        let percent = tracked.cpu * 100.0 / seconds as f64;
        println!(
            "at {:.1} MiB/s of 4 KiB writes, {}: the tracker used {percent:.2}% of a core ({} samples, {} lost, {} reported); goal <= 5% for the agent process: {}",
            steady.mib_per_s,
            source.name(),
            tracked.samples,
            tracked.lost,
            blockferry_receiver::status::human_bytes(tracked.bytes),
            if percent <= 5.0 {
                "met (the tracker alone)"
            } else {
                "MISSED"
            }
        );
    }
    Ok(())
}
