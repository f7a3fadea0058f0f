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
