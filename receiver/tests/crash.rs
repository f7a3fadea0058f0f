//! The receiver is killed with SIGKILL in the middle of an initial sync. The watermark
//! found in its store right after the kill never covers data that is not in the staging
//! image; after a restart the agent reconnects by itself and finishes, byte-identical.

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blockferry_agent::Agent;
use blockferry_receiver::catalog::Catalog;
use common::*;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_killed_mid_sync_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let size = 1 << 30;
    let (source, _) = image(dir.path(), "src.img", size, 0.8, 2 << 20, 7);
    let port = free_port();
    let mut receiver = spawn_receiver(&data, port, &["--barrier-interval-mib", "4"]);

    let volumes = vec![volume("disk0", &source)];
    let config = agent_config(format!("127.0.0.1:{port}"), creds);
    let agent = Agent::new(&volumes);
    let stats = agent.stats().clone();
    let run = tokio::spawn({
        let volumes = volumes.clone();
        async move { agent.run(&config, &volumes, CancellationToken::new()).await }
    });

    // Kill once a good part, but not all, is durable.
    let deadline = Instant::now() + Duration::from_secs(120);
    while stats.durable_bytes() < size / 4 {
        assert!(Instant::now() < deadline, "sync made no progress");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    receiver.kill().unwrap();
    receiver.wait().unwrap();
    assert!(
        !stats.synced.load(Ordering::Relaxed),
        "the kill came too late to test anything"
    );

    // Right after the kill: whatever the store says is durable is in the image.
    let watermark = {
        let catalog = Catalog::open(&data).expect("catalog opens after the kill");
        catalog
            .disk(SERVER, "disk0")
            .unwrap()
            .expect("disk recorded")
            .sync_watermark
    };
    assert!(
        watermark >= size / 8 && watermark < size,
        "watermark {watermark}"
    );
    let staging = staging_image(&data, SERVER, "disk0");
    let (src, img) = (
        std::fs::read(&source).unwrap(),
        std::fs::read(&staging).unwrap(),
    );
    let covered = watermark as usize;
    if let Some(at) = src[..covered]
        .iter()
        .zip(&img[..covered])
        .position(|(a, b)| a != b)
    {
        panic!("the watermark {watermark} covers byte {at}, which is not in the staging image");
    }
    drop((src, img));

    // Restart: the agent, still retrying, reconnects and finishes from the watermark.
    let mut receiver = spawn_receiver(&data, port, &["--barrier-interval-mib", "4"]);
    let report = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("agent finished after the restart")
        .unwrap()
        .expect("agent succeeded");
    assert!(report.sessions >= 2);
    assert_identical(&source, &staging);
    let _ = Command::new("kill").arg(receiver.id().to_string()).status();
    receiver.wait().unwrap();
}
