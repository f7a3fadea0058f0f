//! `blockferry-bench loadgen`: many simulated agents against one real receiver.
//!
//! Each simulated agent is the reference agent's library (`blockferry_agent::Agent`) with
//! its own certificate, source server id and disks, writing through the in-process
//! capture API; all of them run in this process, over real mutual TLS, against a receiver
//! that runs as its own process (so that its CPU and memory are its own), or against an
//! external receiver. The run has two phases: the initial sync of every disk (generated
//! images, a chosen fraction of zeros), then continuous writes at a rate per agent with a
//! size mix and an access pattern. Afterwards every disk is made durable and, with a local
//! receiver, compared byte for byte with its staging image.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use blockferry_agent::{Agent, AgentConfig, Credentials, Volume};
use blockferry_receiver::demo::{ImageLayout, first_difference, generate_image};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::continuous::{peak_rss_of, proc_cpu};

/// Where the writes of the continuous phase land.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// Anywhere on the disk, equally likely.
    Uniform,
    /// One after the other, wrapping at the end of the disk.
    Sequential,
    /// Zipf-distributed (exponent 1) over the disk's 4 KiB blocks, the hot blocks
    /// scattered over the disk: a few blocks take most writes, as with database pages.
    Zipf,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub agents: usize,
    pub disks: usize,
    pub streams: u8,
    pub size: u64,
    pub zero_fraction: f64,
    /// MiB/s of writes per agent in the continuous phase.
    pub rate: f64,
    pub min_write: u64,
    pub max_write: u64,
    pub pattern: Pattern,
    pub seconds: u64,
    pub receiver: Option<String>,
    pub credentials: Option<PathBuf>,
    pub dir: Option<PathBuf>,
    pub json: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    pub sample_every: Duration,
}

/// What one run measured; also the `--json` document.
#[derive(Debug, Serialize)]
pub struct Report {
    pub agents: usize,
    pub disks_per_agent: usize,
    pub streams_per_agent: u8,
    pub disk_size_bytes: u64,
    pub zero_fraction: f64,
    pub pattern: Pattern,
    pub rate_mib_per_agent: f64,
    pub write_size_bytes: (u64, u64),
    pub sync: SyncPhase,
    pub continuous: ContinuousPhase,
    /// Frames sent and received by all agents, after TLS framing, both phases.
    pub wire_bytes: u64,
    /// Percent of one core, over both phases. `None` for an external receiver.
    pub receiver_cpu_percent: Option<f64>,
    pub receiver_peak_rss_bytes: Option<u64>,
    /// This process: every simulated agent plus the load generator's own writers.
    pub agents_cpu_percent: f64,
    pub agents_peak_rss_bytes: u64,
    /// Every source disk compared with its staging image after the run (`None` for an
    /// external receiver, whose images this tool cannot read).
    pub verified_bytes: Option<u64>,
    pub per_agent: Vec<AgentFigures>,
    /// (seconds since the start, bytes per second on the wire) every sample interval.
    pub throughput_series: Vec<(f64, f64)>,
    /// (seconds since the start, lag in seconds) of each lag sample.
    pub lag_series: Vec<(f64, f64)>,
}

#[derive(Debug, Serialize)]
pub struct SyncPhase {
    pub bytes: u64,
    pub seconds: f64,
    /// Every agent's disks together, until the last agent was durable.
    pub aggregate_bytes_per_second: f64,
    /// Slowest agent's rate over the fastest's (1 is perfectly fair).
    pub fairness_min_over_max: f64,
}

