//! Block-layer tracking against real block devices: loop devices, written with O_DIRECT,
//! a partition of one, and a ring too small for the writes (which must report its loss).
//! Skips, saying why, where loop devices or perf events are not available.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use blockferry_agent::blocktrace::{Change, Placement, TraceSource, Tracker};

struct LoopDevice(String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

fn attach(image: &Path, partitions: bool) -> Option<LoopDevice> {
    let mut cmd = Command::new("losetup");
    cmd.args(["--find", "--show"]);
    if partitions {
        cmd.arg("--partscan");
    }
    let out = cmd.arg(image).output().ok()?;
    if !out.status.success() {
        eprintln!(
            "SKIP: cannot attach a loop device: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    Some(LoopDevice(
        String::from_utf8(out.stdout).ok()?.trim().to_owned(),
    ))
}

fn image(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

/// A buffer aligned for O_DIRECT.
struct Aligned(*mut u8, usize);

impl Aligned {
    fn new(len: usize, fill: u8) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: a non-zero layout; freed in Drop with the same layout.
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null());
        // SAFETY: `len` bytes were just allocated at `ptr`.
        unsafe { std::ptr::write_bytes(ptr, fill, len) };
        Self(ptr, len)
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `len` initialized bytes at `ptr`, alive as long as `self`.
        unsafe { std::slice::from_raw_parts(self.0, self.1) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.1, 4096).unwrap();
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.0, layout) };
    }
}

fn write_direct(device: &str, offset: u64, len: usize, fill: u8) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .unwrap();
    file.write_all_at(Aligned::new(len, fill).bytes(), offset)
        .unwrap();
    file.sync_all().unwrap();
}

/// Both sources of the kernel's events, each test run through each.
const SOURCES: [TraceSource; 2] = [TraceSource::Ftrace, TraceSource::Perf];

fn start(placements: &[Placement], pages: usize, source: TraceSource) -> Option<Tracker> {
    match Tracker::start_with(placements, pages, source) {
        Ok(tracker) => {
            let expected = match source {
                TraceSource::Perf => "perf",
                _ => "ftrace",
            };
            assert_eq!(tracker.source(), expected);
            Some(tracker)
        }
        Err(err) => {
            eprintln!("SKIP: block tracking cannot start here: {err}");
            None
        }
    }
}

/// A tracker on a fresh 64 MiB loop device with rings of `pages` pages; None (and why)
/// where this machine cannot.
fn tracked_loop(
    pages: usize,
    source: TraceSource,
) -> Option<(tempfile::TempDir, LoopDevice, Tracker)> {
    let dir = tempfile::tempdir().unwrap();
    let device = attach(&image(dir.path(), 64 << 20), false)?;
    let placement = Placement::of(Path::new(&device.0)).unwrap();
    let tracker = start(&[placement], pages, source)?;
    Some((dir, device, tracker))
}

/// The byte ranges reported for volume 0, merged, and the losses: samples the kernel
/// counted as lost plus shortfalls against the disk's statistics.
fn written(tracker: &mut Tracker) -> (Vec<(u64, u64)>, u64) {
    let (mut ranges, mut lost) = (Vec::new(), 0);
    tracker.drain(|change| match change {
        Change::Written {
            volume: 0,
            offset,
            len,
        } => ranges.push((offset, offset + len)),
        Change::Written { .. } => {}
        Change::Lost(n) => lost += n,
        Change::Unseen { .. } => lost += 1,
    });
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    (merged, lost)
}

#[test]
fn writes_and_discards_to_a_loop_device_are_seen_and_reads_are_not() {
    for source in SOURCES {
        writes_and_discards_are_seen_and_reads_are_not(source);
    }
}

