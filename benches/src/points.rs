//! `blockferry-bench points`: what cutting a file-backend recovery point costs — the
//! time (the server's writes are held off for it) and the space — beside a full copy of
//! the same image with `cp --reflink=never` and an fsync, the baseline, in the same run.
//!
//! Measured on the file system of `--dir` (a full copy where it cannot share extents,
//! the documented fallback) and, as root with mkfs.xfs, on a loop-mounted XFS with
//! reflink (the cheap case). Space is the drop in the file system's free blocks. On the
//! reflinked side, the space the point holds once the live image is rewritten in
//! scattered places is measured too: a reflinked point costs what changed since it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use blockferry_receiver::demo::{ImageLayout, generate_image};
use blockferry_storage::{CopyKind, CopyPolicy, Engine, FileStore, IoEngine};

/// Free bytes of the file system holding `path`, once settled: after a sync (delayed
/// allocations counted) and once the space of files deleted just before is back (XFS
/// frees it in the background): the same figure three times 50 ms apart.
fn free_bytes(path: &Path) -> anyhow::Result<u64> {
    let dir = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let read = || -> anyhow::Result<u64> {
        // SAFETY: syncfs takes an open descriptor.
        unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) };
        // SAFETY: a valid C string and a statvfs to fill.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut stat) } != 0 {
            bail!(
                "statvfs {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(stat.f_bavail * stat.f_frsize)
    };
    let (mut last, mut same) = (read()?, 0);
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while same < 2 && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let now = read()?;
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    Ok(last)
}

struct Side {
    seconds: Vec<f64>,
    bytes: Vec<u64>,
}

impl Side {
    fn median_seconds(&mut self) -> f64 {
        self.seconds.sort_by(f64::total_cmp);
        self.seconds[self.seconds.len() / 2]
    }
    fn median_bytes(&mut self) -> u64 {
        self.bytes.sort();
        self.bytes[self.bytes.len() / 2]
    }
}

/// An XFS with reflink on a loop-mounted file, unmounted (and its loop device freed by
/// autoclear) when dropped.
struct XfsMount {
    root: PathBuf,
    image: PathBuf,
}

impl XfsMount {
    fn make(under: &Path, size: u64) -> anyhow::Result<Self> {
        let image = under.join("points-bench-xfs.img");
        let root = under.join("points-bench-xfs");
        File::create(&image)?.set_len(size)?;
        std::fs::create_dir_all(&root)?;
        run(Command::new("mkfs.xfs")
            .args(["-q", "-f", "-m", "reflink=1"])
            .arg(&image))?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&root))?;
        Ok(Self { root, image })
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.root).status();
        let _ = std::fs::remove_dir(&self.root);
        let _ = std::fs::remove_file(&self.image);
    }
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Cuts `runs` points of `image` the way the receiver does, and makes as many full
/// copies with cp, alternating; prints the medians and their ratios.
fn measure(label: &str, dir: &Path, image: &Path, size: u64, runs: usize) -> anyhow::Result<()> {
    let engine = Engine::start(IoEngine::Sync, 1)?;
    let store = FileStore::from_file(FileStore::open_file(image)?, image, size, engine)?;
    let mut cut = Side {
        seconds: Vec::new(),
        bytes: Vec::new(),
    };
    let mut full = Side {
        seconds: Vec::new(),
        bytes: Vec::new(),
    };
    let mut kind = CopyKind::Full;
    for run_number in 0..runs {
        let point = dir.join(format!("point-{run_number}.img"));
        let before = free_bytes(dir)?;
        let started = Instant::now();
        kind = store.copy_point(&point, CopyPolicy::ReflinkOrFull)?.kind;
        cut.seconds.push(started.elapsed().as_secs_f64());
        cut.bytes.push(before.saturating_sub(free_bytes(dir)?));
        std::fs::remove_file(&point)?;

        let copy = dir.join(format!("copy-{run_number}.img"));
        let before = free_bytes(dir)?;
        let started = Instant::now();
        run(Command::new("cp")
            .arg("--reflink=never")
            .arg(image)
            .arg(&copy))?;
        File::open(&copy)?.sync_all()?;
        full.seconds.push(started.elapsed().as_secs_f64());
        full.bytes.push(before.saturating_sub(free_bytes(dir)?));
        std::fs::remove_file(&copy)?;
    }
    let (cut_s, full_s) = (cut.median_seconds(), full.median_seconds());
    let (cut_b, full_b) = (cut.median_bytes(), full.median_bytes());
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "{label}: point cut ({}) median {:.1} ms, {:.1} MiB; full copy (cp --reflink=never + fsync) median {:.1} ms, {:.1} MiB; time ratio cut/full {:.4}, space ratio cut/full {:.4}",
        kind.name(),
        cut_s * 1e3,
        mib(cut_b),
        full_s * 1e3,
        mib(full_b),
        cut_s / full_s,
        cut_b as f64 / full_b.max(1) as f64,
    );
    if kind == CopyKind::Reflink {
        let grown = kept_point_growth(dir, image, size, |point| {
            store.copy_point(point, CopyPolicy::ReflinkOrFull)?;
            Ok(())
        })?;
        // The same on an image with XFS's default CoW extent hint (a fresh inode).
        let plain = dir.join("plain.img");
        run(Command::new("cp")
            .arg("--reflink=never")
            .arg(image)
            .arg(&plain))?;
        let grown_default = kept_point_growth(dir, &plain, size, |point| {
            run(Command::new("cp")
                .arg("--reflink=always")
                .arg(&plain)
                .arg(point))
        })?;
        std::fs::remove_file(&plain)?;
        println!(
            "{label}: a kept point after 1% of the live image's 4 KiB blocks were rewritten: {:.1} MiB ({:.2}% of a full copy) with the receiver's CoW extent hint; {:.1} MiB ({:.2}%) with XFS's default",
            mib(grown),
            grown as f64 / full_b.max(1) as f64 * 100.0,
            mib(grown_default),
            grown_default as f64 / full_b.max(1) as f64 * 100.0,
        );
    }
    Ok(())
}

