//! Block-layer change tracking with real file systems and real writers: an ext4 file
//! system on a loop device, written by `dd`, `cp -r` and `rm` (with `fstrim` to
//! discard) while the agent replicates the device with `--capture block`; once the file
//! system is unmounted and nothing is pending, the staging image is byte-identical to
//! the device and `e2fsck -n` finds it clean. A ring too small for the writes loses
//! events, and the disk is rescanned for it (`tracking_lost`) to an identical image.
//! Skips, saying why, where loop devices, mkfs or perf events are not available.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blockferry_agent::tracking::CaptureMode;
use blockferry_agent::{Agent, AgentConfig, Volume};
use common::*;
use tokio_util::sync::CancellationToken;

struct LoopDevice(String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

struct Mounted(PathBuf);

impl Drop for Mounted {
    /// Unmounts, retrying while the file system is busy (a frozen point being cut holds
    /// it open for a moment); a test that reads the device after this needs it clean.
    fn drop(&mut self) {
        for _ in 0..50 {
            if run(Command::new("umount").arg(&self.0)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !std::thread::panicking() {
            panic!("cannot unmount {}", self.0.display());
        }
    }
}

fn run(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fs {
    Ext4,
    Xfs,
}

/// A loop device on a fresh file, with a file system on it or on its one partition.
struct Source {
    device: LoopDevice,
    /// Where the file system is: the device, or a node made for its partition.
    fs_node: String,
    /// The file system's offset in the device.
    fs_offset: u64,
    fs: Fs,
}

/// Makes a [`Source`] of `size` bytes; None (and why) where this machine cannot.
fn source(dir: &Path, size: u64, fs: Fs, partitioned: bool) -> Option<Source> {
    let backing = dir.join("source.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(size)
        .unwrap();
    let mut losetup = Command::new("losetup");
    losetup.args(["--find", "--show"]);
    if partitioned {
        losetup.arg("--partscan");
    }
    let out = losetup.arg(&backing).output().ok()?;
    if !out.status.success() {
        eprintln!(
            "SKIP: cannot attach a loop device: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    let device = LoopDevice(String::from_utf8(out.stdout).ok()?.trim().to_owned());
    let (fs_node, fs_offset) = if partitioned {
        (partition_node(dir, &device.0), 1 << 20)
    } else {
        (device.0.clone(), 0)
    };
    let made = match fs {
        Fs::Ext4 => run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "nodiscard"])
            .arg(&fs_node)),
        Fs::Xfs => run(Command::new("mkfs.xfs")
            .args(["-q", "-f", "-K"])
            .arg(&fs_node)),
    };
    if !made {
        eprintln!("SKIP: mkfs for {fs:?} failed or is missing (e2fsprogs, xfsprogs)");
        return None;
    }
    Some(Source {
        device,
        fs_node,
        fs_offset,
        fs,
    })
}

/// Writes a DOS partition table with one partition from 1 MiB to the end, and returns a
/// node for that partition (made here: there may be no udev to make it).
fn partition_node(dir: &Path, device: &str) -> String {
    use std::io::Write;
    let mut sfdisk = Command::new("sfdisk")
        .arg(device)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk (fdisk) is needed");
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\n2048,,L\n")
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    let _ = Command::new("blockdev")
        .args(["--rereadpt", device])
        .status();
    let name = format!("{}p1", device.trim_start_matches("/dev/"));
    let sys = Path::new("/sys/class/block").join(&name).join("dev");
    for _ in 0..100 {
        if sys.exists() {
            break;
        }
        let _ = Command::new("partx").args(["-u", device]).status();
        std::thread::sleep(Duration::from_millis(20));
    }
    let numbers = std::fs::read_to_string(&sys).expect("the partition appears in sysfs");
    let (major, minor) = numbers.trim().split_once(':').unwrap();
    let node = dir.join(&name);
    let c_node = std::ffi::CString::new(node.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mknod with a NUL-terminated path that outlives the call.
    let made = unsafe {
        libc::mknod(
            c_node.as_ptr(),
            libc::S_IFBLK | 0o600,
            libc::makedev(major.parse().unwrap(), minor.parse().unwrap()),
        )
    };
    assert_eq!(
        made,
        0,
        "mknod {}: {}",
        node.display(),
        std::io::Error::last_os_error()
    );
    node.display().to_string()
}

/// The file system at `offset` in `image`: the image itself, or a copy from there.
fn fs_only(image: &Path, offset: u64, scratch: &Path) -> PathBuf {
    if offset == 0 {
        return image.to_owned();
    }
    let copy = scratch.join("fs-only.img");
    let mut from = std::fs::File::open(image).unwrap();
    use std::io::{Seek, SeekFrom};
    from.seek(SeekFrom::Start(offset)).unwrap();
    std::io::copy(&mut from, &mut std::fs::File::create(&copy).unwrap()).unwrap();
    copy
}

/// Checks the file system at `offset` in `image` read-only; panics with the checker's
/// output when it finds a problem.
fn assert_fs_clean(image: &Path, offset: u64, fs: Fs, scratch: &Path) {
    let target = fs_only(image, offset, scratch);
    let out = match fs {
        Fs::Ext4 => Command::new("e2fsck")
            .args(["-n", "-f"])
            .arg(&target)
            .output(),
        Fs::Xfs => Command::new("xfs_repair")
            .args(["-n", "-f"])
            .arg(&target)
            .output(),
    }
    .unwrap();
    assert!(
        out.status.success(),
        "{fs:?} check of the staging image: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until the agent has nothing to send and nothing unacknowledged, for a while.
async fn wait_quiet(agent: &Agent) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut quiet_since = None::<Instant>;
    loop {
        if agent.capture().backlog_bytes() == 0 {
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_millis(1500) {
                return;
            }
        } else {
            quiet_since = None;
        }
        assert!(Instant::now() < deadline, "the agent never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the agent's heartbeats report the disk CONTINUOUS with nothing pending.
async fn wait_continuous(
    receiver: &blockferry_receiver::Receiver,
) -> blockferry_receiver::status::DiskStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let disk = receiver.status().unwrap().servers[0].disks[0].clone();
        if disk.state == "CONTINUOUS" && disk.backlog_bytes == Some(0) {
            return disk;
        }
        assert!(
            Instant::now() < deadline,
            "never CONTINUOUS with nothing pending: {disk:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn workload(mount: &Path) {
    assert!(run(Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "count=24", "conv=fsync"])
        .arg(format!("of={}", mount.join("random.bin").display()))));
    std::fs::create_dir_all(mount.join("tree")).unwrap();
    assert!(run(Command::new("cp")
        .args(["-r", "/usr/share/zoneinfo"])
        .arg(mount.join("tree"))));
    assert!(run(Command::new("dd")
        .args(["if=/dev/urandom", "bs=64k", "count=64", "oflag=direct"])
        .arg(format!("of={}", mount.join("direct.bin").display()))));
    // Thousands of small requests in a burst (more than a one-page ring holds).
    assert!(run(Command::new("dd")
        .args(["if=/dev/urandom", "bs=4k", "count=4000", "oflag=direct"])
        .arg(format!("of={}", mount.join("small.bin").display()))));
    std::fs::remove_file(mount.join("random.bin")).unwrap();
    let _ = run(Command::new("fstrim").arg(mount));
    assert!(run(&mut Command::new("sync")));
}

/// How a replication of a written file system ended.
struct Replicated {
    disk: blockferry_receiver::status::DiskStatus,
    /// Losses of block-layer events the agent noticed (the kernel's count of lost
    /// samples, and shortfalls against the disk's statistics).
    lost: u64,
}

impl Replicated {
    /// Nothing was rescanned unless the agent noticed a loss, and then for it: the
    /// kernel may drop an event now and then (agent/src/blocktrace.rs), and what matters
    /// is that no loss goes unnoticed.
    fn assert_no_rescan_but_for_a_noticed_loss(&self) {
        let reason = self.disk.last_rescan_reason.as_deref();
        if self.lost == 0 {
            assert_eq!(reason, None, "nothing was lost: {:?}", self.disk);
        } else {
            eprintln!("the agent noticed {} lost block-layer events", self.lost);
            assert_eq!(reason, Some("tracking_lost"), "{:?}", self.disk);
        }
    }
}

/// Replicates a [`source`] with block tracking while `workload` writes its mounted file
/// system; once unmounted and quiet, the staging image must equal the device byte for
/// byte and hold a clean file system.
async fn replicate_a_written_file_system(
    (size, fs, partitioned): (u64, Fs, bool),
    config_change: impl FnOnce(&mut AgentConfig),
    workload: impl FnOnce(&Path) + Send + 'static,
) -> Option<Replicated> {
    let dir = tempfile::tempdir().unwrap();
    let source = source(dir.path(), size, fs, partitioned)?;
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let volumes = vec![Volume::open(&format!("sdz={}", source.device.0)).unwrap()];
    let mut config = agent_config(receiver.local_addr(), creds);
    config.exit_when_synced = false;
    config.capture = CaptureMode::Block;
    config_change(&mut config);
    let agent = Background::start(config, volumes);
    wait_synced(agent.agent.stats()).await;

    let mount = dir.path().join("mnt");
    std::fs::create_dir(&mount).unwrap();
    if !run(Command::new("mount").arg(&source.fs_node).arg(&mount)) {
        eprintln!("SKIP: cannot mount {fs:?} here");
        agent.stop().await;
        return None;
    }
    let mounted = Mounted(mount.clone());
    tokio::task::spawn_blocking({
        let mount = mount.clone();
        move || workload(&mount)
    })
    .await
    .unwrap();
    drop(mounted);
    wait_quiet(&agent.agent).await;
    let disk = wait_continuous(&receiver).await;
    let staged = staging_image(&data, SERVER, "sdz");
    // Read the device as it is, not as its page cache last saw it.
    assert!(run(
        Command::new("blockdev").args(["--flushbufs", &source.device.0])
    ));
    let (device, copy) = (
        std::fs::read(&source.device.0).unwrap(),
        std::fs::read(&staged).unwrap(),
    );
    assert_eq!(device.len(), copy.len());
    let differs: Vec<usize> = device
        .chunks(4096)
        .zip(copy.chunks(4096))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(block, _)| block)
        .collect();
    assert!(
        differs.is_empty(),
        "the staging image differs from the device in {} blocks of 4 KiB, the first at {:?}",
        differs.len(),
        &differs[..differs.len().min(16)]
    );
    assert_fs_clean(&staged, source.fs_offset, source.fs, dir.path());
    let lost = agent
        .agent
        .stats()
        .tracking
        .lost
        .load(std::sync::atomic::Ordering::Relaxed);
    agent.stop().await;
    receiver.shutdown().await;
    Some(Replicated { disk, lost })
}

/// fio's own verified random writes (crc32c), through the page cache and with O_DIRECT.
fn fio_verified(mount: &Path) {
    for direct in ["0", "1"] {
        let out = Command::new("fio")
            .args([
                "--name=verify",
                "--rw=randwrite",
                "--bs=4k",
                "--size=24m",
                "--verify=crc32c",
                // No state file in the working directory.
                "--verify_state_save=0",
                "--ioengine=psync",
                "--fsync_on_close=1",
            ])
            .arg(format!("--direct={direct}"))
            .arg(format!("--directory={}", mount.display()))
            .output()
            .expect("fio is needed (scripts/test installs it)");
        assert!(
            out.status.success(),
            "fio --direct={direct}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_of_a_mounted_file_system_reaches_the_staging_image() {
    let Some(replicated) = replicate_a_written_file_system(
        (96 << 20, Fs::Ext4, false),
        |_| {},
        |mount| {
            workload(mount);
            fio_verified(mount);
        },
    )
    .await
    else {
        return;
    };
    replicated.assert_no_rescan_but_for_a_noticed_loss();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_events_make_the_disk_rescan_to_an_identical_image() {
    // One page of ring per CPU, drained every 300 ms: the workload's writes overflow it.
    let Some(Replicated { disk, .. }) = replicate_a_written_file_system(
        (96 << 20, Fs::Ext4, false),
        |config| {
            config.tracking_ring_pages = 1;
            // A consumer that pauses while thousands of writes complete.
            config.tracking_paused_drain = Some(Duration::from_millis(300));
        },
        workload,
    )
    .await
    else {
        return;
    };
    assert_eq!(
        disk.last_rescan_reason.as_deref(),
        Some("tracking_lost"),
        "{disk:?}"
    );
}

/// XFS (at its minimum size of 300 MiB), written by fio's verified random writes and a
/// `cp -r` of a tree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_of_a_mounted_xfs_reaches_the_staging_image() {
    let Some(replicated) = replicate_a_written_file_system(
        (320 << 20, Fs::Xfs, false),
        |_| {},
        |mount| {
            fio_verified(mount);
            assert!(run(Command::new("cp")
                .args(["-r", "/usr/share/zoneinfo", "/usr/share/perl5"])
                .arg(mount)));
            assert!(run(&mut Command::new("sync")));
        },
    )
    .await
    else {
        return;
    };
    replicated.assert_no_rescan_but_for_a_noticed_loss();
}

/// Writes the kernel completes without an event (the tracker's hook ignores one sample
/// in 64, as the kernel sometimes drops one silently) show in the disk's statistics: the
/// disk is rescanned for them (`tracking_lost`) to an identical image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_no_event_reported_are_noticed_and_rescanned() {
    let Some(replicated) = replicate_a_written_file_system(
        (96 << 20, Fs::Ext4, false),
        |config| config.tracking_ignore_samples = Some(64),
        workload,
    )
    .await
    else {
        return;
    };
    assert!(replicated.lost > 0, "no shortfall was noticed");
    assert_eq!(
        replicated.disk.last_rescan_reason.as_deref(),
        Some("tracking_lost"),
        "{:?}",
        replicated.disk
    );
}

/// The bin directory of the installed PostgreSQL, if any.
fn postgres_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("pgbench").exists() && bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop()
}

/// Runs `program` of PostgreSQL as the `postgres` user.
fn as_postgres(bin: &Path, program: &str) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
        .arg(bin.join(program));
    cmd
}

fn must(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// PostgreSQL on ext4 on the disk's partition: `pgbench` runs for 30 s (TPC-B-like
/// transactions, each committed with fsync) while the whole disk is replicated; the
/// partition's writes are placed on the disk, and the database's file system replicates
/// byte-identical and clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_on_a_partition_replicates_under_pgbench() {
    let Some(bin) = postgres_bin() else {
        eprintln!("SKIP: PostgreSQL is not installed (scripts/test installs it)");
        return;
    };
    let Some(replicated) = replicate_a_written_file_system(
        (384 << 20, Fs::Ext4, true),
        |_| {},
        move |mount| {
            let (pgdata, socket) = (mount.join("pgdata"), mount.join("sock"));
            for dir in [&pgdata, &socket] {
                std::fs::create_dir(dir).unwrap();
                must(
                    Command::new("chown").arg("postgres:postgres").arg(dir),
                    "chown",
                );
            }
            must(
                as_postgres(&bin, "initdb")
                    .args(["-A", "trust", "-U", "postgres", "-D"])
                    .arg(&pgdata),
                "initdb",
            );
            must(
                as_postgres(&bin, "pg_ctl")
                    .arg("-D")
                    .arg(&pgdata)
                    .args(["-w", "-l"])
                    .arg(pgdata.join("log"))
                    .arg("-o")
                    // WAL within the small file system.
                    .arg(format!(
                        "-c listen_addresses='' -k {} -c max_wal_size=96MB -c min_wal_size=32MB",
                        socket.display()
                    ))
                    .arg("start"),
                "pg_ctl start",
            );
            let host = socket.display().to_string();
            let bench = |args: &[&str]| {
                let mut cmd = as_postgres(&bin, "pgbench");
                cmd.args(["-h", &host, "-U", "postgres"])
                    .args(args)
                    .arg("postgres");
                cmd
            };
            must(&mut bench(&["-i", "-s", "4", "-q"]), "pgbench -i");
            must(
                &mut bench(&["-T", "30", "-c", "4", "-j", "2"]),
                "pgbench -T 30",
            );
            must(
                as_postgres(&bin, "pg_ctl")
                    .arg("-D")
                    .arg(&pgdata)
                    .args(["-w", "-m", "fast", "stop"]),
                "pg_ctl stop",
            );
            assert!(run(&mut Command::new("sync")));
        },
    )
    .await
    else {
        return;
    };
    replicated.assert_no_rescan_but_for_a_noticed_loss();
}

/// Discards (`blkdiscard`) and write-zeroes (`blkdiscard -z`) of a written raw device
/// reach the staging image: the ranges read as zeros there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discards_and_write_zeroes_reach_the_staging_image() {
    let dir = tempfile::tempdir().unwrap();
    let Some(device) = raw_device(dir.path(), 16 << 20) else {
        return;
    };
    must(
        Command::new("dd")
            .args(["if=/dev/urandom", "bs=1M", "count=16", "oflag=direct"])
            .arg(format!("of={}", device.0)),
        "dd",
    );
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let mut config = agent_config(receiver.local_addr(), creds);
    config.exit_when_synced = false;
    config.capture = CaptureMode::Block;
    let agent = Background::start(
        config,
        vec![Volume::open(&format!("sdu={}", device.0)).unwrap()],
    );
    wait_synced(agent.agent.stats()).await;
    wait_quiet(&agent.agent).await;
    let staged = staging_image(&data, SERVER, "sdu");
    let zero = |path: &Path, from: u64, len: u64| {
        let file = std::fs::File::open(path).unwrap();
        let mut buf = vec![0u8; len as usize];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut buf, from).unwrap();
        buf.iter().all(|&b| b == 0)
    };
    assert!(
        !zero(&staged, 1 << 20, 2 << 20),
        "the synced image holds the random data"
    );
    must(
        Command::new("blkdiscard")
            .args(["-o", "1048576", "-l", "2097152"])
            .arg(&device.0),
        "blkdiscard",
    );
    must(
        Command::new("blkdiscard")
            .args(["-z", "-o", "8388608", "-l", "1048576"])
            .arg(&device.0),
        "blkdiscard -z",
    );
    wait_quiet(&agent.agent).await;
    assert!(run(
        Command::new("blockdev").args(["--flushbufs", &device.0])
    ));
    assert!(
        zero(Path::new(&device.0), 1 << 20, 2 << 20),
        "the loop device discards to zeros"
    );
    assert!(
        zero(&staged, 1 << 20, 2 << 20),
        "the discard reached the staging image"
    );
    assert!(
        zero(&staged, 8 << 20, 1 << 20),
        "the write-zeroes reached the staging image"
    );
    assert_eq!(
        std::fs::read(&device.0).unwrap(),
        std::fs::read(&staged).unwrap()
    );
    agent.stop().await;
    receiver.shutdown().await;
}

fn raw_device(dir: &Path, size: u64) -> Option<LoopDevice> {
    let backing = dir.join("raw.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(size)
        .unwrap();
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&backing)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("SKIP: cannot attach a loop device");
        return None;
    }
    Some(LoopDevice(
        String::from_utf8(out.stdout).ok()?.trim().to_owned(),
    ))
}

/// What block tracking did not see (writes while the agent was stopped) is never
/// trusted: a restart after a clean stop rescans by checksum (`tracking_lost`) and
/// finds what changed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_rescans_what_tracking_could_not_see() {
    let dir = tempfile::tempdir().unwrap();
    let Some(device) = raw_device(dir.path(), 16 << 20) else {
        return;
    };
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let volumes = vec![Volume::open(&format!("sdy={}", device.0)).unwrap()];
    let mut config = agent_config(receiver.local_addr(), creds);
    config.capture = CaptureMode::Block;
    config.state_dir = Some(dir.path().join("state"));
    // A clean stop, which leaves a checkpoint an untracked agent could resume from.
    let mut first = config.clone();
    first.exit_when_synced = false;
    let agent = Agent::new(&volumes);
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (agent, volumes, stop) = (agent.clone(), volumes.clone(), stop.clone());
        async move { agent.run(&first, &volumes, stop).await }
    });
    wait_synced(agent.stats()).await;
    stop.cancel();
    task.await.unwrap().expect("the first agent stops cleanly");
    assert!(
        dir.path()
            .join("state")
            .read_dir()
            .unwrap()
            .next()
            .is_some(),
        "a clean stop leaves a state record"
    );
    // Written while no agent runs.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&device.0)
        .unwrap();
    use std::os::unix::fs::FileExt;
    file.write_all_at(&[0x77; 8192], 5 << 20).unwrap();
    file.sync_all().unwrap();
    sync(&config, &volumes, Duration::from_secs(60)).await;
    let disk = receiver.status().unwrap().servers[0].disks[0].clone();
    assert_eq!(
        disk.last_rescan_reason.as_deref(),
        Some("tracking_lost"),
        "{disk:?}"
    );
    assert!(run(
        Command::new("blockdev").args(["--flushbufs", &device.0])
    ));
    assert_eq!(
        std::fs::read(&device.0).unwrap(),
        std::fs::read(staging_image(&data, SERVER, "sdy")).unwrap()
    );
    receiver.shutdown().await;
}

