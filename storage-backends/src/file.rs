//! The file / block-device backend: a sparse file sized to the disk, or a raw block device
//! at least as large, driven by an [`Engine`].

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::device::{DeviceKind, device_size};
use crate::engine::{Engine, EngineKind, FileHandle, Op, OpOutput};
use crate::error::StoreError;

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
        let io_err = |op| {
            move |source| StoreError::Io {
                op,
                path: path.to_owned(),
                source,
            }
        };
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(!existed)
            .truncate(false)
            .open(path)
            .map_err(io_err("open"))?;
        let (kind, current) = device_size(&file).map_err(io_err("stat"))?.ok_or_else(|| {
            StoreError::UnsupportedFileType {
                path: path.to_owned(),
            }
        })?;
        match kind {
            DeviceKind::File => {
                if current != size {
                    file.set_len(size).map_err(io_err("resize"))?;
                    file.sync_all().map_err(io_err("fsync"))?;
                }
                if !existed {
                    sync_parent_dir(path).map_err(io_err("fsync of the parent directory"))?;
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

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn device_kind(&self) -> DeviceKind {
        self.handle.kind
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

fn sync_parent_dir(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}
