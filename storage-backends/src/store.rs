//! [`BlockStore`]: one staging disk, whatever holds it.

use std::path::{Path, PathBuf};

use std::sync::Arc;

use crate::ebs::chain::SnapshotChain;
use crate::error::StoreError;
use crate::file::FileStore;
use crate::memory::MemoryStore;

/// One staging disk. See the crate docs for the ordering contract.
#[derive(Debug)]
pub enum BlockStore {
    File(FileStore),
    /// A disk staged for EBS: its local base copy, and the snapshot chain every write to
    /// it feeds (see [`crate::ebs::chain`]).
    Ebs {
        base: FileStore,
        chain: Arc<SnapshotChain>,
    },
    Memory(MemoryStore),
}

/// Proof that a flush completed: every write that had completed before the flush was
/// called is on stable storage. Only [`BlockStore::flush`] can make one, so code that
/// records durability metadata cannot skip the flush.
#[derive(Debug)]
#[must_use = "a flush proof exists to be handed to whatever records durability"]
pub struct Flushed {
    _proof: (),
}

impl BlockStore {
    pub fn size(&self) -> u64 {
        match self {
            Self::File(f) | Self::Ebs { base: f, .. } => f.size(),
            Self::Memory(m) => m.size(),
        }
    }

    /// Where the image lives, for status and error messages.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::File(f) | Self::Ebs { base: f, .. } => Some(f.path()),
            Self::Memory(_) => None,
        }
    }

    /// Writes `data` at `offset`. The range must lie within the disk.
    pub async fn write_at(&self, offset: u64, data: Vec<u8>) -> Result<(), StoreError> {
        self.check_range("write", offset, data.len() as u64)?;
        match self {
            Self::File(f) => f.write_at(offset, data).await,
            Self::Ebs { base, chain } => {
                chain.before_write(base, offset, data.len() as u64).await?;
                base.write_at(offset, data).await
            }
            Self::Memory(m) => {
                m.write_at(offset, &data);
                Ok(())
            }
        }
    }

    /// Makes `len` bytes at `offset` read as zeros, giving the space back where the
    /// backend can.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.check_range("zero-fill", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match self {
            Self::File(f) => f.write_zeroes(offset, len).await,
            Self::Ebs { base, chain } => {
                chain.before_write(base, offset, len).await?;
                base.write_zeroes(offset, len).await
            }
            Self::Memory(m) => {
                m.write_zeroes(offset, len);
                Ok(())
            }
        }
    }

    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        self.check_range("read", offset, len as u64)?;
        match self {
            Self::File(f) | Self::Ebs { base: f, .. } => f.read_at(offset, len).await,
            Self::Memory(m) => Ok(m.read_at(offset, len)),
        }
    }

    /// Makes every completed write durable (fdatasync for files and devices).
    pub async fn flush(&self) -> Result<Flushed, StoreError> {
        match self {
            Self::File(f) | Self::Ebs { base: f, .. } => f.flush().await?,
            Self::Memory(_) => {}
        }
        Ok(Flushed { _proof: () })
    }

    fn check_range(&self, what: &'static str, offset: u64, len: u64) -> Result<(), StoreError> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(StoreError::OutOfRange {
                what,
                path: self
                    .path()
                    .map_or_else(|| PathBuf::from("<memory>"), Path::to_owned),
                offset,
                len,
                size,
            }),
        }
    }
}