/// A clean stop and a start in the same boot, with nothing written in between, resume
/// from the state record without a rescan: the device's write counters are the same
/// (and a write made while the first agent ran is still delivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_nothing_written_meanwhile_needs_no_rescan() {
    let dir = tempfile::tempdir().unwrap();
    let Some(device) = raw_device(dir.path(), 16 << 20) else {
        return;
    };
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let volumes = vec![Volume::open(&format!("sdt={}", device.0)).unwrap()];
    let mut config = agent_config(receiver.local_addr(), creds);
    config.capture = CaptureMode::Block;
    config.state_dir = Some(dir.path().join("state"));
    let mut first = config.clone();
    first.exit_when_synced = false;
    let agent = Background::start(first, volumes.clone());
    wait_synced(agent.agent.stats()).await;
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&device.0)
            .unwrap();
        file.write_all_at(&[0x3c; 65536], 3 << 20).unwrap();
        file.sync_all().unwrap();
    }
    agent.stop().await;
    sync(&config, &volumes, Duration::from_secs(60)).await;
    let disk = receiver.status().unwrap().servers[0].disks[0].clone();
    assert_eq!(
        disk.last_rescan_reason, None,
        "resumed without a rescan: {disk:?}"
    );
    assert!(run(
        Command::new("blockdev").args(["--flushbufs", &device.0])
    ));
    assert_eq!(
        std::fs::read(&device.0).unwrap(),
        std::fs::read(staging_image(&data, SERVER, "sdt")).unwrap()
    );
    receiver.shutdown().await;
}

