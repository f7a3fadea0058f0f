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
//!
//! Under a sustained workload the map may never be empty, so on a regular interval (and on
//! every flush) the sender *freezes* it: the dirty runs become a [`Frozen`] generation and
//! new writes go to a fresh map. The frozen generation must be shipped with its content as
//! of the freeze, so a write that would overwrite a block still waiting in it first copies
//! the block's old content aside (copy-on-write, out of the same byte budget as the
//! buffer). Once the generation is shipped, a barrier closes its epoch: a crash-consistent
//! point although writes never stopped. If the old content does not fit in the buffer, or
//! the backlog has too many runs to freeze, the generation is dissolved back into the map
//! and the next consistent point comes when the map drains: more lag, never a wrong point.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{Notify, watch};

use crate::dirty::{BLOCK, DEFAULT_FINE_BUDGET, DirtyMap};
use crate::volume::Volume;

/// Default capture buffer: changes are sent from memory up to this many bytes.
pub const DEFAULT_BUFFER: usize = 256 << 20;

/// A backlog of more runs than this is not frozen: its list would cost more memory than
/// the dirty map itself, and it would take long to ship anyway.
const MAX_FROZEN_RUNS: usize = 16 << 10;
/// Longest run the dirty map hands out (one coarse chunk); bounds the overlap search.
const MAX_RUN: u64 = 4 << 20;

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
    #[error("the agent is stopping: writes to {disk} are no longer accepted")]
    Stopping { disk: String },
    #[error("cannot write to volume {disk}")]
    Io {
        disk: String,
        #[source]
        source: io::Error,
    },
}

/// A point copied under a freeze.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CopiedPoint {
    /// Bytes copied into the frozen generation (0: nothing was dirty).
    pub(crate) bytes: u64,
    /// The capture write sequence number the point covers.
    pub(crate) write_seq: u64,
}

/// Why a frozen point could not be copied.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CopyError {
    #[error("a generation is still being shipped")]
    Busy,
    #[error("{dirty} bytes are dirty, more than the capture buffer's {room} free bytes can copy")]
    TooMuch { dirty: u64, room: u64 },
    #[error("the backlog has more runs than a generation may hold")]
    TooManyRuns,
    #[error("the dirty blocks could not be read within the freeze window ({copied} bytes copied)")]
    Timeout { copied: u64 },
    #[error("cannot read volume {disk}")]
    Read {
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
    /// The generation being shipped for the next consistent point, if any.
    frozen: Option<Frozen>,
    /// Counts freezes, so that a copy made for one generation is never filed in another.
    generation: u64,
    /// Set at shutdown: the dirty map is about to be saved, so no write may change it.
    sealed: bool,
}

/// One disk's share of the backlog, for heartbeats.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DiskBacklog {
    pub(crate) to_send: u64,
    pub(crate) in_flight: u64,
    pub(crate) buffered: u64,
}

/// The dirty runs of one closed interval, shipped with their content as of the freeze.
#[derive(Debug)]
struct Frozen {
    /// Runs not yet taken by the sender, by (disk, offset), with their lengths.
    runs: BTreeMap<(usize, u64), u64>,
    /// Runs taken whose volume read may still be in progress.
    reading: Vec<(usize, u64, u64)>,
    /// Blocks' content as of the freeze: the buffer's copies at that moment, and the old
    /// content of blocks overwritten since (copy-on-write).
    cache: HashMap<(usize, u64), Box<[u8]>>,
    /// The capture write sequence number at the freeze: what the generation covers.
    write_seq: u64,
    generation: u64,
}

impl Frozen {
    /// Whether block `block` of `disk` still has to be shipped from this generation.
    fn pending(&self, disk: usize, block: u64) -> bool {
        let at = block * BLOCK;
        let in_runs = self
            .runs
            .range((disk, at.saturating_sub(MAX_RUN))..=(disk, at))
            .any(|(&(_, offset), &len)| at < offset + len);
        in_runs
            || self
                .reading
                .iter()
                .any(|&(d, offset, len)| d == disk && at >= offset && at < offset + len)
    }
}

