//! The real aws-sdk-ebs client against moto's server (an EBS direct API emulator on
//! 127.0.0.1): first the client alone (a snapshot's blocks go up and the restore returns
//! identical bytes), then the whole path — an agent replicates into a receiver run with
//! `--backend ebs`, its first recovery point becomes a snapshot in moto, and the
//! `restore` command returns the disk byte for byte; last, retention deletes the snapshots
//! of the points it drops through EC2's DeleteSnapshot (aws-sdk-ec2) and keeps the others;
//! and `launch` downloads an EBS point into disks with the agent switched off, and makes
//! EBS volumes and an AMI of them (CreateVolume, RegisterImage) whose snapshot holds what
//! preparing changed, and deletes what it made when EC2 refuses a step.
//! moto models neither parents nor
//! checksums nor throttling; the strict fake covers those (tests/ebs.rs).
//!
//! One test in this binary: it sets the environment (credentials for the emulator, no
//! instance-metadata probing) before any other thread exists.

mod common;

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockferry_storage::ebs::aws::{AwsEbs, AwsSettings};
use blockferry_storage::ebs::restore::restore;
use blockferry_storage::ebs::upload::{PendingSnapshot, UploadConfig};
use blockferry_storage::ebs::{BLOCK_SIZE, RetryPolicy, StartSnapshot};
use bytes::Bytes;

/// Where `.ci/run` installs moto; `BLOCKFERRY_MOTO_SERVER` or `PATH` may say otherwise.
const MOTO_VENV: &str = "/opt/blockferry-moto/bin/moto_server";

fn moto_server() -> PathBuf {
    if let Some(path) = std::env::var_os("BLOCKFERRY_MOTO_SERVER") {
        return PathBuf::from(path);
    }
    if std::path::Path::new(MOTO_VENV).exists() {
        return PathBuf::from(MOTO_VENV);
    }
    let on_path = Command::new("moto_server")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        on_path,
        "moto_server not found; install it as .ci/run does: python3 -m venv \
         /opt/blockferry-moto && /opt/blockferry-moto/bin/pip install 'moto[server]'"
    );
    PathBuf::from("moto_server")
}

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_moto() -> (Moto, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let moto = Moto(
        Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto_server"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "moto_server did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (moto, port)
}

fn block(seed: u8) -> Bytes {
    Bytes::from(
        (0..BLOCK_SIZE)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
            .collect::<Vec<u8>>(),
    )
}

#[test]
fn the_sdk_client_and_the_receiver_replicate_into_moto_and_restore_byte_for_byte() {
    // Only this test runs in this process, before any runtime or thread that could read
    // the environment: credentials for the emulator, and no instance-metadata probing
    // (nothing may leave the loopback interface).
    // SAFETY: no other thread exists yet that reads or writes the environment.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "blockferry-test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "blockferry-test");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        std::env::remove_var("AWS_PROFILE");
    }
    let (_moto, port) = start_moto();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = Arc::new(
            AwsEbs::connect(&AwsSettings {
                region: Some("us-east-1".into()),
                endpoint_url: Some(format!("http://127.0.0.1:{port}")),
                attempt_timeout: Some(Duration::from_secs(10)),
                ec2_endpoint_url: None,
            })
            .await,
        );
        let retry = RetryPolicy {
            attempts: 5,
            first_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
        };
        let size = 7 * BLOCK_SIZE as u64 + 4096;
        let mut image = vec![0u8; size as usize];
        let mut snapshot = PendingSnapshot::start(
            Arc::clone(&client),
            StartSnapshot {
                volume_size_gib: 1,
                parent: None,
                description: "blockferry moto test".into(),
                tags: vec![("blockferry:server".into(), "srv".into())],
                kms_key_arn: None,
                timeout_minutes: 60,
                client_token: "moto-1".into(),
            },
            UploadConfig {
                concurrency: 4,
                retry,
            },
        )
        .await
        .expect("StartSnapshot against moto");
        for index in [0u32, 1, 2, 4, 6, 7] {
            let data = block(index as u8 + 1);
            let at = index as usize * BLOCK_SIZE;
            let len = (image.len() - at).min(BLOCK_SIZE);
            image[at..at + len].copy_from_slice(&data[..len]);
            snapshot.put(index, data).await.unwrap();
        }
        // Block 1 again: the last write wins.
        let again = block(99);
        image[BLOCK_SIZE..2 * BLOCK_SIZE].copy_from_slice(&again);
        snapshot.put(1, again).await.unwrap();
        let done = snapshot.complete().await.expect("CompleteSnapshot");
        assert_eq!(done.changed_blocks, 6);

        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("restored.img");
        let blocks = restore(Arc::clone(&client), &done.id, size, &out, retry)
            .await
            .expect("restoring from moto");
        assert_eq!(blocks, 6);
        let restored = std::fs::read(&out).unwrap();
        assert!(restored == image, "the restored image differs");
    });
    runtime.block_on(receiver_into_moto(port));
    runtime.block_on(retention_deletes_snapshots_in_moto(port));
    runtime.block_on(an_ebs_point_launches_prepared(port));
}

