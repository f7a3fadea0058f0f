use std::io;
use std::path::PathBuf;

/// What went wrong with a staging store. Messages name the store; the I/O cause is the
/// error's source.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} of {len} bytes at offset {offset} is beyond the end of {path} ({size} bytes)")]
    OutOfRange {
        what: &'static str,
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{op} failed on {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is a block device of {device_size} bytes, smaller than the disk ({size} bytes)"
    )]
    DeviceTooSmall {
        path: PathBuf,
        device_size: u64,
        size: u64,
    },
    #[error("{path} is neither a regular file nor a block device")]
    UnsupportedFileType { path: PathBuf },
    #[error("io_uring is not available")]
    UringUnavailable(#[source] io::Error),
    #[error("the io_uring writer thread has stopped; no more I/O can be submitted")]
    EngineStopped,
    #[error(
        "the file system of {path} cannot share extents (no reflinks), and a full copy was not allowed"
    )]
    NoReflink { path: PathBuf },
}

impl StoreError {
    /// Whether the staging storage is out of space: the disk should go STALLED and resume
    /// when space returns, rather than fail.
    pub fn is_no_space(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC))
    }
}

impl StoreError {
    /// Whether the staging file system (or device) ran out of space: the disk stalls
    /// until space returns, rather than failing for good.
    pub fn is_out_of_space(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == io::ErrorKind::StorageFull
            || source.raw_os_error() == Some(libc::ENOSPC)
            || source.raw_os_error() == Some(libc::EDQUOT))
    }
}
