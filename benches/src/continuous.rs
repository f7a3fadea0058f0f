//! `blockferry-bench continuous`: lag, CPU and memory of continuous replication at fixed
//! write rates.

use std::path::PathBuf;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockferry_agent::{Agent, AgentConfig, Credentials, Volume};
use tokio_util::sync::CancellationToken;

/// How often a lag sample is taken: the capture's write sequence now, and the time it
/// becomes durable at the receiver.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

pub async fn run(
    rates: &[u64],
    seconds: u64,
    size: u64,
    dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let base = dir.unwrap_or_else(|| PathBuf::from("/var/tmp"));
    std::fs::create_dir_all(&base)?;
    let work = tempfile::Builder::new()
        .prefix("blockferry-bench")
        .tempdir_in(&base)?;
    let data = work.path().join("receiver");
    let creds = work.path().join("creds");
    blockferry_receiver::pki::write_agent_credentials(
        &data,
        "bench",
        &creds,
        time::Duration::days(1),
    )?;
    let source = work.path().join("source.img");
    std::fs::File::create(&source)?.set_len(size)?;

    let (address, receiver) = crate::loadgen::start_receiver(&data, 5).await?;

    let volumes = Volume::open_all(&[format!("disk0={}", source.display())])?;
    let agent = Agent::new(&volumes);
    let mut config = AgentConfig::new(address, Credentials::load(&creds)?);
    config.exit_when_synced = false;
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (agent, stop, volumes) = (agent.clone(), stop.clone(), volumes.clone());
        async move { agent.run(&config, &volumes, stop).await }
    });
    while !agent
        .stats()
        .synced
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "continuous replication, random 4-64 KiB writes on a {} disk, agent in this process, receiver pid {}",
        blockferry_receiver::status::human_bytes(size),
        receiver.pid()
    );
    println!(
        "{:>9} {:>10} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10}",
        "MiB/s", "written", "lag p50", "lag p99", "lag max", "agent %", "agent RSS", "receiver %"
    );
    for &rate in rates {
        let phase = measure(&agent, rate, seconds, size, receiver.pid()).await?;
        println!(
            "{:>9} {:>9.0}M {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>9.1} {:>9}M {:>10.1}",
            rate,
            phase.written as f64 / (1 << 20) as f64,
            phase.lag_p50.as_secs_f64() * 1e3,
            phase.lag_p99.as_secs_f64() * 1e3,
            phase.lag_max.as_secs_f64() * 1e3,
            phase.agent_cpu,
            phase.agent_rss >> 20,
            phase.receiver_cpu
        );
    }
    stop.cancel();
    let _ = run.await;
    drop(receiver);
    Ok(())
}

struct Phase {
    written: u64,
    lag_p50: Duration,
    lag_p99: Duration,
    lag_max: Duration,
    agent_cpu: f64,
    agent_rss: u64,
    receiver_cpu: f64,
}

async fn measure(
    agent: &Agent,
    rate_mib: u64,
    seconds: u64,
    size: u64,
    receiver_pid: u32,
) -> anyhow::Result<Phase> {
    let capture = agent.capture().clone();
    let lags = Arc::new(Mutex::new(Vec::new()));
    let (cpu0, rcpu0, t0) = (self_cpu(), proc_cpu(receiver_pid), Instant::now());
    let end = t0 + Duration::from_secs(seconds);

    // The lag sampler.
    let sampler = tokio::spawn({
        let (capture, lags) = (capture.clone(), Arc::clone(&lags));
        async move {
            let mut waits = Vec::new();
            while Instant::now() < end {
                let (seq, at) = (capture.write_seq(), Instant::now());
                let (capture, lags) = (capture.clone(), Arc::clone(&lags));
                waits.push(tokio::spawn(async move {
                    capture.wait_durable(seq).await;
                    lags.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(at.elapsed());
                }));
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
            for w in waits {
                let _ = tokio::time::timeout(Duration::from_secs(60), w).await;
            }
        }
    });

    // The writer: a token bucket refilled every 10 ms.
    let pattern: Vec<u8> = (0..(128u32 << 10))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1)
        .collect();
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ rate_mib;
    let mut written = 0u64;
    let budget_per_tick = (rate_mib << 20) / 100;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while Instant::now() < end {
        tick.tick().await;
        let mut budget = budget_per_tick;
        while budget > 0 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let len = (4096 + (rng % 15) * 4096).min(budget.max(4096));
            let offset = (rng >> 20) % (size - len) / 4096 * 4096;
            let from = ((rng >> 8) % (64 << 10)) as usize;
            capture
                .write(0, offset, pattern[from..from + len as usize].to_vec())
                .await?;
            written += len;
            budget = budget.saturating_sub(len);
        }
    }
    // Close the last epoch so the last samples can complete.
    let _ = capture.flush_local().await?;
    sampler.await?;
    let elapsed = t0.elapsed().as_secs_f64();
    let (cpu1, rcpu1) = (self_cpu(), proc_cpu(receiver_pid));
    let mut lags = std::mem::take(&mut *lags.lock().unwrap_or_else(|p| p.into_inner()));
    lags.sort();
    let pick = |q: f64| {
        lags.get(((lags.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    Ok(Phase {
        written,
        lag_p50: pick(0.5),
        lag_p99: pick(0.99),
        lag_max: lags.last().copied().unwrap_or_default(),
        agent_cpu: (cpu1 - cpu0) / elapsed * 100.0,
        agent_rss: rss_bytes(),
        receiver_cpu: (rcpu1 - rcpu0) / elapsed * 100.0,
    })
}

/// CPU seconds used by this process.
fn self_cpu() -> f64 {
    proc_cpu(std::process::id())
}

/// CPU seconds (user + system) of process `pid`, from /proc.
pub(crate) fn proc_cpu(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}

/// The peak resident set size of process `pid` (VmHWM), from /proc.
pub(crate) fn peak_rss_of(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
