//! `--backend ebs` through the whole receiver, against the strict in-memory EBS: recovery
//! points become snapshot chains that restore byte for byte, consistent-point bytes
//! survive writes made while their snapshot uploads, faults are retried, and an access
//! denial fails fast and clearly without stopping replication.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockferry_agent::Agent;
use blockferry_receiver::Receiver;
use blockferry_receiver::catalog::RecoveryPointRecord;
use blockferry_receiver::snapshots::restore;
use blockferry_storage::ebs::fake::{FakeEbs, Fault};
use blockferry_storage::ebs::{AnyEbs, BLOCK_SIZE};
use common::ebs::*;
use common::*;
use tokio_util::sync::CancellationToken;

const BLOCK: u64 = BLOCK_SIZE as u64;

/// An agent that replicates `volumes` (and keeps going after its initial sync) until
/// stopped.
struct RunningAgent {
    agent: Arc<Agent>,
    stop: CancellationToken,
    run: tokio::task::JoinHandle<
        Result<blockferry_agent::AgentReport, blockferry_agent::AgentError>,
    >,
}

impl RunningAgent {
    fn start(
        receiver: std::net::SocketAddr,
        credentials: blockferry_agent::Credentials,
        volumes: &[blockferry_agent::Volume],
    ) -> Self {
        let mut config = agent_config(receiver, credentials);
        config.exit_when_synced = false;
        let agent = Arc::new(Agent::new(volumes));
        let stop = CancellationToken::new();
        let run = {
            let (volumes, stop, agent) = (volumes.to_vec(), stop.clone(), Arc::clone(&agent));
            tokio::spawn(async move { agent.run(&config, &volumes, stop).await })
        };
        Self { agent, stop, run }
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.run.await;
    }
}

fn block_is_zero(path: &Path, block: u64) -> bool {
    let data = std::fs::read(path).unwrap();
    let start = (block * BLOCK) as usize;
    data[start..(start + BLOCK_SIZE).min(data.len())]
        .iter()
        .all(|&b| b == 0)
}