/// Runs the agent once over a fresh loop device with block tracking asked for, through
/// `wrapper` (a command line that ends with the agent's and its arguments appended), and
/// returns the one log line that says why tracking cannot start.
async fn refused_tracking_line(wrapper: Vec<String>, agent_args: &[&str]) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let device = raw_device(dir.path(), 8 << 20)?;
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds_dir = dir.path().join("creds");
    credentials(&data, SERVER, &creds_dir);
    let agent_bin =
        PathBuf::from(env!("CARGO_BIN_EXE_blockferry-receiver")).with_file_name("blockferry-agent");
    let mut args = wrapper;
    args.push(agent_bin.display().to_string());
    args.extend(
        [
            "run",
            "--exit-when-synced",
            "--progress",
            "log",
            "--capture",
            "block",
            "--receiver",
            &receiver.local_addr().to_string(),
            "--credentials",
            &creds_dir.display().to_string(),
            "--disk",
            &format!("sdx={}", device.0),
        ]
        .map(String::from),
    );
    args.extend(agent_args.iter().map(|a| a.to_string()));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&args[0])
            .args(&args[1..])
            .output()
            .unwrap_or_else(|e| panic!("{} is needed (.ci/run installs it): {e}", args[0]))
    })
    .await
    .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{log}");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("cannot start")).collect();
    assert_eq!(lines.len(), 1, "one line says why:\n{log}");
    assert!(lines[0].contains("rescanned"), "{}", lines[0]);
    receiver.shutdown().await;
    Some(lines[0].to_owned())
}

