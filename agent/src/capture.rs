//! Write capture: what a workload writes to a replicated volume, on its way to the
//! receiver.
//!
//! A captured write goes to the source volume first, then into the [`DirtyMap`] (the
//! source of truth: a dirty block is always sent again) and, while the buffer has room,
//! into an in-memory copy so that it can be sent without reading the volume. When the
//! buffer is full the copy is dropped but the block stays dirty, and the sender re-reads it
//! from the volume when its turn comes: that is the backlog.
//!
//! During a disk's initial sync, a write at or above the sync cursor needs nothing: the
//! sync will read it. One below the cursor is a change like any other.
//!
//! Consistency: the sender clears a block's dirty bit *before* it reads the block, so a
//! write that lands afterwards makes it dirty again. When the map is empty, every block's
//! last shipped content is its content at that instant, so a barrier sent then closes a
//! crash-consistent epoch.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{Notify, watch};

use crate::dirty::{BLOCK, DEFAULT_FINE_BUDGET, DirtyMap};
use crate::volume::Volume;

/// Default capture buffer: changes are sent from memory up to this many bytes.
pub const DEFAULT_BUFFER: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("disk index {disk} does not exist (the agent replicates {count} disks)")]
    NoSuchDisk { disk: usize, count: usize },
    #[error(
        "write of {len} bytes at offset {offset} is beyond the end of disk {disk} ({size} bytes)"
    )]
    OutOfRange {
        disk: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("cannot write to volume {disk}")]
    Io {
        disk: String,
        #[source]
        source: io::Error,
    },
}

/// A handle on an agent's write capture; cheap to clone, shareable between writers.
#[derive(Debug, Clone)]
pub struct Capture {
    shared: Arc<CaptureShared>,
}

#[derive(Debug)]
pub(crate) struct CaptureShared {
    volumes: Vec<Volume>,
    writable: Vec<OnceLock<File>>,
    /// Per disk: held from a write's volume I/O until it is recorded, so that the buffer
    /// keeps the copy the volume ends up with when two writes to one block race.
    write_order: Vec<Mutex<()>>,
    state: Mutex<CaptureState>,
    /// Woken on every captured write and flush request.
    pub(crate) changed: Notify,
    /// The capture write sequence number made durable at a consistent point.
    durable_writes: watch::Sender<u64>,
    buffer_limit: usize,
}

#[derive(Debug)]
struct CaptureState {
    dirty: DirtyMap,
    cache: HashMap<(usize, u64), Box<[u8]>>,
    cache_bytes: usize,
    /// Per disk: writes at or above this offset will be read by the initial sync.
    cursors: Vec<u64>,
    /// Per disk: how far the initial sync has *sent*. The sync reads ahead, so a change
    /// between here and the cursor must wait until the chunk it overwrites has been sent
    /// (the same stream then delivers the chunk first). `u64::MAX` when not syncing.
    sync_sent: Vec<u64>,
    /// Captured writes completed so far.
    write_seq: u64,
    /// Runs sent and not yet durable: (epoch, disk, offset, len). Marked dirty again if
    /// the session ends before they are durable.
    unacked: VecDeque<(u64, usize, u64, u64)>,
    unacked_bytes: u64,
    flush_requested: bool,
    /// The disk [`CaptureShared::take_run`] looks at first, rotating so no disk starves.
    next_disk: usize,
}

/// A run of changed bytes taken from the dirty map, with its data when every block was
/// in the buffer.
#[derive(Debug)]
pub(crate) struct TakenRun {
    pub(crate) disk: usize,
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) data: Option<Vec<u8>>,
}

