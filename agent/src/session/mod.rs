//! One session with the receiver: connect, Hello, Welcome, then the initial sync of every
//! disk from the watermark the receiver reported, captured changes and rescans, with
//! barriers, until the agent stops or the connection breaks.
//!
//! The decisions that need no I/O live apart and are tested alone: what a Welcome means
//! ([`welcome::plan`]), what the receiver's frames mean ([`transport::interpret`]) and
//! which epochs are durable and what that settles ([`ledger::EpochLedger`]). This module
//! schedules the work and moves the bytes.

mod error;
mod ledger;
mod transport;
mod welcome;

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blockferry_proto::route::stream_for;
use blockferry_proto::{
    Barrier, Checkpoint, DiskBeat, DiskState, Frame, Goodbye, Heartbeat, Hello, JoinStream,
    ResumeClaim, SumReply, SyncProgress, Welcome, WriteFlags, WriteHeader, encode_write,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use self::error::SessionError;
use self::error::broken;
use self::ledger::{EpochLedger, MAX_UNACKED_BARRIERS};
use self::transport::{
    Event, STALL_TIMEOUT, STREAM_QUEUE, StreamSender, connect, deadline_token, read_frames,
};
use crate::agent::{AgentConfig, AgentStats};
use crate::capture::{CaptureShared, GenerationState};
use crate::freeze::FreezeMode;
use crate::rescan::{RescanEvent, RescanJob};
use crate::resources::ProcessSampler;
use crate::tracking::Tracking;
use crate::volume::CHUNK;
use crate::volume::{ChunkReader, Volume, zero_runs};

const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// Captured changes sent between two initial-sync chunks: changes go first, but the sync
/// is never starved.
const CHANGE_BATCH: u64 = 4 << 20;
/// How long the receiver has to record a clean shutdown's checkpoint.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(10);
/// Checksum replies waiting for the rescan task (it keeps at most 16 requests in flight).
const SUM_REPLY_QUEUE: usize = 64;
/// After a failed frozen point, or while the first one is wanted, the next attempt
/// comes this soon (or at the freeze interval, when shorter).
const CUT_RETRY: Duration = Duration::from_secs(5);

/// Bytes of changed runs taken, read and sent together (see `Session::ship_changes`).
const CHANGE_READ_BATCH: u64 = 1 << 20;

/// How a session that did not fail ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every disk's initial sync is durable at the receiver (and the agent was asked to
    /// exit then).
    Synced,
    /// The agent is shutting down.
    Shutdown,
    /// The receiver ended the session (shutdown, replaced); reconnect.
    Closed(String),
    /// The agent is shutting down cleanly and the receiver recorded checkpoint `seq`: the
    /// state record may now be saved under it.
    Checkpointed(u64),
    /// Replication of this server is over for good (an operator cut it over to its
    /// launched copy): the receiver's words. The agent must not reconnect.
    Finished(String),
}

pub(crate) struct Session<'a> {
    config: &'a AgentConfig,
    volumes: &'a [Volume],
    stats: &'a Arc<AgentStats>,
    capture: &'a Arc<CaptureShared>,
    /// Bytes of captured changes sent since the last barrier.
    changes_since_barrier: u64,
    streams: Vec<StreamSender>,
    events: mpsc::Receiver<Event>,
    events_tx: mpsc::Sender<Event>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    /// Which epochs are closed and durable, and what each one settles.
    ledger: EpochLedger,
    bytes_since_barrier: u64,
    heartbeat_every: Duration,
    last_heartbeat: Instant,
    /// When the last consistent epoch was closed (or the last generation frozen).
    last_consistent: Instant,
    sampler: ProcessSampler,
    /// What ends waits early: the shutdown request while replicating, then the drain's
    /// and the checkpoint's deadlines while stopping cleanly.
    stop: CancellationToken,
    series: [u8; 16],
    /// Set once every disk's initial sync is durable.
    sync_done: bool,
    /// Disks whose rescan is not yet durable at the receiver.
    rescans_pending: BTreeSet<usize>,
    /// Disks whose rescan has marked everything, with when it finished; each is claimed
    /// done in the first barrier sent once the disk has nothing left to send.
    rescans_finished: Vec<(usize, Instant)>,
    /// When the generation being shipped was frozen.
    frozen_at: Option<Instant>,
    sum_replies: Option<mpsc::Receiver<SumReply>>,
    rescan_task: Option<tokio::task::JoinHandle<()>>,
    /// Whether Welcome has come: only then can a clean stop record a checkpoint.
    welcomed: bool,
    /// Bytes between barriers, as the receiver asked.
    barrier_interval: u64,
    /// A consistent barrier is due even without changes (the initial sync just became
    /// durable: the receiver can cut its first recovery point there).
    consistent_due: bool,
    /// What block tracking sees; with it, only points cut under a freeze are
    /// consistent.
    tracking: &'a Arc<Tracking>,
    /// Block tracking: a first frozen point is wanted (the initial sync is durable).
    first_point_wanted: bool,
    /// When the last frozen point was attempted.
    last_cut: Option<Instant>,
    /// Tracked writes counted when the last frozen point was cut.
    writes_at_cut: u64,
    /// The frozen generation being shipped was copied under a freeze.
    frozen_consistent: bool,
    /// Why the last frozen point failed, so that a lasting cause is logged once.
    cut_failing: Option<String>,
}

