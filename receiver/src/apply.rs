//! The apply pipeline of one session: writes are submitted to the staging stores as they
//! arrive and complete in any order, under two rules:
//!
//! - **Per-block order** (invariant 2): a write never starts while an overlapping write
//!   is in flight; it waits, so overlapping writes land in arrival order.
//! - **Bounded memory** (invariant 4): the bytes in flight are bounded per session and
//!   across the receiver; a full budget stops the session's reader, which is
//!   backpressure through TCP.
//!
//! Every write gets a sequence number; [`ApplyPipeline::wait_through`] waits until every
//! write up to a sequence number has completed, which is what a barrier needs before it
//! flushes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use crate::lock;
use blockferry_proto::{WriteFlags, WriteHeader};
use blockferry_storage::{BlockStore, Flushed, StoreError};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{Notify, Semaphore};

/// Smallest budget charge of one write, so that a flood of zero-fills (which carry no
/// data) is bounded too.
const MIN_WRITE_COST: u32 = 4096;

/// One staging disk of the session.
#[derive(Debug)]
pub(crate) struct StagingDisk {
    pub(crate) name: String,
    pub(crate) store: BlockStore,
    /// start → end of each write in flight; the ranges never overlap.
    in_flight: Mutex<BTreeMap<u64, u64>>,
    range_released: Notify,
    /// Whether the agent is rescanning this disk in this session.
    pub(crate) rescanning: std::sync::atomic::AtomicBool,
    /// Bytes compared by checksum in the current rescan.
    pub(crate) rescanned_bytes: std::sync::atomic::AtomicU64,
    /// Bytes of changes written while the rescan runs.
    pub(crate) resent_bytes: std::sync::atomic::AtomicU64,
    /// Bytes written, for metrics.
    written: Counter,
    /// Whether a write has completed since the last durable epoch took stock.
    wrote: std::sync::atomic::AtomicBool,
}