/// A receiver process staging into moto, with `extra` flags.
fn spawn_on_moto(
    data: &std::path::Path,
    port: u16,
    endpoint: &str,
    extra: &[&str],
) -> common::ReceiverProcess {
    let mut args = vec![
        "--control",
        "off",
        "--metrics",
        "off",
        "--backend",
        "ebs",
        "--ebs-region",
        "us-east-1",
        "--ebs-endpoint-url",
        endpoint,
    ];
    args.extend_from_slice(extra);
    common::spawn_receiver(data, port, &args)
}

async fn receiver_into_moto(moto_port: u16) {
    use common::*;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let endpoint = format!("http://127.0.0.1:{moto_port}");
    let creds = credentials(&data, "srv", &dir.path().join("creds"));
    let port = free_port();
    let mut receiver = spawn_on_moto(
        &data,
        port,
        &endpoint,
        &["--ebs-tag", "team=dr", "--recovery-interval-secs", "0"],
    );
    let (source, _) = image(
        dir.path(),
        "d0.img",
        9 * BLOCK_SIZE as u64 + 8192,
        0.6,
        1 << 20,
        12,
    );
    let volumes = vec![volume("d0", &source)];
    let config = agent_config(format!("127.0.0.1:{port}"), creds);
    sync(&config, &volumes, Duration::from_secs(60)).await;

    let receiver_cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_blockferry-receiver"))
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let snapshot = loop {
        let (ok, out) = receiver_cli(&["status", "--json"]);
        assert!(ok, "{out}");
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        if let Some(id) = status["servers"][0]["disks"][0]["snapshot_id"].as_str() {
            break id.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no recovery point in moto: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(snapshot.starts_with("snap-"), "{snapshot}");
    let out_path = dir.path().join("restored.img");
    let out_arg = out_path.to_str().unwrap();
    let (ok, out) = receiver_cli(&[
        "restore",
        "--disk",
        "d0",
        "--out",
        out_arg,
        "--ebs-region",
        "us-east-1",
        "--ebs-endpoint-url",
        &endpoint,
    ]);
    assert!(ok, "restore: {out}");
    assert!(out.contains(&snapshot), "{out}");
    assert_identical(&source, &out_path);
    // An existing file is not overwritten unless asked.
    let (ok, out) = receiver_cli(&["restore", "--disk", "d0", "--out", out_arg]);
    assert!(!ok && out.contains("--overwrite"), "{out}");
    let _ = receiver.kill();
    let _ = receiver.wait();
}

/// The snapshot ids moto's EC2 knows.
async fn snapshots_in_moto(endpoint: &str) -> std::collections::BTreeSet<String> {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .load()
        .await;
    let ec2 = aws_sdk_ec2::Client::new(&config);
    let out = ec2
        .describe_snapshots()
        .owner_ids("self")
        .send()
        .await
        .expect("DescribeSnapshots against moto");
    out.snapshots()
        .iter()
        .filter_map(|s| s.snapshot_id().map(str::to_owned))
        .collect()
}

/// A template retention of one point per minute for the last minute: of the points cut
/// many times a minute, the dropped ones leave the catalog and their snapshots leave
/// EC2; every snapshot a kept point names stays.
async fn retention_deletes_snapshots_in_moto(moto_port: u16) {
    use common::*;
    use std::collections::BTreeSet;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let endpoint = format!("http://127.0.0.1:{moto_port}");
    let before = snapshots_in_moto(&endpoint).await;
    let creds = credentials(&data, "srv", &dir.path().join("creds"));
    let port = free_port();
    let mut receiver = spawn_on_moto(
        &data,
        port,
        &endpoint,
        &[
            "--ec2-endpoint-url",
            &endpoint,
            "--recovery-interval-secs",
            "0",
            "--retention-check-secs",
            "1",
        ],
    );
    // The receiver listens on its port before its admin socket answers: until then the
    // command finds the catalog locked.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let set = Command::new(env!("CARGO_BIN_EXE_blockferry-receiver"))
            .args(["settings", "set", "--default", "--retention", "1m:1m"])
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        if set.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&set.stderr).into_owned();
        assert!(
            err.contains("in use by another process") && Instant::now() < deadline,
            "settings set: {err}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (source, _) = image(dir.path(), "d0.img", 4 * BLOCK_SIZE as u64, 0.5, 1 << 20, 3);
    let volumes = vec![volume("d0", &source)];
    let agent = blockferry_agent::Agent::new(&volumes);
    let mut config = agent_config(format!("127.0.0.1:{port}"), creds);
    config.exit_when_synced = false;
    config.epoch_interval = Duration::from_millis(100);
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn({
        let (agent, stop, volumes) = (agent.clone(), stop.clone(), volumes.clone());
        async move { agent.run(&config, &volumes, stop).await }
    });
    wait_synced(agent.stats()).await;

    let status = || {
        let out = Command::new(env!("CARGO_BIN_EXE_blockferry-receiver"))
            .args(["status", "--json", "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let named = |status: &serde_json::Value| -> BTreeSet<String> {
        status["servers"][0]["recovery_points"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|p| p["disks"].as_array().cloned().unwrap_or_default())
            .filter_map(|d| d["snapshot_id"].as_str().map(str::to_owned))
            .collect()
    };
    // Every write makes the next point a new snapshot; retention drops all but the newest.
    let capture = agent.capture().clone();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut k = 0u64;
    let (kept, dropped) = loop {
        k += 1;
        capture
            .write(0, (k % 4) * BLOCK_SIZE as u64, vec![k as u8; 4096])
            .await
            .unwrap();
        capture.flush().await.unwrap();
        let now = status();
        let kept = named(&now);
        seen.extend(kept.iter().cloned());
        let dropped: BTreeSet<String> = seen.difference(&kept).cloned().collect();
        if dropped.len() >= 3 {
            let in_moto = snapshots_in_moto(&endpoint).await;
            let deleted = dropped.iter().all(|id| !in_moto.contains(id));
            if deleted && kept.iter().all(|id| in_moto.contains(id)) {
                break (kept, dropped);
            }
        }
        assert!(
            Instant::now() < deadline,
            "retention did not delete dropped snapshots in moto: seen {seen:?}, kept {kept:?}, in moto {:?}",
            snapshots_in_moto(&endpoint).await
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(!kept.is_empty(), "the newest point is always kept");
    assert!(
        kept.len() <= 3,
        "1m:1m keeps at most a few points: {kept:?}"
    );
    // Snapshots of other tests' receivers are not touched.
    let in_moto = snapshots_in_moto(&endpoint).await;
    assert!(
        before.is_subset(&in_moto),
        "a snapshot no point of this receiver named was deleted"
    );
    eprintln!(
        "retention deleted {} snapshots in moto, kept {}",
        dropped.len(),
        kept.len()
    );
    stop.cancel();
    let _ = run.await;
    let _ = receiver.kill();
    let _ = receiver.wait();
}

/// `launch` of an EBS point: its snapshots downloaded into OUT, the agent switched off in
/// the copy; the snapshot in EBS still holds the agent (it is never changed).
async fn an_ebs_point_launches_prepared(moto_port: u16) {
    use common::*;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let endpoint = format!("http://127.0.0.1:{moto_port}");
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let port = free_port();
    let mut receiver = spawn_on_moto(&data, port, &endpoint, &["--recovery-interval-secs", "0"]);
    let source = common::guest::small_root_disk(dir.path());
    let volumes = vec![volume("root", &source)];
    let config = agent_config(format!("127.0.0.1:{port}"), creds);
    sync(&config, &volumes, Duration::from_secs(60)).await;
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_blockferry-receiver"))
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    // The first point: a snapshot without parent (moto does not model parents).
    let epoch = loop {
        let (ok, out, err) = cli(&["points", "list", "--json", "--server", SERVER]);
        assert!(ok, "{err}");
        let points: serde_json::Value = serde_json::from_str(&out).unwrap();
        if let Some(epoch) = points[SERVER][0]["epoch"].as_u64() {
            break epoch;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery point in moto: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let out = dir.path().join("launch");
    let epoch_arg = epoch.to_string();
    let (ok, stdout, stderr) = cli(&[
        "launch",
        "--server",
        SERVER,
        "--mode",
        "test",
        "--recovery-point",
        &epoch_arg,
        "--out",
        out.to_str().unwrap(),
        "--ebs-region",
        "us-east-1",
        "--ebs-endpoint-url",
        &endpoint,
    ]);
    assert!(ok, "launch of an EBS point:\n{stdout}\n{stderr}");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("launch.json")).unwrap()).unwrap();
    assert_eq!(record["disks"][0]["copy"], "download", "{record}");
    let launched = out.join("root.img");
    for gone in ["/etc/blockferry-agent", "/var/lib/blockferry-agent"] {
        assert!(
            common::guest::stat_in(&launched, gone).is_none(),
            "{gone} is still in the launched copy"
        );
    }
    // The point itself still holds the agent: restored, it is the source.
    let restored = dir.path().join("restored.img");
    let (ok, _, err) = cli(&[
        "restore",
        "--disk",
        "root",
        "--recovery-point",
        &epoch_arg,
        "--out",
        restored.to_str().unwrap(),
        "--ebs-region",
        "us-east-1",
        "--ebs-endpoint-url",
        &endpoint,
    ]);
    assert!(ok, "restore: {err}");
    assert_identical(&source, &restored);
    assert!(common::guest::stat_in(&restored, "/etc/blockferry-agent").is_some());

    // Into EC2 as volumes: the prepared copy goes up as a child of the point's snapshot
    // holding only the blocks preparing changed (moto does not model parents, so the
    // child holds just those: laid over the point, they give the prepared copy).
    let launch_into = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec![
            "launch",
            "--server",
            SERVER,
            "--mode",
            "test",
            "--recovery-point",
            &epoch_arg,
            "--out",
            out.to_str().unwrap(),
            "--ebs-region",
            "us-east-1",
            "--ebs-endpoint-url",
            &endpoint,
            "--ec2-endpoint-url",
            &endpoint,
        ];
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = cli(&args);
        (out, ok, stdout, stderr)
    };
    let (out, ok, stdout, stderr) = launch_into(
        "launch-volumes",
        &["--ec2", "volumes", "--availability-zone", "us-east-1a"],
    );
    assert!(ok, "launch --ec2 volumes:\n{stdout}\n{stderr}");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("launch.json")).unwrap()).unwrap();
    let snapshot = record["disks"][0]["snapshot_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let volume = record["disks"][0]["volume_id"].as_str().unwrap().to_owned();
    assert!(stdout.contains(&volume), "{stdout}");
    let ec2 = ec2_client(&endpoint).await;
    let described = ec2
        .describe_volumes()
        .volume_ids(&volume)
        .send()
        .await
        .unwrap();
    let described = &described.volumes()[0];
    assert_eq!(described.snapshot_id(), Some(snapshot.as_str()));
    assert_eq!(described.availability_zone(), Some("us-east-1a"));
    assert!(
        described
            .tags()
            .iter()
            .any(|t| t.key() == Some("blockferry:server") && t.value() == Some(SERVER)),
        "{described:?}"
    );
    let client = Arc::new(
        AwsEbs::connect(&AwsSettings {
            region: Some("us-east-1".into()),
            endpoint_url: Some(endpoint.clone()),
            ..AwsSettings::default()
        })
        .await,
    );
    let mut expected = std::fs::read(&restored).unwrap();
    let own = {
        use blockferry_storage::ebs::EbsClient;
        let page = client.list_snapshot_blocks(&snapshot, None).await.unwrap();
        assert!(page.next_token.is_none());
        for (index, token) in &page.blocks {
            let (data, _) = client
                .get_snapshot_block(&snapshot, *index, token)
                .await
                .unwrap();
            let at = *index as usize * BLOCK_SIZE;
            let len = (expected.len() - at).min(BLOCK_SIZE);
            expected[at..at + len].copy_from_slice(&data[..len]);
        }
        page.blocks.len()
    };
    let disk_blocks = expected.len().div_ceil(BLOCK_SIZE);
    assert!(
        own > 0 && own < disk_blocks / 2,
        "the launch snapshot holds {own} of {disk_blocks} blocks: only what preparing changed belongs there"
    );
    assert!(
        expected == std::fs::read(out.join("root.img")).unwrap(),
        "the point's snapshot with the launch snapshot's blocks is not the prepared copy"
    );

    // As a machine image, root device first.
    let (out, ok, stdout, stderr) = launch_into(
        "launch-ami",
        &["--ec2", "ami", "--image-name", "blockferry-moto-test"],
    );
    assert!(ok, "launch --ec2 ami:\n{stdout}\n{stderr}");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("launch.json")).unwrap()).unwrap();
    let image = record["image_id"].as_str().unwrap().to_owned();
    assert_eq!(record["disks"][0]["device"], "/dev/xvda", "{record}");
    let described = ec2
        .describe_images()
        .image_ids(&image)
        .send()
        .await
        .unwrap();
    assert_eq!(described.images()[0].name(), Some("blockferry-moto-test"));
    let (ok, listed, _) = cli(&["launches", "--json", "--server", SERVER]);
    assert!(ok);
    assert!(
        listed.contains(&image) && listed.contains(&volume),
        "{listed}"
    );

    // A volume EC2 refuses (io2 needs its IOPS): the launch fails, recorded nowhere,
    // and the snapshot it wrote is deleted again.
    let before = snapshots_in_moto(&endpoint).await;
    let (_, ok, stdout, stderr) = launch_into(
        "launch-refused",
        &[
            "--ec2",
            "volumes",
            "--availability-zone",
            "us-east-1a",
            "--volume-type",
            "io2",
        ],
    );
    assert!(!ok, "an io2 volume without IOPS was made:\n{stdout}");
    assert!(
        stderr.contains("CreateVolume") && stderr.contains("deleted again"),
        "{stderr}"
    );
    assert_eq!(snapshots_in_moto(&endpoint).await, before);
    let (_, again, _) = cli(&["launches", "--json", "--server", SERVER]);
    assert_eq!(again, listed, "a failed launch was recorded");
    let _ = receiver.kill();
    let _ = receiver.wait();
}

async fn ec2_client(endpoint: &str) -> aws_sdk_ec2::Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .load()
        .await;
    aws_sdk_ec2::Client::new(&config)
}