impl Capture {
    pub(crate) fn new(volumes: &[Volume], buffer_limit: usize) -> Self {
        let sizes: Vec<u64> = volumes.iter().map(|v| v.size).collect();
        Self {
            shared: Arc::new(CaptureShared {
                volumes: volumes.to_vec(),
                writable: volumes.iter().map(|_| OnceLock::new()).collect(),
                write_order: volumes.iter().map(|_| Mutex::new(())).collect(),
                state: Mutex::new(CaptureState {
                    dirty: DirtyMap::new(&sizes, DEFAULT_FINE_BUDGET),
                    cache: HashMap::new(),
                    cache_bytes: 0,
                    // Until a session says where each initial sync resumes, every write
                    // is a change.
                    sync_sent: vec![u64::MAX; sizes.len()],
                    cursors: sizes,
                    write_seq: 0,
                    unacked: VecDeque::new(),
                    unacked_bytes: 0,
                    flush_requested: false,
                    next_disk: 0,
                }),
                changed: Notify::new(),
                durable_writes: watch::channel(0).0,
                buffer_limit,
            }),
        }
    }

    pub(crate) fn shared(&self) -> &Arc<CaptureShared> {
        &self.shared
    }

    /// Writes `data` at `offset` of disk number `disk` (its position in the agent's
    /// volume list) to the source volume, and captures it for the receiver. Returns once
    /// the volume has the data (not necessarily on stable storage: see [`Self::flush`]).
    pub async fn write(&self, disk: usize, offset: u64, data: Vec<u8>) -> Result<(), CaptureError> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || shared.write(disk, offset, &data))
            .await
            .map_err(|e| CaptureError::Io {
                disk: format!("#{disk}"),
                source: io::Error::other(e),
            })?
    }

    /// Makes `len` bytes at `offset` read as zeros on the source volume, and captures
    /// that (the zeros travel as zero-fill frames without payload).
    pub async fn write_zeroes(
        &self,
        disk: usize,
        offset: u64,
        len: u64,
    ) -> Result<(), CaptureError> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || shared.write_zeroes(disk, offset, len))
            .await
            .map_err(|e| CaptureError::Io {
                disk: format!("#{disk}"),
                source: io::Error::other(e),
            })?
    }

    /// Syncs the source volumes (fdatasync) and asks the sender to close an epoch soon,
    /// without waiting for the receiver. Returns the capture write sequence number that
    /// [`Self::wait_durable`] can wait for.
    pub async fn flush_local(&self) -> Result<u64, CaptureError> {
        let shared = Arc::clone(&self.shared);
        let target = tokio::task::spawn_blocking(move || shared.flush_local())
            .await
            .map_err(|e| CaptureError::Io {
                disk: "?".into(),
                source: io::Error::other(e),
            })??;
        self.shared.changed.notify_waiters();
        Ok(target)
    }

    /// How many writes have been captured so far; with [`Self::wait_durable`], how long
    /// they take to reach the receiver (the replication lag).
    pub fn write_seq(&self) -> u64 {
        self.shared.lock().write_seq
    }

    /// Waits until every capture write up to `write_seq` is durable at the receiver at a
    /// consistent point.
    pub async fn wait_durable(&self, write_seq: u64) {
        let mut durable = self.shared.durable_writes.subscribe();
        let _ = durable.wait_for(|&d| d >= write_seq).await;
    }

    /// Makes every write captured so far durable: on the source volume (fdatasync) and
    /// at the receiver, at a consistent point. Waits for the receiver, so it returns only
    /// while an agent session is running and once every disk's initial sync is complete.
    pub async fn flush(&self) -> Result<(), CaptureError> {
        let target = self.flush_local().await?;
        self.wait_durable(target).await;
        Ok(())
    }

    /// The disks, in the order their indices refer to.
    pub fn volumes(&self) -> &[Volume] {
        &self.shared.volumes
    }

    /// Bytes changed and not yet durable at the receiver (dirty, or sent and unacknowledged).
    pub fn backlog_bytes(&self) -> u64 {
        self.shared.backlog_bytes()
    }

    /// Bytes of changes held in memory.
    pub fn buffered_bytes(&self) -> usize {
        self.shared.lock().cache_bytes
    }
}

