//! `blockferry-bench compare`: the standard comparison, on one machine, in one go.
//!
//! 1. Initial sync of a random image, durable at the end: blockferry (agent and receiver
//!    over loopback mutual TLS) vs. a TLS 1.3 pipe of the same file with socat
//!    (AES-128-GCM, client certificates, into a file, then fsync) vs. a local `cp` + fsync.
//! 2. The same with half of the image zeros.
//! 3. Rescan after 1% of the 4 KiB blocks changed, scattered: blockferry's rescan by
//!    checksum vs. `rsync --inplace --no-whole-file -B 4096` through an rsync daemon on
//!    127.0.0.1 vs. reading both images (the lower bound).
//!
//! Runs alternate between the contenders so that a shared machine's noise falls on all of
//! them; medians and ratios are printed, and each target of the benchmark suite is
//! checked. Every copy is verified byte for byte, outside the timings. Nothing is
//! installed: a missing tool is named with the command that installs it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use blockferry_agent::Agent;
use blockferry_receiver::demo::{ImageLayout, first_difference, generate_image};
use blockferry_receiver::status::human_bytes;
use tokio_util::sync::CancellationToken;

use crate::rescan::{blockferry_rescan, change_blocks, read_both};
use crate::{ReceiverOptions, local_pair, median, time_blockferry};

/// The TLS 1.3 suite the socat pipe must use: what the comparison names, and what
/// blockferry negotiates on CPUs with AES instructions.
const SOCAT_SUITE: &str = "TLS_AES_128_GCM_SHA256";

/// socat's read/write size: TLS records hold 16 KiB, and a larger buffer lets socat hand
/// OpenSSL whole records (its 8 KiB default would halve them).
const SOCAT_BUFFER: &str = "131072";