impl StagingDisk {
    pub(crate) fn new(name: String, store: BlockStore, written: Counter) -> Self {
        Self {
            name,
            store,
            written,
            wrote: std::sync::atomic::AtomicBool::new(false),
            in_flight: Mutex::new(BTreeMap::new()),
            range_released: Notify::new(),
            rescanning: std::sync::atomic::AtomicBool::new(false),
            rescanned_bytes: std::sync::atomic::AtomicU64::new(0),
            resent_bytes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Starts counting a rescan, from the counters already recorded for it.
    pub(crate) fn start_rescan(&self, rescanned: u64, resent: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.rescanned_bytes.store(rescanned, Relaxed);
        self.resent_bytes.store(resent, Relaxed);
        self.rescanning.store(true, Relaxed);
    }

    /// Whether a write completed since the last call.
    pub(crate) fn take_wrote(&self) -> bool {
        self.wrote.swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until no in-flight write overlaps `[start, end)`, then claims it.
    async fn claim(&self, start: u64, end: u64) {
        loop {
            let released = self.range_released.notified();
            tokio::pin!(released);
            // Registered before checking, so a release between the check and the await
            // still wakes us.
            released.as_mut().enable();
            {
                let mut ranges = lock(&self.in_flight);
                let overlaps = ranges
                    .range(..end)
                    .next_back()
                    .is_some_and(|(_, &other_end)| other_end > start);
                if !overlaps {
                    ranges.insert(start, end);
                    return;
                }
            }
            released.await;
        }
    }

    fn release(&self, start: u64) {
        lock(&self.in_flight).remove(&start);
        self.range_released.notify_waiters();
    }
}

#[derive(Debug, Default)]
struct Sequence {
    next: u64,
    pending: BTreeSet<u64>,
}

impl Sequence {
    /// Every write with a sequence number ≤ this has completed.
    fn completed_through(&self) -> u64 {
        self.pending
            .first()
            .map_or(self.next, |&first| first)
            .saturating_sub(1)
    }
}

#[derive(Debug)]
pub(crate) struct ApplyPipeline {
    disks: Vec<Arc<StagingDisk>>,
    budget: Arc<Semaphore>,
    budget_bytes: u32,
    global_budget: Arc<Semaphore>,
    sequence: Arc<Mutex<Sequence>>,
    completed: Arc<Notify>,
    failure: Arc<Mutex<Option<StagingFailure>>>,
    apply_seconds: Histogram,
    /// Held shared while a write takes its sequence number, and exclusively while a
    /// recovery point is copied: no write starts during a copy.
    hold: tokio::sync::RwLock<()>,
}

/// The first staging write that failed in a session.
#[derive(Debug, Clone)]
pub(crate) struct StagingFailure {
    pub(crate) disk: String,
    pub(crate) message: String,
    /// The staging file system is full: the disk stalls until space returns.
    pub(crate) out_of_space: bool,
}

impl ApplyPipeline {
    /// `budget_bytes` bounds the data in flight for this session; `global_budget` is
    /// shared by every session of the receiver.
    pub(crate) fn new(
        disks: Vec<Arc<StagingDisk>>,
        budget_bytes: u32,
        global_budget: Arc<Semaphore>,
        apply_seconds: Histogram,
    ) -> Self {
        Self {
            apply_seconds,
            disks,
            budget: Arc::new(Semaphore::new(budget_bytes as usize)),
            budget_bytes,
            global_budget,
            sequence: Arc::new(Mutex::new(Sequence {
                next: 1,
                pending: BTreeSet::new(),
            })),
            completed: Arc::new(Notify::new()),
            failure: Arc::new(Mutex::new(None)),
            hold: tokio::sync::RwLock::new(()),
        }
    }

    pub(crate) fn disks(&self) -> &[Arc<StagingDisk>] {
        &self.disks
    }

    /// Runs `f` if no write after sequence `through` has been submitted, and holds off new
    /// submissions until it returns: with every write up to `through` completed, the
    /// staging images then hold exactly what those writes made.
    pub(crate) fn if_quiescent<T>(&self, through: u64, f: impl FnOnce() -> T) -> Option<T> {
        let sequence = lock(&self.sequence);
        (sequence.next.saturating_sub(1) == through).then(f)
    }

    /// Holds off new writes while the images are exactly what the writes up to `through`
    /// made: every one of them completed and none after submitted. `None` if that is not
    /// so. New writes wait (asynchronously) until the guard is dropped.
    pub(crate) async fn quiesce(
        &self,
        through: u64,
    ) -> Option<tokio::sync::RwLockWriteGuard<'_, ()>> {
        let held = self.hold.write().await;
        let sequence = lock(&self.sequence);
        let quiet =
            sequence.next.saturating_sub(1) == through && sequence.completed_through() >= through;
        drop(sequence);
        quiet.then_some(held)
    }

    /// Reserves `bytes` of the session's and the receiver's in-flight budgets for a read
    /// (a checksum query's), waiting as a write would: the memory a session can make the
    /// receiver hold is bounded whatever it asks for.
    pub(crate) async fn reserve_read(
        &self,
        bytes: u64,
    ) -> (
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    ) {
        let cost = u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .clamp(MIN_WRITE_COST, self.budget_bytes);
        let own = Arc::clone(&self.budget)
            .acquire_many_owned(cost)
            .await
            .expect("the budget semaphore is never closed");
        let global = Arc::clone(&self.global_budget)
            .acquire_many_owned(cost)
            .await
            .expect("the global budget semaphore is never closed");
        (own, global)
    }

    /// Submits a write that the session has already validated (disk index, range, flags).
    /// Returns once the write is in flight, after waiting for budget and for overlapping
    /// writes. Returns the write's sequence number.
    pub(crate) async fn submit(&self, header: WriteHeader, data: Vec<u8>) -> u64 {
        let disk = Arc::clone(&self.disks[usize::from(header.disk)]);
        let cost = u32::try_from(data.len())
            .unwrap_or(u32::MAX)
            .clamp(MIN_WRITE_COST, self.budget_bytes);
        let permit = Arc::clone(&self.budget)
            .acquire_many_owned(cost)
            .await
            .expect("the budget semaphore is never closed");
        // The session's own budget first: one busy session queues on its own permits
        // instead of holding a share of the global budget while it waits.
        let global_permit = Arc::clone(&self.global_budget)
            .acquire_many_owned(cost)
            .await
            .expect("the global budget semaphore is never closed");
        let (start, end) = (header.offset, header.end());
        disk.claim(start, end).await;
        let seq = {
            let _hold = self.hold.read().await;
            let mut sequence = lock(&self.sequence);
            let seq = sequence.next;
            sequence.next += 1;
            sequence.pending.insert(seq);
            seq
        };
        let sequence = Arc::clone(&self.sequence);
        let completed = Arc::clone(&self.completed);
        let failure = Arc::clone(&self.failure);
        let apply_seconds = self.apply_seconds.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = if header.flags.contains(WriteFlags::ZERO_FILL) {
                disk.store.write_zeroes(start, u64::from(header.len)).await
            } else {
                disk.store.write_at(start, data).await
            };
            disk.release(start);
            match result {
                Ok(()) => {
                    apply_seconds.observe(started.elapsed().as_secs_f64());
                    disk.written.inc_by(u64::from(header.len));
                    disk.wrote.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Err(err) => record_failure(&failure, &disk.name, &err),
            }
            lock(&sequence).pending.remove(&seq);
            completed.notify_waiters();
            drop((permit, global_permit));
        });
        seq
    }

    /// The sequence number of the last write submitted.
    pub(crate) fn last_submitted(&self) -> u64 {
        lock(&self.sequence).next - 1
    }

    /// Waits until every write with a sequence number ≤ `seq` has completed.
    pub(crate) async fn wait_through(&self, seq: u64) {
        loop {
            let notified = self.completed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&self.sequence).completed_through() >= seq {
                return;
            }
            notified.await;
        }
    }

