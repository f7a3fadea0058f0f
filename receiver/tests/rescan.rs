//! Rescan by checksum and clean restarts: a killed agent rescans and resends little more
//! than what changed; a cleanly stopped one resumes from its state record without any
//! rescan; a damaged or unknown record is never trusted; an added disk syncs while the
//! others rescan; an operator can ask for a rescan; malformed checksum queries are
//! refused.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use blockferry_agent::{Agent, AgentConfig, Volume};
use blockferry_proto::{ErrorCode, Frame, SumRequest};
use blockferry_receiver::Receiver;
use blockferry_receiver::status::DiskStatus;
use common::*;
use tokio_util::sync::CancellationToken;

fn agent_bin() -> PathBuf {
    let bin =
        PathBuf::from(env!("CARGO_BIN_EXE_blockferry-receiver")).with_file_name("blockferry-agent");
    assert!(
        bin.exists(),
        "run through `cargo test --workspace`, which builds blockferry-agent"
    );
    bin
}

/// Starts the agent binary with its log in `log`.
fn spawn_agent(args: &[&str], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(agent_bin())
        .args(args)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("agent binary starts")
}

fn disk(receiver: &Receiver, name: &str) -> DiskStatus {
    find_disk(receiver, name).unwrap_or_else(|| panic!("disk {name} in status"))
}

/// The disk, once the receiver knows it.
fn find_disk(receiver: &Receiver, name: &str) -> Option<DiskStatus> {
    let status = receiver.status().unwrap();
    status
        .servers
        .first()?
        .disks
        .iter()
        .find(|d| d.name == name)
        .cloned()
}

