//! The EBS snapshot chain against the strict fake: what the service rejects is rejected,
//! uploads never conflict, retries recover from every injected fault, access denied fails
//! fast, and a chain of recovery points restores byte for byte.

use std::sync::Arc;
use std::time::Duration;

use blockferry_storage::ebs::fake::{FakeEbs, Fault};
use blockferry_storage::ebs::restore::{RestoreError, restore};
use blockferry_storage::ebs::upload::{PendingSnapshot, UploadConfig};
use blockferry_storage::ebs::{
    BLOCK_SIZE, EbsClient, EbsError, RetryPolicy, StartSnapshot, aggregate_checksum, base64, sha256,
};
use bytes::Bytes;

const DISK: u64 = 16 * BLOCK_SIZE as u64 + 12_345;

fn request(parent: Option<&str>, token: &str) -> StartSnapshot {
    StartSnapshot {
        volume_size_gib: 1,
        parent: parent.map(str::to_owned),
        description: "blockferry test".into(),
        tags: vec![("blockferry:disk".into(), "sda".into())],
        kms_key_arn: None,
        timeout_minutes: 60,
        client_token: token.into(),
    }
}

fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        attempts: 12,
        first_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(20),
    }
}

fn config(concurrency: usize) -> UploadConfig {
    UploadConfig {
        concurrency,
        retry: fast_retries(),
    }
}

fn block(seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut data = Vec::with_capacity(BLOCK_SIZE);
    while data.len() < BLOCK_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    Bytes::from(data)
}

/// Writes `data` into the expected image at block `index` (clipped at the disk's end).
fn apply(image: &mut [u8], index: u32, data: &[u8]) {
    let at = index as usize * BLOCK_SIZE;
    let len = (image.len() - at).min(BLOCK_SIZE);
    image[at..at + len].copy_from_slice(&data[..len]);
}

async fn restored(fake: &Arc<FakeEbs>, snapshot: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("restored.img");
    restore(Arc::clone(fake), snapshot, DISK, &out, fast_retries())
        .await
        .unwrap();
    std::fs::read(&out).unwrap()
}

#[tokio::test]
async fn a_chain_of_recovery_points_restores_byte_for_byte_zeroed_blocks_included() {
    let fake = Arc::new(FakeEbs::new());
    let mut image = vec![0u8; DISK as usize];

    // The initial sync: blocks 0..16 and the partial last one; 5 and 9 are all zeros and
    // may be left out of a snapshot without parent.
    let mut first = PendingSnapshot::start(Arc::clone(&fake), request(None, "t1"), config(4))
        .await
        .unwrap();
    for index in 0..17u32 {
        if index == 5 || index == 9 {
            continue;
        }
        let data = block(u64::from(index));
        apply(&mut image, index, &data);
        first.put(index, data).await.unwrap();
    }
    let first = first.complete().await.unwrap();
    assert_eq!(first.changed_blocks, 15);
    let point1 = image.clone();

    // A recovery interval: block 3 rewritten twice (the last write wins), block 7
    // zeroed — which must be written as zeros, or the child inherits the parent's data —
    // and block 9 written for the first time.
    let mut second =
        PendingSnapshot::start(Arc::clone(&fake), request(Some(&first.id), "t2"), config(4))
            .await
            .unwrap();
    for (index, data) in [
        (3u32, block(100)),
        (7, Bytes::from(vec![0u8; BLOCK_SIZE])),
        (9, block(101)),
        (3, block(102)),
    ] {
        apply(&mut image, index, &data);
        second.put(index, data).await.unwrap();
    }
    let second = second.complete().await.unwrap();
    assert_eq!(second.changed_blocks, 3);
    assert_eq!(second.parent.as_deref(), Some(first.id.as_str()));
    assert_eq!(fake.parent(&second.id).as_deref(), Some(first.id.as_str()));
    assert_eq!(fake.own_blocks(&second.id), vec![3, 7, 9]);

    assert!(
        restored(&fake, &first.id).await == point1,
        "recovery point 1"
    );
    let now = restored(&fake, &second.id).await;
    assert!(now == image, "recovery point 2");
    assert!(now[7 * BLOCK_SIZE..8 * BLOCK_SIZE].iter().all(|&b| b == 0));
    assert_eq!(
        fake.tags(&first.id).unwrap(),
        vec![("blockferry:disk".to_owned(), "sda".to_owned())]
    );
}

