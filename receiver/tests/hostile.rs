//! Attacks of an enrolled (or compromised) agent, replayed from the security audit of
//! 2026-12: each test does what the attacker did, and checks that the receiver now holds.

mod common;

use std::time::Duration;

use blockferry_proto::{DiskSpec, ErrorCode, Frame, Hello, Inventory, ResumeClaim};
use common::*;

fn hello(disks: Vec<DiskSpec>, inventory: Inventory) -> Frame {
    Frame::Hello(Hello {
        agent_version: "raw".into(),
        inventory,
        disks,
        streams: 1,
        series: [7; 16],
        resume: ResumeClaim::Live,
    })
}

/// The audit's C6: the 50-disk limit held per Hello only, so six Hellos of 50 new 8 TiB
/// disks each gave one server 301 disks, 2,400 TiB of sparse images and 4,525 metric
/// series. Now the limit counts every disk the catalog holds for the server, a disk is at
/// most `--max-disk-size`, and the metric series of a server stay bounded with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_cannot_pile_up_disks_beyond_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = credentials(&data, "srvA", &dir.path().join("creds"));
    let mut refused = 0;
    for round in 0..6 {
        let disks = (0..50)
            .map(|i| DiskSpec {
                name: format!("r{round}d{i:02}"),
                size: 8 << 40,
            })
            .collect();
        let mut raw = RawStream::connect(receiver.local_addr(), &creds).await;
        raw.send(&hello(disks, Inventory::default())).await;
        match raw.next().await {
            Some(Frame::Welcome(_)) => assert_eq!(round, 0, "round {round} was welcomed"),
            Some(Frame::Error(err)) => {
                assert_eq!(err.code, ErrorCode::LIMIT);
                assert!(
                    err.message.contains("at most 50 per server")
                        && err.message.contains("disk forget"),
                    "{}",
                    err.message
                );
                refused += 1;
            }
            other => panic!("round {round}: {other:?}"),
        }
    }
    assert_eq!(refused, 5);
    let images = std::fs::read_dir(data.join("images/srvA")).unwrap().count();
    assert!(images <= 100, "{images} files for 50 disks");
    let status = receiver.status().unwrap();
    assert_eq!(status.servers[0].disks.len(), 50);
    let series = receiver
        .render_metrics()
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("server=\"srvA\""))
        .count();
    assert!(series <= 1000, "{series} metric series for one server");

    // A disk larger than the receiver allows (64 TiB by default) is refused outright.
    let big = credentials(&data, "srvB", &dir.path().join("creds-b"));
    let mut raw = RawStream::connect(receiver.local_addr(), &big).await;
    let disk = DiskSpec {
        name: "huge".into(),
        size: (64 << 40) + 4096,
    };
    raw.send(&hello(vec![disk], Inventory::default())).await;
    match raw.next().await {
        Some(Frame::Error(err)) => {
            assert_eq!(err.code, ErrorCode::LIMIT);
            assert!(err.message.contains("--max-disk-size"), "{}", err.message);
        }
        other => panic!("a 64 TiB + 4 KiB disk got {other:?}"),
    }
    assert!(!data.join("images/srvB").exists());
    receiver.shutdown().await;
}