/// What the agent tells the receiver about itself at Hello.
#[derive(Debug)]
pub(crate) struct Identity {
    pub(crate) series: [u8; 16],
    /// Turned into [`ResumeClaim::Live`] once a Hello has carried it.
    pub(crate) claim: ResumeClaim,
    /// The checkpoint number a clean shutdown of this session would use.
    pub(crate) next_seq: u64,
    /// Whether a clean shutdown saves a state record (there is a state dir).
    pub(crate) checkpoints: bool,
}

/// How a session learns of changes it cannot ship: block tracking, and the token that
/// ends the session when tracking lost events (or a periodic rescan is due).
pub(crate) struct Changes<'a> {
    pub(crate) tracking: &'a Arc<Tracking>,
    pub(crate) restart: &'a CancellationToken,
}

/// Connects, says Hello, and runs the session to its end. When `shutdown` fires, the
/// session drains what it can, then asks the receiver to record a checkpoint.
pub(crate) async fn run(
    config: &AgentConfig,
    volumes: &[Volume],
    stats: &Arc<AgentStats>,
    capture: &Arc<CaptureShared>,
    shutdown: &CancellationToken,
    changes: Changes<'_>,
    identity: &mut Identity,
) -> Result<Outcome, SessionError> {
    let Changes { tracking, restart } = changes;
    let stream = connect(&config.receiver, &config.credentials).await?;
    let (events_tx, events) = mpsc::channel(256);
    let (sums_tx, sums) = mpsc::channel(SUM_REPLY_QUEUE);
    let (reader, writer) = tokio::io::split(stream);
    let mut session = Session {
        config,
        volumes,
        stats,
        capture,
        changes_since_barrier: 0,
        streams: vec![StreamSender::start(
            writer,
            0,
            events_tx.clone(),
            Arc::clone(stats),
        )],
        readers: vec![tokio::spawn(read_frames(
            reader,
            events_tx.clone(),
            sums_tx.clone(),
            Arc::clone(stats),
        ))],
        events,
        events_tx,
        ledger: EpochLedger::default(),
        bytes_since_barrier: 0,
        heartbeat_every: Duration::from_secs(5),
        last_heartbeat: Instant::now(),
        last_consistent: Instant::now(),
        sampler: ProcessSampler::new(),
        stop: shutdown.clone(),
        series: identity.series,
        sync_done: false,
        rescans_pending: BTreeSet::new(),
        rescans_finished: Vec::new(),
        frozen_at: None,
        sum_replies: Some(sums),
        rescan_task: None,
        welcomed: false,
        barrier_interval: 16 << 20,
        consistent_due: false,
        tracking,
        first_point_wanted: false,
        last_cut: None,
        writes_at_cut: 0,
        frozen_consistent: false,
        cut_failing: None,
    };
    let claim = std::mem::replace(&mut identity.claim, ResumeClaim::Live);
    // Stopping is noticed between frames, never inside one, so the Goodbye is the last
    // whole frame the receiver reads.
    // A restart drops the drive between two of its awaits: a frame is handed to a
    // stream's writer whole or not at all, and what was sent but not acknowledged is
    // marked dirty again below, as after a broken connection.
    let driven = tokio::select! {
        result = session.drive(claim, sums_tx) => result,
        () = restart.cancelled() => {
            let _ = session
                .send(
                    0,
                    &Frame::Goodbye(Goodbye {
                        message: "reconnecting to rescan: block tracking lost events, or a periodic rescan is due".into(),
                    }),
                )
                .await;
            Err(SessionError::Restart)
        }
    };
    let result = match driven {
        Err(SessionError::Stopping) if session.welcomed && identity.checkpoints => {
            let seq = identity.next_seq;
            identity.next_seq += 1;
            session.stop_cleanly(seq).await
        }
        Err(SessionError::Stopping) => {
            let _ = session
                .send(
                    0,
                    &Frame::Goodbye(Goodbye {
                        message: "agent stopping".into(),
                    }),
                )
                .await;
            Ok(Outcome::Shutdown)
        }
        other => other,
    };
    if let Some(task) = session.rescan_task.take() {
        task.abort();
    }
    session.close().await;
    // Changes sent in this session but not durable are changes again.
    capture.session_ended();
    result
}