async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_exit(child: &mut Child, limit: Duration, log: &Path) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the agent did not exit; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Overwrites `count` distinct, scattered 4 KiB blocks of `path` with new random bytes;
/// returns the bytes changed.
fn change_blocks(path: &Path, size: u64, count: u64, seed: u64) -> u64 {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let blocks = size / 4096;
    let mut rng = Rng(seed);
    let mut chosen = std::collections::BTreeSet::new();
    while (chosen.len() as u64) < count {
        chosen.insert(rng.next() % blocks);
    }
    let mut data = vec![0u8; 4096];
    for block in chosen {
        for chunk in data.chunks_mut(8) {
            chunk.copy_from_slice(&rng.next().to_le_bytes());
        }
        file.write_all_at(&data, block * 4096).unwrap();
    }
    file.sync_all().unwrap();
    count * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_rescans_and_resends_little_more_than_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds_dir = dir.path().join("creds");
    credentials(&data, SERVER, &creds_dir);
    let size = 1u64 << 30;
    let (source, _) = image(dir.path(), "src.img", size, 0.5, 1 << 20, 21);
    let state = dir.path().join("state");
    let log = dir.path().join("agent.log");
    let addr = receiver.local_addr().to_string();
    let disk_arg = format!("disk0={}", source.display());
    let args = [
        "run",
        "--receiver",
        &addr,
        "--credentials",
        creds_dir.to_str().unwrap(),
        "--disk",
        &disk_arg,
        "--state-dir",
        state.to_str().unwrap(),
        "--progress",
        "log",
    ];
    let mut agent = spawn_agent(&args, &log);
    wait_until("the initial sync", Duration::from_secs(600), || {
        find_disk(&receiver, "disk0").is_some_and(|d| d.state == "CONTINUOUS")
    })
    .await;
    agent.kill().unwrap();
    agent.wait().unwrap();
    assert!(
        !blockferry_agent::state::path(&state).exists(),
        "a killed agent leaves no state record"
    );

    // 1% of the 4 KiB blocks, scattered, change while the agent is down.
    let changed = change_blocks(&source, size, size / 4096 / 100, 0xd1ff);

    let mut restarted = args.to_vec();
    restarted.push("--exit-when-synced");
    let mut agent = spawn_agent(&restarted, &log);
    let status = wait_exit(&mut agent, Duration::from_secs(600), &log).await;
    assert!(
        status.success(),
        "the agent exits once the rescan is durable"
    );

    let d = disk(&receiver, "disk0");
    assert_eq!(d.last_rescan_reason.as_deref(), Some("unclean_shutdown"));
    assert_eq!(d.rescan_reason, None, "the rescan completed");
    assert_eq!(d.rescanned_bytes, size, "every block was compared");
    assert!(
        d.resent_bytes >= changed && d.resent_bytes * 2 <= changed * 3,
        "resent {} bytes for {changed} changed (at most 1.5x allowed)",
        d.resent_bytes
    );
    assert_identical(&source, &staging_image(&data, SERVER, "disk0"));
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_keeps_every_tap_write_and_restarts_without_a_rescan() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds_dir = dir.path().join("creds");
    credentials(&data, SERVER, &creds_dir);
    let size = 128u64 << 20;
    let (source, _) = image(dir.path(), "src.img", size, 0.5, 1 << 20, 22);
    let throttled = Arc::new(AtomicBool::new(false));
    let proxy = throttling_proxy(receiver.local_addr(), 256 << 10, Arc::clone(&throttled)).await;
    let state = dir.path().join("state");
    let log = dir.path().join("agent.log");
    let proxy_addr = proxy.to_string();
    let nbd_socket = dir.path().join("nbd.sock");
    let nbd_addr = format!("unix:{}", nbd_socket.display());
    let disk_arg = format!("disk0={}", source.display());
    let common_args = [
        "--credentials",
        creds_dir.to_str().unwrap(),
        "--disk",
        &disk_arg,
        "--state-dir",
        state.to_str().unwrap(),
        "--progress",
        "log",
    ];
    let mut first = vec!["run", "--receiver", &proxy_addr];
    first.extend_from_slice(&common_args);
    // One stream: less room in flight between the dirty map and the receiver.
    first.extend_from_slice(&[
        "--nbd-listen",
        &nbd_addr,
        "--drain-timeout-secs",
        "1",
        "--streams",
        "1",
    ]);
    let mut agent = spawn_agent(&first, &log);
    wait_until("the initial sync", Duration::from_secs(300), || {
        find_disk(&receiver, "disk0").is_some_and(|d| d.state == "CONTINUOUS")
    })
    .await;

    // The link crawls: much of what qemu-io writes (more than the streams' queues and
    // socket buffers hold) is still only in the agent's dirty map at SIGTERM.
    throttled.store(true, Ordering::Relaxed);
    let mut rng = Rng(0x7a9);
    let commands: Vec<String> = (0..300)
        .map(|_| {
            let len = [4096u64, 65536, 1 << 20][(rng.next() % 3) as usize];
            let offset = (rng.next() % ((size - len) / 4096)) * 4096;
            format!("write -P {} {offset} {len}", rng.next() % 255 + 1)
        })
        .collect();
    let mut qemu = Command::new("qemu-io");
    qemu.args(["-f", "raw"]);
    for c in &commands {
        qemu.args(["-c", c]);
    }
    let out = qemu
        .arg(format!("nbd+unix:///disk0?socket={}", nbd_socket.display()))
        .output()
        .expect("qemu-io is needed: apt-get install qemu-utils (.ci/run installs it)");
    assert!(
        out.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) }, 0);
    // The one-second drain runs out against the crawling link; then the link opens so
    // that the checkpoint (queued behind what the streams already carry) gets through.
    // (Waiting for the agent to say so, not for a fixed time: on a loaded machine the
    // drain can start well after the signal.)
    wait_until("the drain to time out", Duration::from_secs(60), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("drain timed out"))
    })
    .await;
    throttled.store(false, Ordering::Relaxed);
    let status = wait_exit(&mut agent, Duration::from_secs(60), &log).await;
    assert!(status.success(), "a clean stop exits with 0");
    assert!(
        blockferry_agent::state::path(&state).exists(),
        "a clean stop saves the state record"
    );

    let agent_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        agent_log.contains("drain timed out"),
        "changes were left for the state record:\n{agent_log}"
    );
    let addr = receiver.local_addr().to_string();
    let mut second = vec!["run", "--receiver", &addr];
    second.extend_from_slice(&common_args);
    second.push("--exit-when-synced");
    let mut agent = spawn_agent(&second, &log);
    let status = wait_exit(&mut agent, Duration::from_secs(300), &log).await;
    assert!(status.success());

    let d = disk(&receiver, "disk0");
    assert_eq!(d.last_rescan_reason, None, "no rescan ever ran");
    assert_eq!(d.rescanned_bytes, 0, "the restart rescanned nothing");
    let agent_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        agent_log.contains("resuming from the clean-shutdown state record"),
        "{agent_log}"
    );
    assert!(
        !blockferry_agent::state::path(&state).exists(),
        "the record is consumed"
    );
    assert_identical(&source, &staging_image(&data, SERVER, "disk0"));
    receiver.shutdown().await;
}

