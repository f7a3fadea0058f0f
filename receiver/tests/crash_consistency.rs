//! Continuous replication across receiver crashes: a writer issues pairs "write A,
//! flush, write B (which refers to A)" through the capture while the receiver crashes at
//! random moments and is restarted. Right after every crash, the staging image holds
//! every A whose flush returned (nothing acknowledged is lost), and every B found in it
//! has its A (no write is applied ahead of the epoch it depends on).
//!
//! Two kinds of crash: SIGKILL of a receiver process (its page cache survives), and a
//! power cut of an in-process receiver staging through a volatile-cache engine (what it
//! wrote and did not flush is lost, as on a real power cut).

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use blockferry_agent::Agent;
use blockferry_receiver::Receiver;
use blockferry_storage::{Engine, PowerSwitch};
use common::*;
use tokio_util::sync::CancellationToken;

const PAIRS: u64 = 2048;

/// Block contents: A_i and B_i are recognisable and name their pair.
fn block(kind: u8, pair: u64) -> Vec<u8> {
    let mut b = vec![kind; 4096];
    b[..8].copy_from_slice(&pair.to_le_bytes());
    b
}

/// A receiver that can crash.
enum Crashing {
    Killed(ReceiverProcess),
    PowerCut(Receiver, PowerSwitch),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Crash {
    Kill,
    PowerCut,
}

impl Crashing {
    async fn start(crash: Crash, data: &std::path::Path, port: u16) -> Self {
        match crash {
            Crash::Kill => Self::Killed(spawn_receiver(data, port, &[])),
            Crash::PowerCut => {
                let (engine, power) = Engine::with_volatile_cache();
                let mut config = receiver_config(data);
                config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                config.engine = Some(engine);
                let receiver = Receiver::start(config).await.expect("receiver starts");
                Self::PowerCut(receiver, power)
            }
        }
    }

    async fn crash(self) {
        match self {
            Self::Killed(mut process) => {
                process.kill().unwrap();
                process.wait().unwrap();
            }
            Self::PowerCut(receiver, power) => {
                power.cut();
                receiver.shutdown().await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_b_has_its_a_and_no_flushed_a_is_lost_across_kills() {
    across(Crash::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_b_has_its_a_and_no_flushed_a_is_lost_across_power_cuts() {
    across(Crash::PowerCut).await;
}

async fn across(crash: Crash) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let size = PAIRS * 2 * 4096;
    let (source, _) = image(dir.path(), "src.img", size, 0.0, 1 << 20, 51);
    let port = free_port();
    let mut receiver = Crashing::start(crash, &data, port).await;

    let volumes = vec![volume("disk0", &source)];
    let agent = Agent::new(&volumes);
    let mut config = agent_config(format!("127.0.0.1:{port}"), creds);
    config.exit_when_synced = false;
    config.initial_backoff = Duration::from_millis(50);
    config.max_backoff = Duration::from_millis(200);
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (agent, stop, volumes) = (agent.clone(), stop.clone(), volumes.clone());
        async move { agent.run(&config, &volumes, stop).await.unwrap() }
    });

    // The writer: A_i, flush (durable at the receiver), B_i. `flushed` is the number of
    // pairs whose A is acknowledged.
    let flushed = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn({
        let (capture, flushed) = (agent.capture().clone(), Arc::clone(&flushed));
        async move {
            for i in 0..PAIRS {
                capture
                    .write(0, 2 * i * 4096, block(b'A', i))
                    .await
                    .unwrap();
                capture.flush().await.unwrap();
                flushed.store(i + 1, Ordering::SeqCst);
                capture
                    .write(0, (2 * i + 1) * 4096, block(b'B', i))
                    .await
                    .unwrap();
            }
        }
    });

    let staging = staging_image(&data, SERVER, "disk0");
    let mut rng = 0x5eed_u64;
    let mut kills = 0;
    while !writer.is_finished() && kills < 6 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(200 + rng % 500)).await;
        let acknowledged = flushed.load(Ordering::SeqCst);
        receiver.crash().await;
        kills += 1;
        let image = std::fs::read(&staging).unwrap();
        for i in 0..PAIRS {
            let (a, b) = (2 * i as usize * 4096, (2 * i as usize + 1) * 4096);
            let has_a = image[a..a + 4096] == block(b'A', i)[..];
            let has_b = image[b..b + 4096] == block(b'B', i)[..];
            assert!(
                !has_b || has_a,
                "after crash {kills} ({crash:?}): B{i} is in the image without A{i}"
            );
            assert!(
                i >= acknowledged || has_a,
                "after crash {kills} ({crash:?}): A{i} was acknowledged, then lost"
            );
        }
        receiver = Crashing::start(crash, &data, port).await;
    }
    assert!(
        kills >= 3,
        "the writer finished before the receiver was killed often enough"
    );
    tokio::time::timeout(Duration::from_secs(120), writer)
        .await
        .expect("the writer finishes after the restarts")
        .unwrap();
    agent.capture().flush().await.unwrap();
    assert_identical(&source, &staging);
    stop.cancel();
    run.await.unwrap();
    match receiver {
        Crashing::Killed(mut process) => {
            let _ = Command::new("kill").arg(process.id().to_string()).status();
            process.wait().unwrap();
        }
        Crashing::PowerCut(receiver, _) => receiver.shutdown().await,
    }
}