impl Session<'_> {
    async fn drive(
        &mut self,
        claim: ResumeClaim,
        sums_tx: mpsc::Sender<SumReply>,
    ) -> Result<Outcome, SessionError> {
        let hello = Hello {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            inventory: crate::inventory::collect(),
            disks: self
                .volumes
                .iter()
                .map(|v| blockferry_proto::DiskSpec {
                    name: v.name.clone(),
                    size: v.size,
                })
                .collect(),
            streams: self.config.streams,
            series: self.series,
            resume: claim,
        };
        self.send(0, &Frame::Hello(hello)).await?;
        let welcome = tokio::select! {
            () = self.stop.cancelled() => return Err(SessionError::Stopping),
            welcome = tokio::time::timeout(WELCOME_TIMEOUT, self.events.recv()) => welcome,
        };
        let welcome = match welcome {
            Err(_) => return Err(SessionError::Timeout("Welcome")),
            Ok(Some(Event::Welcome(w))) => w,
            Ok(Some(other)) => return self.ended(other),
            Ok(None) => return Err(broken("the connection closed before Welcome")),
        };
        let offered: Vec<(&str, u64)> = self
            .volumes
            .iter()
            .map(|v| (v.name.as_str(), v.size))
            .collect();
        let plan = welcome::plan(&offered, self.config.streams, &welcome)?;
        self.welcomed = true;
        self.ledger = EpochLedger::starting_at(plan.next_epoch);
        self.heartbeat_every = plan.heartbeat_every;
        self.stats
            .throttle
            .set_rate(welcome.settings.bandwidth_limit);
        self.stats.pause.set(welcome.settings.paused);
        let barrier_interval = plan.barrier_interval;
        self.barrier_interval = barrier_interval;
        self.join_streams(&welcome, plan.streams, &sums_tx).await?;
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);

        let capture = Arc::clone(self.capture);
        let mut to_sync = VecDeque::new();
        let mut rescans = Vec::new();
        let queued = plan.disks.iter().filter(|d| d.queued).count();
        for (index, (volume, disk)) in self.volumes.iter().zip(&plan.disks).enumerate() {
            if disk.queued {
                tracing::info!(disk = %volume.name, "queued at the receiver for an initial sync or rescan slot");
            }
            if let Some((end, reason)) = disk.rescan {
                tracing::info!(
                    disk = %volume.name,
                    %reason,
                    bytes = end,
                    "the receiver asks for a rescan"
                );
                rescans.push(RescanJob { disk: index, end });
                self.rescans_pending.insert(index);
            }
            self.stats.set_durable(index, disk.watermark);
            self.stats.set_position(index, disk.watermark);
            // Writes below the sync cursor are changes; at or above it, the sync reads them.
            capture.set_cursor(index, disk.watermark);
            if disk.watermark < volume.size {
                // Changes above the watermark wait for the sync to send past them.
                capture.set_sync_sent(index, disk.watermark);
                if disk.sync {
                    to_sync.push_back((index, disk.watermark));
                }
            } else {
                capture.set_sync_sent(index, u64::MAX);
            }
        }
        let (rescan_tx, mut rescan_events) = mpsc::channel(16);
        if !rescans.is_empty() {
            let senders = self.streams.iter().map(|s| s.frames.clone()).collect();
            let replies = self
                .sum_replies
                .take()
                .expect("one rescan task per session");
            self.rescan_task = Some(tokio::spawn(crate::rescan::run(
                rescans,
                self.volumes.to_vec(),
                Arc::clone(&capture),
                senders,
                replies,
                rescan_tx,
                Arc::clone(self.stats),
            )));
        }
        drop(sums_tx);
        let mut syncing: Option<(usize, ChunkReader)> = None;
        // The epoch of the last initial-sync barrier: the sync is complete once it is
        // durable.
        let mut last_sync_epoch = self.ledger.sent();
        let stats = self.stats;
        loop {
            // Registered first, so that a write landing (or a resume arriving) during
            // this iteration wakes the wait at its end.
            let changed = capture.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let pause_changed = stats.pause.changed();
            tokio::pin!(pause_changed);
            pause_changed.as_mut().enable();
            self.poll_events()?;
            while let Ok(event) = rescan_events.try_recv() {
                self.on_rescan_event(event)?;
            }
            if self.last_heartbeat.elapsed() >= self.heartbeat_every {
                self.heartbeat().await?;
            }

            if stats.pause.is_paused() {
                // Nothing is sent but heartbeats: captured writes pile up in the dirty
                // map, the sync and the rescan hold their places, and what was sent
                // before the pause is still acknowledged.
                tokio::select! {
                    () = self.stop.cancelled() => return Err(SessionError::Stopping),
                    () = &mut pause_changed => {}
                    Some(event) = rescan_events.recv() => self.on_rescan_event(event)?,
                    event = tokio::time::timeout(self.heartbeat_every, self.events.recv()) => match event {
                        Err(_) => {}
                        Ok(Some(event)) => self.on_event(event)?,
                        Ok(None) => return Err(broken("the connection closed")),
                    },
                }
                continue;
            }

            // Changes first: they are what the lag is made of.
            let shipped = self.ship_changes(CHANGE_BATCH).await?;

            if syncing.is_none()
                && let Some((disk, start)) = to_sync.pop_front()
            {
                let volume = &self.volumes[disk];
                tracing::info!(
                    disk = %volume.name,
                    from = start,
                    size = volume.size,
                    streams = self.streams.len(),
                    "initial sync"
                );
                let cursor_capture = Arc::clone(&capture);
                let reader =
                    volume.read_from(start, move |end| cursor_capture.set_cursor(disk, end));
                syncing = Some((disk, reader));
            }
            if let Some((disk, reader)) = &mut syncing {
                let disk = *disk;
                let chunk = tokio::select! {
                    () = self.stop.cancelled() => return Err(SessionError::Stopping),
                    chunk = reader.recv() => chunk,
                };
                match chunk {
                    Some(chunk) => {
                        if self.ship_sync_chunk(disk, chunk, barrier_interval).await? {
                            last_sync_epoch = self.ledger.sent();
                        }
                    }
                    None => {
                        capture.set_sync_sent(disk, u64::MAX);
                        syncing = None;
                    }
                }
                continue;
            }

            if !self.sync_done && queued == 0 && self.ledger.durable() >= last_sync_epoch {
                self.sync_done = true;
                // The synced images become a consistent point as soon as nothing captured
                // meanwhile is left to send, even if nothing changes after. Block-tracked
                // images become one only under a freeze.
                if self.tracking.tracked {
                    self.first_point_wanted = true;
                } else {
                    self.consistent_due = true;
                }
                tracing::info!("every disk's initial sync is durable at the receiver");
                self.update_synced();
            }
            let synced = self.sync_done;
            // Continuous replication: an epoch closes when the frozen generation has been
            // shipped, or whenever the dirty map drains; either makes it a
            // crash-consistent point.
            let mut barrier_sent = false;
            if synced {
                match capture.generation_state() {
                    GenerationState::Shipped(write_seq) => {
                        let frozen_at = self.frozen_at.take();
                        // A tracked generation is a point only if it was copied frozen.
                        let consistent =
                            !self.tracking.tracked || std::mem::take(&mut self.frozen_consistent);
                        self.point_barrier(write_seq, frozen_at, consistent).await?;
                        barrier_sent = true;
                    }
                    GenerationState::Shipping => {}
                    GenerationState::Open if self.frozen_point_due() => {
                        self.cut_frozen_point().await?;
                        continue;
                    }
                    GenerationState::Open => {
                        if let Some((write_seq, flush)) = capture.quiescent() {
                            let due = self.changes_since_barrier > 0
                                || flush
                                || self.consistent_due
                                || !self.rescans_finished.is_empty();
                            if due && self.ledger.may_close() {
                                // An empty map is a point only where every write is
                                // seen as it happens; block tracking learns of writes
                                // after they completed.
                                let consistent = !self.tracking.tracked;
                                self.point_barrier(write_seq, None, consistent).await?;
                                barrier_sent = true;
                            } else if due {
                                // Too many barriers in flight: ask again once one is
                                // acknowledged.
                                capture.request_flush();
                            }
                            if self.config.exit_when_synced
                                && !due
                                && self.rescans_pending.is_empty()
                                && self.ledger.all_durable()
                                && capture.backlog_bytes() == 0
                            {
                                self.send(
                                    0,
                                    &Frame::Goodbye(Goodbye {
                                        message: "initial sync complete".into(),
                                    }),
                                )
                                .await?;
                                return Ok(Outcome::Synced);
                            }
                        } else if (self.last_consistent.elapsed() >= self.config.epoch_interval
                            || capture.flush_requested())
                            && self.ledger.may_close()
                        {
                            // Writes keep coming: close the interval by freezing what is
                            // dirty now, and ship that first.
                            if capture.freeze() {
                                self.last_consistent = Instant::now();
                                self.frozen_at = Some(self.last_consistent);
                            }
                        }
                    }
                }
            }
            if shipped > 0 || barrier_sent {
                continue;
            }
            tokio::select! {
                () = self.stop.cancelled() => return Err(SessionError::Stopping),
                () = &mut changed => {}
                Some(event) = rescan_events.recv() => self.on_rescan_event(event)?,
                event = tokio::time::timeout(self.heartbeat_every, self.events.recv()) => match event {
                    Err(_) => {}
                    Ok(Some(event)) => self.on_event(event)?,
                    Ok(None) => return Err(broken("the connection closed")),
                },
            }
        }
    }

    /// Sends up to `limit` bytes of captured changes; returns the bytes sent. Runs are
    /// taken in batches of up to [`CHANGE_READ_BATCH`] bytes: the ones not in memory are
    /// read from the volumes in one blocking call, and each stream gets one message per
    /// batch, so a burst of small changes costs a few thread hand-offs, not a few per run.
    async fn ship_changes(&mut self, limit: u64) -> Result<u64, SessionError> {
        let capture = Arc::clone(self.capture);
        let mut shipped = 0;
        while shipped < limit {
            let mut batch = Vec::new();
            let mut batch_bytes = 0;
            while shipped + batch_bytes < limit && batch_bytes < CHANGE_READ_BATCH {
                let room = (CHUNK as u64).min(CHANGE_READ_BATCH - batch_bytes);
                let Some(run) = capture.take_run(room, self.ledger.open_epoch()) else {
                    break;
                };
                batch_bytes += run.len;
                batch.push(run);
            }
            if batch.is_empty() {
                break;
            }
            // Cleared from the dirty map when taken, read now: a write after the read
            // marks its blocks dirty again.
            let unread: Vec<(usize, u64, u64)> = batch
                .iter()
                .filter(|run| run.data.is_none())
                .map(|run| (run.disk, run.offset, run.len))
                .collect();
            let mut reads = if unread.is_empty() {
                Vec::new()
            } else {
                let reader = Arc::clone(&capture);
                tokio::task::spawn_blocking(move || {
                    unread
                        .into_iter()
                        .map(|(disk, offset, len)| (disk, reader.read_volume(disk, offset, len)))
                        .collect::<Vec<_>>()
                })
                .await
                .map_err(|e| broken(&e.to_string()))?
            }
            .into_iter();
            let mut out = vec![Vec::new(); self.streams.len()];
            let (mut payload, mut zero_fill) = (0, 0);
            for run in &mut batch {
                let data = match run.data.take() {
                    Some(data) => data,
                    None => {
                        let (disk, read) = reads.next().expect("one read per unread run");
                        let mut data = read.map_err(|source| SessionError::Volume {
                            disk: self.volumes[disk].name.clone(),
                            source,
                        })?;
                        capture.finish_read(run, &mut data);
                        data
                    }
                };
                // A run may cross block groups; each piece goes on its group's stream.
                let disk = u16::try_from(run.disk).expect("at most MAX_DISKS volumes");
                let mut at = 0usize;
                while at < data.len() {
                    let offset = run.offset + at as u64;
                    let group_end = (offset / CHUNK as u64 + 1) * CHUNK as u64;
                    let piece = ((group_end - offset) as usize).min(data.len() - at);
                    let stream = stream_for(disk, offset, self.streams.len());
                    let (p, z) = self.encode_piece(
                        &mut out[stream],
                        (disk, offset),
                        &data[at..at + piece],
                        WriteFlags::default(),
                    );
                    (payload, zero_fill) = (payload + p, zero_fill + z);
                    at += piece;
                }
                shipped += run.len;
                self.changes_since_barrier += run.len;
            }
            for (stream, bytes) in out.into_iter().enumerate() {
                if !bytes.is_empty() {
                    self.send_bytes(stream, bytes).await?;
                }
            }
            self.count_sent(payload, zero_fill);
        }
        Ok(shipped)
    }

    /// Sends one chunk of a disk's initial sync; returns whether a barrier followed it.
    async fn ship_sync_chunk(
        &mut self,
        disk: usize,
        chunk: std::io::Result<(u64, Vec<u8>)>,
        barrier_interval: u64,
    ) -> Result<bool, SessionError> {
        let volume = &self.volumes[disk];
        let (offset, data) = chunk.map_err(|source| SessionError::Volume {
            disk: volume.name.clone(),
            source,
        })?;
        let size = volume.size;
        let disk16 = u16::try_from(disk).expect("at most MAX_DISKS volumes");
        self.ship_piece(disk16, offset, &data, WriteFlags::INITIAL_SYNC)
            .await?;
        let end = offset + data.len() as u64;
        self.capture.set_sync_sent(disk, end);
        self.stats.set_position(disk, end);
        self.bytes_since_barrier += data.len() as u64;
        if self.bytes_since_barrier >= barrier_interval || end == size {
            self.barrier(vec![SyncProgress {
                disk: disk16,
                watermark: end,
            }])
            .await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Sends `data` (within one block group) as write frames, zero runs as zero-fills,
    /// on the group's stream.
    async fn ship_piece(
        &mut self,
        disk: u16,
        offset: u64,
        data: &[u8],
        flags: WriteFlags,
    ) -> Result<(), SessionError> {
        let mut out = Vec::with_capacity(data.len() + 256);
        let (payload, zero_fill) = self.encode_piece(&mut out, (disk, offset), data, flags);
        let stream = stream_for(disk, offset, self.streams.len());
        self.send_bytes(stream, out).await?;
        self.count_sent(payload, zero_fill);
        Ok(())
    }

    /// Counts bytes sent as payload and as zero-fills, for the stats.
    fn count_sent(&self, payload: u64, zero_fill: u64) {
        self.stats
            .payload_bytes
            .fetch_add(payload, Ordering::Relaxed);
        self.stats
            .zero_fill_bytes
            .fetch_add(zero_fill, Ordering::Relaxed);
    }

    /// Appends `data` (within one block group) to `out` as write frames of the open
    /// epoch, zero runs as zero-fills; returns the payload and zero-filled bytes.
    fn encode_piece(
        &self,
        out: &mut Vec<u8>,
        (disk, offset): (u16, u64),
        data: &[u8],
        flags: WriteFlags,
    ) -> (u64, u64) {
        let (mut payload, mut zero_fill) = (0u64, 0u64);
        for (at, len, zero) in zero_runs(data) {
            let header = WriteHeader {
                disk,
                flags: if zero {
                    flags | WriteFlags::ZERO_FILL
                } else {
                    flags
                },
                offset: offset + at as u64,
                len: u32::try_from(len).expect("pieces are at most MAX_WRITE_DATA"),
                epoch: self.ledger.open_epoch(),
            };
            encode_write(out, &header, if zero { &[] } else { &data[at..at + len] });
            if zero {
                zero_fill += len as u64;
            } else {
                payload += len as u64;
            }
        }
        (payload, zero_fill)
    }

    /// Opens the streams the receiver granted beyond the first.
    async fn join_streams(
        &mut self,
        welcome: &Welcome,
        granted: u8,
        sums_tx: &mpsc::Sender<SumReply>,
    ) -> Result<(), SessionError> {
        for index in 1..granted {
            let stream = connect(&self.config.receiver, &self.config.credentials).await?;
            let (reader, writer) = tokio::io::split(stream);
            self.readers.push(tokio::spawn(read_frames(
                reader,
                self.events_tx.clone(),
                sums_tx.clone(),
                Arc::clone(self.stats),
            )));
            self.streams.push(StreamSender::start(
                writer,
                index,
                self.events_tx.clone(),
                Arc::clone(self.stats),
            ));
            self.send(
                usize::from(index),
                &Frame::JoinStream(JoinStream {
                    session_id: welcome.session_id,
                    stream_index: index,
                }),
            )
            .await?;
        }
        Ok(())
    }

    /// Closes an epoch covering capture writes up to `write_seq` (and, for a shipped
    /// generation, everything marked before `frozen_at`), marked crash-consistent when
    /// it is one.
    async fn point_barrier(
        &mut self,
        write_seq: u64,
        frozen_at: Option<Instant>,
        consistent: bool,
    ) -> Result<(), SessionError> {
        self.barrier_with(Vec::new(), frozen_at, consistent, Some(write_seq))
            .await?;
        let counter = if consistent {
            &self.stats.consistent_points
        } else {
            &self.stats.inconsistent_points
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.changes_since_barrier = 0;
        self.consistent_due = false;
        self.last_consistent = Instant::now();
        Ok(())
    }

    /// Whether a point should now be cut under a freeze: block tracking with `--freeze
    /// auto`, no rescan in progress (a disk not yet compared is no point), and either the
    /// first point after the initial sync or writes since the last one, an interval ago.
    fn frozen_point_due(&self) -> bool {
        if !self.tracking.tracked
            || self.config.freeze != FreezeMode::Auto
            || !self.rescans_pending.is_empty()
            || !self.ledger.may_close()
        {
            return false;
        }
        let wait = if self.first_point_wanted {
            self.config.freeze_interval.min(CUT_RETRY)
        } else {
            self.config.freeze_interval
        };
        let written = self.stats.tracking.writes.load(Ordering::Relaxed) != self.writes_at_cut;
        self.last_cut.is_none_or(|at| at.elapsed() >= wait) && (self.first_point_wanted || written)
    }

    /// Cuts a point under a freeze (see [`crate::freeze`]). On success the copied
    /// generation ships next and its barrier is marked consistent (or, with nothing
    /// dirty, a consistent barrier goes at once). A failure is logged (once while its
    /// cause lasts) and replication goes on without the point.
    async fn cut_frozen_point(&mut self) -> Result<(), SessionError> {
        let tracking = Arc::clone(self.tracking);
        let timeout = self.config.freeze_timeout;
        let cut = tokio::task::spawn_blocking(move || tracking.cut_point(timeout))
            .await
            .map_err(|e| broken(&e.to_string()))?;
        self.last_cut = Some(Instant::now());
        match cut {
            Ok(point) => {
                tracing::debug!(
                    frozen_ms = point.frozen_for.as_secs_f64() * 1e3,
                    file_systems = point.file_systems,
                    copied = point.copied,
                    "crash-consistent point cut under a freeze"
                );
                if self.cut_failing.take().is_some() {
                    tracing::info!("crash-consistent points are cut again");
                }
                self.first_point_wanted = false;
                self.writes_at_cut = self.stats.tracking.writes.load(Ordering::Relaxed);
                if point.copied == 0 {
                    self.point_barrier(point.write_seq, None, true).await?;
                } else {
                    self.frozen_consistent = true;
                    self.last_consistent = Instant::now();
                    self.frozen_at = Some(self.last_consistent);
                }
            }
            Err(err) => {
                let why = blockferry_util::error_chain(&err);
                if self.cut_failing.as_deref() != Some(why.as_str()) {
                    tracing::warn!(
                        error = %why,
                        retry_s = self.config.freeze_interval.min(CUT_RETRY).as_secs(),
                        "cannot cut a crash-consistent point under a freeze; changes are still replicated, but no recovery point is cut until one succeeds"
                    );
                }
                self.cut_failing = Some(why);
            }
        }
        Ok(())
    }

    /// Closes the current epoch with a barrier on every stream. Waits first if too many
    /// barriers are unacknowledged, so that a broken connection never loses more than a
    /// few intervals of work.
    async fn barrier(&mut self, sync_progress: Vec<SyncProgress>) -> Result<(), SessionError> {
        self.barrier_with(sync_progress, None, false, None).await
    }

    async fn barrier_with(
        &mut self,
        sync_progress: Vec<SyncProgress>,
        frozen_at: Option<Instant>,
        consistent: bool,
        covers: Option<u64>,
    ) -> Result<(), SessionError> {
        while !self.ledger.may_close() {
            let event = self.next_event().await?;
            self.on_event(event)?;
        }
        // A finished rescan is claimed once nothing it marked can still be unsent: the
        // disk has nothing waiting, or its marks were all in the generation just shipped.
        let capture = Arc::clone(self.capture);
        let (claimed, waiting): (Vec<_>, Vec<_>) =
            self.rescans_finished.iter().partition(|&&(disk, at)| {
                capture.disk_clean(disk) || frozen_at.is_some_and(|frozen| at < frozen)
            });
        self.rescans_finished = waiting;
        let rescan_done: Vec<usize> = claimed.into_iter().map(|(disk, _)| disk).collect();
        let epoch = self.ledger.close(
            sync_progress
                .iter()
                .map(|p| (usize::from(p.disk), p.watermark))
                .collect(),
            rescan_done.clone(),
            covers,
        );
        let mut rescan_done = Some(
            rescan_done
                .into_iter()
                .map(|d| u16::try_from(d).expect("at most MAX_DISKS volumes"))
                .collect::<Vec<_>>(),
        );
        self.bytes_since_barrier = 0;
        // The progress claim rides on the first stream; the receiver merges the
        // barriers of all streams into one consistent point.
        let mut progress = Some(sync_progress);
        for stream in 0..self.streams.len() {
            let frame = Frame::Barrier(Barrier {
                epoch,
                sync_progress: progress.take().unwrap_or_default(),
                rescan_done: rescan_done.take().unwrap_or_default(),
                consistent,
            });
            self.send_bytes_until(stream, frame.to_bytes(), false)
                .await?;
        }
        Ok(())
    }

    fn on_rescan_event(&mut self, event: RescanEvent) -> Result<(), SessionError> {
        match event {
            RescanEvent::Done(disk) => {
                tracing::info!(disk = %self.volumes[disk].name, "rescan compared every block");
                self.rescans_finished.push((disk, Instant::now()));
                Ok(())
            }
            RescanEvent::Failed { disk, error } => Err(SessionError::Volume {
                disk: self.volumes[disk].name.clone(),
                source: error,
            }),
        }
    }

    /// Every initial sync and every rescan is durable: the disks are in step.
    fn update_synced(&self) {
        if self.sync_done && self.rescans_pending.is_empty() {
            self.stats.synced.store(true, Ordering::Relaxed);
        }
    }

    /// A clean stop: sends what is dirty (for at most the drain timeout) and makes it
    /// durable, then has the receiver record checkpoint `seq`. What was not sent stays in
    /// the dirty map, which the caller saves under that checkpoint.
    async fn stop_cleanly(&mut self, seq: u64) -> Result<Outcome, SessionError> {
        if let Some(task) = self.rescan_task.take() {
            // The receiver keeps the rescan's reason: the next start rescans again.
            task.abort();
        }
        self.capture.seal();
        // Before the receiver records a checkpoint that says "nothing else changed", the
        // source must keep what was written: otherwise a power loss after the stop could
        // leave the replica holding writes the source lost, and the record would be
        // trusted at the next start.
        let capture = Arc::clone(self.capture);
        tokio::task::spawn_blocking(move || capture.sync_sources())
            .await
            .map_err(|e| SessionError::Protocol(format!("syncing the source volumes: {e}")))?
            .map_err(|err| match err {
                crate::capture::CaptureError::Io { disk, source } => {
                    SessionError::Volume { disk, source }
                }
                other => SessionError::Protocol(other.to_string()),
            })?;
        tracing::info!(
            backlog = self.capture.backlog_bytes(),
            timeout_s = self.config.drain_timeout.as_secs(),
            "stopping: source volumes synced; sending what is left"
        );
        self.stop = deadline_token(self.config.drain_timeout);
        match self.drain().await {
            Ok(()) => {}
            Err(SessionError::Stopping) => tracing::warn!(
                backlog = self.capture.backlog_bytes(),
                "drain timed out; the rest is saved in the state record"
            ),
            Err(err) => return Err(err),
        }
        self.stop = deadline_token(CHECKPOINT_TIMEOUT);
        self.send(0, &Frame::Checkpoint(Checkpoint { seq })).await?;
        loop {
            match self.next_event().await {
                Ok(Event::CheckpointSaved(saved)) if saved == seq => break,
                Ok(Event::CheckpointSaved(other)) => {
                    return Err(SessionError::Protocol(format!(
                        "the receiver saved checkpoint {other}, the agent asked for {seq}"
                    )));
                }
                Ok(event) => self.on_event(event)?,
                Err(SessionError::Stopping) => {
                    return Err(SessionError::Timeout(
                        "the receiver to record the checkpoint",
                    ));
                }
                Err(err) => return Err(err),
            }
        }
        self.send(
            0,
            &Frame::Goodbye(Goodbye {
                message: "agent stopping (clean shutdown)".into(),
            }),
        )
        .await?;
        Ok(Outcome::Checkpointed(seq))
    }

    /// Ships every change that can go now and waits until the last epoch is durable.
    /// Changes that wait for an initial sync (which no longer runs) stay dirty.
    async fn drain(&mut self) -> Result<(), SessionError> {
        loop {
            self.poll_events()?;
            // Paused: nothing more is sent. What went before the pause is made durable;
            // the rest stays in the dirty map the caller saves.
            let paused = self.stats.pause.is_paused();
            if !paused {
                let shipped = self.ship_changes(u64::MAX).await?;
                if shipped > 0 || self.capture.generation_state() != GenerationState::Open {
                    continue;
                }
            }
            if self.changes_since_barrier > 0 {
                let consistent = if paused {
                    None
                } else {
                    self.capture.quiescent().filter(|_| self.sync_done)
                };
                match consistent {
                    Some((write_seq, _)) => {
                        let consistent = !self.tracking.tracked;
                        self.point_barrier(write_seq, None, consistent).await?;
                    }
                    None => {
                        self.barrier(Vec::new()).await?;
                        self.changes_since_barrier = 0;
                    }
                }
                continue;
            }
            if self.ledger.all_durable() {
                return Ok(());
            }
            let event = self.next_event().await?;
            self.on_event(event)?;
        }
    }

    /// How long to wait for the receiver to take data or acknowledge a barrier: longer
    /// under a bandwidth limit, which holds back on purpose what the streams' queues and
    /// the unacknowledged barriers contain.
    fn patience(&self) -> Duration {
        let rate = self.stats.throttle.rate();
        if rate == 0 {
            return STALL_TIMEOUT;
        }
        let queued = (self.streams.len() * (STREAM_QUEUE + 1)) as u64
            * (blockferry_proto::limits::MAX_WRITE_DATA as u64);
        let unacked = (MAX_UNACKED_BARRIERS + 1) * self.barrier_interval;
        STALL_TIMEOUT + Duration::from_secs_f64((queued + unacked) as f64 / rate as f64)
    }

    async fn heartbeat(&mut self) -> Result<(), SessionError> {
        self.last_heartbeat = Instant::now();
        let sample = self.sampler.sample();
        let disks = self
            .capture
            .disk_backlogs()
            .into_iter()
            .enumerate()
            .map(|(disk, backlog)| DiskBeat {
                disk: u16::try_from(disk).unwrap_or(u16::MAX),
                state: if self.stats.pause.is_paused() {
                    DiskState::PAUSED
                } else if !self.stats.disk_synced(disk) {
                    DiskState::INITIAL_SYNC
                } else if self.rescans_pending.contains(&disk) {
                    DiskState::RESCAN
                } else if backlog.to_send > backlog.buffered {
                    // More is dirty than the buffer holds: the rest is re-read from
                    // the volume, the change rate is above what the link carries.
                    DiskState::BACKLOG
                } else {
                    DiskState::CONTINUOUS
                },
                backlog_bytes: backlog.to_send + backlog.in_flight,
            })
            .collect();
        let frame = Frame::Heartbeat(Heartbeat {
            cpu_permille: sample.cpu_permille,
            rss_bytes: sample.rss_bytes,
            backlog_bytes: self.stats.backlog_bytes() + self.capture.backlog_bytes(),
            disks,
            tracking: Some(self.tracking.beat()),
        });
        // On every stream: the receiver closes a stream that stays silent, and an idle
        // agent's other streams would carry nothing else.
        for stream in 0..self.streams.len() {
            self.send(stream, &frame).await?;
        }
        Ok(())
    }

    fn poll_events(&mut self) -> Result<(), SessionError> {
        while let Ok(event) = self.events.try_recv() {
            self.on_event(event)?;
        }
        Ok(())
    }

    async fn next_event(&mut self) -> Result<Event, SessionError> {
        tokio::select! {
            () = self.stop.cancelled() => Err(SessionError::Stopping),
            event = tokio::time::timeout(self.patience(), self.events.recv()) => match event {
                Ok(Some(event)) => Ok(event),
                Ok(None) => Err(broken("the connection closed")),
                Err(_) => Err(SessionError::Timeout("the receiver to acknowledge a barrier")),
            },
        }
    }

    fn on_event(&mut self, event: Event) -> Result<(), SessionError> {
        match event {
            Event::Durable(epoch) => {
                let settled = self
                    .ledger
                    .durable_through(epoch)
                    .map_err(|e| SessionError::Protocol(e.to_string()))?;
                // Every stream hears of each durable epoch; the first word is enough.
                let Some(settled) = settled else {
                    return Ok(());
                };
                self.stats.durable_through(&settled.watermarks);
                self.capture.durable_through(settled.epoch);
                if let Some(write_seq) = settled.writes_through {
                    self.capture.writes_durable(write_seq);
                }
                if !settled.rescans.is_empty() {
                    for disk in settled.rescans {
                        self.rescans_pending.remove(&disk);
                        tracing::info!(disk = %self.volumes[disk].name, "rescan complete and durable");
                    }
                    self.update_synced();
                }
                Ok(())
            }
            other => self.ended(other).map(drop),
        }
    }

    /// Turns an event that ends the session into its result.
    fn ended(&self, event: Event) -> Result<Outcome, SessionError> {
        match event {
            Event::Refused(err) => Err(SessionError::Refused {
                code: err.code,
                message: blockferry_util::text::printable(&err.message).into_owned(),
                retry_after: Duration::from_millis(u64::from(err.retry_after_ms.unwrap_or(0))),
            }),
            Event::Goodbye(message) => Err(SessionError::Connection(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                format!("the receiver ended the session: {message}"),
            ))),
            Event::Broken(why) => Err(broken(&why)),
            Event::CertificateRefused(why) => Err(SessionError::CertificateRefused(why)),
            Event::Welcome(_) | Event::Durable(_) | Event::CheckpointSaved(_) => Err(
                SessionError::Protocol("unexpected frame from the receiver".into()),
            ),
        }
    }

    async fn send(&mut self, stream: usize, frame: &Frame) -> Result<(), SessionError> {
        let mut out = Vec::new();
        frame.encode(&mut out);
        self.send_bytes(stream, out).await
    }

    async fn send_bytes(&mut self, stream: usize, bytes: Vec<u8>) -> Result<(), SessionError> {
        self.send_bytes_until(stream, bytes, true).await
    }

    /// Sends, giving up when `stop` fires only if `interruptible`: a barrier must reach
    /// every stream or none, or the streams' epochs would part ways.
    async fn send_bytes_until(
        &mut self,
        stream: usize,
        bytes: Vec<u8>,
        interruptible: bool,
    ) -> Result<(), SessionError> {
        let stop = if interruptible {
            self.stop.clone()
        } else {
            CancellationToken::new()
        };
        let sent = tokio::select! {
            () = stop.cancelled() => return Err(SessionError::Stopping),
            sent = tokio::time::timeout(self.patience(), self.streams[stream].frames.send(bytes)) => sent,
        };
        match sent {
            Ok(Ok(())) => Ok(()),
            Err(_) => Err(SessionError::Timeout("the receiver to accept data")),
            // The stream's writer stopped: the receiver may have said why; prefer its
            // reason over "broken pipe".
            Ok(Err(_)) => {
                let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
                let mut broken_reason = None;
                while let Ok(Some(event)) =
                    tokio::time::timeout_at(deadline, self.events.recv()).await
                {
                    match event {
                        Event::Durable(_) | Event::CheckpointSaved(_) => {}
                        Event::Broken(why) => broken_reason = Some(why),
                        other => return self.ended(other).map(drop),
                    }
                }
                Err(broken(
                    &broken_reason.unwrap_or_else(|| format!("stream {stream} closed")),
                ))
            }
        }
    }

    /// Lets every stream write out what is queued (a Goodbye included) and close.
    async fn close(self) {
        let Self {
            streams, readers, ..
        } = self;
        for stream in streams {
            drop(stream.frames);
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.task).await;
        }
        for reader in readers {
            reader.abort();
        }
    }
}
