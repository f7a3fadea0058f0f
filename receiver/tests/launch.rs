//! Launch: a recovery point made into disks that boot, with the agent switched off inside
//! them; cutover ends the source's replication for good; bad launches are refused with
//! what to do, and change nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use blockferry_agent::{Agent, Outcome};
use blockferry_receiver::Receiver;
use blockferry_receiver::catalog::{ImageFormat, LaunchMode, LaunchRecord, RecoveryPointRecord};
use blockferry_receiver::points::FilePointMode;
use common::mount::Mount;
use common::*;
use tokio_util::sync::CancellationToken;

const MIB: u64 = 1 << 20;
const HOUR: Duration = Duration::from_secs(3600);

async fn start(data: &Path, mode: FilePointMode) -> Receiver {
    let mut config = receiver_config(data);
    config.recovery_points = mode;
    config.recovery_interval = Duration::ZERO;
    config.retention_check = HOUR;
    Receiver::start(config).await.unwrap()
}

/// The receiver's command line; `(succeeded, stdout, stderr)`.
fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_blockferry-receiver"))
        .args(args)
        .output()
        .expect("the receiver's command line runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn launch(data: &Path, out: &Path, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "launch",
        "--data-dir",
        data.to_str().unwrap(),
        "--server",
        SERVER,
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    cli(&args)
}

fn points(receiver: &Receiver) -> Vec<RecoveryPointRecord> {
    receiver
        .status()
        .unwrap()
        .servers
        .iter()
        .find(|s| s.server_id == SERVER)
        .map(|s| s.recovery_points.clone())
        .unwrap_or_default()
}

/// Where the agent lives on a source server: each must be gone from a launched copy.
const AGENT_TRACES: [&str; 4] = [
    "/etc/systemd/system/multi-user.target.wants/blockferry-agent.service",
    "/etc/blockferry-agent/agent.key",
    "/etc/blockferry-agent",
    "/var/lib/blockferry-agent",
];

fn assert_agent_switched_off(image: &Path) {
    for trace in AGENT_TRACES {
        assert!(
            common::guest::stat_in(image, trace).is_none(),
            "{trace} is still in the launched image {}",
            image.display()
        );
    }
    let unit = common::guest::stat_in(image, "/etc/systemd/system/blockferry-agent.service")
        .expect("the agent's unit is masked, not absent");
    assert!(
        unit.contains("/dev/null"),
        "the agent's unit is not masked:\n{unit}"
    );
}

fn assert_agent_present(image: &Path) {
    for trace in AGENT_TRACES {
        assert!(
            common::guest::stat_in(image, trace).is_some(),
            "{trace} is missing from {}: the check of the launched copy proves nothing",
            image.display()
        );
    }
}

/// A receiver on a loop-mounted XFS (so points and launches are reflinks) and the
/// directory beside its data dir for launches. `None` where XFS cannot be mounted.
struct Staging {
    _xfs: Mount,
    data: PathBuf,
    launches: PathBuf,
}

fn staging(dir: &Path, size: u64) -> Option<Staging> {
    let root = dir.join("xfs");
    let xfs = Mount::xfs(&dir.join("xfs.img"), size, &root)?;
    Some(Staging {
        _xfs: xfs,
        data: root.join("receiver"),
        launches: root.join("launches"),
    })
}

/// An agent replicating `volumes` in the background until stopped or refused.
struct Running {
    stop: CancellationToken,
    run: tokio::task::JoinHandle<
        Result<blockferry_agent::AgentReport, blockferry_agent::AgentError>,
    >,
}

async fn replicate(receiver: &Receiver, data: &Path, dir: &Path, disk: &Path) -> Running {
    let creds = credentials(data, SERVER, &dir.join("creds"));
    let volumes = vec![volume("root", disk)];
    let agent = Agent::new(&volumes);
    let mut config = agent_config(receiver.local_addr(), creds);
    config.exit_when_synced = false;
    config.epoch_interval = Duration::from_millis(100);
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (agent, stop) = (agent.clone(), stop.clone());
        async move { agent.run(&config, &volumes, stop).await }
    });
    wait_synced(agent.stats()).await;
    Running { stop, run }
}

