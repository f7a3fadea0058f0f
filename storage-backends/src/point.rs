//! A recovery point of a file-backed staging disk: a copy of its image frozen at one
//! instant, made while no write is in flight, so that it holds exactly what the image
//! held then.
//!
//! Where the file system shares extents between files (XFS with reflink, btrfs), the copy
//! is a reflink (`FICLONE`): it costs no data and little time, and the live image keeps
//! receiving writes beside it. Elsewhere (ext4, tmpfs, a block device) it is a full copy
//! of the data (holes stay holes), which takes time and space; the caller decides
//! whether to allow it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::error::StoreError;
use crate::file::{FileStore, io_error, sync_parent_dir};
use blockferry_util::device::DeviceKind;

/// How a point's copy of an image was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// Shares the image's extents: no data was copied.
    Reflink,
    /// Every data byte was copied.
    Full,
}

impl CopyKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Reflink => "reflink",
            Self::Full => "copy",
        }
    }
}

/// Whether a full copy may stand in for a reflink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyPolicy {
    ReflinkOnly,
    ReflinkOrFull,
}

/// What [`FileStore::copy_point`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointCopy {
    pub kind: CopyKind,
    /// Bytes of data copied (0 for a reflink).
    pub copied: u64,
}

/// Bytes moved per `copy_file_range` or read of a full copy.
const COPY_CHUNK: usize = 8 << 20;

impl FileStore {
    /// Writes the image as it is now to a new file at `dest` and makes it durable (the
    /// file and its directory entry). The caller makes sure that no write to the image
    /// is in flight and none starts before this returns.
    ///
    /// With [`CopyPolicy::ReflinkOnly`] a file system without reflinks is an error
    /// ([`StoreError::NoReflink`]), and nothing is left at `dest`.
    pub fn copy_point(&self, dest: &Path, policy: CopyPolicy) -> Result<PointCopy, StoreError> {
        let out = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .map_err(io_error(dest, "create"))?;
        let result = self.copy_into(&out, dest, policy);
        if result.is_err() {
            drop(out);
            let _ = std::fs::remove_file(dest);
            return result;
        }
        out.sync_all().map_err(io_error(dest, "fsync"))?;
        sync_parent_dir(dest).map_err(io_error(dest, "fsync of the parent directory"))?;
        result
    }

    fn copy_into(
        &self,
        out: &File,
        dest: &Path,
        policy: CopyPolicy,
    ) -> Result<PointCopy, StoreError> {
        let source = self.file();
        if self.device_kind() == DeviceKind::File {
            // SAFETY: FICLONE reads the source descriptor's number; both files stay open
            // for the call.
            let rc = unsafe { libc::ioctl(out.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) };
            if rc == 0 {
                return Ok(PointCopy {
                    kind: CopyKind::Reflink,
                    copied: 0,
                });
            }
            let err = io::Error::last_os_error();
            if !no_reflink(&err) {
                return Err(StoreError::Io {
                    op: "reflink (FICLONE)",
                    path: dest.to_owned(),
                    source: err,
                });
            }
        }
        if policy == CopyPolicy::ReflinkOnly {
            return Err(StoreError::NoReflink {
                path: self.path().to_owned(),
            });
        }
        out.set_len(self.size()).map_err(io_error(dest, "resize"))?;
        let copied = match self.device_kind() {
            DeviceKind::File => copy_data_extents(source, out, self.size()),
            DeviceKind::BlockDevice => copy_nonzero_chunks(source, out, self.size()),
        }
        .map_err(io_error(dest, "copy"))?;
        Ok(PointCopy {
            kind: CopyKind::Full,
            copied,
        })
    }
}

/// `struct fsxattr` of `<linux/fs.h>`.
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

const _: () = assert!(std::mem::size_of::<FsXattr>() == 28);
/// `_IOR('X', 31, struct fsxattr)` and `_IOW('X', 32, struct fsxattr)`.
const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820;
const FS_XFLAG_COWEXTSIZE: u32 = 0x0001_0000;

/// Sets a staging image's copy-on-write extent size hint to one file system block, on
/// XFS; returns whether it did. XFS's default hint makes a write into an extent shared
/// with a point allocate 32 blocks: a 4 KiB write then holds 128 KiB, and a point after
/// scattered 4 KiB writes to 1% of the image costs about a quarter of a full copy instead
/// of 1% (`blockferry-bench points`). Elsewhere nothing changes: btrfs copies on write per
/// block already, and other file systems have no reflinks.
pub fn small_cow_extents(file: &File) -> io::Result<bool> {
    // SAFETY: fstatfs fills the struct given; the descriptor is open.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type and the magic have a different type on each architecture.
    #[allow(clippy::unnecessary_cast)]
    if fs.f_type as i64 != libc::XFS_SUPER_MAGIC as i64 {
        return Ok(false);
    }
    let block = u32::try_from(fs.f_bsize).unwrap_or(4096);
    let mut attr = FsXattr::default();
    // SAFETY: the ioctl fills an fsxattr of the size its number encodes.
    if unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FSGETXATTR as _, &mut attr) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if attr.xflags & FS_XFLAG_COWEXTSIZE != 0 && attr.cowextsize == block {
        return Ok(true);
    }
    attr.xflags |= FS_XFLAG_COWEXTSIZE;
    attr.cowextsize = block;
    // SAFETY: as above; the kernel reads the fsxattr.
    if unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FSSETXATTR as _, &attr) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

