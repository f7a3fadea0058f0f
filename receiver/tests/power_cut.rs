//! A power cut, not a kill: the receiver stages through an engine that holds every
//! write in memory until a flush, like a page cache and a drive's cache, and the test
//! cuts its power in the middle of an initial sync and right after one ends. A SIGKILL
//! keeps the page cache, so it cannot catch a watermark committed before its data was
//! flushed; this can. After each cut, whatever the catalog says is durable must be in
//! the staging image, and a new receiver (a new engine) lets the agent finish
//! byte-identical.
//!
//! The same run with a cache that acknowledges flushes without writing (a removed
//! fdatasync) must lose acknowledged data, and the check must see it: the test can fail.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use blockferry_agent::{Agent, AgentStats};
use blockferry_receiver::Receiver;
use blockferry_receiver::catalog::Catalog;
use blockferry_storage::{Engine, PowerSwitch};
use common::*;
use tokio_util::sync::CancellationToken;

const SIZE: u64 = 96 << 20;

async fn receiver_on(data: &std::path::Path, port: u16, engine: Option<Engine>) -> Receiver {
    let mut config = receiver_config(data);
    config.listen = SocketAddr::from(([127, 0, 0, 1], port));
    config.barrier_interval = 2 << 20;
    config.engine = engine;
    Receiver::start(config).await.expect("receiver starts")
}

fn watermark(data: &std::path::Path) -> u64 {
    Catalog::open(data)
        .expect("the catalog opens after the cut")
        .disk(SERVER, "disk0")
        .unwrap()
        .expect("disk recorded")
        .sync_watermark
}

/// The first byte below `covered` where the staging image is not the source.
fn first_lost(source: &std::path::Path, staging: &std::path::Path, covered: u64) -> Option<usize> {
    let (src, img) = (
        std::fs::read(source).unwrap(),
        std::fs::read(staging).unwrap(),
    );
    let covered = covered as usize;
    src[..covered]
        .iter()
        .zip(&img[..covered])
        .position(|(a, b)| a != b)
}

/// Waits until a quarter of the disk is durable (as the agent was told) and writes are
/// held unflushed, then cuts the power and stops the receiver; returns the writes the
/// cut lost (almost always some: a flush may just have emptied the cache).
async fn cut_mid_sync(receiver: Receiver, power: &PowerSwitch, stats: &AgentStats) -> u64 {
    wait_for(
        "a quarter of the disk durable",
        Duration::from_secs(120),
        || (stats.durable_bytes() >= SIZE / 4).then_some(()),
    )
    .await;
    // Usually at once; a sync that already ended holds nothing, and is cut as it is.
    for _ in 0..500 {
        if power.held() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let lost = power.cut();
    receiver.shutdown().await;
    lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_loses_nothing_the_receiver_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let (source, _) = image(dir.path(), "src.img", SIZE, 0.9, 1 << 20, 11);
    let staging = staging_image(&data, SERVER, "disk0");
    let port = free_port();
    let volumes = vec![volume("disk0", &source)];
    let config = agent_config(format!("127.0.0.1:{port}"), creds);
    let agent = Agent::new(&volumes);
    let stats = agent.stats().clone();
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (volumes, config, stop) = (volumes.clone(), config.clone(), stop.clone());
        async move { agent.run(&config, &volumes, stop).await }
    });

    // Mid-sync.
    let (engine, power) = Engine::with_volatile_cache();
    let receiver = receiver_on(&data, port, Some(engine)).await;
    let lost = cut_mid_sync(receiver, &power, &stats).await;
    eprintln!("the cut lost {lost} unflushed writes");
    let covered = watermark(&data);
    assert!((SIZE / 8..=SIZE).contains(&covered), "watermark {covered}");
    if let Some(at) = first_lost(&source, &staging, covered) {
        panic!(
            "after a power cut the watermark {covered} covers byte {at}, which is not in the staging image"
        );
    }

    // The agent, still retrying, finishes into a new receiver; then a cut right after
    // the sync ended loses nothing of it.
    let (engine, power) = Engine::with_volatile_cache();
    let receiver = receiver_on(&data, port, Some(engine)).await;
    wait_synced(&stats).await;
    power.cut();
    receiver.shutdown().await;
    assert_eq!(watermark(&data), SIZE);
    assert_identical(&source, &staging);
    stop.cancel();
    let _ = run.await;
}

/// A cache that acknowledges flushes without writing: the receiver's acknowledgements
/// are then lies, and the check above must catch them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_real_flush_the_check_finds_acknowledged_data_lost() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let (source, _) = image(dir.path(), "src.img", SIZE, 1.0, 1 << 20, 12);
    let port = free_port();
    let volumes = vec![volume("disk0", &source)];
    let config = agent_config(format!("127.0.0.1:{port}"), creds);
    let agent = Agent::new(&volumes);
    let stats = agent.stats().clone();
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (volumes, config, stop) = (volumes.clone(), config.clone(), stop.clone());
        async move { agent.run(&config, &volumes, stop).await }
    });
    let (engine, power) = Engine::with_volatile_cache();
    power.ignore_flushes(true);
    let receiver = receiver_on(&data, port, Some(engine)).await;
    cut_mid_sync(receiver, &power, &stats).await;
    stop.cancel();
    let _ = run.await;
    let covered = watermark(&data);
    assert!(covered > 0, "nothing was acknowledged");
    assert_eq!(
        first_lost(&source, &staging_image(&data, SERVER, "disk0"), covered),
        Some(0),
        "with flushes ignored the staging image holds nothing, yet the check found no loss"
    );
}
