//! Continuous replication across receiver crashes: a writer issues pairs "write A,
//! flush, write B (which refers to A)" through the capture while the receiver is killed
//! with SIGKILL at random moments and restarted. Right after every kill, the staging image
//! holds every A whose flush returned (nothing acknowledged is lost), and every B found
//! in it has its A (no write is applied ahead of the epoch it depends on).

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use blockferry_agent::Agent;
use common::*;
use tokio_util::sync::CancellationToken;

const PAIRS: u64 = 2048;

/// Block contents: A_i and B_i are recognisable and name their pair.
fn block(kind: u8, pair: u64) -> Vec<u8> {
    let mut b = vec![kind; 4096];
    b[..8].copy_from_slice(&pair.to_le_bytes());
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_b_has_its_a_and_no_flushed_a_is_lost_across_kills() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let size = PAIRS * 2 * 4096;
    let (source, _) = image(dir.path(), "src.img", size, 0.0, 1 << 20, 51);
    let port = free_port();
    let mut receiver = spawn_receiver(&data, port, &[]);

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
        receiver.kill().unwrap();
        receiver.wait().unwrap();
        kills += 1;
        let image = std::fs::read(&staging).unwrap();
        for i in 0..PAIRS {
            let (a, b) = (2 * i as usize * 4096, (2 * i as usize + 1) * 4096);
            let has_a = image[a..a + 4096] == block(b'A', i)[..];
            let has_b = image[b..b + 4096] == block(b'B', i)[..];
            assert!(
                !has_b || has_a,
                "after kill {kills}: B{i} is in the image without A{i}"
            );
            assert!(
                i >= acknowledged || has_a,
                "after kill {kills}: A{i} was acknowledged, then lost"
            );
        }
        receiver = spawn_receiver(&data, port, &[]);
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
    let _ = Command::new("kill").arg(receiver.id().to_string()).status();
    receiver.wait().unwrap();
}
