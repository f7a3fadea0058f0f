//! Continuous replication through the in-process capture API: writes during and after
//! the initial sync, overwrites racing over four streams, a buffer too small to hold the
//! changes, and a connection cut while changes are in flight — each ends with the staging
//! image identical to the source volume once `flush` returns.

mod common;

use std::time::Duration;

use blockferry_agent::{Agent, AgentConfig, Volume};
use common::*;
use tokio_util::sync::CancellationToken;

struct Running {
    agent: Agent,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn start_agent(agent: Agent, mut config: AgentConfig, volumes: Vec<Volume>) -> Running {
    config.exit_when_synced = false;
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (agent, stop) = (agent.clone(), stop.clone());
        async move {
            agent
                .run(&config, &volumes, stop)
                .await
                .expect("agent runs");
        }
    });
    Running { agent, stop, task }
}

impl Running {
    async fn wait_synced(&self) {
        wait_synced(self.agent.stats()).await;
    }

    async fn flush(&self) {
        tokio::time::timeout(Duration::from_secs(120), self.agent.capture().flush())
            .await
            .expect("flush completes")
            .expect("flush succeeds");
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

/// A random write: mixed sizes from 512 bytes to 256 KiB, unaligned offsets, and one in
/// eight all zeros.
fn random_write(rng: &mut Rng, size: u64) -> (u64, Vec<u8>) {
    let len = [512u64, 4096, 6000, 65536, 262144][(rng.next() % 5) as usize];
    let offset = rng.next() % (size - len);
    let fill = if rng.next().is_multiple_of(8) {
        0
    } else {
        (rng.next() % 255) as u8 + 1
    };
    (offset, vec![fill; len as usize])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_and_after_the_initial_sync_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let mut rconfig = receiver_config(&data);
    rconfig.barrier_interval = 4 << 20;
    let receiver = blockferry_receiver::Receiver::start(rconfig).await.unwrap();
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let size = 96 << 20;
    let (source, _) = image(dir.path(), "src.img", size, 0.5, 1 << 20, 11);
    let volumes = vec![volume("disk0", &source)];
    let agent = Agent::new(&volumes);
    let running = start_agent(agent, agent_config(receiver.local_addr(), creds), volumes);
    let capture = running.agent.capture().clone();

    // While the initial sync runs: writes above and below its cursor.
    let mut rng = Rng(0x1234_5678);
    for _ in 0..300 {
        let (offset, bytes) = random_write(&mut rng, size);
        capture.write(0, offset, bytes).await.unwrap();
    }
    running.wait_synced().await;
    // And after it.
    for _ in 0..200 {
        let (offset, bytes) = random_write(&mut rng, size);
        capture.write(0, offset, bytes).await.unwrap();
    }
    running.flush().await;
    assert_identical(&source, &staging_image(&data, SERVER, "disk0"));
    assert_eq!(capture.backlog_bytes(), 0);
    let status = receiver.status().unwrap();
    assert!(status.servers[0].durable_epoch > 0);
    running.stop().await;
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_overwrites_over_four_streams_end_with_the_last_write() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let size = 32 << 20;
    let (source, _) = image(dir.path(), "src.img", size, 1.0, 1 << 20, 12);
    let volumes = vec![volume("disk0", &source)];
    let mut config = agent_config(receiver.local_addr(), creds);
    config.streams = 4;
    let running = start_agent(Agent::new(&volumes), config, volumes);
    running.wait_synced().await;
    assert_eq!(receiver.status().unwrap().servers[0].streams, 4);

    // Four writers hammer the same 64 blocks, spread over every block group.
    let capture = running.agent.capture().clone();
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let capture = capture.clone();
        writers.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37 + w);
            for i in 0..400u64 {
                let block = rng.next() % 64;
                let offset = block * (size / 64) + (rng.next() % 16) * 4096;
                let fill = ((w * 61 + i) % 251) as u8 + 1;
                capture.write(0, offset, vec![fill; 8192]).await.unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    running.flush().await;
    assert_identical(&source, &staging_image(&data, SERVER, "disk0"));
    running.stop().await;
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_drops_data_but_never_changes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let size = 64 << 20;
    let (source, _) = image(dir.path(), "src.img", size, 0.5, 1 << 20, 13);
    let volumes = vec![volume("disk0", &source)];
    let buffer = 256 << 10;
    let running = start_agent(
        Agent::with_buffer(&volumes, buffer),
        agent_config(receiver.local_addr(), creds),
        volumes,
    );
    running.wait_synced().await;
    let capture = running.agent.capture().clone();
    let mut rng = Rng(0xfeed);
    let mut peak_backlog = 0;
    for _ in 0..400 {
        let (offset, bytes) = random_write(&mut rng, size);
        capture.write(0, offset, bytes).await.unwrap();
        assert!(
            capture.buffered_bytes() <= buffer,
            "buffer {} over its bound",
            capture.buffered_bytes()
        );
        peak_backlog = peak_backlog.max(capture.backlog_bytes());
    }
    assert!(peak_backlog > 0, "writes made a backlog");
    running.flush().await;
    assert_eq!(capture.backlog_bytes(), 0, "the backlog drained");
    assert_identical(&source, &staging_image(&data, SERVER, "disk0"));
    running.stop().await;
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_in_flight_survive_a_cut_connection() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let size = 32 << 20;
    let (source, non_zero) = image(dir.path(), "src.img", size, 0.5, 1 << 20, 14);
    // The cut comes after the initial sync, among the changes.
    let proxy = CutProxy::start(receiver.local_addr(), non_zero + (6 << 20)).await;
    let volumes = vec![volume("disk0", &source)];
    let running = start_agent(
        Agent::new(&volumes),
        agent_config(proxy.addr, creds),
        volumes,
    );
    running.wait_synced().await;
    let capture = running.agent.capture().clone();
    let mut rng = Rng(0xc0ffee);
    for _ in 0..600 {
        let (offset, bytes) = random_write(&mut rng, size);
        capture.write(0, offset, bytes).await.unwrap();
    }
    running.flush().await;
    assert_eq!(
        proxy.cuts.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the connection was cut"
    );
    assert!(
        running
            .agent
            .stats()
            .sessions
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    assert_identical(&source, &staging_image(&data, SERVER, "disk0"));
    running.stop().await;
    receiver.shutdown().await;
}

/// A workload that rewrites a hot set faster than the link can carry it never lets the
/// dirty map drain; consistent points must keep coming anyway (every flush is answered
/// while the writes go on), and the end is identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_points_keep_coming_while_a_hot_set_is_rewritten() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let size = 32 << 20;
    let (source, _) = image(dir.path(), "src.img", size, 0.5, 1 << 20, 15);
    let throttled = Arc::new(AtomicBool::new(false));
    let proxy = throttling_proxy(receiver.local_addr(), 4 << 20, Arc::clone(&throttled)).await;
    let volumes = vec![volume("disk0", &source)];
    let mut config = agent_config(proxy, creds);
    config.epoch_interval = Duration::from_millis(200);
    // One stream: less queued between the map and the throttled link.
    config.streams = 1;
    let running = start_agent(Agent::new(&volumes), config, volumes);
    running.wait_synced().await;
    throttled.store(true, Ordering::Relaxed);

    // 1024 hot blocks (4 MiB) rewritten without pause, 16 KiB at a time: many times
    // what the 4 MiB/s link carries.
    let capture = running.agent.capture().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn({
        let (capture, stop, written) = (capture.clone(), Arc::clone(&stop), Arc::clone(&written));
        async move {
            let mut rng = Rng(0x4077);
            while !stop.load(Ordering::Relaxed) {
                let block = rng.next() % 1021;
                let fill = (rng.next() % 255) as u8 + 1;
                capture
                    .write(0, block * 4096, vec![fill; 16384])
                    .await
                    .unwrap();
                written.fetch_add(16384, Ordering::Relaxed);
            }
        }
    });

    let epoch_before = receiver.status().unwrap().servers[0].durable_epoch;
    for round in 0..3 {
        // Let a backlog build first: the flush then covers writes still in flight.
        let start = written.load(Ordering::Relaxed);
        while written.load(Ordering::Relaxed) < start + (32 << 20) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let target = capture.flush_local().await.unwrap();
        let before = written.load(Ordering::Relaxed);
        tokio::time::timeout(Duration::from_secs(60), capture.wait_durable(target))
            .await
            .unwrap_or_else(|_| {
                panic!("round {round}: no consistent point under a sustained workload")
            });
        assert!(!writer.is_finished(), "the writer is still writing");
        let during = written.load(Ordering::Relaxed) - before;
        assert!(
            during > 0 && capture.backlog_bytes() > 0,
            "round {round}: the point was cut while writes went on ({during} bytes) and \
             changes were pending"
        );
    }
    let epoch_after = receiver.status().unwrap().servers[0].durable_epoch;
    assert!(
        epoch_after >= epoch_before + 3,
        "{epoch_before} -> {epoch_after}"
    );

    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    throttled.store(false, Ordering::Relaxed);
    running.flush().await;
    assert_eq!(capture.backlog_bytes(), 0);
    assert_identical(&source, &staging_image(&data, SERVER, "disk0"));
    running.stop().await;
    receiver.shutdown().await;
}