fn nonzero_blocks(path: &Path) -> usize {
    let data = std::fs::read(path).unwrap();
    data.chunks(BLOCK_SIZE)
        .filter(|c| c.iter().any(|&b| b != 0))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_recovery_point_restores_byte_identical_from_its_snapshot_chain() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let fake = Arc::new(FakeEbs::new());
    let receiver = Receiver::start(ebs_config(&data, &fake, 8, 64 << 20))
        .await
        .unwrap();
    let creds = credentials(&data, "srv", &dir.path().join("creds"));
    // Sizes that end inside a block; half zeros, so the first snapshot can skip blocks.
    let (d0, _) = image(dir.path(), "d0.img", 12 * BLOCK + 4096, 0.5, 1 << 20, 5);
    let (d1, _) = image(dir.path(), "d1.img", 5 * BLOCK + 512, 1.0, 1 << 20, 6);
    let volumes = vec![volume("d0", &d0), volume("d1", &d1)];
    let running = RunningAgent::start(receiver.local_addr(), creds, &volumes);
    let agent = Arc::clone(&running.agent);
    wait_synced(agent.stats()).await;
    // The first point: the initial sync, no parent, zero blocks left out.
    let first = wait_point(&receiver, "the first recovery point", |_| true).await;
    let expected: Vec<PathBuf> = ["d0", "d1"]
        .iter()
        .zip([&d0, &d1])
        .map(|(name, source)| {
            let copy = dir.path().join(format!("{name}-at-first.img"));
            std::fs::copy(source, &copy).unwrap();
            copy
        })
        .collect();
    for snapshot in &first.disks {
        assert_eq!(fake.parent(&snapshot.snapshot_id), None, "{snapshot:?}");
        let source = if snapshot.disk == "d0" { &d0 } else { &d1 };
        assert_eq!(
            fake.own_blocks(&snapshot.snapshot_id).len(),
            nonzero_blocks(source),
            "the first snapshot of {} holds exactly its non-zero blocks",
            snapshot.disk
        );
        let tags = fake.tags(&snapshot.snapshot_id).unwrap();
        for (key, value) in [
            ("team", "dr"),
            ("blockferry:server", "srv"),
            ("blockferry:disk", snapshot.disk.as_str()),
        ] {
            assert!(
                tags.contains(&(key.to_owned(), value.to_owned())),
                "{tags:?} lacks {key}={value}"
            );
        }
    }

    // Changes: a 4 KiB write inside a block, a write across two blocks, a non-zero
    // block made zeros, and the partial last block of each disk. The service throttles,
    // fails and hides the new snapshot meanwhile: retries carry the point through.
    let zeroed = (0..12)
        .find(|&b| !block_is_zero(&d0, b))
        .expect("d0 has a non-zero block");
    let capture = agent.capture();
    let mut rng = Rng(77);
    let mut random = |len: usize| -> Vec<u8> { (0..len).map(|_| rng.next() as u8).collect() };
    fake.inject(Fault::Throttle, 3);
    fake.inject(Fault::ServerError, 2);
    fake.hide_new_snapshots_for(2);
    capture
        .write(0, 3 * BLOCK + 8192, random(4096))
        .await
        .unwrap();
    capture
        .write(0, 6 * BLOCK - 4096, random(16384))
        .await
        .unwrap();
    capture
        .write_zeroes(0, zeroed * BLOCK, BLOCK)
        .await
        .unwrap();
    capture.write(0, 12 * BLOCK, random(4096)).await.unwrap();
    capture.write(1, 5 * BLOCK, random(512)).await.unwrap();
    capture.flush().await.unwrap();
    // Every change is in the epochs up to the one durable now: a point at or after it
    // holds them all.
    let durable = receiver.status().unwrap().servers[0].durable_epoch;
    let second = wait_point(&receiver, "a point after the changes", |p| {
        p.epoch >= durable
    })
    .await;

    // Each point restores to exactly what the disks held at it.
    for (index, (name, source)) in ["d0", "d1"].iter().zip([&d0, &d1]).enumerate() {
        let at_first = restore_to(
            &receiver,
            &fake,
            name,
            first.epoch,
            &dir.path().join(format!("{name}-r1.img")),
        )
        .await;
        assert_identical(&expected[index], &at_first);
        let at_second = restore_to(
            &receiver,
            &fake,
            name,
            second.epoch,
            &dir.path().join(format!("{name}-r2.img")),
        )
        .await;
        assert_identical(source, &at_second);
    }
    // The zeroed block is zeros in the child although the parent holds data there.
    assert!(block_is_zero(&dir.path().join("d0-r2.img"), zeroed));
    // The chain from the first point to the second (a point may have been cut while the
    // changes arrived): each d0 snapshot a child of the one before, holding only changed
    // blocks, the zeroed one among them, written as zeros although the parent has data.
    let points = receiver.status().unwrap().servers[0]
        .recovery_points
        .clone();
    let d0_of = |p: &RecoveryPointRecord| {
        p.disks
            .iter()
            .find(|d| d.disk == "d0")
            .unwrap()
            .snapshot_id
            .clone()
    };
    let chain: Vec<&RecoveryPointRecord> = points
        .iter()
        .filter(|p| p.epoch >= first.epoch && p.epoch <= second.epoch)
        .collect();
    let mut own = Vec::new();
    for pair in chain.windows(2) {
        let (parent, child) = (d0_of(pair[0]), d0_of(pair[1]));
        if parent == child {
            continue; // d0 did not change between these points
        }
        assert_eq!(fake.parent(&child).as_deref(), Some(parent.as_str()));
        own.extend(fake.own_blocks(&child));
    }
    let changed = [3, 5, 6, u32::try_from(zeroed).unwrap(), 12];
    assert!(
        own.contains(&changed[3]),
        "the zeroed block {zeroed} must be written to a child: {own:?}"
    );
    assert!(own.iter().all(|b| changed.contains(b)), "{own:?}");
    // Status names each disk's latest snapshot.
    let status = receiver.status().unwrap();
    let latest = status.servers[0].recovery_points.last().unwrap();
    for disk in &status.servers[0].disks {
        let in_point = latest.disks.iter().find(|d| d.disk == disk.name).unwrap();
        assert_eq!(
            disk.snapshot_id.as_deref(),
            Some(in_point.snapshot_id.as_str())
        );
    }
    assert!(status.servers[0].recovery_point_error.is_none());

    // A restore asks for what exists, and says what does.
    let report = receiver.status().unwrap();
    let client = Arc::new(AnyEbs::Fake(Arc::clone(&fake)));
    let err = restore(
        &report,
        Arc::clone(&client),
        None,
        "d0",
        Some(999_999),
        &dir.path().join("x"),
    )
    .await
    .unwrap_err();
    assert!(
        format!("{err:#}").contains("no recovery point 999999"),
        "{err:#}"
    );
    let err = restore(&report, client, None, "nope", None, &dir.path().join("x"))
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("no server has a disk named nope"),
        "{err:#}"
    );

    running.stop().await;
    receiver.shutdown().await;
}