/// Where the generation being shipped stands, for the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GenerationState {
    /// No frozen generation: the next consistent point comes when the map drains, or
    /// when the sender freezes one.
    Open,
    /// A frozen generation still has runs to ship.
    Shipping,
    /// Every run of the frozen generation has been sent: a barrier now closes a
    /// consistent epoch covering capture writes up to this sequence number.
    Shipped(u64),
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
                    frozen: None,
                    generation: 0,
                    sealed: false,
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
        // Read too: copy-on-write for a frozen generation reads old content through it.
        let file = OpenOptions::new()
            .read(true)
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
        self.prepare_write(disk, offset, len)?;
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
        self.prepare_write(disk, offset, len)?;
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

    /// Stops accepting writes (they fail with [`CaptureError::Stopping`]) so that the
    /// dirty map can be saved complete. Waits for writes in progress to be recorded.
    pub(crate) fn seal(&self) {
        self.lock().sealed = true;
        for order in &self.write_order {
            drop(order.lock().unwrap_or_else(|poison| poison.into_inner()));
        }
    }

    /// Marks `[offset, offset + len)` of `disk` as changed, whatever the sync cursor: a
    /// restored state record or a rescan found it different from the receiver's copy.
    pub(crate) fn mark_dirty(&self, disk: usize, offset: u64, len: u64) {
        let mut state = self.lock();
        state.dirty.mark(disk, offset, len);
        // A buffered copy may predate whatever made the block differ; the volume decides.
        for block in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
            if let Some(copy) = state.cache.remove(&(disk, block)) {
                state.cache_bytes -= copy.len();
            }
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Whether `disk` has nothing waiting to be sent (neither in the map nor frozen).
    pub(crate) fn disk_clean(&self, disk: usize) -> bool {
        let state = self.lock();
        state.dirty.dirty_bytes(disk) == 0
            && state.frozen.as_ref().is_none_or(|f| {
                !f.runs.keys().any(|&(d, _)| d == disk) && !f.reading.iter().any(|r| r.0 == disk)
            })
    }

    /// Every disk's dirty runs (after [`Self::session_ended`] has put back what was
    /// unacknowledged), for the state record. The map is left as it was.
    pub(crate) fn dirty_runs(&self) -> Vec<Vec<(u64, u64)>> {
        let mut state = self.lock();
        dissolve(&mut state);
        let mut all = Vec::with_capacity(self.volumes.len());
        for disk in 0..self.volumes.len() {
            let mut runs = Vec::new();
            while let Some(run) = state.dirty.pop_run(disk, MAX_RUN) {
                runs.push(run);
            }
            for &(offset, len) in &runs {
                state.dirty.mark(disk, offset, len);
            }
            runs.sort_unstable();
            all.push(runs);
        }
        all
    }

    /// Before a write overwrites `[offset, offset + len)`: refuses it once the capture is
    /// sealed, and copies aside the current content of every block that the frozen
    /// generation still has to ship. The caller holds the disk's write-order lock, so the
    /// volume cannot change meanwhile. When the copies do not fit in the buffer, the
    /// generation is dissolved instead.
    fn prepare_write(&self, disk: usize, offset: u64, len: u64) -> Result<(), CaptureError> {
        let (generation, needed) = {
            let state = self.lock();
            if state.sealed {
                return Err(CaptureError::Stopping {
                    disk: self.volumes[disk].name.clone(),
                });
            }
            let Some(frozen) = &state.frozen else {
                return Ok(());
            };
            let needed: Vec<u64> = (offset / BLOCK..(offset + len).div_ceil(BLOCK))
                .filter(|&b| frozen.pending(disk, b) && !frozen.cache.contains_key(&(disk, b)))
                .collect();
            (frozen.generation, needed)
        };
        if needed.is_empty() {
            return Ok(());
        }
        let size = self.volumes[disk].size;
        let mut copies = Vec::with_capacity(needed.len());
        let file = self.volume_file(disk)?;
        for block in needed {
            let end = ((block + 1) * BLOCK).min(size);
            let mut copy = vec![0u8; (end - block * BLOCK) as usize].into_boxed_slice();
            file.read_exact_at(&mut copy, block * BLOCK)
                .map_err(|source| CaptureError::Io {
                    disk: self.volumes[disk].name.clone(),
                    source,
                })?;
            copies.push((block, copy));
        }
        let mut state = self.lock();
        let state = &mut *state;
        let Some(frozen) = state.frozen.as_mut().filter(|f| f.generation == generation) else {
            return Ok(());
        };
        let bytes: usize = copies.iter().map(|(_, c)| c.len()).sum();
        if state.cache_bytes + bytes > self.buffer_limit {
            tracing::debug!(
                disk = %self.volumes[disk].name,
                "the capture buffer cannot hold the frozen generation's old content; \
                 the next consistent point waits for the backlog to drain"
            );
            dissolve(state);
            return Ok(());
        }
        for (block, copy) in copies {
            // The sender may have shipped the block meanwhile (from the unchanged volume).
            if frozen.pending(disk, block) && !frozen.cache.contains_key(&(disk, block)) {
                state.cache_bytes += copy.len();
                frozen.cache.insert((disk, block), copy);
            }
        }
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
    /// Makes everything written to the source volumes so far durable there: through the
    /// capture's own handles and through the volumes' (writes the workload made behind
    /// the capture). What the receiver acknowledges must never be newer than what the
    /// source itself keeps after a power loss.
    pub(crate) fn sync_sources(&self) -> Result<(), CaptureError> {
        for (disk, volume) in self.volumes.iter().enumerate() {
            let synced = match self.writable[disk].get() {
                Some(file) => file.sync_data().and_then(|()| volume.sync()),
                None => volume.sync(),
            };
            synced.map_err(|source| CaptureError::Io {
                disk: volume.name.clone(),
                source,
            })?;
        }
        Ok(())
    }

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

    /// Per disk: bytes to send (dirty or frozen), bytes sent and not yet durable, and
    /// bytes held in the buffer. What is to send and not held must be re-read from the
    /// volume.
    pub(crate) fn disk_backlogs(&self) -> Vec<DiskBacklog> {
        let state = self.lock();
        let mut disks: Vec<DiskBacklog> = (0..self.volumes.len())
            .map(|disk| DiskBacklog {
                to_send: state.dirty.dirty_bytes(disk),
                ..DiskBacklog::default()
            })
            .collect();
        if let Some(frozen) = &state.frozen {
            for (&(disk, _), &len) in &frozen.runs {
                disks[disk].to_send += len;
            }
            for &(disk, _, len) in &frozen.reading {
                disks[disk].to_send += len;
            }
        }
        for &(_, disk, _, len) in &state.unacked {
            disks[disk].in_flight += len;
        }
        for (&(disk, _), block) in &state.cache {
            disks[disk].buffered += block.len() as u64;
        }
        disks
    }

    pub(crate) fn backlog_bytes(&self) -> u64 {
        let state = self.lock();
        let frozen: u64 = state.frozen.as_ref().map_or(0, |f| f.runs.values().sum());
        state.dirty.total_dirty_bytes() + frozen + state.unacked_bytes
    }

    /// Sets where disk `disk`'s initial sync will read next. Writes below are changes.
    pub(crate) fn set_cursor(&self, disk: usize, cursor: u64) {
        self.lock().cursors[disk] = cursor;
    }

    /// Records how far disk `disk`'s initial sync has sent (`u64::MAX`: not syncing).
    pub(crate) fn set_sync_sent(&self, disk: usize, sent: u64) {
        self.lock().sync_sent[disk] = sent;
    }

    /// Takes the next changed run, at most `max_len` bytes (or one coarse chunk), and
    /// records it as sent in `epoch` (so that a failure from here on marks it dirty
    /// again). Runs of the frozen generation come first; otherwise a run of any disk is
    /// cleared from the dirty map *before* its data is read. When `data` is `None`, the
    /// caller reads the run from the volume and passes it to [`Self::finish_read`].
    pub(crate) fn take_run(&self, max_len: u64, epoch: u64) -> Option<TakenRun> {
        let mut state = self.lock();
        let state = &mut *state;
        if let Some(frozen) = &mut state.frozen {
            let ((disk, offset), len) = frozen.runs.pop_first()?;
            let blocks = offset / BLOCK..(offset + len).div_ceil(BLOCK);
            let complete = blocks
                .clone()
                .all(|b| frozen.cache.contains_key(&(disk, b)));
            let data = if complete {
                let mut data = Vec::with_capacity(len as usize);
                for copy in blocks.filter_map(|b| frozen.cache.remove(&(disk, b))) {
                    state.cache_bytes -= copy.len();
                    data.extend_from_slice(&copy);
                }
                Some(data)
            } else {
                // The copies stay until the read is done: a write meanwhile must find
                // them (or make them) so that the read's result can be corrected.
                frozen.reading.push((disk, offset, len));
                None
            };
            state.unacked.push_back((epoch, disk, offset, len));
            state.unacked_bytes += len;
            return Some(TakenRun {
                disk,
                offset,
                len,
                data,
            });
        }
        // Runs ahead of a sync's sent position are put back; a few tries per disk find
        // the runs behind it, the rest wait for the sync to move on.
        const TRIES: usize = 16;
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
        let mut data = vec![0; len as usize];
        self.volumes[disk].read_exact_at(&mut data, offset)?;
        Ok(data)
    }

    /// Completes a run read from the volume: blocks of a frozen run that were overwritten
    /// since the freeze get their frozen content back.
    pub(crate) fn finish_read(&self, run: &TakenRun, data: &mut [u8]) {
        let mut state = self.lock();
        let state = &mut *state;
        let Some(frozen) = &mut state.frozen else {
            return;
        };
        let Some(at) = frozen
            .reading
            .iter()
            .position(|&r| r == (run.disk, run.offset, run.len))
        else {
            return;
        };
        frozen.reading.swap_remove(at);
        for block in run.offset / BLOCK..(run.offset + run.len).div_ceil(BLOCK) {
            if let Some(copy) = frozen.cache.remove(&(run.disk, block)) {
                state.cache_bytes -= copy.len();
                let from = (block * BLOCK - run.offset) as usize;
                data[from..from + copy.len()].copy_from_slice(&copy);
            }
        }
    }

    /// Closes the current interval: the dirty runs become the frozen generation, which
    /// the sender ships before anything written later. Returns whether it froze (not
    /// when a generation is already being shipped, nothing is dirty, or the backlog has
    /// too many runs).
    pub(crate) fn freeze(&self) -> bool {
        let mut state = self.lock();
        let state = &mut *state;
        if state.frozen.is_some() || state.dirty.total_dirty_bytes() == 0 {
            return false;
        }
        let mut runs = BTreeMap::new();
        for disk in 0..self.volumes.len() {
            while let Some((offset, len)) = state.dirty.pop_run(disk, MAX_RUN) {
                runs.insert((disk, offset), len);
                if runs.len() > MAX_FROZEN_RUNS {
                    for ((disk, offset), len) in runs {
                        state.dirty.mark(disk, offset, len);
                    }
                    return false;
                }
            }
        }
        state.flush_requested = false;
        state.generation += 1;
        state.frozen = Some(Frozen {
            runs,
            reading: Vec::new(),
            cache: std::mem::take(&mut state.cache),
            write_seq: state.write_seq,
            generation: state.generation,
        });
        true
    }

    /// While the volumes cannot change (their file systems are frozen): makes every
    /// dirty run the frozen generation and reads its content from the volumes now, so
    /// that it ships as of this instant whatever is written after the thaw. Returns the
    /// bytes copied; `Ok(0)` when nothing is dirty (every block's last shipped content is
    /// already its content now). Gives the generation up (back to the dirty map) when it
    /// cannot be copied by `deadline`, would not fit the buffer, or a volume read fails.
    pub(crate) fn freeze_copied(
        &self,
        deadline: std::time::Instant,
    ) -> Result<CopiedPoint, CopyError> {
        let write_seq = {
            let state = self.lock();
            if state.frozen.is_some() {
                return Err(CopyError::Busy);
            }
            let dirty = state.dirty.total_dirty_bytes();
            if dirty == 0 {
                return Ok(CopiedPoint {
                    bytes: 0,
                    write_seq: state.write_seq,
                });
            }
            let room = self.buffer_limit.saturating_sub(state.cache_bytes) as u64;
            if dirty > room {
                return Err(CopyError::TooMuch { dirty, room });
            }
            state.write_seq
        };
        if !self.freeze() {
            return Err(CopyError::TooManyRuns);
        }
        let (generation, runs): (u64, Vec<(usize, u64, u64)>) = {
            let state = self.lock();
            let frozen = state.frozen.as_ref().expect("just frozen");
            let runs = frozen.runs.iter().map(|(&(d, o), &l)| (d, o, l)).collect();
            (frozen.generation, runs)
        };
        let mut copied = 0;
        for (disk, offset, len) in runs {
            if std::time::Instant::now() >= deadline {
                self.abandon_generation(generation);
                return Err(CopyError::Timeout { copied });
            }
            let data = match self.read_volume(disk, offset, len) {
                Ok(data) => data,
                Err(source) => {
                    self.abandon_generation(generation);
                    return Err(CopyError::Read {
                        disk: self.volumes[disk].name.clone(),
                        source,
                    });
                }
            };
            let mut state = self.lock();
            let state = &mut *state;
            let Some(frozen) = state.frozen.as_mut().filter(|f| f.generation == generation) else {
                return Err(CopyError::Busy);
            };
            // What the volume holds now is the truth: it replaces any buffered copy.
            for (i, block) in (offset / BLOCK..(offset + len).div_ceil(BLOCK)).enumerate() {
                let from = i * BLOCK as usize;
                let to = (from + BLOCK as usize).min(data.len());
                let copy: Box<[u8]> = data[from..to].into();
                state.cache_bytes += copy.len();
                if let Some(old) = frozen.cache.insert((disk, block), copy) {
                    state.cache_bytes -= old.len();
                }
            }
            copied += len;
        }
        Ok(CopiedPoint {
            bytes: copied,
            write_seq,
        })
    }

    /// Gives up generation `generation` (if it is still the frozen one): its runs are
    /// dirty again and its epoch closes only as an ordinary, not consistent, one.
    pub(crate) fn abandon_generation(&self, generation: u64) {
        let mut state = self.lock();
        if state
            .frozen
            .as_ref()
            .is_some_and(|f| f.generation == generation)
        {
            dissolve(&mut state);
        }
    }

    /// The generation number of the frozen generation, if any.
    pub(crate) fn frozen_generation(&self) -> Option<u64> {
        self.lock().frozen.as_ref().map(|f| f.generation)
    }

    /// Where the frozen generation stands; a [`GenerationState::Shipped`] generation is
    /// forgotten, since the caller now closes its epoch.
    pub(crate) fn generation_state(&self) -> GenerationState {
        let mut state = self.lock();
        match &state.frozen {
            None => GenerationState::Open,
            Some(f) if !f.runs.is_empty() || !f.reading.is_empty() => GenerationState::Shipping,
            Some(f) => {
                let write_seq = f.write_seq;
                let leftover: usize = f.cache.values().map(|c| c.len()).sum();
                state.cache_bytes -= leftover;
                state.frozen = None;
                GenerationState::Shipped(write_seq)
            }
        }
    }

    /// Whether a flush asked for a consistent point that has not been started yet.
    pub(crate) fn flush_requested(&self) -> bool {
        self.lock().flush_requested
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

    /// The session ended: runs sent but not durable are changes again, and so is the
    /// frozen generation (its epoch can no longer be closed).
    pub(crate) fn session_ended(&self) {
        let mut state = self.lock();
        dissolve(&mut state);
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
        if state.dirty.total_dirty_bytes() > 0 || state.frozen.is_some() {
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

/// Gives up the frozen generation: its unsent runs go back to the dirty map, and copies
/// that are still the blocks' current content go back to the buffer. Runs already sent in
/// its epoch stay sent; that epoch now closes only when the map drains.
fn dissolve(state: &mut CaptureState) {
    let Some(frozen) = state.frozen.take() else {
        return;
    };
    for (key, copy) in frozen.cache {
        // A copy is still the block's content if the block was not written since the
        // freeze (it would be dirty again) and is still to be sent. Copies for reads in
        // progress are dropped: those reads now ship whatever they find, in an epoch that
        // closes only when the map drains.
        let unsent = frozen
            .runs
            .range((key.0, (key.1 * BLOCK).saturating_sub(MAX_RUN))..=(key.0, key.1 * BLOCK))
            .any(|(&(_, offset), &len)| key.1 * BLOCK < offset + len);
        if unsent && !state.dirty.is_dirty(key.0, key.1 * BLOCK) && !state.cache.contains_key(&key)
        {
            state.cache.insert(key, copy);
        } else {
            state.cache_bytes -= copy.len();
        }
    }
    for ((disk, offset), len) in frozen.runs {
        state.dirty.mark(disk, offset, len);
    }
}

#[cfg(test)]
mod tests {
    //! The generations against a model: a receiver image that applies every run in the
    //! order the sender takes it must, at every consistent point, equal the source
    //! volume as it was when that point's generation was frozen (or, for a point cut
    //! when the map drained, as it is then), whatever writes race with the sender.

    use super::*;
    use proptest::prelude::*;

    const BLOCKS: u64 = 48;

    #[derive(Debug, Clone)]
    enum Op {
        Write {
            block: u64,
            blocks: u64,
            byte: u8,
        },
        Zero {
            block: u64,
            blocks: u64,
        },
        /// The sender takes a run; when it must read the volume, these writes land
        /// between taking the run and reading it (the worst moment).
        Take {
            racing: Vec<(u64, u8)>,
        },
        Freeze,
        Close,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..BLOCKS, 1..6u64, 1..=255u8).prop_map(|(block, blocks, byte)| Op::Write { block, blocks, byte }),
            1 => (0..BLOCKS, 1..4u64).prop_map(|(block, blocks)| Op::Zero { block, blocks }),
            4 => proptest::collection::vec((0..BLOCKS, 1..=255u8), 0..3).prop_map(|racing| Op::Take { racing }),
            1 => Just(Op::Freeze),
            2 => Just(Op::Close),
        ]
    }

    struct Model {
        shared: Arc<CaptureShared>,
        path: std::path::PathBuf,
        image: Vec<u8>,
        epoch: u64,
        /// The volume's content at the freeze of the generation being shipped.
        frozen_at: Option<Vec<u8>>,
        /// Consistent points closed by a shipped generation.
        points: usize,
    }

    impl Model {
        fn volume(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }

        fn write(&self, block: u64, blocks: u64, byte: u8) {
            let blocks = blocks.min(BLOCKS - block);
            let data = vec![byte; (blocks * BLOCK) as usize];
            self.shared.write(0, block * BLOCK, &data).unwrap();
        }

        fn take(&mut self, racing: &[(u64, u8)]) {
            let Some(run) = self.shared.take_run(1 << 20, self.epoch) else {
                return;
            };
            let data = match run.data.clone() {
                Some(data) => data,
                None => {
                    for &(block, byte) in racing {
                        self.write(block, 1, byte);
                    }
                    let mut data = self.shared.read_volume(0, run.offset, run.len).unwrap();
                    self.shared.finish_read(&run, &mut data);
                    data
                }
            };
            let at = run.offset as usize;
            self.image[at..at + data.len()].copy_from_slice(&data);
        }

        fn close(&mut self) {
            match self.shared.generation_state() {
                GenerationState::Shipped(_) => {
                    let expected = self.frozen_at.take().expect("a generation was frozen");
                    assert!(
                        self.image == expected,
                        "a frozen generation shipped content other than its own"
                    );
                    self.epoch += 1;
                    self.points += 1;
                }
                GenerationState::Shipping => {}
                GenerationState::Open => {
                    if self.shared.quiescent().is_some() {
                        assert!(
                            self.image == self.volume(),
                            "the map drained but the image differs"
                        );
                        self.epoch += 1;
                    }
                }
            }
        }

        /// A dissolved generation has no point of its own any more.
        fn forget_dissolved(&mut self) {
            if self.shared.lock().frozen.is_none() {
                self.frozen_at = None;
            }
        }
    }

    fn check(ops: &[Op], buffer: usize) -> usize {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk0.img");
        std::fs::write(&path, vec![0u8; (BLOCKS * BLOCK) as usize]).unwrap();
        let volume = Volume::open(&format!("disk0={}", path.display())).unwrap();
        let capture = Capture::new(&[volume], buffer);
        let mut model = Model {
            shared: Arc::clone(capture.shared()),
            image: vec![0u8; (BLOCKS * BLOCK) as usize],
            path,
            epoch: 1,
            frozen_at: None,
            points: 0,
        };
        for op in ops {
            match op {
                Op::Write {
                    block,
                    blocks,
                    byte,
                } => model.write(*block, *blocks, *byte),
                Op::Zero { block, blocks } => {
                    let blocks = (*blocks).min(BLOCKS - block);
                    model
                        .shared
                        .write_zeroes(0, block * BLOCK, blocks * BLOCK)
                        .unwrap();
                }
                Op::Take { racing } => model.take(racing),
                Op::Freeze => {
                    let before = model.volume();
                    if model.shared.freeze() {
                        model.frozen_at = Some(before);
                    }
                }
                Op::Close => model.close(),
            }
            model.forget_dissolved();
        }
        // Drain: everything written reaches the image, a frozen generation first.
        for _ in 0..2 {
            model.forget_dissolved();
            while let Some(run) = model.shared.take_run(1 << 20, model.epoch) {
                let mut data = match run.data.clone() {
                    Some(data) => data,
                    None => model.shared.read_volume(0, run.offset, run.len).unwrap(),
                };
                model.shared.finish_read(&run, &mut data);
                let at = run.offset as usize;
                model.image[at..at + data.len()].copy_from_slice(&data);
            }
            model.close();
        }
        assert!(
            model.image == model.volume(),
            "the drained image differs from the volume"
        );
        let state = model.shared.lock();
        let held: usize = state.cache.values().map(|c| c.len()).sum();
        assert_eq!(state.cache_bytes, held, "the buffer's byte count drifted");
        model.points
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn frozen_generations_ship_their_own_content(ops in proptest::collection::vec(op(), 1..120)) {
            check(&ops, 1 << 20);
        }

        #[test]
        fn a_buffer_too_small_for_copies_dissolves_but_never_lies(ops in proptest::collection::vec(op(), 1..120)) {
            check(&ops, 3 * BLOCK as usize);
        }
    }

    #[test]
    fn a_hot_block_rewritten_while_frozen_keeps_its_frozen_content() {
        let ops = [
            Op::Write {
                block: 3,
                blocks: 1,
                byte: 1,
            },
            Op::Write {
                block: 9,
                blocks: 3,
                byte: 2,
            },
            Op::Freeze,
            // Rewritten before the sender gets to it: the frozen copy must travel.
            Op::Write {
                block: 3,
                blocks: 1,
                byte: 7,
            },
            Op::Take { racing: vec![] },
            // Rewritten between the take and the read.
            Op::Take {
                racing: vec![(9, 8), (10, 9)],
            },
            Op::Close,
        ];
        // Three blocks of buffer: blocks 9-11 are not buffered, so their run is read from
        // the volume after the racing writes, and only the copies made for them can
        // correct it.
        assert_eq!(
            check(&ops, 3 * BLOCK as usize),
            1,
            "the frozen generation closed a point"
        );
        assert_eq!(
            check(&ops, 1 << 20),
            1,
            "the frozen generation closed a point"
        );
        assert_eq!(
            check(&ops, 0),
            0,
            "without room for copies the generation dissolves"
        );
    }
}
