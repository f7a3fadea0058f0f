//! End to end over loopback mTLS: images arrive byte-identical, zeros travel without
//! payload, broken connections resume from the watermark, and several agents with
//! several disks replicate at once.

mod common;

use std::time::Duration;

use blockferry_receiver::catalog::Catalog;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_with_random_and_zero_regions_arrives_identical() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    // 256 MiB + 4 KiB: the odd tail exercises a last chunk shorter than a frame.
    let size = (256 << 20) + 4096;
    let (source, non_zero) = image(dir.path(), "src.img", size, 0.5, 3 << 20, 1);
    let volumes = vec![volume("disk0", &source)];
    let report = sync(
        &agent_config(receiver.local_addr(), creds),
        &volumes,
        Duration::from_secs(120),
    )
    .await;

    let staging = staging_image(&data, SERVER, "disk0");
    assert_identical(&source, &staging);
    assert!(
        (report.payload_bytes as f64) < 0.6 * size as f64,
        "payload {} of a half-zero image of {size}",
        report.payload_bytes
    );
    assert_eq!(
        report.payload_bytes, non_zero,
        "exactly the non-zero data travels as payload"
    );
    assert_eq!(report.payload_bytes + report.zero_fill_bytes, size);

    let status = receiver.status().unwrap();
    let disk = &status.servers[0].disks[0];
    assert_eq!(disk.sync_watermark, size);
    // CONTINUOUS while the session lasts, DISCONNECTED once the receiver has seen the
    // agent's Goodbye.
    assert!(
        matches!(disk.state.as_str(), "CONTINUOUS" | "DISCONNECTED"),
        "{}",
        disk.state
    );
    assert_eq!(status.servers[0].server_id, SERVER);
    assert!(
        !status.servers[0].inventory.host_name.is_empty(),
        "inventory is stored"
    );
    receiver.shutdown().await;

    // A second sync of the same disk after a restart sends nothing: the watermark says
    // it is complete.
    let receiver = start_receiver(&data).await;
    let creds = blockferry_agent::Credentials::load(&dir.path().join("creds")).unwrap();
    let again = sync(
        &agent_config(receiver.local_addr(), creds),
        &volumes,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(again.payload_bytes + again.zero_fill_bytes, 0);
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connection_resumes_from_the_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let mut config = receiver_config(&data);
    config.barrier_interval = 8 << 20;
    let receiver = blockferry_receiver::Receiver::start(config).await.unwrap();
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let size = 256 << 20;
    let (source, non_zero) = image(dir.path(), "src.img", size, 0.75, 1 << 20, 2);
    // Cut once the agent has sent about half of the image's data.
    let proxy = CutProxy::start(receiver.local_addr(), non_zero / 2).await;
    let volumes = vec![volume("disk0", &source)];
    let report = sync(
        &agent_config(proxy.addr, creds),
        &volumes,
        Duration::from_secs(120),
    )
    .await;

    assert_eq!(
        proxy.cuts.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the connection was cut"
    );
    assert!(
        report.sessions >= 2,
        "the agent reconnected ({} sessions)",
        report.sessions
    );
    assert_identical(&source, &staging_image(&data, SERVER, "disk0"));
    let ratio = report.payload_bytes as f64 / non_zero as f64;
    assert!(
        ratio <= 1.15,
        "payload sent was {ratio:.3}x the non-zero bytes"
    );
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_with_several_disks_replicate_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let mut runs = Vec::new();
    let mut expected = Vec::new();
    for server in ["web-1", "db-1"] {
        let creds = credentials(&data, server, &dir.path().join(format!("creds-{server}")));
        let mut volumes = Vec::new();
        for (i, disk) in ["sda", "sdb", "nvme0n1"].iter().enumerate() {
            let size = (24 << 20) + (i as u64) * 4096 * 3;
            let seed = server.len() as u64 * 10 + i as u64;
            let (path, _) = image(
                dir.path(),
                &format!("{server}-{disk}.img"),
                size,
                0.6,
                1 << 20,
                seed,
            );
            volumes.push(volume(disk, &path));
            expected.push((server, *disk, path));
        }
        let config = agent_config(receiver.local_addr(), creds);
        runs.push(tokio::spawn(async move {
            sync(&config, &volumes, Duration::from_secs(120)).await
        }));
    }
    for run in runs {
        run.await.unwrap();
    }
    for (server, disk, source) in &expected {
        assert_identical(source, &staging_image(&data, server, disk));
    }
    let status = receiver.status().unwrap();
    assert_eq!(status.servers.len(), 2);
    assert!(status.servers.iter().all(|s| s.disks.len() == 3));
    receiver.shutdown().await;

    // The watermarks are in the store, for every disk.
    let catalog = Catalog::open(&data).unwrap();
    for (server, disk, source) in &expected {
        let record = catalog.disk(server, disk).unwrap().expect("disk recorded");
        assert_eq!(
            record.sync_watermark,
            std::fs::metadata(source).unwrap().len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_agent_ends_cleanly_and_resumes_later() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let mut rconfig = receiver_config(&data);
    rconfig.barrier_interval = 4 << 20;
    let receiver = blockferry_receiver::Receiver::start(rconfig).await.unwrap();
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let size = 256 << 20;
    let (source, non_zero) = image(dir.path(), "src.img", size, 1.0, 1 << 20, 5);
    let volumes = vec![volume("disk0", &source)];
    let config = agent_config(receiver.local_addr(), creds);

    let agent = blockferry_agent::Agent::new(&volumes);
    let stats = agent.stats().clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn({
        let (config, volumes, stop) = (config.clone(), volumes.clone(), stop.clone());
        async move { agent.run(&config, &volumes, stop).await }
    });
    while stats.durable_bytes() < size / 4 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    stop.cancel();
    let first = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the agent stops promptly")
        .unwrap()
        .expect("a stop is not an error");
    assert_eq!(first.outcome, blockferry_agent::Outcome::Shutdown);

    // The receiver saw a Goodbye at a frame boundary, not a torn frame.
    let mut disk = receiver.status().unwrap().servers[0].disks[0].clone();
    for _ in 0..100 {
        if disk.state == "DISCONNECTED" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        disk = receiver.status().unwrap().servers[0].disks[0].clone();
    }
    assert_eq!(
        (disk.state.as_str(), disk.reason.as_str()),
        ("DISCONNECTED", "session_ended")
    );
    assert!(
        disk.sync_watermark > 0 && disk.sync_watermark < size,
        "{}",
        disk.sync_watermark
    );

    let second = sync(&config, &volumes, Duration::from_secs(120)).await;
    assert_identical(&source, &staging_image(&data, SERVER, "disk0"));
    let ratio = (first.payload_bytes + second.payload_bytes) as f64 / non_zero as f64;
    assert!(ratio <= 1.15, "stop and resume sent {ratio:.3}x the data");
    receiver.shutdown().await;
}