/// Writes made while a point's snapshot uploads must not leak into it: the chain keeps
/// the consistent-point bytes of every frozen block a write overwrites (and with a
/// preserve limit of two blocks, writers wait for the upload instead of holding more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_an_upload_do_not_leak_into_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let fake = Arc::new(FakeEbs::new());
    // 24 blocks at 2 PUTs of 150 ms each: the first snapshot takes about 2 s, and the
    // overwrites start as soon as the sync is durable (when the upload has just begun).
    fake.set_put_latency(Duration::from_millis(150));
    let receiver = Receiver::start(ebs_config(&data, &fake, 2, 2 * BLOCK_SIZE))
        .await
        .unwrap();
    let creds = credentials(&data, "srv", &dir.path().join("creds"));
    let (d0, _) = image(dir.path(), "d0.img", 24 * BLOCK, 1.0, 1 << 20, 9);
    let original = dir.path().join("original.img");
    std::fs::copy(&d0, &original).unwrap();
    let volumes = vec![volume("d0", &d0)];
    let running = RunningAgent::start(receiver.local_addr(), creds, &volumes);
    let agent = Arc::clone(&running.agent);
    wait_synced(agent.stats()).await;
    // Overwrite every block, last first (the upload goes first to last).
    let mut rng = Rng(3);
    for block in (0..24).rev() {
        let data: Vec<u8> = (0..BLOCK_SIZE).map(|_| rng.next() as u8).collect();
        agent.capture().write(0, block * BLOCK, data).await.unwrap();
    }
    agent.capture().flush().await.unwrap();
    let first = wait_point(&receiver, "the first point", |_| true).await;
    let second = wait_point(&receiver, "the second point", |p| p.epoch > first.epoch).await;
    let r1 = restore_to(
        &receiver,
        &fake,
        "d0",
        first.epoch,
        &dir.path().join("r1.img"),
    )
    .await;
    assert_identical(&original, &r1);
    let r2 = restore_to(
        &receiver,
        &fake,
        "d0",
        second.epoch,
        &dir.path().join("r2.img"),
    )
    .await;
    assert_identical(&d0, &r2);
    running.stop().await;
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_denied_fails_fast_and_clearly_and_replication_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let fake = Arc::new(FakeEbs::new());
    fake.deny_access(true);
    let receiver = Receiver::start(ebs_config(&data, &fake, 4, 64 << 20))
        .await
        .unwrap();
    let creds = credentials(&data, "srv", &dir.path().join("creds"));
    let (d0, _) = image(dir.path(), "d0.img", 8 * BLOCK, 1.0, 1 << 20, 4);
    let volumes = vec![volume("d0", &d0)];
    let running = RunningAgent::start(receiver.local_addr(), creds, &volumes);
    let agent = Arc::clone(&running.agent);
    // The initial sync is durable on the base copy whatever EBS says.
    wait_synced(agent.stats()).await;
    assert_identical(&d0, &staging_image(&data, "srv", "d0"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let error = loop {
        let status = receiver.status().unwrap();
        if let Some(error) = status.servers[0].recovery_point_error.clone() {
            break error;
        }
        assert!(Instant::now() < deadline, "no recovery point error shown");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        error.contains("AccessDenied") || error.contains("access denied"),
        "{error}"
    );
    assert!(error.contains("d0"), "the error names the disk: {error}");
    // Fails fast: the denied start is not retried.
    assert_eq!(fake.calls("StartSnapshot"), 1);
    assert!(
        receiver.status().unwrap().servers[0]
            .recovery_points
            .is_empty()
    );
    // Replication goes on meanwhile.
    agent
        .capture()
        .write(0, BLOCK, vec![0xab; 8192])
        .await
        .unwrap();
    agent.capture().flush().await.unwrap();
    assert_identical(&d0, &staging_image(&data, "srv", "d0"));
    // Once access is granted, the next point carries everything.
    fake.deny_access(false);
    let point = wait_point(&receiver, "a point once access is granted", |_| true).await;
    let restored = restore_to(
        &receiver,
        &fake,
        "d0",
        point.epoch,
        &dir.path().join("r.img"),
    )
    .await;
    assert_identical(&d0, &restored);
    assert!(
        receiver.status().unwrap().servers[0]
            .recovery_point_error
            .is_none()
    );
    running.stop().await;
    receiver.shutdown().await;
}

/// A new receiver process cannot know what changed before it started: its first point
/// compares every block of the base copy with the digest index kept beside it, and
/// uploads only what differs, as a child of the chain's latest snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_receiver_restart_the_chain_goes_on_with_only_the_changed_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let fake = Arc::new(FakeEbs::new());
    let port = free_port();
    let config = || {
        let mut config = ebs_config(&data, &fake, 4, 64 << 20);
        config.listen = format!("127.0.0.1:{port}").parse().unwrap();
        config
    };
    let receiver = Receiver::start(config()).await.unwrap();
    let creds = credentials(&data, "srv", &dir.path().join("creds"));
    let (d0, _) = image(dir.path(), "d0.img", 16 * BLOCK, 1.0, 1 << 20, 21);
    let volumes = vec![volume("d0", &d0)];
    let running = RunningAgent::start(receiver.local_addr(), creds, &volumes);
    let agent = Arc::clone(&running.agent);
    wait_synced(agent.stats()).await;
    let first = wait_point(&receiver, "the first point", |_| true).await;
    receiver.shutdown().await;

    // Changes while the receiver is down, then a new receiver on the same data dir.
    agent
        .capture()
        .write(0, 5 * BLOCK + 100, vec![0x5a; 3000])
        .await
        .unwrap();
    agent
        .capture()
        .write_zeroes(0, 9 * BLOCK, BLOCK)
        .await
        .unwrap();
    let receiver = Receiver::start(config()).await.unwrap();
    agent.capture().flush().await.unwrap();
    let durable = receiver.status().unwrap().servers[0].durable_epoch;
    let second = wait_point(&receiver, "a point after the restart", |p| {
        p.epoch >= durable && p.epoch > first.epoch
    })
    .await;
    let (parent, child) = (&first.disks[0].snapshot_id, &second.disks[0].snapshot_id);
    assert_ne!(parent, child);
    assert_eq!(fake.parent(child).as_deref(), Some(parent.as_str()));
    let mut own = fake.own_blocks(child);
    own.sort_unstable();
    assert_eq!(own, vec![5, 9], "only the changed blocks go up");
    let restored = restore_to(
        &receiver,
        &fake,
        "d0",
        second.epoch,
        &dir.path().join("r.img"),
    )
    .await;
    assert_identical(&d0, &restored);
    running.stop().await;
    receiver.shutdown().await;
}