#[tokio::test]
async fn the_fake_rejects_what_ebs_rejects() {
    let fake = FakeEbs::new();
    let id = fake.start_snapshot(request(None, "r")).await.unwrap();
    let data = block(1);
    let sum = base64(&sha256(&data));
    let rejected = |r: Result<(), EbsError>, what: &str| match r {
        Err(EbsError::Rejected(why)) => assert!(why.contains(what), "{why}"),
        other => panic!("expected a rejection for {what}, got {other:?}"),
    };
    rejected(
        fake.put_snapshot_block(&id, 0, data.slice(..4096), &sum)
            .await,
        "bytes, not",
    );
    rejected(
        fake.put_snapshot_block(&id, 0, data.clone(), &base64(&sha256(b"x")))
            .await,
        "checksum",
    );
    rejected(
        fake.put_snapshot_block(&id, 2048, data.clone(), &sum).await,
        "beyond the volume",
    );
    // Two PUTs of one block at once.
    fake.set_put_latency(Duration::from_millis(100));
    let (a, b) = tokio::join!(fake.put_snapshot_block(&id, 1, data.clone(), &sum), async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        fake.put_snapshot_block(&id, 1, data.clone(), &sum).await
    });
    a.unwrap();
    rejected(b, "CONFLICTING_BLOCK_UPDATE");
    fake.set_put_latency(Duration::ZERO);
    // One block is stored: a wrong count, then a wrong checksum, fail the snapshot.
    let right = base64(&aggregate_checksum([sha256(&data)].iter()));
    let other = fake.start_snapshot(request(None, "r2")).await.unwrap();
    fake.put_snapshot_block(&other, 0, data.clone(), &sum)
        .await
        .unwrap();
    rejected(
        fake.complete_snapshot(&id, 2, &right).await,
        "CompleteSnapshot",
    );
    rejected(
        fake.put_snapshot_block(&id, 3, data.clone(), &sum).await,
        "in error",
    );
    rejected(
        fake.complete_snapshot(&other, 1, &base64(&sha256(b"wrong")))
            .await,
        "CompleteSnapshot",
    );
    // A good one completes, and then takes no more blocks.
    let good = fake.start_snapshot(request(None, "r3")).await.unwrap();
    fake.put_snapshot_block(&good, 0, data.clone(), &sum)
        .await
        .unwrap();
    fake.complete_snapshot(&good, 1, &right).await.unwrap();
    rejected(
        fake.put_snapshot_block(&good, 1, data.clone(), &sum).await,
        "is completed",
    );
    // A parent must exist and be completed.
    let child = request(Some(&id), "r4");
    assert!(matches!(
        fake.start_snapshot(child).await,
        Err(EbsError::Rejected(_))
    ));
}

#[tokio::test]
async fn rewrites_of_one_block_never_overlap_and_the_last_one_wins() {
    let fake = Arc::new(FakeEbs::new());
    fake.set_put_latency(Duration::from_millis(30));
    let mut snapshot = PendingSnapshot::start(Arc::clone(&fake), request(None, "c"), config(8))
        .await
        .unwrap();
    // Block 2 rewritten ten times while its first PUT is still in flight; others too.
    for round in 0..10u64 {
        snapshot.put(2, block(1000 + round)).await.unwrap();
        snapshot.put(round as u32 + 3, block(round)).await.unwrap();
    }
    let done = snapshot.complete().await.unwrap();
    assert_eq!(done.changed_blocks, 11);
    // The fake rejects overlapping PUTs of one block (and the upload would have failed),
    // so every PUT of block 2 was alone; rewrites that came while one was in flight
    // collapsed into the latest, so block 2 did not go up ten times.
    assert!(fake.puts_stored() < 10 + 10, "{}", fake.puts_stored());
    let image = restored(&fake, &done.id).await;
    let expected = block(1009);
    assert!(image[2 * BLOCK_SIZE..3 * BLOCK_SIZE] == expected[..]);
    assert!(fake.max_puts_in_flight() <= 8);
}