fn writes_and_discards_are_seen_and_reads_are_not(source: TraceSource) {
    let dir = tempfile::tempdir().unwrap();
    let Some(device) = attach(&image(dir.path(), 64 << 20), false) else {
        return;
    };
    let placement = Placement::of(Path::new(&device.0)).unwrap();
    assert_eq!((placement.start, placement.len), (0, 64 << 20));
    let Some(mut tracker) = start(&[placement], 64, source) else {
        return;
    };
    write_direct(&device.0, 1 << 20, 64 << 10, 0xab);
    let mut buf = vec![0u8; 4096];
    std::fs::File::open(&device.0)
        .unwrap()
        .read_at(&mut buf, 8 << 20)
        .unwrap();
    let (ranges, lost) = written(&mut tracker);
    assert_eq!(lost, 0);
    assert_eq!(ranges, vec![((1 << 20), (1 << 20) + (64 << 10))]);

    let status = Command::new("blkdiscard")
        .args([
            "--offset",
            &(16u64 << 20).to_string(),
            "--length",
            &(1u64 << 20).to_string(),
        ])
        .arg(&device.0)
        .status()
        .expect("blkdiscard (util-linux) is needed");
    assert!(status.success());
    let (ranges, lost) = written(&mut tracker);
    assert_eq!(
        ranges,
        vec![(16 << 20, 17 << 20)],
        "the discard is a change"
    );
    assert_eq!(lost, 0, "the discard's sectors balance the statistics");
}

/// The kernel may drop a sample without counting it (module documentation); the
/// tracker's hook ignores samples the same way, and the disk's statistics must show the
/// shortfall: the sectors the ignored writes covered, once.
#[test]
fn a_sample_the_kernel_drops_silently_shows_in_the_disk_statistics() {
    for source in SOURCES {
        a_dropped_sample_shows_in_the_disk_statistics(source);
    }
}

fn a_dropped_sample_shows_in_the_disk_statistics(source: TraceSource) {
    let Some((_dir, device, mut tracker)) = tracked_loop(64, source) else {
        return;
    };
    // Every write is either seen or its loss reported, and nothing seen is reported
    // lost (the kernel itself may drop a sample now and then: that must show too).
    for i in 0..300u64 {
        write_direct(&device.0, i * 8192, 4096, 3);
    }
    let (ranges, lost) = written(&mut tracker);
    assert_eq!(
        lost > 0,
        ranges.len() < 300,
        "{} of 300 seen, {lost} lost",
        ranges.len()
    );
    // One sample in four ignored: the shortfall is the unseen writes' sectors.
    tracker.ignore_samples(Some(4));
    let (mut seen, mut unseen) = (0u64, 0u64);
    for i in 0..100u64 {
        write_direct(&device.0, (32 << 20) + i * 8192, 4096, 4);
    }
    tracker.drain(|change| match change {
        Change::Written { .. } => seen += 1,
        Change::Unseen { sectors, .. } => unseen += sectors,
        Change::Lost(_) => {}
    });
    assert!(
        seen <= 75,
        "one sample in four was ignored, {seen} of 100 seen"
    );
    assert_eq!(
        unseen,
        (100 - seen) * 8,
        "the shortfall is the unseen writes' sectors"
    );
    // Reported once: with nothing ignored any more, the account balances again.
    tracker.ignore_samples(None);
    write_direct(&device.0, 40 << 20, 4096, 5);
    let (ranges, lost) = written(&mut tracker);
    assert_eq!(lost > 0, ranges.is_empty(), "{ranges:?}, {lost} lost");
}