    /// The first write failure of the session, if any. After one, nothing more may be
    /// acknowledged.
    pub(crate) fn failure(&self) -> Option<StagingFailure> {
        lock(&self.failure).clone()
    }

    /// Flushes every disk of the session; the proofs are what a watermark needs. A
    /// failure names its disk.
    pub(crate) async fn flush_all(&self) -> Result<Vec<Flushed>, (String, StoreError)> {
        let mut proofs = Vec::with_capacity(self.disks.len());
        for disk in &self.disks {
            proofs.push(
                disk.store
                    .flush()
                    .await
                    .map_err(|e| (disk.name.clone(), e))?,
            );
        }
        Ok(proofs)
    }
}

fn record_failure(failure: &Mutex<Option<StagingFailure>>, disk: &str, err: &StoreError) {
    let mut slot = lock(failure);
    if slot.is_none() {
        let mut message = format!("disk {disk}: {err}");
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        tracing::error!(%message, "staging write failed");
        *slot = Some(StagingFailure {
            disk: disk.to_owned(),
            message,
            out_of_space: err.is_out_of_space(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(offset: u64, len: u32) -> WriteHeader {
        WriteHeader {
            disk: 0,
            flags: WriteFlags::default(),
            offset,
            len,
            epoch: 0,
        }
    }

    /// Through io_uring, where completions really can overtake each other: without the
    /// overlap rule, an earlier write could land after a later one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn overlapping_writes_land_in_arrival_order() {
        let dir = tempfile::tempdir().unwrap();
        let engine =
            blockferry_storage::Engine::start(blockferry_storage::IoEngine::Auto, 2).unwrap();
        let store = blockferry_storage::FileStore::open_or_create(
            &dir.path().join("d.img"),
            1 << 20,
            engine,
        )
        .unwrap();
        let disk = Arc::new(StagingDisk::new(
            "d".into(),
            BlockStore::File(store),
            Counter::default(),
        ));
        let pipeline = ApplyPipeline::new(
            vec![disk.clone()],
            8 << 20,
            Arc::new(Semaphore::new(8 << 20)),
            Histogram::new([0.001].into_iter()),
        );
        // Many overlapping writes; each byte must end up holding the last write that
        // covered it.
        let mut expected = vec![0u8; 1 << 20];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in 1..=1500u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = 4096 + (x % (192 << 10)) as usize;
            let offset = (x >> 24) % ((1 << 20) - len as u64);
            pipeline
                .submit(header(offset, len as u32), vec![i as u8; len])
                .await;
            expected[offset as usize..offset as usize + len].fill(i as u8);
        }
        pipeline.wait_through(pipeline.last_submitted()).await;
        assert!(pipeline.failure().is_none());
        let got = disk.store.read_at(0, 1 << 20).await.unwrap();
        let stale = got.iter().zip(&expected).position(|(g, e)| g != e);
        assert_eq!(
            stale, None,
            "a byte holds an older write than the last one covering it"
        );
        assert!(lock(&disk.in_flight).is_empty());
    }

    #[test]
    fn completed_through_is_the_lowest_pending_minus_one() {
        let mut s = Sequence {
            next: 6,
            pending: BTreeSet::new(),
        };
        assert_eq!(s.completed_through(), 5);
        s.pending.insert(3);
        s.pending.insert(5);
        assert_eq!(s.completed_through(), 2);
    }
}