/// The audit's C12: a Hello's host name with terminal escapes cleared the operator's
/// screen, set its title and forged a healthy status line, in `status` and in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escape_sequences_from_an_agent_never_reach_a_terminal_raw() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let creds_dir = dir.path().join("creds");
    credentials(&data, "srvB", &creds_dir);
    let creds = blockferry_agent::Credentials::load(&creds_dir).unwrap();
    let log = dir.path().join("receiver.log");
    let receiver = Spawned::start(&data, &log);
    let forged = "db\x1b[2J\x1b[H\x1b]0;pwned\x07server srvB  host ok  replicating\n";
    let inventory = Inventory {
        host_name: forged.into(),
        os: "Linux\x1b[31m red".into(),
        private_ips: vec!["10.0.0.1\x1b[1A".into()],
        ..Inventory::default()
    };
    let mut raw = RawStream::connect(receiver.addr, &creds).await;
    let disk = DiskSpec {
        name: "d0".into(),
        size: 1 << 20,
    };
    raw.send(&hello(vec![disk], inventory)).await;
    assert!(matches!(raw.next().await, Some(Frame::Welcome(_))));
    raw.send(&Frame::Goodbye(blockferry_proto::Goodbye {
        message: "bye\x1b[2J".into(),
    }))
    .await;
    drop(raw);

    let status = std::process::Command::new(env!("CARGO_BIN_EXE_blockferry-receiver"))
        .args(["status", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.status.success(), "{table}");
    assert!(
        !table.contains('\x1b') && !table.contains('\x07'),
        "{table:?}"
    );
    assert!(
        table.contains("db\\u{1b}[2J"),
        "the host name is shown escaped: {table}"
    );
    let json = std::process::Command::new(env!("CARGO_BIN_EXE_blockferry-receiver"))
        .args(["status", "--json", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!json.stdout.contains(&0x1b), "raw ESC in status --json");
    drop(receiver);
    let logged = std::fs::read(&log).unwrap();
    assert!(
        !logged.iter().any(|&b| b == 0x1b || b == 0x07),
        "raw escapes in the log:\n{}",
        String::from_utf8_lossy(&logged)
    );
}

/// Resident memory of process `pid`, bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib << 10
}

