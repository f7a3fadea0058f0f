//! Recovery-point copies on a file system that shares extents: XFS (with reflink, the
//! default of mkfs.xfs) on a loop device.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use blockferry_storage::{CopyKind, CopyPolicy, Engine, FileStore};

const MIB: u64 = 1 << 20;

struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        // A loop mount detaches its device when unmounted.
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// XFS on a sparse file, loop-mounted at `at`; `None` where this cannot be done.
fn xfs(backing: &Path, at: &Path) -> Option<Mounted> {
    std::fs::File::create(backing)
        .unwrap()
        .set_len(512 * MIB)
        .unwrap();
    let made = Command::new("mkfs.xfs")
        .args(["-q", "-f", "-m", "reflink=1"])
        .arg(backing)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    std::fs::create_dir_all(at).unwrap();
    let mounted = made
        && Command::new("mount")
            .args(["-o", "loop"])
            .arg(backing)
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    mounted.then(|| Mounted(at.to_owned()))
}

fn free_bytes(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn on_xfs_a_point_is_a_reflink_that_costs_no_data() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    let Some(_mounted) = xfs(&dir.path().join("xfs.img"), &mnt) else {
        eprintln!(
            "SKIPPED: cannot make and loop-mount XFS here (needs xfsprogs, root, loop devices)"
        );
        return;
    };
    let live = FileStore::create_new(&mnt.join("live.img"), 64 * MIB, Engine::sync()).unwrap();
    let data: Vec<u8> = (0..64 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(mnt.join("live.img"), &data).unwrap();
    let before = free_bytes(&mnt);

    let point = mnt.join("point.img");
    let copy = live.copy_point(&point, CopyPolicy::ReflinkOnly).unwrap();
    assert_eq!(copy.kind, CopyKind::Reflink);
    assert_eq!(copy.copied, 0);
    let used = before.saturating_sub(free_bytes(&mnt));
    assert!(
        used < 4 * MIB,
        "a reflink shares the data; {used} bytes went"
    );
    assert_eq!(
        std::fs::metadata(&point).unwrap().size(),
        64 * MIB,
        "the point has the image's size"
    );

    // The live image goes on; the point keeps what it held at the cut.
    std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("live.img"))
        .unwrap()
        .write_all_at(&[0xAA; 1 << 20], 8 * MIB)
        .unwrap();
    assert_eq!(std::fs::read(&point).unwrap(), data);
}

/// A kept point costs what the live image rewrote since it, not more: XFS's default
/// copy-on-write extent hint would make each 4 KiB rewrite allocate 128 KiB (about a
/// third of the image for 1% of its blocks); the staging image's hint is one block.
#[test]
fn on_xfs_a_kept_point_costs_about_what_was_rewritten_since() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    let Some(_mounted) = xfs(&dir.path().join("xfs.img"), &mnt) else {
        eprintln!(
            "SKIPPED: cannot make and loop-mount XFS here (needs xfsprogs, root, loop devices)"
        );
        return;
    };
    let path = mnt.join("live.img");
    let live = FileStore::create_new(&path, 64 * MIB, Engine::sync()).unwrap();
    let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let data: Vec<u8> = (0..64 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    writer.write_all_at(&data, 0).unwrap();
    writer.sync_all().unwrap();
    let hint = Command::new("xfs_io")
        .args(["-c", "cowextsize"])
        .arg(&path)
        .output()
        .unwrap();
    let hint = String::from_utf8_lossy(&hint.stdout).into_owned();
    live.copy_point(&mnt.join("point.img"), CopyPolicy::ReflinkOnly)
        .unwrap();
    let before = free_bytes(&mnt);
    let blocks = 64 * MIB / 4096;
    let rewritten = blocks / 100;
    for i in 0..rewritten {
        // Scattered: one block in every hundred.
        writer
            .write_all_at(&[0xa5; 4096], (i * 100 + 37) * 4096)
            .unwrap();
    }
    writer.sync_all().unwrap();
    let _ = Command::new("sync").status();
    let grown = before.saturating_sub(free_bytes(&mnt));
    assert!(
        hint.contains("[4096]"),
        "the staging image's CoW hint: {hint}"
    );
    assert!(
        grown <= 4 * rewritten * 4096 + 2 * MIB,
        "{rewritten} rewritten blocks of 4 KiB made the point hold {grown} bytes"
    );
}
