//! The receiver with `--backend ebs` on the strict in-memory EBS, and what its recovery
//! points hold.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockferry_receiver::catalog::RecoveryPointRecord;
use blockferry_receiver::snapshots::{EbsBackendConfig, EbsConnection, restore};
use blockferry_receiver::{Receiver, ReceiverConfig};
use blockferry_storage::ebs::chain::ChainSettings;
use blockferry_storage::ebs::fake::FakeEbs;
use blockferry_storage::ebs::upload::UploadConfig;
use blockferry_storage::ebs::{AnyEbs, RetryPolicy};

use super::receiver_config;

pub fn ebs_config(
    data: &Path,
    fake: &Arc<FakeEbs>,
    concurrency: usize,
    preserve: usize,
) -> ReceiverConfig {
    let mut config = receiver_config(data);
    config.barrier_interval = 1 << 20;
    // Points wait for a heartbeat that reports nothing unacknowledged.
    config.heartbeat_interval = Duration::from_millis(200);
    config.ebs = Some(EbsBackendConfig {
        connection: EbsConnection::InMemory(Arc::clone(fake)),
        chain: ChainSettings {
            upload: UploadConfig {
                concurrency,
                retry: RetryPolicy {
                    attempts: 6,
                    first_delay: Duration::from_millis(5),
                    max_delay: Duration::from_millis(50),
                },
            },
            tags: vec![("team".into(), "dr".into())],
            preserve_limit: preserve,
            ..ChainSettings::default()
        },
        recovery_interval: Duration::ZERO,
    });
    config
}

pub async fn wait_point(
    receiver: &Receiver,
    what: &str,
    done: impl Fn(&RecoveryPointRecord) -> bool,
) -> RecoveryPointRecord {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = receiver.status().unwrap();
        if let Some(point) = status
            .servers
            .first()
            .and_then(|s| s.recovery_points.iter().rev().find(|p| done(p)))
        {
            return point.clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            status
                .servers
                .first()
                .map(|s| (&s.recovery_points, &s.recovery_point_error))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn restore_to(
    receiver: &Receiver,
    fake: &Arc<FakeEbs>,
    disk: &str,
    epoch: u64,
    out: &Path,
) -> PathBuf {
    let report = receiver.status().unwrap();
    let client = Arc::new(AnyEbs::Fake(Arc::clone(fake)));
    let restored = restore(&report, client, None, disk, Some(epoch), out)
        .await
        .unwrap_or_else(|e| panic!("restore of {disk} at {epoch}: {e:#}"));
    assert_eq!(restored.epoch, epoch);
    out.to_owned()
}