impl CaptureShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, CaptureState> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn volume_file(&self, disk: usize) -> Result<&File, CaptureError> {
        let volume = &self.volumes[disk];
        if let Some(file) = self.writable[disk].get() {
            return Ok(file);
        }
        let file = OpenOptions::new()
            .write(true)
            .open(volume.path())
            .map_err(|source| CaptureError::Io {
                disk: volume.name.clone(),
                source,
            })?;
        Ok(self.writable[disk].get_or_init(|| file))
    }

    /// The volume a write addresses, if the write fits it.
    fn target(&self, disk: usize, offset: u64, len: u64) -> Result<&Volume, CaptureError> {
        let volume = self.volumes.get(disk).ok_or(CaptureError::NoSuchDisk {
            disk,
            count: self.volumes.len(),
        })?;
        if offset.checked_add(len).is_none_or(|end| end > volume.size) {
            return Err(CaptureError::OutOfRange {
                disk: volume.name.clone(),
                offset,
                len,
                size: volume.size,
            });
        }
        Ok(volume)
    }

    fn write(&self, disk: usize, offset: u64, data: &[u8]) -> Result<(), CaptureError> {
        let len = data.len() as u64;
        let volume = self.target(disk, offset, len)?;
        if data.is_empty() {
            return Ok(());
        }
        // The volume first: the dirty bit must never be set (and cleared by the sender)
        // before the data it stands for is readable.
        let _order = self.write_order[disk]
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        self.volume_file(disk)?
            .write_all_at(data, offset)
            .map_err(|source| CaptureError::Io {
                disk: volume.name.clone(),
                source,
            })?;
        self.record(disk, offset, len, Some(data));
        Ok(())
    }

    fn write_zeroes(&self, disk: usize, offset: u64, len: u64) -> Result<(), CaptureError> {
        let volume = self.target(disk, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _order = self.write_order[disk]
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let file = self.volume_file(disk)?;
        let zeros = vec![0u8; (len.min(1 << 20)) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], at)
                .map_err(|source| CaptureError::Io {
                    disk: volume.name.clone(),
                    source,
                })?;
            at += n as u64;
        }
        self.record(disk, offset, len, None);
        Ok(())
    }

    /// Marks a completed volume write dirty (below the sync cursor) and buffers whole
    /// blocks of `data` while the buffer has room.
    fn record(&self, disk: usize, offset: u64, len: u64, data: Option<&[u8]>) {
        let size = self.volumes[disk].size;
        let mut state = self.lock();
        let cursor = state.cursors[disk];
        let end = offset + len;
        if offset < cursor {
            let marked_end = end.min(cursor);
            state.dirty.mark(disk, offset, marked_end - offset);
            let first = offset / BLOCK;
            let last = (marked_end - 1) / BLOCK;
            for block in first..=last {
                let (b_start, b_end) = (block * BLOCK, ((block + 1) * BLOCK).min(size));
                let whole = b_start >= offset && b_end <= end;
                let old = state.cache.remove(&(disk, block));
                if let Some(old) = old {
                    state.cache_bytes -= old.len();
                }
                let room = state.cache_bytes + (b_end - b_start) as usize <= self.buffer_limit;
                if let (true, true, Some(data)) = (whole, room, data) {
                    let from = (b_start - offset) as usize;
                    let copy: Box<[u8]> = data[from..from + (b_end - b_start) as usize].into();
                    state.cache_bytes += copy.len();
                    state.cache.insert((disk, block), copy);
                }
            }
        }
        state.write_seq += 1;
        drop(state);
        self.changed.notify_waiters();
    }

    /// fdatasync of every volume written to; returns the write sequence it covers and
    /// asks the sender to close an epoch.
    fn flush_local(&self) -> Result<u64, CaptureError> {
        let target = self.lock().write_seq;
        for (disk, file) in self.writable.iter().enumerate() {
            if let Some(file) = file.get() {
                file.sync_data().map_err(|source| CaptureError::Io {
                    disk: self.volumes[disk].name.clone(),
                    source,
                })?;
            }
        }
        self.lock().flush_requested = true;
        Ok(target)
    }

    pub(crate) fn backlog_bytes(&self) -> u64 {
        let state = self.lock();
        state.dirty.total_dirty_bytes() + state.unacked_bytes
    }

    /// Sets where disk `disk`'s initial sync will read next. Writes below are changes.
    pub(crate) fn set_cursor(&self, disk: usize, cursor: u64) {
        self.lock().cursors[disk] = cursor;
    }

    /// Records how far disk `disk`'s initial sync has sent (`u64::MAX`: not syncing).
    pub(crate) fn set_sync_sent(&self, disk: usize, sent: u64) {
        self.lock().sync_sent[disk] = sent;
    }

    /// Takes the next changed run of any disk, at most `max_len` bytes (or one coarse
    /// chunk), cleared from the dirty map *before* its data is read, and recorded as sent
    /// in `epoch` (so that a failure from here on marks it dirty again).
    pub(crate) fn take_run(&self, max_len: u64, epoch: u64) -> Option<TakenRun> {
        // Runs ahead of a sync's sent position are put back; a few tries per disk find
        // the runs behind it, the rest wait for the sync to move on.
        const TRIES: usize = 16;
        let mut state = self.lock();
        let count = self.volumes.len();
        for i in 0..count {
            let disk = (state.next_disk + i) % count;
            for _ in 0..TRIES {
                if state.dirty.dirty_bytes(disk) == 0 {
                    break;
                }
                let Some((offset, len)) = state.dirty.pop_run(disk, max_len) else {
                    break;
                };
                if offset + len > state.sync_sent[disk] {
                    state.dirty.mark(disk, offset, len);
                    continue;
                }
                state.next_disk = (disk + 1) % count;
                let mut data = Vec::with_capacity(len as usize);
                let mut complete = true;
                for block in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
                    match state.cache.remove(&(disk, block)) {
                        Some(copy) => {
                            state.cache_bytes -= copy.len();
                            if complete {
                                data.extend_from_slice(&copy);
                            }
                        }
                        None => complete = false,
                    }
                }
                state.unacked.push_back((epoch, disk, offset, len));
                state.unacked_bytes += len;
                let data = (complete && data.len() as u64 == len).then_some(data);
                return Some(TakenRun {
                    disk,
                    offset,
                    len,
                    data,
                });
            }
        }
        None
    }

    /// Reads a run from its volume (when the buffer no longer had it).
    pub(crate) fn read_volume(&self, disk: usize, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let volume = &self.volumes[disk];
        let file = File::open(volume.path())?;
        let mut data = vec![0; len as usize];
        file.read_exact_at(&mut data, offset)?;
        Ok(data)
    }

    /// Epoch `epoch` is durable: its runs need no resending.
    pub(crate) fn durable_through(&self, epoch: u64) {
        let mut state = self.lock();
        while let Some(&(e, _, _, len)) = state.unacked.front() {
            if e > epoch {
                break;
            }
            state.unacked.pop_front();
            state.unacked_bytes -= len;
        }
    }

    /// The session ended: runs sent but not durable are changes again.
    pub(crate) fn session_ended(&self) {
        let mut state = self.lock();
        let runs: Vec<_> = state.unacked.drain(..).collect();
        state.unacked_bytes = 0;
        for (_, disk, offset, len) in runs {
            state.dirty.mark(disk, offset, len);
        }
    }

    /// Whether nothing is dirty now; if so, the write sequence number that a barrier sent
    /// now covers, and whether a flush asked for one.
    pub(crate) fn quiescent(&self) -> Option<(u64, bool)> {
        let mut state = self.lock();
        if state.dirty.total_dirty_bytes() > 0 {
            return None;
        }
        let flush = std::mem::take(&mut state.flush_requested);
        Some((state.write_seq, flush))
    }

    /// Asks the sender to close an epoch as soon as it can.
    pub(crate) fn request_flush(&self) {
        self.lock().flush_requested = true;
    }

    /// Every write up to `write_seq` is durable at a consistent point.
    pub(crate) fn writes_durable(&self, write_seq: u64) {
        self.durable_writes.send_if_modified(|d| {
            let advanced = write_seq > *d;
            *d = (*d).max(write_seq);
            advanced
        });
    }
}