/// The receiver binary on a free port, with its log in `log`; killed when dropped.
struct Spawned {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Spawned {
    fn start(data: &std::path::Path, log: &std::path::Path) -> Self {
        let port = free_port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_blockferry-receiver"))
            .args(["run", "--control", "off", "--metrics", "off", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "receiver did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The audit's C7: before Hello, each of up to 1,024 connections of one agent
/// certificate could buffer a 1 MiB partial frame for 15 s (400 connections: +453 MiB of
/// receiver RSS, not given back). Now a connection may send only Hello or JoinStream
/// first, in a control-sized buffer; a frame of another kind is refused at its header;
/// an agent has at most 10 connections waiting for a session; and every buffer is
/// charged to one budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_certificate_cannot_make_the_receiver_hold_memory_before_hello() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let creds_dir = dir.path().join("creds");
    credentials(&data, "srvB", &creds_dir);
    let creds = blockferry_agent::Credentials::load(&creds_dir).unwrap();
    let receiver = Spawned::start(&data, &dir.path().join("receiver.log"));
    let pid = receiver.child.id();
    let before = rss(pid);

    // A Write header announcing 1 MiB, and all but one byte of its payload.
    let write = Frame::Write(blockferry_proto::Write {
        header: blockferry_proto::WriteHeader {
            disk: 0,
            flags: blockferry_proto::WriteFlags::default(),
            offset: 0,
            len: blockferry_proto::limits::MAX_WRITE_DATA,
            epoch: 1,
        },
        data: vec![0x5a; blockferry_proto::limits::MAX_WRITE_DATA as usize],
    })
    .to_bytes();
    let partial = &write[..write.len() - 1];
    let mut refused = 0;
    let mut held = Vec::new();
    for _ in 0..200 {
        let tcp = tokio::net::TcpStream::connect(receiver.addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(creds.client_config())
            .connect(blockferry_agent::Credentials::server_name(), tcp)
            .await
            .unwrap();
        // The receiver may close the connection while this is still being written.
        let _ = tls.write_all(partial).await;
        let _ = tls.flush().await;
        held.push(tls);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = rss(pid).saturating_sub(before);
    for mut tls in held {
        let mut buf = blockferry_proto::FrameBuffer::new();
        use tokio::io::AsyncReadExt;
        let read = tokio::time::timeout(Duration::from_secs(5), tls.read(buf.spare())).await;
        if let Ok(Ok(n)) = read {
            buf.filled(n);
            if let Ok(Some(Frame::Error(err))) = buf.next_frame() {
                assert!(
                    err.message.contains("expected Hello or JoinStream"),
                    "{}",
                    err.message
                );
            }
            refused += 1;
        }
    }
    assert_eq!(refused, 200, "every such connection is refused at once");
    assert!(
        grown < 64 << 20,
        "200 partial 1 MiB frames grew the receiver by {} MiB",
        grown >> 20
    );

    // Connections that say nothing: beyond 10 for one agent, BUSY with a retry hint.
    let mut waiting = Vec::new();
    for _ in 0..10 {
        waiting.push(RawStream::connect(receiver.addr, &creds).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = RawStream::connect(receiver.addr, &creds).await;
    match extra.next().await {
        Some(Frame::Error(err)) => {
            assert_eq!(err.code, ErrorCode::BUSY, "{}", err.message);
            assert!(err.retry_after_ms >= Some(1000), "{err:?}");
        }
        other => panic!("an 11th waiting connection got {other:?}"),
    }
    // Another agent of another server is not held up by them.
    let other_dir = dir.path().join("other");
    credentials(&data, "srvC", &other_dir);
    let other = blockferry_agent::Credentials::load(&other_dir).unwrap();
    let mut raw = RawStream::connect(receiver.addr, &other).await;
    raw.send(&hello(
        vec![DiskSpec {
            name: "d0".into(),
            size: 1 << 20,
        }],
        Inventory::default(),
    ))
    .await;
    assert!(matches!(raw.next().await, Some(Frame::Welcome(_))));
    drop(waiting);
}

/// The audit's L2: only writes flagged INITIAL_SYNC were refused for a QUEUED disk, so an
/// agent that ignored QUEUED could sync with plain writes and a barrier claiming the
/// whole disk, and get around --max-concurrent-syncs. Now a queued disk takes only
/// changes below its watermark, and no sync or rescan progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_disk_cannot_be_synced_around_the_slot_limit() {
    use blockferry_proto::{Barrier, DiskState, SyncProgress, Write, WriteFlags, WriteHeader};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let mut config = receiver_config(&data);
    config.max_concurrent_syncs = 1;
    let receiver = blockferry_receiver::Receiver::start(config).await.unwrap();
    let disk = || {
        vec![DiskSpec {
            name: "d0".into(),
            size: 1 << 20,
        }]
    };
    // Server A holds the one slot.
    let a = credentials(&data, "srvA", &dir.path().join("a"));
    let mut holder = RawStream::connect(receiver.local_addr(), &a).await;
    holder.send(&hello(disk(), Inventory::default())).await;
    assert!(matches!(holder.next().await, Some(Frame::Welcome(_))));

    let b = credentials(&data, "srvB", &dir.path().join("b"));
    let queued_session = || async {
        let mut raw = RawStream::connect(receiver.local_addr(), &b).await;
        raw.send(&hello(disk(), Inventory::default())).await;
        match raw.next().await {
            Some(Frame::Welcome(w)) => assert_eq!(w.disks[0].state, DiskState::QUEUED),
            other => panic!("{other:?}"),
        }
        raw
    };
    let refused = |frame: Option<Frame>| match frame {
        Some(Frame::Error(err)) => {
            assert_eq!(err.code, ErrorCode::LIMIT, "{}", err.message);
            assert!(
                err.message.contains("waits for a sync slot"),
                "{}",
                err.message
            );
        }
        other => panic!("expected a LIMIT refusal, got {other:?}"),
    };
    // A plain write above the watermark (0): an initial-sync write in disguise.
    let mut raw = queued_session().await;
    raw.send(&Frame::Write(Write {
        header: WriteHeader {
            disk: 0,
            flags: WriteFlags::default(),
            offset: 0,
            len: 4096,
            epoch: 1,
        },
        data: vec![0x42; 4096],
    }))
    .await;
    refused(raw.next().await);
    // A barrier claiming the whole disk synced.
    let mut raw = queued_session().await;
    raw.send(&Frame::Barrier(Barrier {
        epoch: 1,
        sync_progress: vec![SyncProgress {
            disk: 0,
            watermark: 1 << 20,
        }],
        rescan_done: vec![],
        consistent: true,
    }))
    .await;
    refused(raw.next().await);
    // A claimed rescan.
    let mut raw = queued_session().await;
    raw.send(&Frame::Barrier(Barrier {
        epoch: 1,
        sync_progress: vec![],
        rescan_done: vec![0],
        consistent: true,
    }))
    .await;
    refused(raw.next().await);
    let status = receiver.status().unwrap();
    let srv_b = status
        .servers
        .iter()
        .find(|s| s.server_id == "srvB")
        .unwrap();
    assert_eq!(
        srv_b.disks[0].sync_watermark, 0,
        "the queued disk made progress"
    );
    let staged = std::fs::read(staging_image(&data, "srvB", "d0")).unwrap();
    assert!(staged.iter().all(|&b| b == 0), "a queued disk was written");
    drop(holder);
    receiver.shutdown().await;
}

/// The audit's L6: checksum queries (4 at once per session, 64 MiB each) were read into
/// memory outside every budget, and each Checkpoint frame forced a catalog commit, with
/// no rate. Now the bytes a query reads count against the session's and the receiver's
/// in-flight budgets (64 MiB per session by default), and checkpoint commits of a
/// session are at least 100 ms apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksum_queries_and_checkpoints_are_bounded_per_session() {
    use blockferry_proto::{Checkpoint, SumRequest};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let creds_dir = dir.path().join("creds");
    credentials(&data, "srvL", &creds_dir);
    let creds = blockferry_agent::Credentials::load(&creds_dir).unwrap();
    let receiver = Spawned::start(&data, &dir.path().join("receiver.log"));
    let pid = receiver.child.id();
    let mut raw = RawStream::connect(receiver.addr, &creds).await;
    let size = 512u64 << 20;
    raw.send(&hello(
        vec![DiskSpec {
            name: "d0".into(),
            size,
        }],
        Inventory::default(),
    ))
    .await;
    assert!(matches!(raw.next().await, Some(Frame::Welcome(_))));
    let before = rss(pid);
    // 32 queries of 64 MiB each (1 MiB blocks), all sent at once.
    let mut queries = Vec::new();
    for i in 0..32u64 {
        Frame::SumRequest(SumRequest {
            disk: 0,
            first_block: (i % 8) * 64,
            count: 64,
            block_size: 1 << 20,
        })
        .encode(&mut queries);
    }
    raw.send_bytes(&queries).await;
    let sampler = {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let handle = std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                p.fetch_max(rss(pid), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        (stop, peak, handle)
    };
    for _ in 0..32 {
        match raw.next().await {
            Some(Frame::SumReply(reply)) => assert_eq!(reply.digests.len(), 64),
            other => panic!("{other:?}"),
        }
    }
    sampler.0.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.2.join().unwrap();
    let grown = sampler
        .1
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before);
    assert!(
        grown < 128 << 20,
        "32 checksum queries of 64 MiB grew the receiver by {} MiB",
        grown >> 20
    );

    // Thirty checkpoints in one go take at least 2.9 s to be recorded.
    let started = std::time::Instant::now();
    let mut frames = Vec::new();
    for seq in 1..=30 {
        Frame::Checkpoint(Checkpoint { seq }).encode(&mut frames);
    }
    raw.send_bytes(&frames).await;
    for seq in 1..=30 {
        match raw.next().await {
            Some(Frame::CheckpointSaved(saved)) => assert_eq!(saved.seq, seq),
            other => panic!("{other:?}"),
        }
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2900),
        "30 checkpoints recorded in {took:?}"
    );
}