pub async fn run(size: u64, runs: usize, percent: f64, dir: Option<PathBuf>) -> anyhow::Result<()> {
    let missing: Vec<&str> = ["socat", "rsync", "cp"]
        .into_iter()
        .filter(|tool| {
            Command::new(tool)
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
        })
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing: {} (the baselines of the comparison): apt-get install socat rsync",
            missing.join(", ")
        );
    }
    let base = dir.unwrap_or_else(|| PathBuf::from("/var/tmp"));
    std::fs::create_dir_all(&base)?;
    let work = tempfile::Builder::new()
        .prefix("blockferry-compare")
        .tempdir_in(&base)?;
    let random = work.path().join("random.img");
    let half_zero = work.path().join("half-zero.img");
    println!(
        "generating two {} images (random; half zeros) in {}",
        human_bytes(size),
        work.path().display()
    );
    for (path, random_fraction, seed) in [(&random, 1.0, 42), (&half_zero, 0.5, 43)] {
        generate_image(
            path,
            size,
            ImageLayout {
                random_fraction,
                region: 8 << 20,
                seed,
            },
        )?;
    }
    let tls = SocatTls::create(work.path())?;
    let options = ReceiverOptions {
        io_engine: blockferry_storage::IoEngine::Auto,
        barrier_interval: 16 << 20,
    };

    let mut sync = SyncFigures::default();
    let mut zero = SyncFigures::default();
    for run in 1..=runs {
        for (image, figures, label) in [
            (&random, &mut sync, "random"),
            (&half_zero, &mut zero, "half zeros"),
        ] {
            // Turns: each run starts with a different contender.
            let mut times = [Duration::ZERO; 3];
            for k in 0..3 {
                let which = (k + run) % 3;
                times[which] = match which {
                    0 => time_blockferry(image, &work.path().join("receiver"), options).await?,
                    1 => tls.time_pipe(image, &work.path().join("socat-copy.img"))?,
                    _ => time_cp(image, &work.path().join("cp-copy.img"))?,
                };
            }
            println!(
                "run {run}, {label}: blockferry {:.2} GB/s, socat TLS {:.2} GB/s, cp + fsync {:.2} GB/s",
                gbps(size, times[0]),
                gbps(size, times[1]),
                gbps(size, times[2])
            );
            figures.blockferry.push(times[0]);
            figures.socat.push(times[1]);
            figures.cp.push(times[2]);
        }
    }

    // Rescan: one initial sync (not timed), a copy for the rsync daemon's module.
    let data = work.path().join("rescan-receiver");
    let (receiver, agent_config, volumes) = local_pair(&random, &data, options).await?;
    println!("rescan: initial sync (not timed)");
    Agent::new(&volumes)
        .run(&agent_config, &volumes, CancellationToken::new())
        .await?;
    let staging = data.join("images/bench/disk0.img");
    let module = work.path().join("rsync-module");
    std::fs::create_dir_all(&module)?;
    let copy = module.join("copy.img");
    std::fs::copy(&random, &copy).context("making the rsync daemon's copy")?;
    let daemon = RsyncDaemon::start(work.path(), &module)?;
    let blocks = size / 4096;
    let changed = ((blocks as f64) * percent / 100.0).round().max(1.0) as u64;
    let (mut ours, mut theirs, mut reads) = (Vec::new(), Vec::new(), Vec::new());
    let (mut our_wire, mut their_wire) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        change_blocks(&random, blocks, changed, 0x5eed + run as u64)?;
        let mut ours_now = None;
        let mut theirs_now = None;
        for k in 0..2 {
            if (k + run) % 2 == 0 {
                ours_now = Some(blockferry_rescan(&agent_config, &volumes).await?);
            } else {
                theirs_now = Some(daemon.sync(&random, &copy)?);
            }
        }
        let (a, b) = (ours_now.expect("ran"), theirs_now.expect("ran"));
        let read = read_both(&random, &staging)?;
        for (what, path) in [("staging", &staging), ("rsync", &copy)] {
            if let Some(at) = first_difference(&random, path)? {
                bail!("the {what} copy differs from the source at byte {at}");
            }
        }
        println!(
            "run {run}, rescan: blockferry {:.2} s, rsync daemon {:.2} s, read both {:.2} s",
            a.time.as_secs_f64(),
            b.time.as_secs_f64(),
            read.as_secs_f64()
        );
        ours.push(a.time);
        our_wire.push(Duration::from_nanos(a.wire));
        theirs.push(b.time);
        their_wire.push(Duration::from_nanos(b.wire));
        reads.push(read);
    }
    receiver.shutdown().await;
    drop(daemon);

    let gb = |d: Duration| gbps(size, d);
    let (bf, so, cp) = (
        median(&mut sync.blockferry),
        median(&mut sync.socat),
        median(&mut sync.cp),
    );
    let (bfz, soz, cpz) = (
        median(&mut zero.blockferry),
        median(&mut zero.socat),
        median(&mut zero.cp),
    );
    let (ours, theirs, read) = (median(&mut ours), median(&mut theirs), median(&mut reads));
    let (our_wire, their_wire) = (
        median(&mut our_wire).as_nanos() as u64,
        median(&mut their_wire).as_nanos() as u64,
    );
    println!();
    println!(
        "{} images, {runs} runs each, medians; agent and receiver on one machine",
        human_bytes(size)
    );
    println!();
    println!("initial sync, durable                 random       half zeros");
    println!(
        "  blockferry (loopback mTLS)        {:>7.2} GB/s  {:>7.2} GB/s",
        gb(bf),
        gb(bfz)
    );
    println!(
        "  socat TLS 1.3 pipe + fsync        {:>7.2} GB/s  {:>7.2} GB/s",
        gb(so),
        gb(soz)
    );
    println!(
        "  cp + fsync (no network)           {:>7.2} GB/s  {:>7.2} GB/s",
        gb(cp),
        gb(cpz)
    );
    println!();
    println!(
        "rescan, {percent}% of 4 KiB blocks changed ({}):  time      on the wire",
        human_bytes(changed * 4096)
    );
    println!(
        "  blockferry rescan by checksum     {:>7.2} s   {:>10}",
        ours.as_secs_f64(),
        human_bytes(our_wire)
    );
    println!(
        "  rsync daemon, -B 4096 --inplace   {:>7.2} s   {:>10}",
        theirs.as_secs_f64(),
        human_bytes(their_wire)
    );
    println!(
        "  read both images (lower bound)    {:>7.2} s",
        read.as_secs_f64()
    );
    println!();
    println!("targets");
    let check = |met: bool| if met { "met" } else { "MISSED" };
    let ratio = so.as_secs_f64() / bf.as_secs_f64();
    println!(
        "  initial sync >= 2x socat            {ratio:>6.2}x   {}",
        check(ratio >= 2.0)
    );
    println!(
        "  initial sync >= 1.3 GB/s            {:>6.2}    {}",
        gb(bf),
        check(gb(bf) >= 1.3)
    );
    let zero_ratio = bf.as_secs_f64() / bfz.as_secs_f64();
    println!(
        "  half zeros >= 1.8x random           {zero_ratio:>6.2}x   {}",
        check(zero_ratio >= 1.8)
    );
    let rsync_ratio = theirs.as_secs_f64() / ours.as_secs_f64();
    println!(
        "  rescan >= 5x rsync daemon           {rsync_ratio:>6.2}x   {}",
        check(rsync_ratio >= 5.0)
    );
    let read_ratio = ours.as_secs_f64() / read.as_secs_f64();
    println!(
        "  rescan within 2x of reading both    {read_ratio:>6.2}x   {}",
        check(read_ratio <= 2.0)
    );
    Ok(())
}

