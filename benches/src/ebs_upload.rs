//! `blockferry-bench ebs-upload`: the snapshot uploader's throughput against the strict
//! fake EBS with a fixed latency per PUT, at several concurrency levels. With latency L
//! and concurrency C the ceiling is C blocks of 512 KiB per L; the real service needs
//! about 100 PUTs in flight for about 500 MB/s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockferry_storage::ebs::fake::FakeEbs;
use blockferry_storage::ebs::upload::{PendingSnapshot, UploadConfig};
use blockferry_storage::ebs::{BLOCK_SIZE, RetryPolicy, StartSnapshot};
use bytes::Bytes;

pub async fn run(blocks: u32, latency: Duration, levels: &[usize]) -> anyhow::Result<()> {
    let data = Bytes::from(
        (0..BLOCK_SIZE)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8)
            .collect::<Vec<u8>>(),
    );
    println!(
        "uploading {blocks} blocks of 512 KiB to the fake EBS, {} ms per PUT",
        latency.as_millis()
    );
    println!(
        "{:>12} {:>12} {:>12} {:>10}",
        "concurrency", "MB/s", "ceiling", "of ceiling"
    );
    for &concurrency in levels {
        let fake = Arc::new(FakeEbs::new());
        fake.set_put_latency(latency);
        let request = StartSnapshot {
            volume_size_gib: u64::from(blocks).div_ceil(2048).max(1),
            parent: None,
            description: "blockferry-bench ebs-upload".into(),
            tags: Vec::new(),
            kms_key_arn: None,
            timeout_minutes: 60,
            client_token: format!("bench-{concurrency}"),
        };
        let config = UploadConfig {
            concurrency,
            retry: RetryPolicy::default(),
        };
        let started = Instant::now();
        let mut snapshot = PendingSnapshot::start(Arc::clone(&fake), request, config).await?;
        for index in 0..blocks {
            snapshot.put(index, data.clone()).await?;
        }
        let done = snapshot.complete().await?;
        let elapsed = started.elapsed().as_secs_f64();
        anyhow::ensure!(done.changed_blocks == blocks, "blocks went missing");
        let rate = f64::from(blocks) * BLOCK_SIZE as f64 / elapsed / 1e6;
        let ceiling = concurrency as f64 * BLOCK_SIZE as f64 / latency.as_secs_f64() / 1e6;
        println!(
            "{concurrency:>12} {rate:>12.1} {ceiling:>12.1} {:>9.0}%",
            rate / ceiling * 100.0
        );
    }
    Ok(())
}