/// strace makes perf_event_open fail with EACCES, as a seccomp filter or
/// kernel.perf_event_paranoid would.
fn perf_refused() -> Vec<String> {
    [
        "strace",
        "-f",
        "-qq",
        "-o",
        "/dev/null",
        "-e",
        "trace=perf_event_open",
        "-e",
        "inject=perf_event_open:error=EACCES",
    ]
    .map(String::from)
    .to_vec()
}

/// Where the kernel refuses perf events and the agent is told to use them, it says why
/// in one line and replicates anyway, with periodic rescans instead of tracking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_perf_events_are_refused_the_agent_says_so_and_falls_back_to_rescans() {
    let Some(line) = refused_tracking_line(perf_refused(), &["--trace-source", "perf"]).await
    else {
        return;
    };
    assert!(line.contains("refused a perf event"), "{line}");
}

/// Under `auto`, the agent tries an ftrace instance, then perf events. Here tracefs is
/// read-only in the agent's mount namespace (as in many containers) and perf events are
/// refused: one line names both reasons, and the agent falls back to rescans.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_both_trace_sources_are_refused_the_agent_names_both_and_falls_back() {
    let tracefs = "/sys/kernel/tracing";
    if !Path::new(tracefs).join("events").exists() {
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", tracefs])
            .status();
    }
    let mut wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        // The agent's own arguments follow as "$@".
        "mount -o remount,bind,ro /sys/kernel/tracing && exec \"$@\"",
        "sh",
    ]
    .map(String::from)
    .to_vec();
    wrapper.extend(perf_refused());
    let Some(line) = refused_tracking_line(wrapper, &[]).await else {
        return;
    };
    assert!(
        line.contains("neither source") && line.contains("Read-only file system"),
        "{line}"
    );
    assert!(line.contains("refused a perf event"), "{line}");
}

