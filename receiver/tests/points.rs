//! Recovery points on the file backend: copies of the staging images cut at consistent
//! epochs across every disk of a server, while the live images keep receiving writes.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use blockferry_agent::Agent;
use blockferry_receiver::Receiver;
use blockferry_receiver::catalog::RecoveryPointRecord;
use blockferry_receiver::points::FilePointMode;
use common::mount::Mount;
use common::*;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const HOUR: Duration = Duration::from_secs(3600);
/// Records the writer writes, in order, alternating between the two disks.
const RECORDS: u64 = 1200;

/// Record `k`: disk `k % 2`, its own 4 KiB slot, holding `k`.
fn slot(k: u64) -> (usize, u64) {
    ((k % 2) as usize, (k / 2) * 4096)
}

fn record(k: u64) -> Vec<u8> {
    let mut block = vec![0xAB; 4096];
    block[..8].copy_from_slice(&k.to_le_bytes());
    block
}

/// The records a point's images hold.
fn records_in(point: &RecoveryPointRecord) -> BTreeSet<u64> {
    let images: Vec<Vec<u8>> = ["d0", "d1"]
        .iter()
        .map(|disk| {
            let copy = point
                .disks
                .iter()
                .find(|d| d.disk == *disk)
                .unwrap_or_else(|| panic!("point {} has no disk {disk}", point.epoch));
            std::fs::read(copy.image.as_ref().expect("a file point names its image")).unwrap()
        })
        .collect();
    (1..=RECORDS)
        .filter(|&k| {
            let (disk, offset) = slot(k);
            let block = &images[disk][offset as usize..offset as usize + 4096];
            let found = block != [0u8; 4096];
            if found {
                assert_eq!(
                    block,
                    record(k),
                    "point {}: slot of record {k}",
                    point.epoch
                );
            }
            found
        })
        .collect()
}

/// A receiver cutting a point after every epoch; `retention_check` apart, it deletes the
/// points its retention policy drops (the default keeps one per 10 minutes, so a test that
/// reads every point it saw cut passes an hour).
async fn start(data: &Path, mode: FilePointMode, retention_check: Duration) -> Receiver {
    let mut config = receiver_config(data);
    config.recovery_points = mode;
    config.recovery_interval = Duration::ZERO;
    config.retention_check = retention_check;
    Receiver::start(config).await.unwrap()
}