#[derive(Default)]
struct SyncFigures {
    blockferry: Vec<Duration>,
    socat: Vec<Duration>,
    cp: Vec<Duration>,
}

fn gbps(size: u64, d: Duration) -> f64 {
    size as f64 / d.as_secs_f64() / 1e9
}

/// `cp` then fsync of the copy: the lower bound of moving a file on one machine.
fn time_cp(source: &Path, target: &Path) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status = Command::new("cp").arg(source).arg(target).status()?;
    if !status.success() {
        bail!("cp failed: {status}");
    }
    File::open(target)?.sync_all()?;
    let elapsed = started.elapsed();
    verify_and_remove(source, target, "cp")?;
    Ok(elapsed)
}

fn verify_and_remove(source: &Path, copy: &Path, what: &str) -> anyhow::Result<()> {
    if let Some(at) = first_difference(source, copy)? {
        bail!("the {what} copy differs from the source at byte {at}");
    }
    std::fs::remove_file(copy)?;
    Ok(())
}

/// Certificates (from blockferry's own CA code: ECDSA P-256, as the agent's) and an
/// OpenSSL configuration that holds socat to TLS 1.3 with AES-128-GCM.
struct SocatTls {
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    ca: PathBuf,
    openssl_conf: PathBuf,
}

impl SocatTls {
    fn create(work: &Path) -> anyhow::Result<Self> {
        let data = work.join("socat-pki");
        let ca = blockferry_receiver::pki::CertificateAuthority::load_or_create(&data)?;
        ca.receiver_certificate()?;
        let client = work.join("socat-client");
        blockferry_receiver::pki::write_agent_credentials(
            &data,
            "socat",
            &client,
            time::Duration::days(1),
        )?;
        let openssl_conf = work.join("openssl.cnf");
        std::fs::write(
            &openssl_conf,
            format!(
                "openssl_conf = default_conf\n[default_conf]\nssl_conf = ssl_sect\n\
                 [ssl_sect]\nsystem_default = system_default_sect\n\
                 [system_default_sect]\nMinProtocol = TLSv1.3\nCiphersuites = {SOCAT_SUITE}\n"
            ),
        )?;
        Ok(Self {
            server_cert: data.join("pki/receiver.crt"),
            server_key: data.join("pki/receiver.key"),
            client_cert: client.join("agent.crt"),
            client_key: client.join("agent.key"),
            ca: data.join("pki/ca.crt"),
            openssl_conf,
        })
    }