/// An agent replicating in the background until stopped.
struct Background {
    agent: Agent,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<
        Result<blockferry_agent::AgentReport, blockferry_agent::AgentError>,
    >,
}

impl Background {
    fn start(config: AgentConfig, volumes: Vec<Volume>) -> Self {
        let agent = Agent::new(&volumes);
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (agent, stop) = (agent.clone(), stop.clone());
            async move { agent.run(&config, &volumes, stop).await }
        });
        Self { agent, stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().expect("the agent stops cleanly");
    }
}

/// Writes files (with fsync) and deletes them, in a loop, until `stop`.
fn busy_writer(
    mount: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        use std::io::Write;
        let mut rounds = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let path = mount.join(format!("f{}", rounds % 16));
            let mut file = std::fs::File::create(&path).unwrap();
            file.write_all(&vec![rounds as u8; 256 << 10]).unwrap();
            file.sync_all().unwrap();
            if rounds.is_multiple_of(3) {
                let _ = std::fs::remove_file(mount.join(format!("f{}", (rounds + 5) % 16)));
            }
            rounds += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        rounds
    })
}

/// A receiver on the in-memory EBS, an ext4 device, and a tracked agent with `freeze`;
/// the file system is mounted and written by [`busy_writer`] until `points` recovery
/// points were cut while it wrote (or, for `points == 0`, for three seconds).
async fn points_of_a_busy_file_system(
    freeze: blockferry_agent::freeze::FreezeMode,
    points: usize,
    check: impl AsyncFnOnce(
        &blockferry_receiver::Receiver,
        &std::sync::Arc<blockferry_storage::ebs::fake::FakeEbs>,
        &Agent,
        &Path,
    ),
) {
    let dir = tempfile::tempdir().unwrap();
    // On a partition: the freeze must find the file system through it.
    let Some(source) = source(dir.path(), 64 << 20, Fs::Ext4, true) else {
        return;
    };
    let data = dir.path().join("receiver");
    let fake = std::sync::Arc::new(blockferry_storage::ebs::fake::FakeEbs::new());
    let receiver =
        blockferry_receiver::Receiver::start(common::ebs::ebs_config(&data, &fake, 4, 64 << 20))
            .await
            .unwrap();
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let mut config = agent_config(receiver.local_addr(), creds);
    config.exit_when_synced = false;
    config.capture = CaptureMode::Block;
    config.freeze = freeze;
    config.freeze_interval = Duration::from_secs(1);
    let mount = dir.path().join("mnt");
    std::fs::create_dir(&mount).unwrap();
    if !run(Command::new("mount").arg(&source.fs_node).arg(&mount)) {
        eprintln!("SKIP: cannot mount ext4 here");
        return;
    }
    let mounted = Mounted(mount.clone());
    let agent = Background::start(
        config,
        vec![Volume::open(&format!("sdw={}", source.device.0)).unwrap()],
    );
    wait_synced(agent.agent.stats()).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = busy_writer(mount.clone(), std::sync::Arc::clone(&stop));
    let writing_since = now_ms();
    if points > 0 {
        for n in 1..=points {
            common::ebs::wait_point(
                &receiver,
                &format!("point {n} cut while the file system is written"),
                |p| {
                    p.cut_at_ms > writing_since
                        && receiver.status().unwrap().servers[0]
                            .recovery_points
                            .iter()
                            .filter(|q| q.cut_at_ms > writing_since)
                            .count()
                            >= n
                },
            )
            .await;
        }
    } else {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = writer.join().unwrap();
    assert!(rounds > 10, "the writer wrote {rounds} rounds");
    check(&receiver, &fake, &agent.agent, dir.path()).await;
    drop(mounted);
    agent.stop().await;
    receiver.shutdown().await;
}

/// With `--freeze auto`, points are cut while a file system is being written: each
/// freeze stays within its bound, and a recovery point restored from its snapshots is
/// an ext4 file system that was frozen (journal clean, no recovery needed) and that
/// `e2fsck -f` finds consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_points_of_a_busy_file_system_restore_to_a_clean_file_system() {
    points_of_a_busy_file_system(
        blockferry_agent::freeze::FreezeMode::Auto,
        2,
        async |receiver, fake, agent, dir| {
            let tracking = &agent.stats().tracking;
            let frozen = tracking
                .frozen_points
                .load(std::sync::atomic::Ordering::Relaxed);
            let longest = tracking
                .max_freeze_us
                .load(std::sync::atomic::Ordering::Relaxed);
            assert!(frozen >= 2, "{frozen} frozen points");
            // The bound is on the copy; FIFREEZE's own flush and the thaw come on top.
            assert!(longest < 1_000_000, "a freeze lasted {longest} µs");
            let status = receiver.status().unwrap();
            // Status and metrics show the capture and what tracking and freezing did.
            assert_eq!(status.servers[0].disks[0].capture.as_deref(), Some("block"));
            let reported = status.servers[0]
                .tracking
                .clone()
                .expect("the heartbeat reports tracking");
            assert!(
                reported.writes > 0 && reported.frozen_points >= 1,
                "{reported:?}"
            );
            assert!(
                reported.max_freeze_ms > 0.0 && reported.max_freeze_ms < 1000.0,
                "{reported:?}"
            );
            let metrics = receiver.render_metrics();
            for name in [
                "blockferry_agent_tracked_writes{",
                "blockferry_agent_tracking_lost_events{",
                "blockferry_agent_max_freeze_seconds{",
                "blockferry_disk_block_tracking{",
            ] {
                assert!(
                    metrics.contains(name),
                    "{name} missing from the metrics:\n{metrics}"
                );
            }
            assert!(
                metrics.lines().any(
                    |l| l.starts_with("blockferry_disk_block_tracking{") && l.ends_with(" 1.0")
                ),
                "{metrics}"
            );
            let table = status.render_table();
            assert!(
                table.contains("capture: sdw block") && table.contains("frozen points"),
                "{table}"
            );
            let point = status.servers[0].recovery_points.last().unwrap().clone();
            let image = common::ebs::restore_to(
                receiver,
                fake,
                "sdw",
                point.epoch,
                &dir.join("restored.img"),
            )
            .await;
            let image = fs_only(&image, 1 << 20, dir);
            let features = Command::new("dumpe2fs")
                .arg("-h")
                .arg(&image)
                .output()
                .unwrap();
            let features = String::from_utf8_lossy(&features.stdout);
            let line = features
                .lines()
                .find(|l| l.starts_with("Filesystem features:"))
                .unwrap_or_default();
            assert!(
                !line.contains("needs_recovery"),
                "the point was not cut frozen: {line}"
            );
            let fsck = Command::new("e2fsck")
                .args(["-n", "-f"])
                .arg(&image)
                .output()
                .unwrap();
            assert!(
                fsck.status.success(),
                "e2fsck of recovery point {}: {}{}",
                point.epoch,
                String::from_utf8_lossy(&fsck.stdout),
                String::from_utf8_lossy(&fsck.stderr)
            );
        },
    )
    .await;
}