/// The errors by which a file system (or a pair of files) says it cannot share extents.
fn no_reflink(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EXDEV | libc::EINVAL | libc::ENOSYS)
    )
}

/// Copies the data extents of a sparse file (its holes are left holes), in the kernel.
fn copy_data_extents(source: &File, out: &File, size: u64) -> io::Result<u64> {
    let mut copied = 0;
    let mut at = 0u64;
    while at < size {
        let Some(start) = seek(source, at, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(source, start, libc::SEEK_HOLE)?
            .unwrap_or(size)
            .min(size);
        let mut offset = start;
        while offset < end {
            let len = usize::try_from(end - offset)
                .unwrap_or(usize::MAX)
                .min(COPY_CHUNK);
            let mut from = i64::try_from(offset).map_err(io::Error::other)?;
            let mut to = from;
            // SAFETY: both descriptors are open; the offsets are ours, passed by pointer
            // for the kernel to advance.
            let n = unsafe {
                libc::copy_file_range(
                    source.as_raw_fd(),
                    &mut from,
                    out.as_raw_fd(),
                    &mut to,
                    len,
                    0,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the image ended at {offset}, before its size of {size}"),
                ));
            }
            offset += n as u64;
            copied += n as u64;
        }
        at = end;
    }
    Ok(copied)
}

/// `lseek` with `SEEK_DATA` or `SEEK_HOLE`; `None` past the last data (ENXIO).
fn seek(file: &File, from: u64, whence: i32) -> io::Result<Option<u64>> {
    let from = i64::try_from(from).map_err(io::Error::other)?;
    // SAFETY: lseek on an open descriptor; it only moves the file offset, which nothing
    // else of ours uses (all I/O is positional).
    let at = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if at < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(at as u64))
}

/// Copies a block device's chunks that are not all zeroes (those stay holes).
fn copy_nonzero_chunks(source: &File, out: &File, size: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut copied = 0;
    let mut at = 0u64;
    while at < size {
        let len = usize::try_from(size - at)
            .unwrap_or(usize::MAX)
            .min(COPY_CHUNK);
        source.read_exact_at(&mut buf[..len], at)?;
        if buf[..len].iter().any(|&b| b != 0) {
            out.write_all_at(&buf[..len], at)?;
            copied += len as u64;
        }
        at += len as u64;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Engine;

    const MIB: u64 = 1 << 20;

    fn image_with_holes(dir: &Path) -> (FileStore, Vec<u8>) {
        let path = dir.join("live.img");
        let store = FileStore::create_new(&path, 16 * MIB, Engine::sync()).unwrap();
        let mut expected = vec![0u8; (16 * MIB) as usize];
        for (at, byte) in [(0u64, 1u8), (5 * MIB + 4096, 2), (16 * MIB - 8192, 3)] {
            let data = vec![byte; 8192];
            store.file().write_all_at(&data, at).unwrap();
            expected[at as usize..at as usize + 8192].copy_from_slice(&data);
        }
        (store, expected)
    }

    fn allocated(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn a_point_holds_the_image_as_it_was_and_the_image_goes_on_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (store, expected) = image_with_holes(dir.path());
        let dest = dir.path().join("point.img");
        let copy = store.copy_point(&dest, CopyPolicy::ReflinkOrFull).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), expected);
        if copy.kind == CopyKind::Full {
            assert_eq!(copy.copied, 3 * 8192, "the data extents only");
            assert!(
                allocated(&dest) < 4 * MIB,
                "holes stay holes: {} bytes allocated",
                allocated(&dest)
            );
        }
        // A write to the live image after the cut is not in the point.
        store.file().write_all_at(&[9; 4096], 0).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), expected);
    }

    #[test]
    fn without_reflinks_a_copy_is_refused_unless_allowed_and_nothing_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = image_with_holes(dir.path());
        let dest = dir.path().join("point.img");
        match store.copy_point(&dest, CopyPolicy::ReflinkOnly) {
            Ok(copy) => assert_eq!(copy.kind, CopyKind::Reflink, "this file system reflinks"),
            Err(err) => {
                assert!(matches!(err, StoreError::NoReflink { .. }), "{err}");
                assert!(err.to_string().contains("no reflinks"), "{err}");
                assert!(!dest.exists(), "a refused copy leaves no file behind");
            }
        }
    }

    #[test]
    fn a_point_never_overwrites_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = image_with_holes(dir.path());
        let dest = dir.path().join("point.img");
        std::fs::write(&dest, b"keep").unwrap();
        let err = store
            .copy_point(&dest, CopyPolicy::ReflinkOrFull)
            .unwrap_err();
        assert!(err.to_string().contains("create"), "{err}");
        assert_eq!(std::fs::read(&dest).unwrap(), b"keep");
    }
}