    /// Pipes `source` through socat over TLS into `target`, then fsyncs it; verified and
    /// removed afterwards (untimed).
    fn time_pipe(&self, source: &Path, target: &Path) -> anyhow::Result<Duration> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let listen = format!(
            "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,cert={},key={},cafile={},verify=1",
            self.server_cert.display(),
            self.server_key.display(),
            self.ca.display()
        );
        let mut server = KillOnDrop(
            Command::new("socat")
                .env("OPENSSL_CONF", &self.openssl_conf)
                .args(["-u", "-b", SOCAT_BUFFER, &listen])
                .arg(format!("CREATE:{}", target.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting the socat listener")?,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !listening(port) {
            if Instant::now() > deadline {
                bail!("socat did not listen on 127.0.0.1:{port}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let connect = format!(
            "OPENSSL:127.0.0.1:{port},cert={},key={},cafile={},commonname=blockferry-receiver",
            self.client_cert.display(),
            self.client_key.display(),
            self.ca.display()
        );
        let started = Instant::now();
        let client = Command::new("socat")
            .env("OPENSSL_CONF", &self.openssl_conf)
            .args(["-d", "-d", "-u", "-b", SOCAT_BUFFER])
            .arg(format!("OPEN:{},rdonly", source.display()))
            .arg(&connect)
            .output()
            .context("running the socat client")?;
        let status = server.0.wait()?;
        File::open(target)?.sync_all()?;
        let elapsed = started.elapsed();
        let log = String::from_utf8_lossy(&client.stderr);
        if !client.status.success() || !status.success() {
            bail!("the socat pipe failed: {log}");
        }
        if !log.contains(SOCAT_SUITE) {
            bail!("socat did not negotiate {SOCAT_SUITE}: {log}");
        }
        verify_and_remove(source, target, "socat")?;
        Ok(elapsed)
    }
}

/// Whether something accepts connections on 127.0.0.1:`port`. (A probe connection
/// costs socat's listener nothing: it serves the first connection that completes a
/// handshake, and a plain TCP probe that closes at once never does.)
fn listening(port: u16) -> bool {
    // Linux lists listening sockets in /proc/net/tcp: state 0A, local port in hex.
    let hex = format!(":{port:04X} ");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|table| {
        table
            .lines()
            .any(|l| l.contains(&hex) && l.split_whitespace().nth(3) == Some("0A"))
    })
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An rsync daemon on 127.0.0.1 serving one writable module.
struct RsyncDaemon {
    port: u16,
    _process: KillOnDrop,
}

impl RsyncDaemon {
    fn start(work: &Path, module: &Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = work.join("rsyncd.conf");
        // Run as root, the daemon would drop to nobody, who cannot write the module.
        // SAFETY: geteuid has no preconditions and cannot fail.
        let as_root = unsafe { libc::geteuid() } == 0;
        std::fs::write(
            &config,
            format!(
                "use chroot = false\nport = {port}\naddress = 127.0.0.1\npid file = {}\n\
                 [bench]\npath = {}\nread only = false\n{}",
                work.join("rsyncd.pid").display(),
                module.display(),
                if as_root {
                    "uid = root\ngid = root\n"
                } else {
                    ""
                }
            ),
        )?;
        let process = KillOnDrop(
            Command::new("rsync")
                .args(["--daemon", "--no-detach", "--config"])
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting the rsync daemon")?,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !listening(port) {
            if Instant::now() > deadline {
                bail!("the rsync daemon did not listen on 127.0.0.1:{port}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Self {
            port,
            _process: process,
        })
    }

    /// Brings the module's `copy` up to date with `source` through the daemon.
    fn sync(&self, source: &Path, copy: &Path) -> anyhow::Result<crate::rescan::Measured> {
        let name = copy.file_name().expect("a file").to_string_lossy();
        let url = format!("rsync://127.0.0.1:{}/bench/{name}", self.port);
        crate::rescan::rsync_to(source, std::ffi::OsStr::new(&url), copy)
    }
}