/// The space a point of `live` (made by `cut`) holds once 1% of the live image's 4 KiB
/// blocks, scattered, are rewritten.
fn kept_point_growth(
    dir: &Path,
    live: &Path,
    size: u64,
    cut: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let point = dir.join("point-kept.img");
    cut(&point)?;
    let before = free_bytes(dir)?;
    let writer = File::options().write(true).open(live)?;
    let blocks = size / 4096;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data = vec![0xa5u8; 4096];
    for _ in 0..(blocks / 100).max(1) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        writer.write_all_at(&data, (x % blocks) * 4096)?;
    }
    writer.sync_data()?;
    let grown = before.saturating_sub(free_bytes(dir)?);
    std::fs::remove_file(&point)?;
    Ok(grown)
}

fn on(label: &str, dir: &Path, size: u64, runs: usize) -> anyhow::Result<()> {
    let image = dir.join("staging.img");
    let written = generate_image(
        &image,
        size,
        ImageLayout {
            random_fraction: 1.0,
            region: 8 << 20,
            seed: 7,
        },
    )?;
    File::open(&image)?.sync_all()?;
    anyhow::ensure!(written == size, "the image was not written whole");
    let result = measure(label, dir, &image, size, runs);
    let _ = std::fs::remove_file(&image);
    result
}

pub fn run_bench(size: u64, runs: usize, dir: Option<PathBuf>) -> anyhow::Result<()> {
    let base = dir.unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let scratch = tempfile::tempdir_in(&base)
        .with_context(|| format!("a scratch directory in {}", base.display()))?;
    println!(
        "recovery point cut vs full copy of a {:.0} MiB random image, {runs} runs each, alternating",
        size as f64 / f64::from(1 << 20)
    );
    let fs_type = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(scratch.path())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    on(
        &format!("{} ({fs_type})", base.display()),
        scratch.path(),
        size,
        runs,
    )?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let has_xfs = Command::new("mkfs.xfs")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if root && has_xfs {
        // Room for the image, a full copy, a second image and the points' rewritten blocks.
        let xfs = XfsMount::make(scratch.path(), (size * 3).max(512 << 20))?;
        on("loop-mounted XFS (reflink=1)", &xfs.root, size, runs)?;
    } else {
        println!("XFS with reflink: not measured (needs root and mkfs.xfs from xfsprogs)");
    }
    Ok(())
}