#[test]
fn a_write_to_a_partition_is_seen_at_its_place_in_the_partition() {
    let dir = tempfile::tempdir().unwrap();
    let Some(device) = attach(&image(dir.path(), 64 << 20), true) else {
        return;
    };
    // One partition from sector 2048 (1 MiB) to the end.
    let mut sfdisk = Command::new("sfdisk")
        .arg(&device.0)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk (fdisk) is needed");
    use std::io::Write;
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\n2048,,L\n")
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    // The kernel re-reads the table; without udev, the node may have to be made here.
    let _ = Command::new("blockdev")
        .args(["--rereadpt", &device.0])
        .status();
    let name = format!("{}p1", device.0.trim_start_matches("/dev/"));
    let sys = Path::new("/sys/class/block").join(&name).join("dev");
    for _ in 0..100 {
        if sys.exists() {
            break;
        }
        let _ = Command::new("partx").args(["-u", &device.0]).status();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let numbers = std::fs::read_to_string(&sys).expect("the partition appears in sysfs");
    let (major, minor) = numbers.trim().split_once(':').unwrap();
    let node = dir.path().join(&name);
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
    let partition = node.display().to_string();
    let part = Placement::of(Path::new(&partition)).unwrap();
    let disk = Placement::of(Path::new(&device.0)).unwrap();
    assert_eq!(
        part.disk_dev, disk.disk_dev,
        "the partition maps to its disk"
    );
    assert_eq!(part.start, 1 << 20);
    // Volume 0 is the partition, volume 1 the whole disk.
    let Some(mut tracker) = start(&[part, disk], 64, TraceSource::Auto) else {
        return;
    };
    write_direct(&partition, 4 << 20, 8192, 0x5a);
    let mut on_disk = Vec::new();
    let (ranges, _) = {
        let mut ranges = Vec::new();
        tracker.drain(|change| match change {
            Change::Written {
                volume: 0,
                offset,
                len,
            } => ranges.push((offset, offset + len)),
            Change::Written {
                volume: 1,
                offset,
                len,
            } => on_disk.push((offset, offset + len)),
            _ => {}
        });
        (ranges, ())
    };
    assert_eq!(ranges, vec![(4 << 20, (4 << 20) + 8192)]);
    assert_eq!(on_disk, vec![(5 << 20, (5 << 20) + 8192)]);
}

#[test]
fn a_ring_too_small_for_the_writes_reports_their_loss() {
    for source in SOURCES {
        a_tiny_buffer_reports_its_loss(source);
    }
}

fn a_tiny_buffer_reports_its_loss(source: TraceSource) {
    // One page: a few dozen samples.
    let Some((_dir, device, mut tracker)) = tracked_loop(1, source) else {
        return;
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&device.0)
        .unwrap();
    let block = Aligned::new(4096, 1);
    for i in 0..2000u64 {
        file.write_all_at(block.bytes(), (i * 2 % 16384) * 4096)
            .unwrap();
    }
    let (_, lost) = written(&mut tracker);
    assert!(
        lost > 0,
        "{source:?}: 2000 writes into a one-page buffer lost nothing"
    );
    let (_, kernel_lost, unseen) = tracker.counts();
    assert!(
        kernel_lost > 0,
        "{source:?}: the kernel counts the samples it lost"
    );
    assert_eq!(kernel_lost + unseen, lost);
}

/// The ftrace instance is the agent's own: it exists while its tracker runs and goes
/// with it, and one that a killed agent left behind is removed by the next start.
#[test]
fn the_trace_instance_lives_as_long_as_its_tracker_and_a_dead_agents_is_removed() {
    let Some((_dir, _device, tracker)) = tracked_loop(4, TraceSource::Ftrace) else {
        return;
    };
    let instance = tracker.instance().expect("an ftrace tracker").to_owned();
    let instances = instance.parent().unwrap().to_owned();
    assert!(instances.ends_with("tracing/instances"), "{instance:?}");
    let name = instance.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("blockferry-{}-", std::process::id())),
        "{name}"
    );
    assert!(instance.join("per_cpu").exists(), "{name} is not there");
    drop(tracker);
    assert!(!instance.exists(), "{name} outlived its tracker");
    // An instance named for a process that no longer exists (pid_max is at most 2^22).
    let abandoned = instances.join("blockferry-4194305-0");
    if let Err(err) = std::fs::create_dir(&abandoned) {
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists, "{err}");
    }
    let Some((_dir, _device, _tracker)) = tracked_loop(4, TraceSource::Ftrace) else {
        return;
    };
    // A tracker that other tests start at the same moment may be removing it as well.
    for _ in 0..100 {
        if !abandoned.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        !abandoned.exists(),
        "the instance of an agent that no longer runs was left"
    );
}

#[test]
fn a_device_mapper_or_a_file_is_not_tracked() {
    let dir = tempfile::tempdir().unwrap();
    let file = image(dir.path(), 1 << 20);
    let err = Placement::of(&file).unwrap_err().to_string();
    assert!(err.contains("not a block device"), "{err}");
}