#[tokio::test]
async fn concurrency_is_bounded_and_used() {
    let fake = Arc::new(FakeEbs::new());
    fake.set_put_latency(Duration::from_millis(50));
    let mut snapshot = PendingSnapshot::start(Arc::clone(&fake), request(None, "b"), config(6))
        .await
        .unwrap();
    for index in 0..30u32 {
        snapshot.put(index, block(u64::from(index))).await.unwrap();
    }
    snapshot.complete().await.unwrap();
    assert_eq!(fake.max_puts_in_flight(), 6);
}

#[tokio::test]
async fn retries_recover_from_throttling_500s_not_found_after_start_and_stalls() {
    let fake = Arc::new(FakeEbs::new());
    fake.hide_new_snapshots_for(3);
    fake.inject(Fault::Throttle, 2);
    let mut snapshot = PendingSnapshot::start(Arc::clone(&fake), request(None, "f"), config(3))
        .await
        .unwrap();
    assert_eq!(
        fake.calls("StartSnapshot"),
        3,
        "two throttled starts, then one"
    );
    fake.inject(Fault::ServerError, 4);
    fake.stall_next_put(Duration::from_millis(300));
    for index in 0..8u32 {
        snapshot.put(index, block(u64::from(index))).await.unwrap();
    }
    snapshot.flush().await.unwrap();
    fake.inject(Fault::Throttle, 1);
    let done = snapshot.complete().await.unwrap();
    assert_eq!(done.changed_blocks, 8);
    assert!(
        fake.calls("PutSnapshotBlock") > 8 + 3,
        "3 not found, 4 errors retried"
    );
    assert_eq!(fake.calls("CompleteSnapshot"), 2);
    fake.inject(Fault::ServerError, 2);
    let image = restored(&fake, &done.id).await;
    for index in 0..8u32 {
        let at = index as usize * BLOCK_SIZE;
        assert!(image[at..at + BLOCK_SIZE] == block(u64::from(index))[..]);
    }
}

#[tokio::test]
async fn access_denied_fails_fast_with_a_clear_error() {
    let fake = Arc::new(FakeEbs::new());
    fake.deny_access(true);
    let err = PendingSnapshot::start(Arc::clone(&fake), request(None, "d"), config(2))
        .await
        .unwrap_err();
    assert_eq!(fake.calls("StartSnapshot"), 1, "no retry of access denied");
    assert!(matches!(err, EbsError::AccessDenied(_)));
    let message = err.to_string();
    assert!(
        message.contains("IAM") && message.contains("ebs:PutSnapshotBlock"),
        "{message}"
    );

    // Denied halfway: the upload fails, without retrying each block ten times.
    fake.deny_access(false);
    let mut snapshot = PendingSnapshot::start(Arc::clone(&fake), request(None, "d2"), config(2))
        .await
        .unwrap();
    fake.deny_access(true);
    snapshot.put(0, block(0)).await.unwrap();
    let err = snapshot.complete().await.unwrap_err();
    assert!(matches!(err, EbsError::AccessDenied(_)), "{err}");
    assert_eq!(fake.calls("PutSnapshotBlock"), 1);
}

#[tokio::test]
async fn retries_give_up_after_their_attempts_and_say_so() {
    let fake = Arc::new(FakeEbs::new());
    let mut snapshot = PendingSnapshot::start(Arc::clone(&fake), request(None, "g"), config(1))
        .await
        .unwrap();
    fake.inject(Fault::Throttle, 100);
    snapshot.put(0, block(0)).await.unwrap();
    let err = snapshot.flush().await.unwrap_err();
    assert!(
        err.to_string().contains("gave up after 12 attempts"),
        "{err}"
    );
    assert_eq!(fake.calls("PutSnapshotBlock"), 12);
}