/// The whole path on a real Debian: replicated through the agent, a point cut, launched
/// with `--boot`; the guest comes up and answers on its health port, and the launched
/// disk has no agent unit or credentials, while the source and the point still do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_debian_launches_boots_healthy_and_carries_no_agent() {
    let dir = tempfile::tempdir().unwrap();
    let Some(staging) = staging(dir.path(), 8 << 30) else {
        eprintln!(
            "SKIPPED: cannot make and loop-mount XFS here (needs xfsprogs, root, loop devices)"
        );
        return;
    };
    let source = common::guest::bootable_disk().expect("the bootable guest builds");
    assert_agent_present(&source);
    let receiver = start(&staging.data, FilePointMode::Auto).await;
    let agent = replicate(&receiver, &staging.data, dir.path(), &source).await;
    let point = wait_for(
        "a recovery point of the synced disk",
        Duration::from_secs(120),
        || points(&receiver).into_iter().next(),
    )
    .await;

    let out = staging.launches.join("test-1");
    let port = common::guest::HEALTH_PORT.to_string();
    let epoch = point.epoch.to_string();
    let (ok, stdout, stderr) = launch(
        &staging.data,
        &out,
        &[
            "--mode",
            "test",
            "--recovery-point",
            &epoch,
            "--boot",
            "--health-port",
            &port,
            "--boot-timeout-secs",
            "600",
        ],
    );
    let console = std::fs::read_to_string(out.join("console.log")).unwrap_or_default();
    assert!(
        ok,
        "launch --boot failed:\n{stdout}\n{stderr}\nconsole tail:\n{}",
        console
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let record: LaunchRecord =
        serde_json::from_slice(&std::fs::read(out.join("launch.json")).unwrap()).unwrap();
    let boot = record.boot.as_ref().expect("the launch was booted");
    eprintln!(
        "booted under {} in {} s: {}",
        boot.accelerator, boot.seconds, boot.detail
    );
    assert!(boot.healthy, "{boot:?}");
    assert!(
        boot.detail.contains("blockferry-health-ok"),
        "the health port's answer is the guest's: {boot:?}"
    );
    assert_eq!(
        (record.mode, record.epoch, record.number),
        (LaunchMode::Test, point.epoch, 1)
    );
    assert_eq!(record.disks.len(), 1);
    assert_eq!(record.disks[0].copy, "reflink", "XFS launches are reflinks");
    assert!(
        record.prepared.iter().any(|c| c.contains("masked")),
        "{:?}",
        record.prepared
    );

    let launched = &record.disks[0].image;
    assert_agent_switched_off(launched);
    // The launch changed neither the point nor the source.
    assert_agent_present(point.disks[0].image.as_ref().unwrap());
    assert_agent_present(&source);

    // A test launch leaves replication running.
    let status = receiver.status().unwrap();
    let server = status
        .servers
        .iter()
        .find(|s| s.server_id == SERVER)
        .unwrap();
    assert!(
        server.connected && server.cut_over_at_ms.is_none(),
        "{server:?}"
    );
    let (ok, listed, err) = cli(&[
        "launches",
        "--data-dir",
        staging.data.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let listed: Vec<LaunchRecord> = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed, vec![record.clone()]);

    // Without a health port the check is the console's login prompt; a port nothing
    // answers on fails the check, exit status 1, and is recorded as failed.
    let out = staging.launches.join("test-2");
    // (as qcow2, which boots as well).
    let (ok, stdout, stderr) = launch(
        &staging.data,
        &out,
        &["--mode", "test", "--boot", "--format", "qcow2"],
    );
    assert!(
        ok,
        "launch --boot (login prompt) failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("login prompt"), "{stdout}");
    let qcow2: LaunchRecord =
        serde_json::from_slice(&std::fs::read(out.join("launch.json")).unwrap()).unwrap();
    assert_eq!(qcow2.disks[0].format, ImageFormat::Qcow2);
    assert!(!out.join("root.img").exists(), "the raw copy is replaced");
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&qcow2.disks[0].image)
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    let out = staging.launches.join("test-3");
    let (ok, stdout, stderr) = launch(
        &staging.data,
        &out,
        &[
            "--mode",
            "test",
            "--boot",
            "--health-port",
            "9",
            "--boot-timeout-secs",
            "30",
        ],
    );
    assert!(!ok && stderr.contains("NOT healthy"), "{stdout}\n{stderr}");
    let failed: LaunchRecord =
        serde_json::from_slice(&std::fs::read(out.join("launch.json")).unwrap()).unwrap();
    let boot = failed.boot.expect("the failed boot is recorded");
    assert!(!boot.healthy && boot.detail.contains("port 9"), "{boot:?}");
    assert_eq!(failed.number, 3);

    agent.stop.cancel();
    let report = agent.run.await.unwrap().unwrap();
    assert_eq!(report.outcome, Outcome::Shutdown);
    receiver.shutdown().await;
}

/// Cutover: the copy is made and prepared, then the server is marked cut over; its
/// connected agent hears FINISHED and stops, and a new session of it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_ends_the_servers_replication_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let Some(staging) = staging(dir.path(), 1 << 30) else {
        eprintln!(
            "SKIPPED: cannot make and loop-mount XFS here (needs xfsprogs, root, loop devices)"
        );
        return;
    };
    let source = common::guest::small_root_disk(dir.path());
    let receiver = start(&staging.data, FilePointMode::Auto).await;
    let agent = replicate(&receiver, &staging.data, dir.path(), &source).await;
    wait_for("a recovery point", Duration::from_secs(60), || {
        points(&receiver).into_iter().next()
    })
    .await;

    let out = staging.launches.join("cutover");
    let (ok, stdout, stderr) = launch(&staging.data, &out, &["--mode", "cutover"]);
    assert!(ok, "launch --mode cutover failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("its connected agent was told to stop"),
        "{stdout}"
    );
    let report = tokio::time::timeout(Duration::from_secs(30), agent.run)
        .await
        .expect("the agent stops once its server is cut over")
        .unwrap()
        .unwrap();
    assert!(
        matches!(&report.outcome, Outcome::Finished(why) if why.contains("cut over")),
        "{:?}",
        report.outcome
    );
    let record: LaunchRecord =
        serde_json::from_slice(&std::fs::read(out.join("launch.json")).unwrap()).unwrap();
    assert_eq!(record.mode, LaunchMode::Cutover);
    assert_agent_switched_off(&record.disks[0].image);
    let status = receiver.status().unwrap();
    let server = status
        .servers
        .iter()
        .find(|s| s.server_id == SERVER)
        .unwrap();
    assert!(server.cut_over_at_ms.is_some(), "{server:?}");

    // The agent started again (systemd would not: exit status 3) is refused at once.
    let again = replicate_once(&receiver, &staging.data, dir.path(), &source).await;
    assert!(
        matches!(&again, Outcome::Finished(why) if why.contains("cut over")),
        "{again:?}"
    );
    receiver.shutdown().await;
}