#[derive(Debug, Serialize)]
pub struct ContinuousPhase {
    pub seconds: f64,
    pub written_bytes: u64,
    pub aggregate_bytes_per_second: f64,
    pub lag_samples: usize,
    pub lag_p50_ms: f64,
    pub lag_p95_ms: f64,
    pub lag_p99_ms: f64,
    pub lag_max_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct AgentFigures {
    pub server_id: String,
    pub sync_seconds: f64,
    pub sync_bytes_per_second: f64,
    pub written_bytes: u64,
    pub lag_p99_ms: f64,
    pub wire_bytes: u64,
}

/// A receiver process, stopped (SIGTERM) when dropped.
pub(crate) struct ReceiverProcess(Child);

impl ReceiverProcess {
    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ReceiverProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

struct SimulatedAgent {
    server_id: String,
    agent: Agent,
    volumes: Vec<Volume>,
    run: Option<
        tokio::task::JoinHandle<
            Result<blockferry_agent::AgentReport, blockferry_agent::AgentError>,
        >,
    >,
    synced_after: Option<Duration>,
    written: u64,
    lags: Vec<Duration>,
}

pub async fn run(options: Options) -> anyhow::Result<Report> {
    if options.agents == 0 || options.disks == 0 {
        bail!("--agents and --disks must be at least 1");
    }
    if options.min_write < 512
        || options.max_write < options.min_write
        || options.max_write > options.size
        || !options.min_write.is_multiple_of(512)
        || !options.max_write.is_multiple_of(512)
    {
        bail!(
            "write sizes must be multiples of 512 bytes with 512 <= --min-write <= --max-write <= --size"
        );
    }
    if !(0.0..=1.0).contains(&options.zero_fraction) {
        bail!("--zero-fraction must be between 0 and 1");
    }
    let plot_font = match &options.plot {
        Some(_) => Some(crate::plot::load_font()?),
        None => None,
    };
    let base = options
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    std::fs::create_dir_all(&base)?;
    let work = tempfile::Builder::new()
        .prefix("blockferry-loadgen")
        .tempdir_in(&base)?;
    let data = work.path().join("receiver");
    let names: Vec<String> = (0..options.agents)
        .map(|i| format!("loadgen-{i:03}"))
        .collect();

    // Credentials: issued by the local receiver's CA, or given for an external one.
    let credentials: Vec<Credentials> = match (&options.receiver, &options.credentials) {
        (None, _) => names
            .iter()
            .map(|name| {
                let out = work.path().join("credentials").join(name);
                blockferry_receiver::pki::write_agent_credentials(
                    &data,
                    name,
                    &out,
                    time::Duration::days(1),
                )?;
                Ok(Credentials::load(&out)?)
            })
            .collect::<anyhow::Result<_>>()?,
        (Some(_), Some(dir)) => (0..options.agents)
            .map(|i| {
                let path = dir.join(format!("agent-{i:03}"));
                Credentials::load(&path).with_context(|| {
                    format!(
                        "loading the credentials of simulated agent {i} from {} (create them with \
                         blockferry-receiver agent issue --name loadgen-{i:03} --out {})",
                        path.display(),
                        path.display()
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?,
        (Some(_), None) => {
            bail!("--receiver needs --credentials DIR with agent-000, agent-001, … inside")
        }
    };

    println!(
        "generating {} images of {} ({:.0}% zeros) in {}",
        options.agents * options.disks,
        blockferry_receiver::status::human_bytes(options.size),
        options.zero_fraction * 100.0,
        work.path().display()
    );
    let mut sources = Vec::new();
    for (a, name) in names.iter().enumerate() {
        let dir = work.path().join("sources").join(name);
        std::fs::create_dir_all(&dir)?;
        let mut specs = Vec::new();
        for d in 0..options.disks {
            let path = dir.join(format!("disk{d}.img"));
            generate_image(
                &path,
                options.size,
                ImageLayout {
                    random_fraction: 1.0 - options.zero_fraction,
                    region: 1 << 20,
                    seed: (a * 1000 + d) as u64 + 1,
                },
            )?;
            specs.push(format!("disk{d}={}", path.display()));
        }
        sources.push(specs);
    }

    let (address, receiver) = match &options.receiver {
        Some(address) => (address.clone(), None),
        None => {
            let (address, process) = start_receiver(&data, options.streams).await?;
            (address, Some(process))
        }
    };
    let receiver_pid = receiver.as_ref().map(ReceiverProcess::pid);
    let (cpu_start, receiver_cpu_start) =
        (proc_cpu(std::process::id()), receiver_pid.map(proc_cpu));

    let stop = CancellationToken::new();
    let started = Instant::now();
    let mut agents = Vec::new();
    for ((name, specs), credentials) in names.iter().zip(&sources).zip(credentials) {
        let volumes = Volume::open_all(specs)?;
        let agent = Agent::new(&volumes);
        let mut config = AgentConfig::new(address.clone(), credentials);
        config.streams = options.streams;
        let run = tokio::spawn({
            let (agent, volumes, stop) = (agent.clone(), volumes.clone(), stop.clone());
            async move { agent.run(&config, &volumes, stop).await }
        });
        agents.push(SimulatedAgent {
            server_id: name.clone(),
            agent,
            volumes,
            run: Some(run),
            synced_after: None,
            written: 0,
            lags: Vec::new(),
        });
    }

    // Throughput on the wire, sampled for the plot.
    let series = Arc::new(Mutex::new(Vec::new()));
    let sampler_stop = CancellationToken::new();
    let sampler = tokio::spawn({
        let stats: Vec<_> = agents.iter().map(|a| Arc::clone(a.agent.stats())).collect();
        let (series, stop, every) = (
            Arc::clone(&series),
            sampler_stop.clone(),
            options.sample_every,
        );
        async move {
            let mut last = (0.0f64, 0u64);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                let t = started.elapsed().as_secs_f64();
                let wire: u64 = stats
                    .iter()
                    .map(|s| s.wire_bytes.load(Ordering::Relaxed))
                    .sum();
                let rate = (wire - last.1) as f64 / (t - last.0);
                crate::lock(&series).push((t, rate));
                last = (t, wire);
            }
        }
    });

    // Phase 1: every disk's initial sync, durable.
    let sync_limit = Duration::from_secs(3600);
    loop {
        let mut pending = 0;
        for agent in &mut agents {
            if agent.synced_after.is_none() {
                if agent.agent.stats().synced.load(Ordering::Relaxed) {
                    agent.synced_after = Some(started.elapsed());
                } else if agent.run.as_ref().is_none_or(|r| r.is_finished()) {
                    bail!(
                        "simulated agent {} stopped during its initial sync (see the receiver's log)",
                        agent.server_id
                    );
                } else {
                    pending += 1;
                }
            }
        }
        if pending == 0 {
            break;
        }
        if started.elapsed() > sync_limit {
            bail!("{pending} agents still syncing after {sync_limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sync_seconds = started.elapsed().as_secs_f64();
    let sync_bytes = (options.agents * options.disks) as u64 * options.size;
    println!(
        "initial sync: {} in {:.2} s",
        blockferry_receiver::status::human_bytes(sync_bytes),
        sync_seconds
    );

    // Phase 2: continuous writes from every agent at once.
    let continuous_started = Instant::now();
    let end = continuous_started + Duration::from_secs(options.seconds);
    let zipf = (options.pattern == Pattern::Zipf).then(|| Arc::new(Zipf::new(options.size / 4096)));
    let lag_series = Arc::new(Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for (index, agent) in agents.iter().enumerate() {
        let workload = Workload {
            capture: agent.agent.capture().clone(),
            disks: agent.volumes.len(),
            size: options.size,
            rate: options.rate * (1 << 20) as f64,
            min_write: options.min_write,
            max_write: options.max_write,
            pattern: options.pattern,
            zipf: zipf.clone(),
            seed: 0x9e37_79b9_7f4a_7c15 ^ (index as u64 + 1),
        };
        let lags = Arc::clone(&lag_series);
        let every = options.sample_every;
        writers.push(tokio::spawn(async move {
            workload.run(end, started, every, lags).await
        }));
    }
    for (agent, writer) in agents.iter_mut().zip(writers) {
        let (written, lags) = writer.await??;
        agent.written = written;
        agent.lags = lags;
    }
    let continuous_seconds = continuous_started.elapsed().as_secs_f64();
    sampler_stop.cancel();
    let _ = sampler.await;

    let (cpu_end, receiver_cpu_end) = (proc_cpu(std::process::id()), receiver_pid.map(proc_cpu));
    let elapsed = started.elapsed().as_secs_f64();
    let receiver_peak_rss_bytes = receiver_pid.and_then(peak_rss_of);
    let agents_peak_rss_bytes = peak_rss_of(std::process::id()).unwrap_or(0);

    stop.cancel();
    for agent in &mut agents {
        if let Some(run) = agent.run.take() {
            let _ = tokio::time::timeout(Duration::from_secs(60), run).await;
        }
    }

    // Everything acknowledged must be in the staging images, byte for byte.
    let verified_bytes = match &receiver {
        None => None,
        Some(_) => {
            let mut verified = 0u64;
            for (agent, specs) in agents.iter().zip(&sources) {
                for (d, spec) in specs.iter().enumerate() {
                    let source = Path::new(spec.split_once('=').expect("name=path").1);
                    let staging = data
                        .join("images")
                        .join(&agent.server_id)
                        .join(format!("disk{d}.img"));
                    if let Some(at) = first_difference(source, &staging)
                        .with_context(|| format!("comparing {}", staging.display()))?
                    {
                        bail!(
                            "disk{d} of {}: the staging image differs from the source at byte {at}",
                            agent.server_id
                        );
                    }
                    verified += options.size;
                }
            }
            Some(verified)
        }
    };
    drop(receiver);

    let mut all_lags: Vec<Duration> = agents.iter().flat_map(|a| a.lags.clone()).collect();
    all_lags.sort();
    let per_agent: Vec<AgentFigures> = agents
        .iter()
        .map(|a| {
            let synced = a.synced_after.unwrap_or_default().as_secs_f64().max(1e-9);
            let mut lags = a.lags.clone();
            lags.sort();
            let stats = a.agent.stats();
            AgentFigures {
                server_id: a.server_id.clone(),
                sync_seconds: synced,
                sync_bytes_per_second: (options.disks as u64 * options.size) as f64 / synced,
                written_bytes: a.written,
                lag_p99_ms: quantile(&lags, 0.99).as_secs_f64() * 1e3,
                wire_bytes: stats.wire_bytes.load(Ordering::Relaxed)
                    + stats.received_bytes.load(Ordering::Relaxed),
            }
        })
        .collect();
    let rates: Vec<f64> = per_agent.iter().map(|a| a.sync_bytes_per_second).collect();
    let fairness = rates.iter().copied().fold(f64::MAX, f64::min)
        / rates.iter().copied().fold(0.0, f64::max).max(1e-9);
    let written: u64 = agents.iter().map(|a| a.written).sum();
    let report = Report {
        agents: options.agents,
        disks_per_agent: options.disks,
        streams_per_agent: options.streams,
        disk_size_bytes: options.size,
        zero_fraction: options.zero_fraction,
        pattern: options.pattern,
        rate_mib_per_agent: options.rate,
        write_size_bytes: (options.min_write, options.max_write),
        sync: SyncPhase {
            bytes: sync_bytes,
            seconds: sync_seconds,
            aggregate_bytes_per_second: sync_bytes as f64 / sync_seconds,
            fairness_min_over_max: fairness,
        },
        continuous: ContinuousPhase {
            seconds: continuous_seconds,
            written_bytes: written,
            aggregate_bytes_per_second: written as f64 / continuous_seconds,
            lag_samples: all_lags.len(),
            lag_p50_ms: quantile(&all_lags, 0.5).as_secs_f64() * 1e3,
            lag_p95_ms: quantile(&all_lags, 0.95).as_secs_f64() * 1e3,
            lag_p99_ms: quantile(&all_lags, 0.99).as_secs_f64() * 1e3,
            lag_max_ms: all_lags.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        },
        wire_bytes: per_agent.iter().map(|a| a.wire_bytes).sum(),
        receiver_cpu_percent: receiver_cpu_start
            .zip(receiver_cpu_end)
            .map(|(a, b)| (b - a) / elapsed * 100.0),
        receiver_peak_rss_bytes,
        agents_cpu_percent: (cpu_end - cpu_start) / elapsed * 100.0,
        agents_peak_rss_bytes,
        verified_bytes,
        per_agent,
        throughput_series: std::mem::take(&mut *crate::lock(&series)),
        lag_series: {
            let mut lags = std::mem::take(&mut *crate::lock(&lag_series));
            lags.sort_by(|a: &(f64, f64), b| a.0.total_cmp(&b.0));
            lags
        },
    };
    print_report(&report);
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("JSON report: {}", path.display());
    }
    if let (Some(path), Some(font)) = (&options.plot, plot_font) {
        crate::plot::draw(&report, path, font)?;
        println!("plot: {}", path.display());
    }
    Ok(report)
}

/// The receiver binary beside this one, on a free loopback port, without metrics or
/// control API (nothing else may share the port space of a benchmark).
pub(crate) async fn start_receiver(
    data: &Path,
    streams: u8,
) -> anyhow::Result<(String, ReceiverProcess)> {
    let binary = std::env::current_exe()?.with_file_name("blockferry-receiver");
    if !binary.exists() {
        bail!(
            "{} is missing: build it first (cargo build --release -p blockferry-receiver)",
            binary.display()
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let address = format!("127.0.0.1:{port}");
    let process = ReceiverProcess(
        Command::new(&binary)
            .args([
                "run",
                "--listen",
                &address,
                "--metrics",
                "off",
                "--control",
                "off",
            ])
            .args(["--max-streams", &streams.clamp(1, 5).to_string()])
            .arg("--data-dir")
            .arg(data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the receiver")?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("the receiver did not start listening on {address}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((address, process))
}

/// One agent's writes in the continuous phase.
struct Workload {
    capture: blockferry_agent::Capture,
    disks: usize,
    size: u64,
    /// Bytes per second.
    rate: f64,
    min_write: u64,
    max_write: u64,
    pattern: Pattern,
    zipf: Option<Arc<Zipf>>,
    seed: u64,
}

impl Workload {
    /// Writes until `end`; returns the bytes written and the lag samples (write captured →
    /// durable at the receiver at a consistent point), which also go to `series`.
    async fn run(
        self,
        end: Instant,
        started: Instant,
        sample_every: Duration,
        series: Arc<Mutex<Vec<(f64, f64)>>>,
    ) -> anyhow::Result<(u64, Vec<Duration>)> {
        let lags = Arc::new(Mutex::new(Vec::new()));
        let mut waits = Vec::new();
        let mut rng = Rng(self.seed | 1);
        let pattern: Vec<u8> = (0..(self.max_write as usize + (64 << 10)))
            .map(|_| rng.next() as u8 | 1)
            .collect();
        let mut next_sequential = vec![0u64; self.disks];
        let mut written = 0u64;
        let mut next_sample = Instant::now();
        let tick = Duration::from_millis(10);
        let mut ticker = tokio::time::interval(tick);
        let mut credit = 0.0f64;
        let sizes = (self.max_write - self.min_write) / 512 + 1;
        while Instant::now() < end {
            ticker.tick().await;
            credit += self.rate * tick.as_secs_f64();
            while credit >= self.min_write as f64 {
                let len = self.min_write + rng.next() % sizes * 512;
                let disk = (rng.next() % self.disks as u64) as usize;
                let offset = match self.pattern {
                    Pattern::Uniform => rng.next() % (self.size - len + 1) / 512 * 512,
                    Pattern::Sequential => {
                        let at = next_sequential[disk];
                        let at = if at + len > self.size { 0 } else { at };
                        next_sequential[disk] = at + len;
                        at
                    }
                    Pattern::Zipf => {
                        let zipf = self.zipf.as_ref().expect("a table for the zipf pattern");
                        (zipf.block(rng.unit()) * 4096).min(self.size - len)
                    }
                };
                let from = (rng.next() % (64 << 10)) as usize;
                self.capture
                    .write(disk, offset, pattern[from..from + len as usize].to_vec())
                    .await?;
                written += len;
                credit -= len as f64;
            }
            if Instant::now() >= next_sample {
                next_sample += sample_every;
                let (seq, at) = (self.capture.write_seq(), Instant::now());
                let (capture, lags, series) =
                    (self.capture.clone(), Arc::clone(&lags), Arc::clone(&series));
                waits.push(tokio::spawn(async move {
                    capture.wait_durable(seq).await;
                    let lag = at.elapsed();
                    crate::lock(&lags).push(lag);
                    crate::lock(&series).push(((at - started).as_secs_f64(), lag.as_secs_f64()));
                }));
            }
        }
        // Close the last epoch, so that the last samples (and every write) are durable.
        let last = self.capture.flush_local().await?;
        tokio::time::timeout(Duration::from_secs(300), self.capture.wait_durable(last))
            .await
            .context("the last writes did not become durable within 300 s")?;
        for wait in waits {
            let _ = tokio::time::timeout(Duration::from_secs(60), wait).await;
        }
        let lags = std::mem::take(&mut *crate::lock(&lags));
        Ok((written, lags))
    }
}

/// Zipf over `n` blocks by its cumulative distribution; rank r goes to block
/// `r * stride mod n`, a bijection that spreads the hot blocks over the disk.
struct Zipf {
    cdf: Vec<f64>,
    stride: u64,
}

impl Zipf {
    fn new(n: u64) -> Self {
        let n = n.max(1);
        let mut cdf = Vec::with_capacity(n as usize);
        let mut sum = 0.0;
        for rank in 1..=n {
            sum += 1.0 / rank as f64;
            cdf.push(sum);
        }
        for p in &mut cdf {
            *p /= sum;
        }
        let mut stride = (0x9e37_79b9 % n) | 1;
        while gcd(stride, n) != 1 {
            stride += 2;
        }
        Self { cdf, stride }
    }

    fn block(&self, u: f64) -> u64 {
        let rank = self.cdf.partition_point(|&p| p < u) as u64;
        let n = self.cdf.len() as u64;
        rank.min(n - 1) * self.stride % n
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// xorshift64: deterministic and cheap, for workloads only.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn print_report(r: &Report) {
    let mb = |b: f64| b / 1e6;
    println!();
    println!(
        "loadgen: {} agents x {} disks x {} streams, {} per disk, {:.0}% zeros; then {:.1} MiB/s per agent of {}-{} KiB {:?} writes for {:.1} s",
        r.agents,
        r.disks_per_agent,
        r.streams_per_agent,
        blockferry_receiver::status::human_bytes(r.disk_size_bytes),
        r.zero_fraction * 100.0,
        r.rate_mib_per_agent,
        r.write_size_bytes.0 >> 10,
        r.write_size_bytes.1 >> 10,
        r.pattern,
        r.continuous.seconds
    );
    println!();
    println!(
        "  initial sync, durable        {:>10.1} MB/s aggregate ({:.2} s for {})",
        mb(r.sync.aggregate_bytes_per_second),
        r.sync.seconds,
        blockferry_receiver::status::human_bytes(r.sync.bytes)
    );
    let rates: Vec<f64> = r
        .per_agent
        .iter()
        .map(|a| a.sync_bytes_per_second)
        .collect();
    let mut sorted = rates.clone();
    sorted.sort_by(f64::total_cmp);
    println!(
        "  per agent                    {:>10.1} MB/s min, {:.1} median, {:.1} max (min/max {:.2})",
        mb(sorted[0]),
        mb(sorted[sorted.len() / 2]),
        mb(sorted[sorted.len() - 1]),
        r.sync.fairness_min_over_max
    );
    println!(
        "  continuous writes            {:>10.1} MB/s aggregate ({} written)",
        mb(r.continuous.aggregate_bytes_per_second),
        blockferry_receiver::status::human_bytes(r.continuous.written_bytes)
    );
    println!(
        "  lag, captured -> durable     {:>10.1} ms p50, {:.1} p95, {:.1} p99, {:.1} max ({} samples)",
        r.continuous.lag_p50_ms,
        r.continuous.lag_p95_ms,
        r.continuous.lag_p99_ms,
        r.continuous.lag_max_ms,
        r.continuous.lag_samples
    );
    println!(
        "  bytes on the wire            {:>10}",
        blockferry_receiver::status::human_bytes(r.wire_bytes)
    );
    match (r.receiver_cpu_percent, r.receiver_peak_rss_bytes) {
        (Some(cpu), Some(rss)) => println!(
            "  receiver                     {cpu:>10.1} % of a core, peak RSS {}",
            blockferry_receiver::status::human_bytes(rss)
        ),
        _ => println!("  receiver                     external: not measured here"),
    }
    println!(
        "  agents (this process)        {:>10.1} % of a core, peak RSS {}",
        r.agents_cpu_percent,
        blockferry_receiver::status::human_bytes(r.agents_peak_rss_bytes)
    );
    match r.verified_bytes {
        Some(bytes) => println!(
            "  verified                     {:>10} byte for byte against the staging images",
            blockferry_receiver::status::human_bytes(bytes)
        ),
        None => println!("  verified                     no (external receiver)"),
    }
    if r.per_agent.len() <= 16 {
        println!();
        println!(
            "  {:<14} {:>10} {:>12} {:>10} {:>10} {:>10}",
            "agent", "sync s", "sync MB/s", "written", "lag p99", "wire"
        );
        for a in &r.per_agent {
            println!(
                "  {:<14} {:>10.2} {:>12.1} {:>10} {:>8.1}ms {:>10}",
                a.server_id,
                a.sync_seconds,
                mb(a.sync_bytes_per_second),
                blockferry_receiver::status::human_bytes(a.written_bytes),
                a.lag_p99_ms,
                blockferry_receiver::status::human_bytes(a.wire_bytes)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_is_skewed_and_stays_on_the_disk() {
        let zipf = Zipf::new(1000);
        let mut rng = Rng(7);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            let block = zipf.block(rng.unit());
            assert!(block < 1000);
            counts[block as usize] += 1;
        }
        counts.sort_unstable();
        let top10: u32 = counts.iter().rev().take(10).sum();
        // With exponent 1 over 1000 blocks, the 10 hottest take about 39% of the writes.
        assert!((30_000..50_000).contains(&top10), "{top10}");
        assert!(counts.iter().filter(|&&c| c > 0).count() > 500);
    }
}
