//! Freezing the file systems mounted on block-tracked disks (`--freeze`), so that a
//! crash-consistent point can be cut while the server runs.
//!
//! Block tracking learns of a write only after it completed and re-reads the block
//! later, so the content it ships is never "all writes before T, none after" by itself.
//! A point is cut by freezing every file system on the replicated disks (FIFREEZE: new
//! writes wait, dirty data and the journal are written out, ext4 and XFS mark themselves
//! clean), taking every completed write from the kernel's rings, reading every dirty
//! block into memory, and thawing. What was read is the disks' content at one instant;
//! it is shipped as a generation whose barrier is marked consistent. A writer that does
//! not go through a frozen file system (a raw device, an unsupported file system) is
//! caught: any write seen while frozen gives the point up.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from linux/fs.h.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Longest freeze an operator may configure: writers on the server wait this long.
pub const MAX_FREEZE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound on one freeze.
pub const DEFAULT_FREEZE_TIMEOUT: Duration = Duration::from_millis(200);
/// Default time between two frozen points while the disks change.
pub const DEFAULT_FREEZE_INTERVAL: Duration = Duration::from_secs(60);

/// `--freeze`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FreezeMode {
    /// Freeze the file systems on block-tracked disks to cut crash-consistent points.
    #[default]
    Auto,
    /// Never freeze: block-tracked points are shipped but not marked consistent.
    Off,
}

impl std::str::FromStr for FreezeMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            _ => Err(format!("unknown freeze mode {s:?}: expected auto or off")),
        }
    }
}

/// A mounted file system that holds data of a replicated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub point: PathBuf,
    pub source: String,
    pub fstype: String,
}

/// The file systems mounted (now) on `devices` (device numbers of replicated disks or
/// partitions): directly, on a partition of one, or on a device-mapper/MD device stacked
/// on one.
pub fn mounts_on(devices: &[u64]) -> io::Result<Vec<Mount>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut found: Vec<Mount> = Vec::new();
    for line in text.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = before.split(' ').collect();
        let mut rest = after.split(' ');
        let (Some(fstype), Some(source)) = (rest.next(), rest.next()) else {
            continue;
        };
        let (Some(dev), Some(point)) = (fields.get(2), fields.get(4)) else {
            continue;
        };
        let Some(dev) = mount_device(dev, source) else {
            continue;
        };
        if !underlying(dev).iter().any(|d| devices.contains(d)) {
            continue;
        }
        let point = PathBuf::from(unescape(point));
        // A file system bind-mounted twice is frozen once.
        if found
            .iter()
            .any(|m| m.source == source && m.fstype == fstype)
        {
            continue;
        }
        found.push(Mount {
            point,
            source: source.to_owned(),
            fstype: fstype.to_owned(),
        });
    }
    Ok(found)
}

/// The block device a mount is on: its major:minor, or (for file systems such as btrfs
/// that report an anonymous device) its source's.
fn mount_device(dev: &str, source: &str) -> Option<u64> {
    let (major, minor) = dev.split_once(':')?;
    let (major, minor): (u32, u32) = (major.parse().ok()?, minor.parse().ok()?);
    if major != 0 {
        return Some(libc::makedev(major, minor));
    }
    let meta = std::fs::metadata(source).ok()?;
    meta.file_type().is_block_device().then(|| meta.rdev())
}

/// `dev` and every device under it: its disk when it is a partition, and (recursively)
/// the devices a device-mapper or MD device is built on, and their disks.
fn underlying(dev: u64) -> Vec<u64> {
    let mut all = Vec::new();
    let mut todo = vec![dev];
    while let Some(dev) = todo.pop() {
        if all.contains(&dev) || all.len() > 256 {
            continue;
        }
        all.push(dev);
        let sys = PathBuf::from(format!(
            "/sys/dev/block/{}:{}",
            libc::major(dev),
            libc::minor(dev)
        ));
        if sys.join("partition").exists()
            && let Some(parent) = sys
                .canonicalize()
                .ok()
                .and_then(|p| p.parent().map(Path::to_owned))
            && let Some(parent) = read_dev(&parent.join("dev"))
        {
            todo.push(parent);
        }
        if let Ok(slaves) = std::fs::read_dir(sys.join("slaves")) {
            for slave in slaves.flatten() {
                if let Some(dev) = read_dev(&slave.path().join("dev")) {
                    todo.push(dev);
                }
            }
        }
    }
    all
}