/// Only an epoch the agent says ends at a crash-consistent point becomes a recovery point
/// (an initial-sync chunk barrier does not), and an EBS receiver asks for 512 KiB
/// alignment in Welcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_epochs_marked_consistent_become_recovery_points() {
    use blockferry_proto::{Barrier, Durable, Frame, SyncProgress, Write, WriteFlags, WriteHeader};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let fake = Arc::new(FakeEbs::new());
    let receiver = Receiver::start(ebs_config(&data, &fake, 4, 64 << 20))
        .await
        .unwrap();
    let creds = credentials(&data, "srv", &dir.path().join("creds"));
    let mut agent = RawStream::connect(receiver.local_addr(), &creds).await;
    agent.send(&raw_hello(BLOCK, 1)).await;
    let Some(Frame::Welcome(welcome)) = agent.next().await else {
        panic!("no Welcome");
    };
    assert_eq!(welcome.settings.alignment, BLOCK_SIZE as u32);
    let epoch = welcome.next_epoch;
    agent
        .send(&Frame::Write(Write {
            header: WriteHeader {
                disk: 0,
                flags: WriteFlags::INITIAL_SYNC,
                offset: 0,
                len: BLOCK_SIZE as u32,
                epoch,
            },
            data: vec![0x42; BLOCK_SIZE],
        }))
        .await;
    let barrier = |epoch, consistent, sync_progress| {
        Frame::Barrier(Barrier {
            epoch,
            sync_progress,
            rescan_done: vec![],
            consistent,
        })
    };
    agent
        .send(&barrier(
            epoch,
            false,
            vec![SyncProgress {
                disk: 0,
                watermark: BLOCK,
            }],
        ))
        .await;
    assert_eq!(agent.next().await, Some(Frame::Durable(Durable { epoch })));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let status = receiver.status().unwrap();
    assert_eq!(status.servers[0].disks[0].state, "CONTINUOUS");
    assert!(
        status.servers[0].recovery_points.is_empty(),
        "an epoch not marked consistent is no recovery point"
    );
    assert_eq!(fake.calls("StartSnapshot"), 0);
    agent.send(&barrier(epoch + 1, true, vec![])).await;
    assert_eq!(
        agent.next().await,
        Some(Frame::Durable(Durable { epoch: epoch + 1 }))
    );
    let point = wait_point(&receiver, "a point at the consistent epoch", |_| true).await;
    assert_eq!(point.epoch, epoch + 1);
    let restored = restore_to(
        &receiver,
        &fake,
        "d",
        point.epoch,
        &dir.path().join("r.img"),
    )
    .await;
    assert_eq!(std::fs::read(&restored).unwrap(), vec![0x42; BLOCK_SIZE]);
    receiver.shutdown().await;
}
