//! A model of a disk with a volatile write cache, for crash tests: every write (and
//! zero-fill) is held in memory until a flush writes it to the file and fdatasyncs it;
//! [`PowerSwitch::cut`] throws away what is held, as a power cut empties a page cache and
//! a drive's cache, and from then on every operation fails, as on a machine that is off.
//!
//! A receiver killed with SIGKILL keeps its page cache, so a test that only kills
//! processes cannot tell a flushed write from one merely written; on this engine it can:
//! what a receiver acknowledged must be in the file after a cut. Reads see the held
//! writes (read-after-write, as the page cache gives), so everything above the engine
//! behaves as it does on a real disk.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::engine::{FileHandle, Op, OpOutput, execute_sync};
use blockferry_util::lock;

/// What is held for one file, in the order it was written.
enum Held {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
}

#[derive(Default)]
pub(crate) struct VolatileCache {
    /// By (device, inode): every handle of one file shares its cache, as in the kernel.
    held: Mutex<HashMap<(u64, u64), Vec<Held>>>,
    off: AtomicBool,
    ignore_flushes: AtomicBool,
    lost: AtomicU64,
}

/// The switch of a [`crate::Engine::with_volatile_cache`] engine.
#[derive(Clone)]
pub struct PowerSwitch(pub(crate) std::sync::Arc<VolatileCache>);

impl std::fmt::Debug for PowerSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerSwitch")
            .field("off", &self.0.off.load(Ordering::SeqCst))
            .field("held", &self.held())
            .finish()
    }
}

impl PowerSwitch {
    /// Cuts the power: every write not flushed is lost, and every later operation fails
    /// with EIO. Returns the number of writes and zero-fills lost.
    pub fn cut(&self) -> u64 {
        self.0.off.store(true, Ordering::SeqCst);
        let lost: u64 = lock(&self.0.held)
            .drain()
            .map(|(_, ops)| ops.len() as u64)
            .sum();
        self.0.lost.fetch_add(lost, Ordering::SeqCst);
        lost
    }

    /// A cache that acknowledges flushes without writing anything (a drive that lies about
    /// its cache, or a receiver whose fdatasync was removed): the crash tests must catch
    /// the loss this causes.
    pub fn ignore_flushes(&self, ignore: bool) {
        self.0.ignore_flushes.store(ignore, Ordering::SeqCst);
    }

    /// Writes held now (not yet flushed).
    pub fn held(&self) -> usize {
        lock(&self.0.held).values().map(Vec::len).sum()
    }
}

fn key(handle: &FileHandle) -> io::Result<(u64, u64)> {
    let meta = handle.file.metadata()?;
    Ok((meta.dev(), meta.ino()))
}

impl VolatileCache {
    pub(crate) fn execute(&self, handle: &FileHandle, op: Op) -> io::Result<OpOutput> {
        if self.off.load(Ordering::SeqCst) {
            return Err(io::Error::other(
                "the power is off (a volatile-cache test engine after its power cut)",
            ));
        }
        let key = key(handle)?;
        match op {
            Op::Write { offset, data } => {
                lock(&self.held)
                    .entry(key)
                    .or_default()
                    .push(Held::Write { offset, data });
                Ok(OpOutput::Done)
            }
            Op::Zero { offset, len } => {
                lock(&self.held)
                    .entry(key)
                    .or_default()
                    .push(Held::Zero { offset, len });
                Ok(OpOutput::Done)
            }
            Op::Read { offset, len } => {
                let OpOutput::Data(mut data) = execute_sync(handle, Op::Read { offset, len })?
                else {
                    unreachable!("a read returns data");
                };
                let end = offset + len as u64;
                for held in lock(&self.held).get(&key).into_iter().flatten() {
                    let (at, n, bytes) = match held {
                        Held::Write { offset, data } => (*offset, data.len() as u64, Some(data)),
                        Held::Zero { offset, len } => (*offset, *len, None),
                    };
                    let (from, to) = (at.max(offset), (at + n).min(end));
                    if from >= to {
                        continue;
                    }
                    let dst = &mut data[(from - offset) as usize..(to - offset) as usize];
                    match bytes {
                        Some(src) => {
                            dst.copy_from_slice(&src[(from - at) as usize..(to - at) as usize])
                        }
                        None => dst.fill(0),
                    }
                }
                Ok(OpOutput::Data(data))
            }
            Op::Flush => {
                if self.ignore_flushes.load(Ordering::SeqCst) {
                    return Ok(OpOutput::Done);
                }
                // Taken under the lock: a write that completed before this flush is in
                // it, one after stays held.
                let ops = lock(&self.held).remove(&key).unwrap_or_default();
                for held in ops {
                    let op = match held {
                        Held::Write { offset, data } => Op::Write { offset, data },
                        Held::Zero { offset, len } => Op::Zero { offset, len },
                    };
                    execute_sync(handle, op)?;
                }
                execute_sync(handle, Op::Flush)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{BlockStore, Engine, FileStore};

    #[tokio::test]
    async fn what_is_flushed_survives_a_power_cut_and_what_is_not_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let (engine, power) = Engine::with_volatile_cache();
        let store = BlockStore::File(FileStore::open_or_create(&path, 1 << 20, engine).unwrap());
        store.write_at(0, vec![1; 4096]).await.unwrap();
        store.write_at(8192, vec![2; 4096]).await.unwrap();
        store.write_zeroes(8192, 1024).await.unwrap();
        // Read after write sees the cache, in order.
        let read = store.read_at(0, 12288).await.unwrap();
        assert_eq!(&read[..4096], &[1; 4096][..]);
        assert_eq!(&read[8192..9216], &[0; 1024][..]);
        assert_eq!(&read[9216..], &[2; 3072][..]);
        // The file holds nothing until the flush.
        assert_eq!(std::fs::read(&path).unwrap()[..4096], [0; 4096]);
        let _flushed = store.flush().await.unwrap();
        assert_eq!(power.held(), 0);
        assert_eq!(std::fs::read(&path).unwrap()[..12288], read[..]);

        store.write_at(4096, vec![3; 4096]).await.unwrap();
        assert_eq!(power.cut(), 1);
        let file = std::fs::read(&path).unwrap();
        assert_eq!(
            file[4096..8192],
            [0; 4096],
            "an unflushed write survived the cut"
        );
        assert_eq!(file[..4096], [1; 4096], "a flushed write was lost");
        let err = store.write_at(0, vec![9; 512]).await.unwrap_err();
        let why = blockferry_util::error_chain(&err);
        assert!(why.contains("power is off"), "{why}");
    }

    #[tokio::test]
    async fn a_cache_that_ignores_flushes_loses_flushed_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let (engine, power) = Engine::with_volatile_cache();
        let store = BlockStore::File(FileStore::open_or_create(&path, 1 << 20, engine).unwrap());
        power.ignore_flushes(true);
        store.write_at(0, vec![1; 4096]).await.unwrap();
        let _flushed = store.flush().await.unwrap();
        assert_eq!(power.cut(), 1);
        assert_eq!(std::fs::read(&path).unwrap()[..4096], [0; 4096]);
    }
}