fn read_dev(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let (major, minor) = text.trim().split_once(':')?;
    Some(libc::makedev(major.parse().ok()?, minor.parse().ok()?))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Some(code) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|digits| u8::from_str_radix(digits, 8).ok())
        {
            out.push(code);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("cannot open the mount point {} of {source_dev}", point.display())]
    Open {
        point: PathBuf,
        source_dev: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot freeze {} ({fstype} on {source_dev}): FIFREEZE failed (EOPNOTSUPP: the file system cannot be frozen; EBUSY: something else froze it)",
        point.display()
    )]
    Freeze {
        point: PathBuf,
        fstype: String,
        source_dev: String,
        #[source]
        source: io::Error,
    },
}

/// Frozen file systems; dropping thaws them (in reverse order), whatever happened.
#[derive(Debug)]
pub struct Frozen {
    frozen: Vec<(PathBuf, File)>,
    /// Thaws that failed, for the caller to report after the thaw (logging while a file
    /// system is frozen could block on it).
    pub thaw_failures: Vec<(PathBuf, io::Error)>,
}

/// Syncs, then freezes, every file system in `mounts`. Syncing first keeps the frozen
/// window short: FIFREEZE itself must then write out only what came since.
pub fn freeze(mounts: &[Mount]) -> Result<Frozen, FreezeError> {
    let mut dirs = Vec::with_capacity(mounts.len());
    for mount in mounts {
        let dir = File::open(&mount.point).map_err(|source| FreezeError::Open {
            point: mount.point.clone(),
            source_dev: mount.source.clone(),
            source,
        })?;
        // SAFETY: syncfs on a descriptor we own.
        unsafe { libc::syncfs(dir.as_raw_fd()) };
        dirs.push(dir);
    }
    let mut frozen = Frozen {
        frozen: Vec::with_capacity(mounts.len()),
        thaw_failures: Vec::new(),
    };
    for (mount, dir) in mounts.iter().zip(dirs) {
        // SAFETY: an ioctl without a buffer on a descriptor we own.
        if unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, 0) } != 0 {
            let source = io::Error::last_os_error();
            drop(frozen);
            return Err(FreezeError::Freeze {
                point: mount.point.clone(),
                fstype: mount.fstype.clone(),
                source_dev: mount.source.clone(),
                source,
            });
        }
        frozen.frozen.push((mount.point.clone(), dir));
    }
    Ok(frozen)
}

impl Frozen {
    /// How many file systems are frozen.
    pub fn count(&self) -> usize {
        self.frozen.len()
    }

    /// Thaws now; returns the thaws that failed.
    pub fn thaw(mut self) -> Vec<(PathBuf, io::Error)> {
        self.thaw_all();
        std::mem::take(&mut self.thaw_failures)
    }

    fn thaw_all(&mut self) {
        while let Some((point, dir)) = self.frozen.pop() {
            // SAFETY: an ioctl without a buffer on a descriptor we own.
            if unsafe { libc::ioctl(dir.as_raw_fd(), FITHAW as _, 0) } != 0 {
                self.thaw_failures.push((point, io::Error::last_os_error()));
            }
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw_all();
        for (point, err) in &self.thaw_failures {
            tracing::error!(
                mount = %point.display(),
                error = %err,
                "cannot thaw a file system the agent froze: run `fsfreeze -u {}`",
                point.display()
            );
        }
        self.thaw_failures.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_with_spaces_are_unescaped() {
        assert_eq!(unescape(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape(r"/mnt/back\134slash"), r"/mnt/back\slash");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn freeze_modes_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!("auto".parse(), Ok(FreezeMode::Auto));
        assert_eq!("off".parse(), Ok(FreezeMode::Off));
        let err = "sometimes".parse::<FreezeMode>().unwrap_err();
        assert!(err.contains("expected auto or off"), "{err}");
    }
}
