//! File systems mounted for a test: a tmpfs, or XFS on a loop device (reflinks, and a
//! disk that can be made to fail). Unmounted when dropped; a loop mount detaches its
//! device then.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct Mount(PathBuf);

impl Mount {
    /// A tmpfs of `size` (e.g. "40m") at `at`; `None` without mount rights.
    pub fn tmpfs(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Self(at.to_owned()))
    }

    /// A new XFS (reflink on) of `size` bytes in the sparse file `backing`, loop-mounted
    /// at `at`; `None` where that cannot be done (no xfsprogs, root or loop devices).
    pub fn xfs(backing: &Path, size: u64, at: &Path) -> Option<Self> {
        std::fs::File::create(backing)
            .unwrap()
            .set_len(size)
            .unwrap();
        let made = Command::new("mkfs.xfs")
            .args(["-q", "-f", "-m", "reflink=1"])
            .arg(backing)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        Self::loop_mount(made, backing, at, "loop")
    }

    /// Mounts the file system in `backing` again (after a shutdown, say) at `at`.
    pub fn xfs_again(backing: &Path, at: &Path) -> Option<Self> {
        Self::loop_mount(true, backing, at, "loop,nouuid")
    }

    fn loop_mount(made: bool, backing: &Path, at: &Path, options: &str) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let mounted = made
            && Command::new("mount")
                .args(["-o", options])
                .arg(backing)
                .arg(at)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        mounted.then(|| Self(at.to_owned()))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