/// Runs an in-process agent until it is synced, then stops it cleanly (which saves its
/// state record).
async fn run_and_stop(config: &AgentConfig, volumes: &[Volume], writes: &[(u64, u8)]) {
    let mut config = config.clone();
    config.exit_when_synced = false;
    let agent = Agent::new(volumes);
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (agent, stop, config, volumes) = (
            agent.clone(),
            stop.clone(),
            config.clone(),
            volumes.to_vec(),
        );
        async move { agent.run(&config, &volumes, stop).await.unwrap() }
    });
    wait_synced(agent.stats()).await;
    for &(offset, fill) in writes {
        agent
            .capture()
            .write(0, offset, vec![fill; 4096])
            .await
            .unwrap();
    }
    stop.cancel();
    task.await.unwrap();
}

async fn run_until_synced(config: &AgentConfig, volumes: &[Volume]) {
    let mut config = config.clone();
    config.exit_when_synced = true;
    sync(&config, volumes, Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_unknown_state_record_is_never_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let size = 16u64 << 20;
    let (source, _) = image(dir.path(), "src.img", size, 0.5, 1 << 20, 23);
    let volumes = vec![volume("disk0", &source)];
    let state = dir.path().join("state");
    let mut config = agent_config(receiver.local_addr(), creds);
    config.state_dir = Some(state.clone());
    let record = blockferry_agent::state::path(&state);

    // A clean stop, then a restart that trusts the record: no rescan.
    run_and_stop(&config, &volumes, &[(4096, 1)]).await;
    assert!(record.exists());
    run_and_stop(&config, &volumes, &[(8192, 2)]).await;
    assert_eq!(disk(&receiver, "disk0").last_rescan_reason, None);

    // Altered: one flipped bit.
    let mut raw = std::fs::read(&record).unwrap();
    raw[30] ^= 1;
    std::fs::write(&record, &raw).unwrap();
    run_and_stop(&config, &volumes, &[]).await;
    let d = disk(&receiver, "disk0");
    assert_eq!(d.last_rescan_reason.as_deref(), Some("state_mismatch"));
    assert_eq!(d.rescanned_bytes, size);

    // Truncated.
    let raw = std::fs::read(&record).unwrap();
    std::fs::write(&record, &raw[..raw.len() / 2]).unwrap();
    run_and_stop(&config, &volumes, &[]).await;
    assert_eq!(
        disk(&receiver, "disk0").last_rescan_reason.as_deref(),
        Some("state_mismatch")
    );

    // Whole and well-formed, but a chain id the receiver never recorded.
    let mut forged = blockferry_agent::state::take(&state, &volumes)
        .unwrap()
        .expect("a record");
    forged.seq += 1000;
    blockferry_agent::state::save(&state, &volumes, &forged).unwrap();
    // Changes made behind the receiver's back are found by the rescan.
    change_blocks(&source, size, 40, 0xf0);
    run_until_synced(&config, &volumes).await;
    let d = disk(&receiver, "disk0");
    assert_eq!(d.last_rescan_reason.as_deref(), Some("state_mismatch"));
    assert!(d.resent_bytes >= 40 * 4096, "{d:?}");
    assert_identical(&source, &staging_image(&data, SERVER, "disk0"));

    // No record at all: an unclean shutdown.
    run_until_synced(&config, &volumes).await;
    assert_eq!(
        disk(&receiver, "disk0").last_rescan_reason.as_deref(),
        Some("unclean_shutdown")
    );
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_disk_syncs_while_the_others_rescan() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let mut rconfig = receiver_config(&data);
    rconfig.barrier_interval = 2 << 20;
    let receiver = Receiver::start(rconfig).await.unwrap();
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let (old, _) = image(dir.path(), "old.img", 32 << 20, 0.5, 1 << 20, 24);
    let (new, _) = image(dir.path(), "new.img", 48 << 20, 1.0, 1 << 20, 25);
    let config = agent_config(receiver.local_addr(), creds.clone());
    run_until_synced(&config, &[volume("old", &old)]).await;
    change_blocks(&old, 32 << 20, 64, 0xadd);

    // The link is slow enough that the new disk's sync takes seconds.
    let throttled = Arc::new(AtomicBool::new(true));
    let proxy = throttling_proxy(receiver.local_addr(), 12 << 20, Arc::clone(&throttled)).await;
    let mut config = agent_config(proxy, creds);
    config.exit_when_synced = true;
    let volumes = vec![volume("old", &old), volume("new", &new)];
    let run = tokio::spawn({
        let volumes = volumes.clone();
        async move { sync(&config, &volumes, Duration::from_secs(120)).await }
    });
    // Both at once: the new disk makes progress while the old one still rescans, and the
    // old one completes while the new one still syncs. Run one after the other, and one
    // of these never happens.
    let (mut synced_during_rescan, mut rescanned_during_sync) = (false, false);
    while !run.is_finished() {
        let (Some(o), Some(n)) = (find_disk(&receiver, "old"), find_disk(&receiver, "new")) else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        if o.state == "RESCAN" && n.sync_watermark > 0 {
            synced_during_rescan = true;
        }
        if o.state == "CONTINUOUS" && n.state == "INITIAL_SYNC" && n.sync_watermark < n.size {
            rescanned_during_sync = true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    run.await.unwrap();
    let (o, n) = (disk(&receiver, "old"), disk(&receiver, "new"));
    assert_eq!(o.last_rescan_reason.as_deref(), Some("unclean_shutdown"));
    assert_eq!(
        n.sync_watermark, n.size,
        "the new disk's initial sync completed"
    );
    assert_eq!(
        n.last_rescan_reason, None,
        "a new disk is synced, not rescanned"
    );
    assert!(
        synced_during_rescan && rescanned_during_sync,
        "the rescan and the sync ran concurrently ({synced_during_rescan}, {rescanned_during_sync})"
    );
    assert_identical(&old, &staging_image(&data, SERVER, "old"));
    assert_identical(&new, &staging_image(&data, SERVER, "new"));
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_rescan_reaches_a_connected_agent_and_writes_during_it_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let size = 32u64 << 20;
    let (source, _) = image(dir.path(), "src.img", size, 0.5, 1 << 20, 26);
    let volumes = vec![volume("disk0", &source)];
    let agent = Agent::new(&volumes);
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (agent, stop, volumes) = (agent.clone(), stop.clone(), volumes.clone());
        let mut config = agent_config(receiver.local_addr(), creds);
        config.exit_when_synced = false;
        async move { agent.run(&config, &volumes, stop).await.unwrap() }
    });
    wait_synced(agent.stats()).await;
    // Changed behind the agent's back: only a rescan can find these.
    change_blocks(&source, size, 30, 0x0b5);

    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_blockferry-receiver"))
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap()
    };
    let unknown = cli(&["rescan", "--server", "nobody"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no source server nobody"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    let no_disk = cli(&["rescan", "--server", SERVER, "--disk", "sdz"]);
    assert!(!no_disk.status.success());
    assert!(String::from_utf8_lossy(&no_disk.stderr).contains("no disk named \"sdz\""));

    let sessions = agent.stats().sessions.load(Ordering::Relaxed);
    let ok = cli(&["rescan", "--server", SERVER]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("reconnecting"));
    // Writes keep flowing during the rescan, and none is left stale.
    let capture = agent.capture().clone();
    let mut rng = Rng(0x5ca7);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let offset = (rng.next() % (size / 4096)) * 4096;
        capture
            .write(0, offset, vec![(rng.next() % 250) as u8 + 1; 4096])
            .await
            .unwrap();
        let d = disk(&receiver, "disk0");
        if agent.stats().sessions.load(Ordering::Relaxed) > sessions
            && d.last_rescan_reason.as_deref() == Some("operator_request")
            && d.rescan_reason.is_none()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rescan did not complete: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::timeout(Duration::from_secs(60), capture.flush())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(disk(&receiver, "disk0").rescanned_bytes, size);
    assert_identical(&source, &staging_image(&data, SERVER, "disk0"));
    stop.cancel();
    task.await.unwrap();
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_checksum_queries_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let addr = receiver.local_addr();
    let size = 1u64 << 20;

    async fn refusal(
        addr: std::net::SocketAddr,
        creds: &blockferry_agent::Credentials,
        size: u64,
        raw: Vec<u8>,
    ) -> (ErrorCode, String) {
        let mut stream = RawStream::connect(addr, creds).await;
        stream.send(&raw_hello(size, 1)).await;
        assert!(matches!(stream.next().await, Some(Frame::Welcome(_))));
        stream.send_bytes(&raw).await;
        loop {
            match stream.next().await {
                Some(Frame::Error(e)) => return (e.code, e.message),
                Some(_) => continue,
                None => panic!("closed without an error frame"),
            }
        }
    }
    let request = |first_block: u64, count: u32| {
        Frame::SumRequest(SumRequest {
            disk: 0,
            first_block,
            count,
            block_size: 4096,
        })
        .to_bytes()
    };
    // Beyond the disk (256 blocks of 4 KiB).
    let (code, message) = refusal(addr, &creds, size, request(200, 100)).await;
    assert_eq!(code, ErrorCode::OUT_OF_RANGE);
    assert!(message.contains("beyond the end of disk d"), "{message}");
    // Over the count limit: the count field is patched past MAX_SUM_BLOCKS.
    let mut over = request(0, 1);
    let count_at = blockferry_proto::FRAME_HEADER_LEN + 2 + 8;
    over[count_at..count_at + 4]
        .copy_from_slice(&(blockferry_proto::limits::MAX_SUM_BLOCKS + 1).to_be_bytes());
    let (code, message) = refusal(addr, &creds, size, over).await;
    assert_eq!(code, ErrorCode::PROTOCOL);
    assert!(message.contains("count"), "{message}");
    // A disk the session does not have.
    let mut other_disk = request(0, 1);
    other_disk[blockferry_proto::FRAME_HEADER_LEN..blockferry_proto::FRAME_HEADER_LEN + 2]
        .copy_from_slice(&3u16.to_be_bytes());
    let (code, message) = refusal(addr, &creds, size, other_disk).await;
    assert_eq!(code, ErrorCode::PROTOCOL);
    assert!(message.contains("disk index 3"), "{message}");

    // A good one is answered with one digest per block, matching the staging image.
    let mut stream = RawStream::connect(addr, &creds).await;
    stream.send(&raw_hello(size, 1)).await;
    assert!(matches!(stream.next().await, Some(Frame::Welcome(_))));
    stream.send_bytes(&request(250, 6)).await;
    let Some(Frame::SumReply(reply)) = stream.next().await else {
        panic!("a SumReply");
    };
    assert_eq!(reply.first_block, 250);
    assert_eq!(reply.digests.len(), 6);
    let zeros = blockferry_proto::block_digest(&[0u8; 4096]);
    assert!(
        reply.digests.iter().all(|&d| d == zeros),
        "a fresh image reads as zeros"
    );
    receiver.shutdown().await;
}

/// The audit's C4: with its staging image deleted (or its volume not mounted at boot),
/// the receiver made a new, empty image, kept the watermark, and the cleanly restarted
/// agent resumed without a rescan: status said CONTINUOUS and 100 % over all zeros. Now
/// an image that is missing, or not the file the catalog recorded, stalls the disk
/// (`staging_missing`, naming the image) until it is back or an operator decides: `disk
/// reset` (sync again) or `disk adopt` (keep this file, rescan it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_staging_image_stalls_the_disk_until_it_is_back_or_an_operator_decides() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let size = 8u64 << 20;
    let (source, _) = image(dir.path(), "src.img", size, 1.0, 1 << 20, 26);
    let volumes = vec![volume("disk0", &source)];
    let mut config = agent_config(receiver.local_addr(), creds);
    config.state_dir = Some(dir.path().join("state"));
    let staged = staging_image(&data, SERVER, "disk0");
    run_and_stop(&config, &volumes, &[]).await;
    assert_identical(&source, &staged);

    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_blockferry-receiver"))
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .args(["--server", SERVER, "--disk", "disk0"])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };

    // Gone, as when the images volume is not mounted: nothing is made in its place.
    let elsewhere = dir.path().join("unmounted.img");
    std::fs::rename(&staged, &elsewhere).unwrap();
    stalled_by(&receiver, &config, &volumes, &staged, "does not exist").await;
    assert!(
        !staged.exists(),
        "an empty image was made in place of the lost one"
    );
    // Back (the volume mounted): the disk goes on as before, with no rescan.
    std::fs::rename(&elsewhere, &staged).unwrap();
    run_until_synced(&config, &volumes).await;
    let d = disk(&receiver, "disk0");
    assert!(d.state != "STALLED" && d.stall_detail.is_none(), "{d:?}");
    assert_identical(&source, &staged);

    // A copy in its place (a restore): not the recorded file. Adopted, it is rescanned.
    std::fs::copy(&staged, &elsewhere).unwrap();
    std::fs::rename(&elsewhere, &staged).unwrap();
    change_blocks(&staged, size, 8, 0x0dd);
    stalled_by(
        &receiver,
        &config,
        &volumes,
        &staged,
        "not the file the catalog recorded",
    )
    .await;
    let (ok, text) = cli(&["disk", "adopt"]);
    assert!(ok, "{text}");
    run_until_synced(&config, &volumes).await;
    let d = disk(&receiver, "disk0");
    assert_eq!(d.last_rescan_reason.as_deref(), Some("staging_adopted"));
    assert!(d.resent_bytes >= 8 * 4096, "{d:?}");
    assert_identical(&source, &staged);

    // Deleted for good: nothing to adopt; a reset syncs the disk again in full.
    std::fs::remove_file(&staged).unwrap();
    stalled_by(&receiver, &config, &volumes, &staged, "does not exist").await;
    let (ok, text) = cli(&["disk", "adopt"]);
    assert!(!ok && text.contains("disk reset"), "{text}");
    let (ok, text) = cli(&["disk", "reset"]);
    assert!(ok, "{text}");
    let report = blockferry_agent::Agent::new(&volumes);
    let mut full = config.clone();
    full.exit_when_synced = true;
    let done = tokio::time::timeout(
        Duration::from_secs(120),
        report.run(&full, &volumes, CancellationToken::new()),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(done.payload_bytes >= size, "a reset disk is synced in full");
    assert_identical(&source, &staged);
    receiver.shutdown().await;
}

/// Runs the agent until disk0 is STALLED for a staging image the receiver cannot vouch
/// for, and checks what status says of it.
async fn stalled_by(
    receiver: &Receiver,
    config: &AgentConfig,
    volumes: &[Volume],
    staged: &Path,
    expect: &str,
) {
    let mut config = config.clone();
    config.exit_when_synced = false;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (stop, volumes) = (stop.clone(), volumes.to_vec());
        async move { Agent::new(&volumes).run(&config, &volumes, stop).await }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let disk = loop {
        if let Some(d) = find_disk(receiver, "disk0")
            && d.state == "STALLED"
            && d.reason == "staging_missing"
        {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "not STALLED staging_missing: {:?}",
            find_disk(receiver, "disk0")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let detail = disk.stall_detail.clone().unwrap_or_default();
    assert!(
        detail.contains(&staged.display().to_string()) && detail.contains(expect),
        "{detail}"
    );
    assert_eq!(disk.replicated_bytes, 0, "nothing is vouched for: {disk:?}");
    assert_eq!(
        disk.sync_watermark, disk.size,
        "the watermark is kept for its return"
    );
    let status = receiver.status().unwrap();
    assert_eq!(
        status.servers[0].stalled.as_deref(),
        Some("staging_missing")
    );
    stop.cancel();
    let _ = task.await;
}

/// The audit's L1: a clean stop recorded its checkpoint and saved the state record
/// without syncing the source volumes, so writes that went through the tap into the
/// source's page cache could be acknowledged at the receiver and then lost at the source
/// in a power cut, with the record (trusted at the next start) hiding the difference.
/// Traced with strace: after SIGTERM, the source image is fdatasynced before the state
/// record is renamed into place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_syncs_the_source_volumes_before_the_state_record() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds_dir = dir.path().join("creds");
    credentials(&data, SERVER, &creds_dir);
    let (source, _) = image(dir.path(), "src.img", 16 << 20, 0.5, 1 << 20, 27);
    let state = dir.path().join("state");
    let socket = dir.path().join("nbd.sock");
    let log = dir.path().join("agent.log");
    let addr = receiver.local_addr().to_string();
    let disk_arg = format!("disk0={}", source.display());
    let nbd = format!("unix:{}", socket.display());
    let mut agent = spawn_agent(
        &[
            "run",
            "--receiver",
            &addr,
            "--credentials",
            creds_dir.to_str().unwrap(),
            "--disk",
            &disk_arg,
            "--state-dir",
            state.to_str().unwrap(),
            "--nbd-listen",
            &nbd,
            "--progress",
            "log",
        ],
        &log,
    );
    wait_until("the initial sync", Duration::from_secs(60), || {
        find_disk(&receiver, "disk0").is_some_and(|d| d.state == "CONTINUOUS")
    })
    .await;
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x61 4096 65536",
            "-c",
            "write -P 0x62 1048576 4096",
        ])
        .arg(format!("nbd+unix:///disk0?socket={}", socket.display()))
        .output()
        .expect("qemu-io is needed (.ci/run installs qemu-utils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let trace = dir.path().join("trace.txt");
    let mut strace = Command::new("strace")
        .args([
            "-f",
            "-y",
            "-qq",
            "-e",
            "trace=fsync,fdatasync,rename,renameat,renameat2",
            "-o",
        ])
        .arg(&trace)
        .arg("-p")
        .arg(agent.id().to_string())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace is needed (.ci/run installs it)");
    wait_until("strace to attach", Duration::from_secs(20), || {
        std::fs::read_to_string(format!("/proc/{}/status", agent.id())).is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("TracerPid:") && l.trim() != "TracerPid:\t0")
        })
    })
    .await;
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) }, 0);
    let status = tokio::task::spawn_blocking(move || agent.wait().unwrap())
        .await
        .unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    let _ = strace.wait();
    let text = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let signal = lines
        .iter()
        .position(|l| l.contains("--- SIGTERM"))
        .expect("SIGTERM traced");
    let record = lines
        .iter()
        .position(|l| l.contains("rename(") && l.contains("/agent-state\""))
        .unwrap_or_else(|| panic!("the state record was not saved:\n{text}"));
    let source_name = source.display().to_string();
    let synced = lines[signal..record]
        .iter()
        .any(|l| (l.contains("fdatasync(") || l.contains("fsync(")) && l.contains(&source_name));
    assert!(
        synced,
        "no sync of {source_name} between SIGTERM and the state record:\n{text}"
    );
    assert!(blockferry_agent::state::path(&state).exists());
    receiver.shutdown().await;
}
