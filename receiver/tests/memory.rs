//! Bounded memory on the source (invariant 4): 2 GiB written through the agent's NBD tap
//! while the link to the receiver is throttled far below the write rate. The agent's
//! resident memory stays under its capture buffer plus a fixed overhead, the backlog grows
//! and then drains to zero once the link opens, and the images end identical.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// The agent's capture buffer in this test.
const BUFFER_MIB: u64 = 64;
/// What the agent may use beyond its buffer: runtime, TLS, stream queues (4 streams x
/// 4 MiB), read-ahead (4 MiB), the dirty map, allocator slack. Measured at about 40 MiB
/// on the development machine; the bound leaves room for allocator noise.
const OVERHEAD_MIB: u64 = 96;

/// Prints a file (the agent's log) if the test panics while this is alive.
struct PrintOnPanic(std::path::PathBuf);

impl Drop for PrintOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.0).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("--- last agent log lines ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

fn vm_rss_and_hwm(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gib_through_the_tap_under_a_slow_link_stays_within_the_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let mut rconfig = receiver_config(&data);
    rconfig.heartbeat_interval = Duration::from_millis(500);
    let receiver = blockferry_receiver::Receiver::start(rconfig).await.unwrap();
    let creds_dir = dir.path().join("creds");
    credentials(&data, SERVER, &creds_dir);
    let size = 512u64 << 20;
    let (source, _) = image(dir.path(), "src.img", size, 0.0, 1 << 20, 31);
    let throttled = Arc::new(AtomicBool::new(false));
    let proxy = throttling_proxy(receiver.local_addr(), 20 << 20, Arc::clone(&throttled)).await;
    let nbd_socket = dir.path().join("nbd.sock");

    let agent_bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_blockferry-receiver"))
        .with_file_name("blockferry-agent");
    assert!(
        agent_bin.exists(),
        "run through `cargo test --workspace`, which builds blockferry-agent"
    );
    let mut agent = Command::new(&agent_bin)
        .args([
            "run",
            "--progress",
            "quiet",
            "--buffer-mib",
            &BUFFER_MIB.to_string(),
            "--receiver",
        ])
        .arg(proxy.to_string())
        .arg("--credentials")
        .arg(&creds_dir)
        .arg("--disk")
        .arg(format!("disk0={}", source.display()))
        .arg("--nbd-listen")
        .arg(format!("unix:{}", nbd_socket.display()))
        .envs(std::env::vars().filter(|(k, _)| k.starts_with("MALLOC_")))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    let pid = agent.id();
    // On any failure below, the agent's log says what it was doing.
    let agent_log = dir.path().join("agent.log");
    let _print_log_on_failure = PrintOnPanic(agent_log);

    let server_status = || receiver.status().unwrap().servers.into_iter().next();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !server_status()
        .is_some_and(|s| s.disks[0].sync_watermark == size && s.backlog_bytes == Some(0))
    {
        assert!(
            Instant::now() < deadline,
            "the initial sync did not complete"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 2 GiB: four passes over the 512 MiB disk in 16 MiB writes, with the link at 20 MB/s.
    throttled.store(true, Ordering::Relaxed);
    let commands: Vec<String> = (0..128u64)
        .map(|i| {
            format!(
                "write -P {} {} {}",
                i % 250 + 1,
                (i % 32) * (16 << 20),
                16 << 20
            )
        })
        .collect();
    let url = format!("nbd+unix:///disk0?socket={}", nbd_socket.display());
    let writer = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for c in &commands {
            cmd.args(["-c", c]);
        }
        cmd.arg(&url).output().unwrap()
    });
    let mut peak_backlog = 0;
    while !writer.is_finished() {
        if let Some(b) = server_status().and_then(|s| s.backlog_bytes) {
            peak_backlog = peak_backlog.max(b);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = writer.await.unwrap();
    assert!(
        out.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    if let Some(b) = server_status().and_then(|s| s.backlog_bytes) {
        peak_backlog = peak_backlog.max(b);
    }
    assert!(
        peak_backlog > 128 << 20,
        "a slow link makes a backlog (peak {peak_backlog})"
    );

    // The link opens; the backlog drains to zero.
    throttled.store(false, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(300);
    while server_status().and_then(|s| s.backlog_bytes) != Some(0) {
        assert!(Instant::now() < deadline, "the backlog did not drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, peak_rss) = vm_rss_and_hwm(pid);
    let bound = (BUFFER_MIB + OVERHEAD_MIB) << 20;
    println!(
        "agent peak RSS {} MiB, bound {} MiB, peak backlog {} MiB",
        peak_rss >> 20,
        bound >> 20,
        peak_backlog >> 20
    );
    assert!(
        peak_rss > 0 && peak_rss < bound,
        "agent peak RSS {} MiB over {} MiB",
        peak_rss >> 20,
        bound >> 20
    );

    let compare = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&source)
        .arg(staging_image(&data, SERVER, "disk0"))
        .output()
        .unwrap();
    assert!(
        compare.status.success(),
        "{}",
        String::from_utf8_lossy(&compare.stdout)
    );

    let _ = Command::new("kill").arg(pid.to_string()).status();
    let exit = agent.wait().unwrap();
    assert!(exit.success(), "agent exit after SIGTERM: {exit:?}");
    receiver.shutdown().await;
}
