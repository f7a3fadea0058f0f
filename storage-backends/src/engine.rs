//! The two I/O engines behind the file backend, and how one is chosen.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::str::FromStr;
use std::sync::Arc;

use crate::error::StoreError;
use crate::uring::UringPool;
use crate::volatile::{PowerSwitch, VolatileCache};
use crate::zero::{self, ZeroStep};
use blockferry_util::device::DeviceKind;

/// The `io_engine` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoEngine {
    /// io_uring when the kernel allows it, otherwise the sync engine (with one warning).
    #[default]
    Auto,
    /// io_uring or nothing: refusing to start is better than silently running slower.
    Uring,
    /// Portable positioned reads and writes on a blocking thread pool.
    Sync,
}

impl FromStr for IoEngine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "uring" => Ok(Self::Uring),
            "sync" => Ok(Self::Sync),
            other => Err(format!(
                "unknown io_engine {other:?}: expected auto, uring or sync"
            )),
        }
    }
}

impl fmt::Display for IoEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Uring => "uring",
            Self::Sync => "sync",
        })
    }
}

/// The engine actually running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Uring,
    Sync,
    /// The crash tests' model of a volatile write cache ([`Engine::with_volatile_cache`]).
    VolatileCache,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Uring => "uring",
            Self::Sync => "sync",
            Self::VolatileCache => "volatile-cache",
        })
    }
}

/// A running I/O engine, shared by every file store of a receiver. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

enum EngineInner {
    Sync,
    Uring(UringPool),
    VolatileCache(Arc<VolatileCache>),
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Engine({})", self.kind())
    }
}

impl Engine {
    /// Starts the engine `config` asks for. io_uring runs on `writer_threads` dedicated
    /// threads (at least one), each with its own ring.
    pub fn start(config: IoEngine, writer_threads: usize) -> Result<Self, StoreError> {
        let inner = match config {
            IoEngine::Sync => EngineInner::Sync,
            IoEngine::Uring => EngineInner::Uring(UringPool::start(writer_threads)?),
            IoEngine::Auto => match UringPool::start(writer_threads) {
                Ok(pool) => EngineInner::Uring(pool),
                Err(err) => {
                    tracing::warn!(
                        error = %blockferry_util::error_chain(&err),
                        "io_uring refused by the kernel or a seccomp filter; using the sync I/O engine (set io_engine = \"sync\" to silence this)"
                    );
                    EngineInner::Sync
                }
            },
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The portable engine, which needs nothing from the kernel beyond pread/pwrite.
    pub fn sync() -> Self {
        Self {
            inner: Arc::new(EngineInner::Sync),
        }
    }

    /// For crash tests: writes are held in memory until a flush, and the switch cuts the
    /// power (see [`PowerSwitch`]). Never for data anyone needs.
    pub fn with_volatile_cache() -> (Self, PowerSwitch) {
        let cache = Arc::new(VolatileCache::default());
        let engine = Self {
            inner: Arc::new(EngineInner::VolatileCache(Arc::clone(&cache))),
        };
        (engine, PowerSwitch(cache))
    }

    pub fn kind(&self) -> EngineKind {
        match *self.inner {
            EngineInner::Sync => EngineKind::Sync,
            EngineInner::Uring(_) => EngineKind::Uring,
            EngineInner::VolatileCache(_) => EngineKind::VolatileCache,
        }
    }

    pub(crate) async fn execute(&self, file: &Arc<FileHandle>, op: Op) -> io::Result<OpOutput> {
        match &*self.inner {
            EngineInner::Sync => {
                let file = Arc::clone(file);
                tokio::task::spawn_blocking(move || execute_sync(&file, op))
                    .await
                    .map_err(io::Error::other)?
            }
            EngineInner::Uring(pool) => pool.execute(file, op).await,
            EngineInner::VolatileCache(cache) => {
                let (file, cache) = (Arc::clone(file), Arc::clone(cache));
                tokio::task::spawn_blocking(move || cache.execute(&file, op))
                    .await
                    .map_err(io::Error::other)?
            }
        }
    }
}

/// An open staging file, as the engines see it. The id lets an io_uring thread keep its
/// own handle for the file for as long as this handle lives.
#[derive(Debug)]
pub(crate) struct FileHandle {
    pub(crate) id: u64,
    pub(crate) file: File,
    pub(crate) kind: DeviceKind,
}

#[derive(Debug)]
pub(crate) enum Op {
    Write { offset: u64, data: Vec<u8> },
    Read { offset: u64, len: usize },
    Zero { offset: u64, len: u64 },
    Flush,
}

#[derive(Debug)]
pub(crate) enum OpOutput {
    Done,
    Data(Vec<u8>),
}

pub(crate) fn execute_sync(handle: &FileHandle, op: Op) -> io::Result<OpOutput> {
    let file = &handle.file;
    match op {
        Op::Write { offset, data } => {
            file.write_all_at(&data, offset)?;
            Ok(OpOutput::Done)
        }
        Op::Read { offset, len } => {
            let mut data = vec![0; len];
            file.read_exact_at(&mut data, offset)?;
            Ok(OpOutput::Data(data))
        }
        Op::Zero { offset, len } => {
            for step in zero::plan(handle.kind, offset, len) {
                match step {
                    ZeroStep::Fallocate { offset, len, mode } => {
                        if let Err(err) = fallocate(file, mode, offset, len) {
                            if !zero::is_unsupported(&err) {
                                return Err(err);
                            }
                            write_zeros_sync(file, offset, len)?;
                        }
                    }
                    ZeroStep::Write { offset, len } => write_zeros_sync(file, offset, len)?,
                }
            }
            Ok(OpOutput::Done)
        }
        Op::Flush => {
            file.sync_data()?;
            Ok(OpOutput::Done)
        }
    }
}

fn write_zeros_sync(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; zero::ZERO_WRITE_CHUNK as usize];
    for (at, n) in zero::write_chunks(offset, len) {
        file.write_all_at(&zeros[..n], at)?;
    }
    Ok(())
}

fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate only reads its scalar arguments; the fd is open for the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
