//! The file / block-device backend: a sparse file sized to the disk, or a raw block device
//! at least as large, driven by an [`Engine`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::{Engine, EngineKind, FileHandle, Op, OpOutput};
use crate::error::StoreError;
use blockferry_util::device::{DeviceKind, device_size};

/// Source of [`FileHandle`] ids: never reused, so an io_uring thread can never confuse a
/// closed file with a new one.
static NEXT_FILE_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug)]
pub struct FileStore {
    handle: Arc<FileHandle>,
    path: PathBuf,
    size: u64,
    engine: Engine,
}

impl FileStore {
    /// Opens the staging image at `path` for a disk of `size` bytes.
    ///
    /// A regular file is created if missing and set to exactly `size` bytes (sparse: no
    /// space is used until data arrives); its directory entry is made durable so that the
    /// image survives a crash. A block device must be at least `size` bytes.
    pub fn open_or_create(path: &Path, size: u64, engine: Engine) -> Result<Self, StoreError> {
        match Self::open_file(path) {
            Ok(file) => Self::from_file(file, path, size, engine),
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Self::create_new(path, size, engine)
            }
            Err(err) => Err(err),
        }
    }

    /// Creates a new sparse image of `size` bytes at `path`, which must not exist yet,
    /// and makes it and its directory entry durable.
    pub fn create_new(path: &Path, size: u64, engine: Engine) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io_error(path, "create"))?;
        file.set_len(size).map_err(io_error(path, "resize"))?;
        file.sync_all().map_err(io_error(path, "fsync"))?;
        sync_parent_dir(path).map_err(io_error(path, "fsync of the parent directory"))?;
        Self::from_file(file, path, size, engine)
    }

    /// Opens an existing image for reading and writing, without creating anything, so that
    /// the caller can check which file it is ([`FileIdentity::of`]) before trusting it.
    pub fn open_file(path: &Path) -> Result<File, StoreError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_error(path, "open"))
    }

    /// The store of an image already open as `file`: a regular file is set to exactly
    /// `size` bytes (a resized disk), a block device must hold at least `size` bytes.
    pub fn from_file(
        file: File,
        path: &Path,
        size: u64,
        engine: Engine,
    ) -> Result<Self, StoreError> {
        let (kind, current) = device_size(&file)
            .map_err(io_error(path, "stat"))?
            .ok_or_else(|| StoreError::UnsupportedFileType {
                path: path.to_owned(),
            })?;
        match kind {
            DeviceKind::File => {
                if current != size {
                    file.set_len(size).map_err(io_error(path, "resize"))?;
                    file.sync_all().map_err(io_error(path, "fsync"))?;
                }
                // A hint for the space of recovery points; the image works without it.
                if let Err(err) = crate::point::small_cow_extents(&file) {
                    tracing::debug!(path = %path.display(), error = %err, "the CoW extent size hint was not set");
                }
            }
            DeviceKind::BlockDevice => {
                if current < size {
                    return Err(StoreError::DeviceTooSmall {
                        path: path.to_owned(),
                        device_size: current,
                        size,
                    });
                }
            }
        }
        Ok(Self {
            handle: Arc::new(FileHandle {
                id: NEXT_FILE_ID.fetch_add(1, Ordering::Relaxed),
                file,
                kind,
            }),
            path: path.to_owned(),
            size,
            engine,
        })
    }

    /// Which file this store writes to.
    pub fn identity(&self) -> io::Result<FileIdentity> {
        FileIdentity::of(&self.handle.file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn device_kind(&self) -> DeviceKind {
        self.handle.kind
    }

    pub(crate) fn file(&self) -> &File {
        &self.handle.file
    }

    pub fn engine_kind(&self) -> EngineKind {
        self.engine.kind()
    }

    pub(crate) async fn write_at(&self, offset: u64, data: Vec<u8>) -> Result<(), StoreError> {
        self.run("write", Op::Write { offset, data })
            .await
            .map(drop)
    }

    pub(crate) async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.run("zero-fill", Op::Zero { offset, len })
            .await
            .map(drop)
    }

    pub(crate) async fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        match self.run("read", Op::Read { offset, len }).await? {
            OpOutput::Data(data) => Ok(data),
            OpOutput::Done => Ok(Vec::new()),
        }
    }

    pub(crate) async fn flush(&self) -> Result<(), StoreError> {
        self.run("fdatasync", Op::Flush).await.map(drop)
    }

    async fn run(&self, op_name: &'static str, op: Op) -> Result<OpOutput, StoreError> {
        self.engine
            .execute(&self.handle, op)
            .await
            .map_err(|source| StoreError::Io {
                op: op_name,
                path: self.path.clone(),
                source,
            })
    }
}

/// Which file an open image is: its file system and inode (a regular file), or its
/// device number (a block device). A file restored from a backup, recreated, or found on
/// another volume mounted in its place has another identity, even under the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    pub kind: DeviceKind,
    /// `st_dev` and `st_ino` of a regular file; 0 and `st_rdev` of a block device.
    pub device: u64,
    pub inode: u64,
    /// When the inode was created (ns since the epoch; 0 where the file system does not
    /// say): a file deleted and made again often gets the same inode number, never the
    /// same birth time.
    pub born_ns: u64,
    /// Bytes: the file's length, or the device's size.
    pub len: u64,
}

impl FileIdentity {
    pub fn of(file: &File) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = file.metadata()?;
        let (kind, len) = device_size(file)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither a regular file nor a block device",
            )
        })?;
        Ok(match kind {
            DeviceKind::File => Self {
                kind,
                device: meta.dev(),
                inode: meta.ino(),
                born_ns: birth_ns(file),
                len,
            },
            DeviceKind::BlockDevice => Self {
                kind,
                device: 0,
                inode: meta.rdev(),
                born_ns: 0,
                len,
            },
        })
    }
}

/// The birth time of an open file (`statx` `STATX_BTIME`), 0 if the file system keeps none.
fn birth_ns(file: &File) -> u64 {
    use std::os::fd::AsRawFd;
    // SAFETY: all-zero bytes are a valid `statx`.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx on an open descriptor with an empty path writes one `statx` into
    // `stx`, which is alive and writable for the call.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_BTIME,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_BTIME == 0 {
        return 0;
    }
    u64::try_from(stx.stx_btime.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::from(stx.stx_btime.tv_nsec))
}

pub(crate) fn io_error<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

pub(crate) fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}