/// The receiver's command line on `data`; `Err` carries its stderr.
fn cli(data: &Path, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_blockferry-receiver"))
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .map_err(|e| format!("cannot run the receiver's command line: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The epochs whose directories are in the server's points directory.
fn point_dirs(data: &Path) -> Vec<u64> {
    let mut epochs: Vec<u64> = std::fs::read_dir(data.join("images").join(SERVER).join("points"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    epochs.sort_unstable();
    epochs
}

fn points(receiver: &Receiver) -> Vec<RecoveryPointRecord> {
    let status = receiver.status().unwrap();
    status
        .servers
        .iter()
        .find(|s| s.server_id == SERVER)
        .map(|s| s.recovery_points.clone())
        .unwrap_or_default()
}

/// The writer writes records 1, 2, 3, … alternately to two disks; a point that holds
/// record k and lacks some j < k would be torn. Every point cut while it writes holds a
/// prefix of the records, on both disks at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_cut_under_continuous_writes_are_consistent_across_two_disks() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let Some(_xfs) = Mount::xfs(
        &dir.path().join("xfs.img"),
        1024 * MIB,
        &data.join("images"),
    ) else {
        eprintln!(
            "SKIPPED: cannot make and loop-mount XFS here (needs xfsprogs, root, loop devices)"
        );
        return;
    };
    let receiver = start(&data, FilePointMode::Auto, HOUR).await;
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let (a, _) = image(dir.path(), "a.img", 8 * MIB, 0.0, MIB, 1);
    let (b, _) = image(dir.path(), "b.img", 8 * MIB, 0.0, MIB, 2);
    let volumes = vec![volume("d0", &a), volume("d1", &b)];
    let agent = Agent::new(&volumes);
    let mut config = agent_config(receiver.local_addr(), creds);
    config.exit_when_synced = false;
    config.epoch_interval = Duration::from_millis(50);
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (agent, stop, volumes) = (agent.clone(), stop.clone(), volumes.clone());
        async move { agent.run(&config, &volumes, stop).await }
    });
    wait_synced(agent.stats()).await;
    let first = wait_for(
        "the first point, of the synced images",
        Duration::from_secs(60),
        || points(&receiver).into_iter().next(),
    )
    .await;
    assert!(records_in(&first).is_empty(), "nothing was written yet");

    let capture = agent.capture().clone();
    for k in 1..=RECORDS {
        let (disk, offset) = slot(k);
        capture.write(disk, offset, record(k)).await.unwrap();
        if k % 100 == 0 {
            // Epochs close and points are cut while the writes go on.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    capture.flush().await.unwrap();
    let all = wait_for("a point with every record", Duration::from_secs(60), || {
        let points = points(&receiver);
        let complete = points
            .last()
            .is_some_and(|p| records_in(p).len() as u64 == RECORDS);
        complete.then_some(points)
    })
    .await;

    let mut partial = 0;
    for point in &all {
        let held = records_in(point);
        let prefix = held.len() as u64;
        let missing = (1..=prefix).find(|k| !held.contains(k));
        assert!(
            missing.is_none(),
            "point {} is torn: it holds record {} but lacks record {}",
            point.epoch,
            held.last().copied().unwrap_or(0),
            missing.unwrap_or(0)
        );
        if (1..RECORDS).contains(&prefix) {
            partial += 1;
        }
        for disk in &point.disks {
            assert_eq!(
                disk.copy.as_deref(),
                Some("reflink"),
                "on XFS a point is a reflink"
            );
        }
    }
    assert!(
        partial >= 1,
        "no point was cut while the writer wrote ({} points): the test proved nothing",
        all.len()
    );
    // The live images went on past every point but the last.
    assert_identical(&a, &staging_image(&data, SERVER, "d0"));
    assert_identical(&b, &staging_image(&data, SERVER, "d1"));
    eprintln!(
        "{} points, {partial} of them cut mid-stream, epochs {:?}",
        all.len(),
        all.iter().map(|p| p.epoch).collect::<Vec<_>>()
    );
    stop.cancel();
    let _ = run.await;
    receiver.shutdown().await;
}

/// Where the staging file system cannot share extents: `auto` cuts no point and says
/// why, with what to do; `copy` cuts full copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_reflinks_auto_says_why_and_copy_cuts_full_copies() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let Some(_tmpfs) = Mount::tmpfs(&data.join("images"), "64m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root and mount rights)");
        return;
    };
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let (a, _) = image(dir.path(), "a.img", 4 * MIB, 0.5, MIB / 4, 3);
    let volumes = vec![volume("d0", &a)];

    let receiver = start(&data, FilePointMode::Auto, HOUR).await;
    let agent = Agent::new(&volumes);
    let mut config = agent_config(receiver.local_addr(), creds.clone());
    config.exit_when_synced = false;
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (agent, stop, volumes, config) =
            (agent.clone(), stop.clone(), volumes.clone(), config.clone());
        async move { agent.run(&config, &volumes, stop).await }
    });
    let why = wait_for(
        "the reason no point is cut",
        Duration::from_secs(60),
        || {
            let status = receiver.status().unwrap();
            status.servers.first()?.recovery_point_error.clone()
        },
    )
    .await;
    assert!(why.contains("no reflinks"), "{why}");
    assert!(why.contains("--recovery-points copy"), "{why}");
    assert!(points(&receiver).is_empty());
    stop.cancel();
    let _ = run.await;
    receiver.shutdown().await;

    let receiver = start(&data, FilePointMode::Copy, HOUR).await;
    let mut config = config;
    config.receiver = receiver.local_addr().to_string();
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (agent, stop, volumes) = (agent.clone(), stop.clone(), volumes.clone());
        async move { agent.run(&config, &volumes, stop).await }
    });
    let point = wait_for("a full-copy point", Duration::from_secs(60), || {
        points(&receiver).into_iter().next()
    })
    .await;
    assert_eq!(point.disks[0].copy.as_deref(), Some("copy"));
    assert_identical(&a, point.disks[0].image.as_ref().unwrap());
    let status = receiver.status().unwrap();
    assert_eq!(status.servers[0].recovery_point_error, None);
    stop.cancel();
    let _ = run.await;
    receiver.shutdown().await;
}

