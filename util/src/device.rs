//! What kind of thing a path is, and how big.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;

/// A staging store or a source volume is either a regular file or a raw block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    File,
    BlockDevice,
}

/// `BLKGETSIZE64` from `<linux/fs.h>`: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Returns the kind of an open file and its size in bytes (`BLKGETSIZE64` for a block
/// device, the length for a regular file). Anything else is `None`.
pub fn device_size(file: &File) -> io::Result<Option<(DeviceKind, u64)>> {
    let meta = file.metadata()?;
    let file_type = meta.file_type();
    if file_type.is_file() {
        return Ok(Some((DeviceKind::File, meta.len())));
    }
    if !file_type.is_block_device() {
        return Ok(None);
    }
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at `size`,
    // alive and writable for the whole call; the fd is open for the call's duration.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some((DeviceKind::BlockDevice, size)))
}