/// With `--freeze off`, block-tracked changes are replicated, but no barrier claims a
/// crash-consistent point, so the receiver cuts no recovery point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_freeze_no_point_is_consistent_and_no_recovery_point_is_cut() {
    points_of_a_busy_file_system(
        blockferry_agent::freeze::FreezeMode::Off,
        0,
        async |receiver, fake, agent, _| {
            let stats = agent.stats();
            assert_eq!(
                stats
                    .consistent_points
                    .load(std::sync::atomic::Ordering::Relaxed),
                0
            );
            assert!(
                stats
                    .inconsistent_points
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > 0,
                "epochs were closed"
            );
            assert_eq!(
                stats
                    .tracking
                    .frozen_points
                    .load(std::sync::atomic::Ordering::Relaxed),
                0
            );
            let status = receiver.status().unwrap();
            assert!(
                status.servers[0].recovery_points.is_empty(),
                "{:?}",
                status.servers[0].recovery_points
            );
            assert_eq!(fake.calls("StartSnapshot"), 0);
        },
    )
    .await;
}

/// A writer the freeze cannot stop (here, to the raw device) is seen writing while the
/// file systems are frozen: the point is given up, never shipped as consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_the_freeze_give_the_point_up() {
    let dir = tempfile::tempdir().unwrap();
    let Some(device) = raw_device(dir.path(), 16 << 20) else {
        return;
    };
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let mut config = agent_config(receiver.local_addr(), creds);
    config.exit_when_synced = false;
    config.capture = CaptureMode::Block;
    config.freeze_interval = Duration::from_secs(1);
    let agent = Background::start(
        config,
        vec![Volume::open(&format!("sdv={}", device.0)).unwrap()],
    );
    wait_synced(agent.agent.stats()).await;
    // The synced, idle disk is a point at once.
    let tracking = std::sync::Arc::clone(&agent.agent.stats().tracking);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tracking
        .frozen_points
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(Instant::now() < deadline, "no first point");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = std::thread::spawn({
        let (path, stop) = (device.0.clone(), std::sync::Arc::clone(&stop));
        move || {
            use std::os::unix::fs::{FileExt, OpenOptionsExt};
            let file = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .unwrap();
            let mut block = vec![0u8; 8192];
            let buf = {
                // O_DIRECT needs an aligned buffer.
                let at = block.as_ptr().align_offset(4096);
                &mut block[at..at + 4096]
            };
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                buf.fill(n as u8);
                file.write_all_at(buf, (n % 1024) * 4096).unwrap();
                n += 1;
            }
        }
    });
    let failures_before = tracking
        .freeze_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tracking
        .freeze_failures
        .load(std::sync::atomic::Ordering::Relaxed)
        < failures_before + 2
    {
        assert!(Instant::now() < deadline, "no point was given up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    // Under block tracking only a frozen point is ever shipped as consistent.
    let consistent = agent
        .agent
        .stats()
        .consistent_points
        .load(std::sync::atomic::Ordering::Relaxed);
    let frozen = tracking
        .frozen_points
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        consistent <= frozen,
        "{consistent} consistent barriers from {frozen} frozen points"
    );
    wait_quiet(&agent.agent).await;
    assert!(run(
        Command::new("blockdev").args(["--flushbufs", &device.0])
    ));
    assert_eq!(
        std::fs::read(&device.0).unwrap(),
        std::fs::read(staging_image(&data, SERVER, "sdv")).unwrap()
    );
    agent.stop().await;
    receiver.shutdown().await;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