/// A staging file system that fills up while a point is cut: the cut fails with the
/// reason in status, its half copy is removed, the points cut before stay whole, and
/// replication goes on (the live image does not need the space a point did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_staging_file_system_fails_the_cut_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    // Room for the image and one full copy of it, not two.
    let Some(_tmpfs) = Mount::tmpfs(&data.join("images"), "20m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root and mount rights)");
        return;
    };
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let (a, _) = image(dir.path(), "a.img", 8 * MIB, 1.0, MIB, 5);
    let volumes = vec![volume("d0", &a)];
    let receiver = start(&data, FilePointMode::Copy, HOUR).await;
    let agent = Agent::new(&volumes);
    let mut config = agent_config(receiver.local_addr(), creds);
    config.exit_when_synced = false;
    config.epoch_interval = Duration::from_millis(50);
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (agent, stop, volumes) = (agent.clone(), stop.clone(), volumes.clone());
        async move { agent.run(&config, &volumes, stop).await }
    });
    wait_synced(agent.stats()).await;
    wait_for("the first point", Duration::from_secs(60), || {
        points(&receiver).into_iter().next()
    })
    .await;
    // A point is cut only after something changed: write until a cut fails.
    let capture = agent.capture().clone();
    let mut written = 0u64;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let why = loop {
        let status = receiver.status().unwrap();
        if let Some(why) = status
            .servers
            .first()
            .and_then(|s| s.recovery_point_error.clone())
        {
            break why;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no cut failed within 60 s; points: {:?}",
            points(&receiver)
        );
        written += 1;
        let block = vec![(written % 251) as u8 + 1; 4096];
        capture
            .write(0, (written % 2048) * 4096, block)
            .await
            .unwrap();
        capture.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(why.contains("No space left"), "{why}");
    assert!(why.contains("disk d0"), "the error names the disk: {why}");
    let kept = points(&receiver);
    assert!(!kept.is_empty(), "the first point fits and was cut");
    for point in &kept {
        let image = point.disks[0].image.as_ref().unwrap();
        assert_eq!(
            std::fs::metadata(image).unwrap().len(),
            8 * MIB,
            "point {} is whole",
            point.epoch
        );
    }

    // A write after the failure is replicated: the staging image is whole and current.
    let block = vec![0x5A; 4096];
    capture.write(0, 4096, block.clone()).await.unwrap();
    capture.flush().await.unwrap();
    let staging = staging_image(&data, SERVER, "d0");
    // The capture writes through to the source, which the staging image comes to match.
    assert_eq!(std::fs::read(&a).unwrap()[4096..8192], block[..]);
    wait_for(
        "the staging image to match the source",
        Duration::from_secs(30),
        || (std::fs::read(&a).ok()? == std::fs::read(&staging).ok()?).then_some(()),
    )
    .await;
    let left: Vec<String> = std::fs::read_dir(data.join("images").join(SERVER).join("points"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.ends_with(".partial"))
        .collect();
    assert!(left.len() <= 1, "half copies pile up: {left:?}");
    stop.cancel();
    let _ = run.await;
    receiver.shutdown().await;
}

/// A template retention of one point per minute for the last minute keeps, of points cut
/// many times a minute, the newest alone: the others go from the catalog and the disk.
/// `points list`, `show` and `delete` work on a running receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_the_points_its_policy_drops_and_points_delete_removes_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let Some(_xfs) = Mount::xfs(
        &dir.path().join("xfs.img"),
        1024 * MIB,
        &data.join("images"),
    ) else {
        eprintln!(
            "SKIPPED: cannot make and loop-mount XFS here (needs xfsprogs, root, loop devices)"
        );
        return;
    };
    let receiver = start(&data, FilePointMode::Auto, Duration::from_millis(200)).await;
    let set = cli(
        &data,
        &["settings", "set", "--default", "--retention", "1m:1m"],
    )
    .unwrap();
    assert!(set.contains("template retention: 1m:1m"), "{set}");
    let bad = cli(
        &data,
        &["settings", "set", "--default", "--retention", "1s:1h"],
    )
    .unwrap_err();
    assert!(bad.contains("EVERY:FOR"), "{bad}");

    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let (a, _) = image(dir.path(), "a.img", 4 * MIB, 0.0, MIB, 5);
    let volumes = vec![volume("d0", &a)];
    let agent = Agent::new(&volumes);
    let mut config = agent_config(receiver.local_addr(), creds);
    config.exit_when_synced = false;
    config.epoch_interval = Duration::from_millis(50);
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (agent, stop, volumes) = (agent.clone(), stop.clone(), volumes.clone());
        async move { agent.run(&config, &volumes, stop).await }
    });
    wait_synced(agent.stats()).await;
    let capture = agent.capture().clone();
    let mut newest = 0;
    for k in 1..=20u64 {
        capture.write(0, k * 4096, record(k)).await.unwrap();
        capture.flush().await.unwrap();
        newest = wait_for("a point after the write", Duration::from_secs(30), || {
            let epoch = points(&receiver).last()?.epoch;
            (epoch > newest).then_some(epoch)
        })
        .await;
    }
    assert!(newest >= 10, "{newest}: points were cut after writes");
    let kept = wait_for(
        "retention to leave one point",
        Duration::from_secs(30),
        || {
            let kept: Vec<u64> = points(&receiver).iter().map(|p| p.epoch).collect();
            (kept.len() == 1 && point_dirs(&data) == kept).then_some(kept)
        },
    )
    .await;
    // A write's epoch may close a moment after the point we saw, so the survivor is the
    // newest point, which is the one seen last or one cut after it.
    assert!(
        kept[0] >= newest,
        "the newest point stays: kept {kept:?}, saw {newest}"
    );
    let newest = kept[0];

    let listed = cli(&data, &["points", "list", "--server", SERVER]).unwrap();
    assert!(listed.contains(&format!(" {newest} ")), "{listed}");
    assert!(listed.contains("(reflink)"), "{listed}");
    let shown = cli(
        &data,
        &[
            "points",
            "show",
            "--server",
            SERVER,
            "--epoch",
            &newest.to_string(),
        ],
    )
    .unwrap();
    assert!(shown.contains("d0"), "{shown}");
    let missing = cli(
        &data,
        &["points", "delete", "--server", SERVER, "--epoch", "1"],
    )
    .unwrap_err();
    assert!(missing.contains("no recovery point 1"), "{missing}");
    let deleted = cli(
        &data,
        &[
            "points",
            "delete",
            "--server",
            SERVER,
            "--epoch",
            &newest.to_string(),
        ],
    )
    .unwrap();
    assert!(deleted.contains("deleted recovery point"), "{deleted}");
    assert!(points(&receiver).iter().all(|p| p.epoch != newest));
    assert!(!point_dirs(&data).contains(&newest), "its images are gone");
    // The live image is untouched by all of it.
    assert_identical(&a, &staging_image(&data, SERVER, "d0"));
    stop.cancel();
    let _ = run.await;
    receiver.shutdown().await;
}