async fn replicate_once(receiver: &Receiver, data: &Path, dir: &Path, disk: &Path) -> Outcome {
    let creds = credentials(data, SERVER, &dir.join("creds-again"));
    let volumes = vec![volume("root", disk)];
    let config = agent_config(receiver.local_addr(), creds);
    sync(&config, &volumes, Duration::from_secs(30))
        .await
        .outcome
}

/// Every way a launch can be wrong is refused before anything changes: no such server,
/// no point yet, an unknown or deleted point, an output that is taken, a point with no
/// root file system (whose copies are deleted: an unprepared copy must not boot). A
/// refused cutover leaves the server replicating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_launches_are_refused_with_what_to_do_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(staging) = staging(dir.path(), 1 << 30) else {
        eprintln!(
            "SKIPPED: cannot make and loop-mount XFS here (needs xfsprogs, root, loop devices)"
        );
        return;
    };
    let data = staging.data.clone();
    let out = staging.launches.join("bad");

    // A server the receiver has never seen, then one with no point yet.
    let receiver = start(&data, FilePointMode::Off).await;
    let (ok, _, err) = launch(&data, &out, &["--mode", "test"]);
    assert!(!ok && err.contains("no source server test-server"), "{err}");
    let (blank, _) = image(dir.path(), "blank.img", 8 * MIB, 0.5, MIB, 7);
    let creds = credentials(&data, SERVER, &dir.path().join("creds-sync"));
    sync(
        &agent_config(receiver.local_addr(), creds),
        &[volume("root", &blank)],
        Duration::from_secs(30),
    )
    .await;
    let (ok, _, err) = launch(&data, &out, &["--mode", "cutover"]);
    assert!(
        !ok && err.contains("has no recovery point to launch yet"),
        "{err}"
    );
    receiver.shutdown().await;

    // Points of a disk without a file system.
    let receiver = start(&data, FilePointMode::Auto).await;
    let agent = replicate(&receiver, &data, dir.path(), &blank).await;
    let point = wait_for("a recovery point", Duration::from_secs(60), || {
        points(&receiver).into_iter().next()
    })
    .await;
    let (ok, _, err) = launch(
        &data,
        &out,
        &["--mode", "test", "--recovery-point", "999999"],
    );
    assert!(
        !ok && err.contains("has no recovery point 999999") && err.contains("points list"),
        "{err}"
    );
    let (ok, _, err) = launch(&data, &out, &["--mode", "cutover"]);
    assert!(!ok && err.contains("no root file system"), "{err}");
    assert!(
        !out.join("root.img").exists(),
        "an unprepared copy was left to boot"
    );
    let status = receiver.status().unwrap();
    let server = status
        .servers
        .iter()
        .find(|s| s.server_id == SERVER)
        .unwrap();
    assert!(
        server.connected && server.cut_over_at_ms.is_none(),
        "a refused cutover cut the server over: {server:?}"
    );

    // An output directory already holding a launch's disk.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("root.img"), b"an earlier launch").unwrap();
    let (ok, _, err) = launch(&data, &out, &["--mode", "test"]);
    assert!(!ok && err.contains("exists"), "{err}");
    assert_eq!(
        std::fs::read(out.join("root.img")).unwrap(),
        b"an earlier launch"
    );
    std::fs::remove_file(out.join("root.img")).unwrap();

    // A point deleted is no longer launchable.
    agent.stop.cancel();
    agent.run.await.unwrap().unwrap();
    let epoch = point.epoch.to_string();
    let (ok, _, err) = cli(&[
        "points",
        "delete",
        "--data-dir",
        data.to_str().unwrap(),
        "--server",
        SERVER,
        "--epoch",
        &epoch,
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = launch(&data, &out, &["--mode", "test", "--recovery-point", &epoch]);
    assert!(
        !ok && err.contains(&format!("has no recovery point {epoch}")),
        "{err}"
    );
    let (ok, listed, err) = cli(&["launches", "--data-dir", data.to_str().unwrap(), "--json"]);
    assert!(ok, "{err}");
    assert_eq!(listed.trim(), "[]", "a refused launch was recorded");
    receiver.shutdown().await;
}
