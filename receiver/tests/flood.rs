//! Anyone who reaches the receiver's ports, without credentials, holding connections
//! open: the audit of 2026-12 (C2, C3) exhausted the receiver's file descriptors through
//! the control API and the metrics port (so that the replication listener failed with
//! EMFILE), and delayed agents by 25 s with 2,000 idle sockets on port 1500. Replayed
//! here against the receiver binary under a 1,024-descriptor limit.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// Raises this process's own descriptor limit: the flood needs thousands of sockets.
fn raise_own_nofile() {
    let mut rlim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain get/setrlimit on a struct that outlives the calls.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlim);
        rlim.rlim_cur = rlim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &rlim);
    }
}

/// Keeps `count` idle TCP connections from `source` to `target` open, opening a new one
/// whenever the receiver closes one, until `stop`.
fn flood(source: IpAddr, target: SocketAddr, count: usize, stop: Arc<AtomicBool>) {
    for _ in 0..count {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                if socket.bind(SocketAddr::new(source, 0)).is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                if let Ok(mut tcp) = socket.connect(target).await {
                    // Idle until the receiver closes it, or the flood ends.
                    let mut byte = [0u8; 1];
                    let _ = tokio::time::timeout(Duration::from_secs(60), async {
                        use tokio::io::AsyncReadExt;
                        let _ = tcp.read(&mut byte).await;
                    })
                    .await;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
}

fn agent_sync(
    creds: &std::path::Path,
    port: u16,
    disk: &std::path::Path,
    log: &std::path::Path,
) -> (bool, Duration) {
    let agent_bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_blockferry-receiver"))
        .with_file_name("blockferry-agent");
    let started = Instant::now();
    let mut child = Command::new(agent_bin)
        .args([
            "run",
            "--exit-when-synced",
            "--progress",
            "log",
            "--receiver",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--credentials")
        .arg(creds)
        .arg("--disk")
        .arg(format!("p0={}", disk.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.success(), started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(40) {
            let _ = child.kill();
            let _ = child.wait();
            return (false, started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_neither_exhausts_descriptors_nor_starves_agents() {
    raise_own_nofile();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let creds = dir.path().join("creds");
    credentials(&data, "srvC", &creds);
    let (disk, _) = image(dir.path(), "p0.img", 4 << 20, 1.0, 1 << 20, 51);
    let (port, control, metrics) = (free_port(), free_port(), free_port());
    let log = dir.path().join("receiver.log");
    let mut receiver = Command::new(env!("CARGO_BIN_EXE_blockferry-receiver"));
    receiver
        .args(["run", "--io-engine", "sync", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--control")
        .arg(format!("127.0.0.1:{control}"))
        .arg("--metrics")
        .arg(format!("127.0.0.1:{metrics}"))
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // SAFETY: setrlimit is async-signal-safe; it runs in the child before exec.
    unsafe {
        receiver.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 1024,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut receiver = receiver.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "receiver did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The agent's first session makes its address known.
    let (ok, took) = agent_sync(&creds, port, &disk, &dir.path().join("agent1.log"));
    assert!(
        ok,
        "{}",
        std::fs::read_to_string(dir.path().join("agent1.log")).unwrap()
    );
    eprintln!("sync before the flood: {took:?}");

    // One address with far more idle connections than descriptors on every port, then
    // a hundred addresses with as many as each is allowed.
    let stop = Arc::new(AtomicBool::new(false));
    let target = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let lone: IpAddr = [127, 0, 0, 2].into();
    flood(lone, target(port), 2000, Arc::clone(&stop));
    flood(lone, target(control), 1100, Arc::clone(&stop));
    flood(lone, target(metrics), 1100, Arc::clone(&stop));
    for i in 0..100u8 {
        let source: IpAddr = [127, 0, 1, i + 1].into();
        flood(source, target(port), 16, Arc::clone(&stop));
        flood(source, target(control), 8, Arc::clone(&stop));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;

    let agent_log = dir.path().join("agent2.log");
    let (ok, took) = tokio::task::spawn_blocking({
        let (creds, disk, agent_log) = (creds.clone(), disk.clone(), agent_log.clone());
        move || agent_sync(&creds, port, &disk, &agent_log)
    })
    .await
    .unwrap();
    eprintln!("sync during the flood: {took:?}");
    // The control API still answers an operator.
    let status = Command::new("curl")
        .args([
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .arg(format!("https://127.0.0.1:{control}/v1/status"))
        .output()
        .expect("curl is needed (.ci/run installs it)");
    let metrics_page = Command::new("curl")
        .args(["-s", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{metrics}/metrics"))
        .output()
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(receiver.id() as i32, libc::SIGTERM) };
    let _ = receiver.wait();

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        ok,
        "the agent did not sync during the flood:\n{}",
        std::fs::read_to_string(&agent_log).unwrap()
    );
    assert!(
        !text.contains("Too many open files"),
        "descriptors ran out:\n{}",
        &text[text.len().saturating_sub(4000)..]
    );
    assert_eq!(
        String::from_utf8_lossy(&status.stdout),
        "401",
        "the control API did not answer"
    );
    let page = String::from_utf8_lossy(&metrics_page.stdout);
    assert!(
        page.contains("blockferry_refused_connections_total{listener=\"replication\",reason=\"too_many_from_address\"}"),
        "{page}"
    );
    assert!(page.contains("listener=\"control\""), "{page}");
}