#[tokio::test]
async fn a_restore_refuses_a_block_whose_checksum_does_not_match() {
    /// Serves a completed snapshot from a fake, with one block's bytes flipped in transit.
    struct Corrupting(FakeEbs);
    impl EbsClient for Corrupting {
        async fn start_snapshot(&self, r: StartSnapshot) -> Result<String, EbsError> {
            self.0.start_snapshot(r).await
        }
        async fn put_snapshot_block(
            &self,
            s: &str,
            i: u32,
            d: Bytes,
            c: &str,
        ) -> Result<(), EbsError> {
            self.0.put_snapshot_block(s, i, d, c).await
        }
        async fn complete_snapshot(&self, s: &str, n: u32, a: &str) -> Result<(), EbsError> {
            self.0.complete_snapshot(s, n, a).await
        }
        async fn list_snapshot_blocks(
            &self,
            s: &str,
            t: Option<String>,
        ) -> Result<blockferry_storage::ebs::BlockPage, EbsError> {
            self.0.list_snapshot_blocks(s, t).await
        }
        async fn get_snapshot_block(
            &self,
            s: &str,
            i: u32,
            t: &str,
        ) -> Result<(Bytes, String), EbsError> {
            let (data, sum) = self.0.get_snapshot_block(s, i, t).await?;
            let mut bad = data.to_vec();
            if i == 1 {
                bad[100] ^= 1;
            }
            Ok((Bytes::from(bad), sum))
        }
        async fn list_changed_blocks(
            &self,
            f: Option<&str>,
            s: &str,
            t: Option<String>,
        ) -> Result<blockferry_storage::ebs::BlockPage, EbsError> {
            self.0.list_changed_blocks(f, s, t).await
        }
        async fn delete_snapshot(&self, s: &str) -> Result<(), EbsError> {
            self.0.delete_snapshot(s).await
        }
    }
    let client = Arc::new(Corrupting(FakeEbs::new()));
    let mut snapshot = PendingSnapshot::start(Arc::clone(&client), request(None, "x"), config(2))
        .await
        .unwrap();
    for index in 0..3u32 {
        snapshot.put(index, block(u64::from(index))).await.unwrap();
    }
    let done = snapshot.complete().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = restore(
        client,
        &done.id,
        DISK,
        &dir.path().join("r.img"),
        fast_retries(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, RestoreError::Corrupt { index: 1, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn changed_blocks_between_points_are_listed() {
    let fake = Arc::new(FakeEbs::new());
    let mut first = PendingSnapshot::start(Arc::clone(&fake), request(None, "l1"), config(4))
        .await
        .unwrap();
    for index in 0..4u32 {
        first.put(index, block(u64::from(index))).await.unwrap();
    }
    let first = first.complete().await.unwrap();
    let mut second =
        PendingSnapshot::start(Arc::clone(&fake), request(Some(&first.id), "l2"), config(4))
            .await
            .unwrap();
    second.put(1, block(1)).await.unwrap(); // the same data: not a change
    second.put(2, block(22)).await.unwrap();
    second.put(6, block(6)).await.unwrap();
    let second = second.complete().await.unwrap();
    let page = fake
        .list_changed_blocks(Some(&first.id), &second.id, None)
        .await
        .unwrap();
    let changed: Vec<u32> = page.blocks.iter().map(|(i, _)| *i).collect();
    assert_eq!(changed, vec![2, 6]);
}

/// As on the service, deleting a snapshot leaves its children whole: a chain's middle
/// and first snapshots deleted, the newest restores byte for byte. A pending snapshot is
/// not deleted, and deleting one already gone is not an error.
#[tokio::test]
async fn deleting_a_parent_leaves_its_children_restorable() {
    let fake = Arc::new(FakeEbs::new());
    let mut image = vec![0u8; DISK as usize];
    let mut parent: Option<String> = None;
    let mut chain = Vec::new();
    for round in 0..3u32 {
        let token = format!("t{round}");
        let mut snapshot = PendingSnapshot::start(
            Arc::clone(&fake),
            request(parent.as_deref(), &token),
            config(2),
        )
        .await
        .unwrap();
        let indexes: Vec<u32> = if round == 0 {
            (0..17).collect()
        } else {
            vec![round, round + 5]
        };
        for index in indexes {
            let data = block(u64::from(round * 100 + index));
            apply(&mut image, index, &data);
            snapshot.put(index, data).await.unwrap();
        }
        let done = snapshot.complete().await.unwrap();
        parent = Some(done.id.clone());
        chain.push(done.id);
    }
    let pending = PendingSnapshot::start(
        Arc::clone(&fake),
        request(parent.as_deref(), "t9"),
        config(2),
    )
    .await
    .unwrap();
    let err = fake.delete_snapshot(pending.id()).await.unwrap_err();
    assert!(err.to_string().contains("pending"), "{err}");

    fake.delete_snapshot(&chain[1]).await.unwrap();
    fake.delete_snapshot(&chain[0]).await.unwrap();
    assert!(!fake.exists(&chain[0]) && !fake.exists(&chain[1]));
    assert!(
        restored(&fake, &chain[2]).await == image,
        "the newest point after its parents went"
    );
    fake.delete_snapshot(&chain[0]).await.unwrap();
}

/// A launched copy goes to EBS as a snapshot: without a parent its non-zero blocks, as
/// a child of the point's snapshot only the blocks that differ; both restore to the
/// image byte for byte.
#[tokio::test]
async fn an_image_uploads_whole_without_parent_and_as_its_changes_with_one() {
    use blockferry_storage::ebs::image::{ImageUploadError, block_digests, upload_image};
    let fake = Arc::new(FakeEbs::new());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let mut image = vec![0u8; DISK as usize];
    for index in [0u32, 3, 4, 16] {
        apply(&mut image, index, &block(u64::from(index) + 1));
    }
    std::fs::write(&path, &image).unwrap();

    let whole = upload_image(
        Arc::clone(&fake),
        &path,
        None,
        request(None, "launch-1"),
        config(4),
    )
    .await
    .unwrap();
    assert_eq!(whole.changed_blocks, 4, "zero blocks are left out");
    assert_eq!(restored(&fake, &whole.id).await, image);

    // Preparing changed block 3, zeroed block 4, and wrote into the partial last block.
    let parent_digests = block_digests(&path).unwrap();
    apply(&mut image, 3, &block(99));
    apply(&mut image, 4, &vec![0u8; BLOCK_SIZE]);
    apply(&mut image, 16, &block(98));
    std::fs::write(&path, &image).unwrap();
    let child = upload_image(
        Arc::clone(&fake),
        &path,
        Some(parent_digests.clone()),
        request(Some(&whole.id), "launch-2"),
        config(4),
    )
    .await
    .unwrap();
    assert_eq!(child.changed_blocks, 3);
    assert_eq!(fake.own_blocks(&child.id), vec![3, 4, 16]);
    assert_eq!(fake.parent(&child.id).as_deref(), Some(whole.id.as_str()));
    assert_eq!(restored(&fake, &child.id).await, image);

    // Digests of another disk are refused before anything is started.
    let other = dir.path().join("other.img");
    std::fs::write(&other, vec![1u8; BLOCK_SIZE]).unwrap();
    let starts = fake.calls("StartSnapshot");
    let err = upload_image(
        Arc::clone(&fake),
        &other,
        Some(parent_digests),
        request(Some(&whole.id), "launch-3"),
        config(4),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ImageUploadError::Mismatch { .. }), "{err}");
    assert_eq!(fake.calls("StartSnapshot"), starts);
}
