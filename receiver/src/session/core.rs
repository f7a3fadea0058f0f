//! The rules of one receiver session, without I/O, in the style of rustls and quinn-proto:
//! the tokio code around it reads frames, hands each one to [`SessionCore::accept`], and
//! does what the returned [`Step`] says (apply a write, answer a checksum query, save a
//! checkpoint, wait at a barrier). The core owns everything the session decides: which
//! frames are allowed in which phase, what a write or barrier may claim, when an epoch is
//! sealed (the [`EpochGate`]), the epoch ledger (applied, durable, what the images hold
//! beyond the consistent point), the checkpoint pace and the stall clock.
//!
//! A `Durable` frame comes only from [`SessionCore::durable`], which takes the catalog's
//! [`DurableRecord`]; that record is only made by a commit that was handed the staging
//! stores' flush proofs (invariant 1).

use std::collections::VecDeque;
use std::time::Duration;

use blockferry_proto::limits::{MAX_STREAMS, MAX_WRITE_DATA};
use blockferry_proto::{
    Barrier, Durable, Frame, Heartbeat, Hello, JoinStream, SumRequest, Write, WriteFlags,
};
use tokio::time::Instant;

use super::error::SessionError;
use crate::catalog::DurableRecord;
use crate::gate::{EpochGate, Sealed};
use crate::pki::validate_name;

/// Checkpoint commits of one session are at least this far apart.
pub(crate) const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// Flags this receiver knows how to apply.
const KNOWN_FLAGS: u16 = WriteFlags::ZERO_FILL.0 | WriteFlags::INITIAL_SYNC.0;

/// What a connection's first frame opens.
#[derive(Debug)]
pub(crate) enum Opening {
    /// A new session.
    Hello(Box<Hello>),
    /// One more stream of a live session.
    Join(JoinStream),
}

/// The first frame of a connection: Hello or JoinStream, nothing else.
pub(crate) fn opening(frame: Frame) -> Result<Opening, SessionError> {
    match frame {
        Frame::Hello(hello) => Ok(Opening::Hello(Box::new(hello))),
        Frame::JoinStream(join) => Ok(Opening::Join(join)),
        other => Err(SessionError::Protocol(format!(
            "expected Hello or JoinStream, got {}",
            other.kind()
        ))),
    }
}

/// Checks what a Hello asks for against this receiver's limits.
pub(crate) fn check_hello(hello: &Hello, max_disk_size: u64) -> Result<(), SessionError> {
    if hello.disks.is_empty() {
        return Err(SessionError::Protocol(
            "Hello lists no disks to replicate".into(),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for disk in &hello.disks {
        validate_name("disk name", &disk.name)
            .map_err(|e| SessionError::Protocol(e.to_string()))?;
        if !seen.insert(disk.name.as_str()) {
            return Err(SessionError::Protocol(format!(
                "disk name {:?} appears twice in Hello",
                disk.name
            )));
        }
        if disk.size == 0 {
            return Err(SessionError::Protocol(format!(
                "disk {} has size 0",
                disk.name
            )));
        }
        if disk.size > max_disk_size {
            return Err(SessionError::Limit(format!(
                "disk {} has {} bytes, more than this receiver's --max-disk-size of {} bytes",
                disk.name, disk.size, max_disk_size
            )));
        }
    }
    Ok(())
}

/// `hello` with every string the agent chose escaped for terminals and logs (disk names
/// were validated already): an inventory is the agent's word, printed by `status` and in
/// the log lines of every session.
pub(crate) fn printable_hello(mut hello: Hello) -> Hello {
    fn clean(text: &mut String) {
        if let std::borrow::Cow::Owned(escaped) = blockferry_util::text::printable(text) {
            *text = escaped;
        }
    }
    let inventory = &mut hello.inventory;
    clean(&mut hello.agent_version);
    clean(&mut inventory.host_name);
    clean(&mut inventory.host_id);
    clean(&mut inventory.os);
    inventory.cpus.iter_mut().for_each(|c| clean(&mut c.model));
    inventory.disks.iter_mut().for_each(|d| clean(&mut d.name));
    inventory.private_ips.iter_mut().for_each(clean);
    hello
}

/// The streams a session is granted: what the agent asked for, within the receiver's cap
/// and the protocol's.
pub(crate) fn granted_streams(asked: u8, receiver_max: u8) -> u8 {
    asked.clamp(1, receiver_max.clamp(1, MAX_STREAMS))
}

/// What the session knows of one of its disks when it starts.
#[derive(Debug, Clone)]
pub(crate) struct DiskRules {
    pub(crate) name: String,
    pub(crate) size: u64,
    /// The initial-sync watermark when the session started.
    pub(crate) synced: u64,
    /// Waiting for a sync slot: this session may change only what is synced already
    /// (below `synced`), and make no sync or rescan progress.
    pub(crate) queued: bool,
}

/// How a session starts.
#[derive(Debug, Clone)]
pub(crate) struct CoreConfig {
    pub(crate) streams: u8,
    /// The newest epoch the catalog holds as durable for the server.
    pub(crate) durable_epoch: u64,
    pub(crate) disks: Vec<DiskRules>,
    /// No durable progress for this long, with the server not paused, is a stall.
    pub(crate) stall_after: Duration,
    pub(crate) paused: bool,
    /// Unix ms now.
    pub(crate) now_ms: u64,
    /// Keep the writes not yet sealed (EBS backend: what the images hold beyond the
    /// consistent epoch if the session breaks).
    pub(crate) track_unsealed: bool,
}

/// How a stream ended, when it ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    AgentClosed,
    Goodbye,
    AgentError,
    Shutdown,
    Replaced,
    /// Another stream of the session ended, or a flush failed.
    SessionEnded,
}

impl End {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Self::AgentClosed => "the agent closed the connection",
            Self::Goodbye => "the agent said goodbye",
            Self::AgentError => "the agent reported an error",
            Self::Shutdown => "the receiver is shutting down",
            Self::Replaced => "replaced by a newer session of the same server",
            Self::SessionEnded => "another stream of the session ended",
        }
    }
}

/// What the driver does with a frame the core accepted.
#[derive(Debug)]
pub(crate) enum Step {
    /// Submit the write to the apply pipeline.
    Apply(Write),
    /// Read the blocks and send their digests on the query's stream.
    AnswerSums(SumRequest),
    /// Commit the agent's checkpoint, not before `not_before`, then confirm it.
    SaveCheckpoint { seq: u64, not_before: Instant },
    /// This stream delivered the epoch's last barrier: wait for the epoch's writes,
    /// then report it applied with [`SessionCore::applied`] and queue it to be made
    /// durable.
    Sealed(Sealed),
    /// Other streams have yet to deliver this epoch's barrier: read nothing more on this
    /// stream until it is applied.
    AwaitApplied(u64),
    /// A heartbeat was recorded; it reports this many bytes waiting on the agent.
    Heartbeat { backlog_bytes: u64 },
    /// Nothing to do (a frame of a kind a newer agent may send).
    Ignore,
    /// The stream ends here.
    End(End),
}

/// Where the session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Frames are accepted from every joined stream.
    Streaming,
    /// The session is over: no frame is accepted any more, while epochs already sealed are
    /// still made durable.
    Draining,
}

/// The newest epoch applied on every stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SealedMark {
    /// Sequence number of its last write.
    pub(crate) through: u64,
    pub(crate) epoch: u64,
    /// Whether it ends at a crash-consistent point.
    pub(crate) consistent: bool,
}

/// A write submitted but not yet sealed by a barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unsealed {
    pub(crate) seq: u64,
    pub(crate) disk: u16,
    pub(crate) start: u64,
    pub(crate) end: u64,
}

/// What `status` shows of a live session.
#[derive(Debug, Clone)]
pub(crate) struct LiveView {
    pub(crate) streams: u8,
    pub(crate) lag_seconds: f64,
    /// The agent's latest heartbeat, if one has come.
    pub(crate) heartbeat: Option<Heartbeat>,
    /// Bytes per second received over the last 10 s.
    pub(crate) receive_rate: f64,
    /// Changes are waiting and nothing became durable for the stall time.
    pub(crate) no_progress: bool,
    /// Nothing became durable for the stall time, and the server is not paused: a stall
    /// for any disk with work left, such as the rest of an initial sync, whose every
    /// received byte may be sealed while the link carries no more (heartbeats, queued
    /// behind the data on a saturated link, cannot be relied on to say so).
    pub(crate) idle_too_long: bool,
    /// Why the latest recovery point failed (EBS backend), until one succeeds.
    pub(crate) recovery_point_error: Option<String>,
    disk_names: Vec<String>,
}

impl LiveView {
    /// The index heartbeats give disk `name`.
    pub(crate) fn disk_index(&self, name: &str) -> Option<usize> {
        self.disk_names.iter().position(|n| n == name)
    }
}

/// A durable proof for an epoch the ledger cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LedgerError {
    #[error("epoch {epoch} was recorded durable before it was applied (applied through {applied})")]
    NotApplied { epoch: u64, applied: u64 },
    #[error(
        "epoch {epoch} was recorded durable after epoch {durable}: epochs become durable in order"
    )]
    OutOfOrder { epoch: u64, durable: u64 },
}

/// The protocol state of one session, shared by its streams.
#[derive(Debug)]
pub(crate) struct SessionCore {
    phase: Phase,
    disks: Vec<DiskRules>,
    streams: u8,
    /// Bit i: stream i has joined.
    joined: u8,
    gate: EpochGate,
    sealed: SealedMark,
    unsealed: Option<VecDeque<Unsealed>>,
    /// The newest epoch made durable, and when (Unix ms; 0 before any in this session).
    durable: (u64, u64),
    started_at_ms: u64,
    /// Unix ms of the session's start, its latest durable epoch, or a pause or resume.
    progress_at_ms: u64,
    stall_after: Duration,
    /// An operator paused the server: no progress is expected, so none is missed.
    paused: bool,
    /// When the latest checkpoint commit was (or will be) allowed.
    last_checkpoint: Option<Instant>,
    heartbeat: Option<Heartbeat>,
    /// Ending to hear of a granted slot: the server keeps its slots for its next session.
    keeping_slots: bool,
}

impl SessionCore {
    /// A session whose first stream (index 0) has joined.
    pub(crate) fn new(config: CoreConfig) -> Self {
        let streams = config.streams.clamp(1, MAX_STREAMS);
        Self {
            phase: Phase::Streaming,
            disks: config.disks,
            streams,
            joined: 1,
            gate: EpochGate::new(streams, config.durable_epoch + 1),
            // Whatever the images hold at the start, no barrier of this session vouched
            // for it.
            sealed: SealedMark {
                through: 0,
                epoch: config.durable_epoch,
                consistent: false,
            },
            unsealed: config.track_unsealed.then(VecDeque::new),
            durable: (config.durable_epoch, 0),
            started_at_ms: config.now_ms,
            progress_at_ms: config.now_ms,
            stall_after: config.stall_after,
            paused: config.paused,
            last_checkpoint: None,
            heartbeat: None,
            keeping_slots: false,
        }
    }

    /// The first epoch this session's agent closes.
    pub(crate) fn next_epoch(&self) -> u64 {
        self.durable.0 + 1
    }

    /// Lets stream `index` join: each of 1 to streams − 1 joins once.
    pub(crate) fn join(&mut self, index: u8) -> Result<(), SessionError> {
        if self.phase == Phase::Draining {
            return Err(SessionError::Protocol(
                "JoinStream for a session that is ending".into(),
            ));
        }
        if index == 0 || index >= self.streams || self.joined & (1 << index) != 0 {
            return Err(SessionError::Limit(format!(
                "stream {index} refused: the session was granted {} streams (at most {MAX_STREAMS}), numbered 1 to {} beyond the first, each joining once",
                self.streams,
                self.streams - 1
            )));
        }
        self.joined |= 1 << index;
        Ok(())
    }

    /// The session is over: no frame is accepted from now on.
    pub(crate) fn drain(&mut self) {
        self.phase = Phase::Draining;
    }

    /// Decides what a frame from `stream` means. `now` paces checkpoints; `submitted`
    /// is the sequence number of the last write submitted on any stream, which a barrier
    /// covers.
    pub(crate) fn accept(
        &mut self,
        stream: u8,
        frame: Frame,
        now: Instant,
        submitted: u64,
    ) -> Result<Step, SessionError> {
        if self.phase == Phase::Draining {
            return Ok(Step::End(End::SessionEnded));
        }
        match frame {
            Frame::Write(write) => {
                self.check_write(&write)?;
                Ok(Step::Apply(write))
            }
            Frame::SumRequest(request) => {
                self.check_sum_request(&request)?;
                Ok(Step::AnswerSums(request))
            }
            Frame::Checkpoint(checkpoint) => {
                // One catalog commit per CHECKPOINT_INTERVAL at most: an agent sends one
                // at a clean stop; a flood of them waits (and so does its stream).
                let at = self
                    .last_checkpoint
                    .map_or(now, |t| (t + CHECKPOINT_INTERVAL).max(now));
                self.last_checkpoint = Some(at);
                Ok(Step::SaveCheckpoint {
                    seq: checkpoint.seq,
                    not_before: at,
                })
            }
            Frame::Barrier(barrier) => self.barrier(stream, &barrier, submitted),
            Frame::Heartbeat(heartbeat) => {
                self.check_heartbeat(&heartbeat)?;
                let backlog_bytes = heartbeat.backlog_bytes;
                self.heartbeat = Some(heartbeat);
                Ok(Step::Heartbeat { backlog_bytes })
            }
            Frame::Goodbye(_) => Ok(Step::End(End::Goodbye)),
            Frame::Error(_) => Ok(Step::End(End::AgentError)),
            // A newer agent may send frames we do not know; they are not ours to act on.
            Frame::Unknown { .. } => Ok(Step::Ignore),
            other @ (Frame::Hello(_)
            | Frame::Welcome(_)
            | Frame::JoinStream(_)
            | Frame::Durable(_)
            | Frame::SumReply(_)
            | Frame::CheckpointSaved(_)
            | Frame::SettingsUpdate(_)) => Err(SessionError::Protocol(format!(
                "unexpected {} frame during replication",
                other.kind()
            ))),
        }
    }

    fn disk(&self, index: u16, what: &str) -> Result<&DiskRules, SessionError> {
        self.disks.get(usize::from(index)).ok_or_else(|| {
            SessionError::Protocol(format!(
                "{what} disk index {index}, but the session has {} disks",
                self.disks.len()
            ))
        })
    }

    fn check_write(&self, write: &Write) -> Result<(), SessionError> {
        let h = &write.header;
        let disk = self.disk(h.disk, "write to")?;
        if h.flags.0 & !KNOWN_FLAGS != 0 {
            return Err(SessionError::Unsupported(format!(
                "write flags {:#06x} on disk {} (compression and unknown flags are not supported by this receiver)",
                h.flags.0, disk.name
            )));
        }
        debug_assert!(h.len <= MAX_WRITE_DATA);
        let end = match h.offset.checked_add(u64::from(h.len)) {
            Some(end) if end <= disk.size => end,
            _ => {
                return Err(SessionError::OutOfRange(format!(
                    "write of {} bytes at offset {} is beyond the end of disk {} ({} bytes)",
                    h.len, h.offset, disk.name, disk.size
                )));
            }
        };
        // A queued disk waits for its slot: only changes to what is synced already may go
        // on (an initial-sync write in disguise may not).
        if disk.queued && (h.flags.contains(WriteFlags::INITIAL_SYNC) || end > disk.synced) {
            return Err(SessionError::Limit(format!(
                "write of {} bytes at {} to disk {}, which waits for a sync slot (Welcome said QUEUED): only changes below its watermark of {} may be sent",
                h.len, h.offset, disk.name, disk.synced
            )));
        }
        Ok(())
    }

    /// A checksum query must name a disk of the session and start inside it; its last
    /// block may run past the end (it is hashed over the bytes that exist). Count and
    /// block size were checked by the decoder.
    fn check_sum_request(&self, request: &SumRequest) -> Result<(), SessionError> {
        let disk = self.disk(request.disk, "SumRequest for")?;
        let block = u64::from(request.block_size);
        let in_range = request.offset().is_some_and(|offset| {
            offset < disk.size && offset + request.len() <= disk.size.div_ceil(block) * block
        });
        if !in_range {
            return Err(SessionError::OutOfRange(format!(
                "SumRequest for {} blocks of {} bytes from block {} is beyond the end of disk {} ({} bytes)",
                request.count, request.block_size, request.first_block, disk.name, disk.size
            )));
        }
        Ok(())
    }

    fn check_heartbeat(&self, heartbeat: &Heartbeat) -> Result<(), SessionError> {
        let disks = self.disks.len();
        if let Some(beat) = heartbeat
            .disks
            .iter()
            .find(|b| usize::from(b.disk) >= disks)
        {
            return Err(SessionError::Protocol(format!(
                "heartbeat names disk index {}, which does not exist",
                beat.disk
            )));
        }
        if let Some(capture) = heartbeat
            .tracking
            .iter()
            .flat_map(|t| &t.disks)
            .find(|c| usize::from(c.disk) >= disks)
        {
            return Err(SessionError::Protocol(format!(
                "heartbeat names disk index {} in its tracking, which does not exist",
                capture.disk
            )));
        }
        Ok(())
    }

    /// What a barrier may claim: progress within each disk, and none at all for a disk
    /// waiting for its sync slot.
    fn barrier(
        &mut self,
        stream: u8,
        barrier: &Barrier,
        submitted: u64,
    ) -> Result<Step, SessionError> {
        for &index in &barrier.rescan_done {
            let disk = self.disks.get(usize::from(index)).ok_or_else(|| {
                SessionError::Protocol(format!(
                    "barrier claims the rescan of disk index {index}, which does not exist"
                ))
            })?;
            if disk.queued {
                return Err(SessionError::Limit(format!(
                    "barrier claims the rescan of disk {}, which waits for a sync slot (Welcome said QUEUED)",
                    disk.name
                )));
            }
        }
        let progress = barrier
            .sync_progress
            .iter()
            .map(|p| {
                let disk = self.disks.get(usize::from(p.disk)).ok_or_else(|| {
                    SessionError::Protocol(format!(
                        "barrier names disk index {}, which does not exist",
                        p.disk
                    ))
                })?;
                if p.watermark > disk.size {
                    return Err(SessionError::OutOfRange(format!(
                        "barrier claims a watermark of {} on disk {}, beyond its size of {}",
                        p.watermark, disk.name, disk.size
                    )));
                }
                if disk.queued && p.watermark > disk.synced {
                    return Err(SessionError::Limit(format!(
                        "barrier claims initial-sync progress to {} on disk {}, which waits for a sync slot (Welcome said QUEUED) at {}",
                        p.watermark, disk.name, disk.synced
                    )));
                }
                Ok((p.disk, p.watermark))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let sealed = self
            .gate
            .arrive(
                stream,
                barrier.epoch,
                submitted,
                &progress,
                &barrier.rescan_done,
                barrier.consistent,
            )
            .map_err(|e| SessionError::Protocol(e.to_string()))?;
        Ok(match sealed {
            Some(sealed) => Step::Sealed(sealed),
            None => Step::AwaitApplied(barrier.epoch),
        })
    }

    /// Write `seq` was submitted (kept only where the images must know what lies beyond
    /// the consistent epoch).
    pub(crate) fn submitted(&mut self, write: Unsealed) {
        if let Some(unsealed) = &mut self.unsealed {
            unsealed.push_back(write);
        }
    }

    /// Every write of the sealed epoch has completed: streams waiting at its barrier may
    /// go on. Returns the epoch applied.
    pub(crate) fn applied(&mut self, sealed: &Sealed) -> u64 {
        self.sealed = SealedMark {
            through: sealed.through,
            epoch: sealed.epoch,
            consistent: sealed.consistent,
        };
        if let Some(unsealed) = &mut self.unsealed {
            unsealed.retain(|w| w.seq > sealed.through);
        }
        self.gate.mark_applied(sealed.epoch);
        sealed.epoch
    }

    pub(crate) fn applied_through(&self) -> u64 {
        self.gate.applied_through()
    }

    /// Whether every stream has delivered the barrier of `epoch`.
    pub(crate) fn is_sealed(&self, epoch: u64) -> bool {
        self.gate.next() > epoch
    }

    pub(crate) fn sealed_mark(&self) -> SealedMark {
        self.sealed
    }

    /// The writes not sealed by any barrier, which the images hold beyond the consistent
    /// epoch (empty unless tracked).
    pub(crate) fn take_unsealed(&mut self) -> Vec<Unsealed> {
        self.unsealed
            .as_mut()
            .map(|u| u.drain(..).collect())
            .unwrap_or_default()
    }

    /// The catalog holds `record`'s epoch as durable: the agent may be told. The only way
    /// to a `Durable` frame.
    pub(crate) fn durable(
        &mut self,
        record: &DurableRecord,
        now_ms: u64,
    ) -> Result<Durable, LedgerError> {
        let epoch = record.epoch();
        if epoch > self.gate.applied_through() {
            return Err(LedgerError::NotApplied {
                epoch,
                applied: self.gate.applied_through(),
            });
        }
        if epoch <= self.durable.0 {
            return Err(LedgerError::OutOfOrder {
                epoch,
                durable: self.durable.0,
            });
        }
        self.durable = (epoch, now_ms);
        self.progress_at_ms = now_ms;
        Ok(Durable { epoch })
    }

    /// An operator paused or resumed the server.
    pub(crate) fn set_paused(&mut self, paused: bool, now_ms: u64) {
        if std::mem::replace(&mut self.paused, paused) != paused {
            // The stall clock starts again: a pause is no lack of progress, and a resume
            // gives the agent the stall time to show some.
            self.progress_at_ms = now_ms;
        }
    }

    pub(crate) fn keep_slots(&mut self) {
        self.keeping_slots = true;
    }

    pub(crate) fn keeping_slots(&self) -> bool {
        self.keeping_slots
    }

    /// What `status` shows: `submitted` is the last write submitted, `receive_rate` and
    /// `recovery_point_error` come from the driver's meters.
    pub(crate) fn live_view(
        &self,
        now_ms: u64,
        submitted: u64,
        receive_rate: f64,
        recovery_point_error: Option<String>,
    ) -> LiveView {
        let pending = submitted > self.sealed.through
            || self
                .heartbeat
                .as_ref()
                .is_some_and(|hb| hb.backlog_bytes > 0);
        let idle_ms = now_ms.saturating_sub(self.progress_at_ms);
        let idle_too_long = !self.paused && u128::from(idle_ms) > self.stall_after.as_millis();
        let since = match self.durable.1 {
            0 => self.started_at_ms,
            at => at,
        };
        LiveView {
            streams: u8::try_from(self.joined.count_ones()).unwrap_or(u8::MAX),
            lag_seconds: if pending {
                now_ms.saturating_sub(since) as f64 / 1000.0
            } else {
                0.0
            },
            heartbeat: self.heartbeat.clone(),
            receive_rate,
            no_progress: pending && idle_too_long,
            idle_too_long,
            recovery_point_error,
            disk_names: self.disks.iter().map(|d| d.name.clone()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each receiver-side protocol rule of DESIGN.md, against the core alone: no socket,
    //! no store, no catalog.

    use super::*;
    use blockferry_proto::{
        Checkpoint, DiskBeat, DiskSpec, DiskState, Goodbye, Inventory, ResumeClaim, SyncProgress,
        TrackingBeat, WriteHeader,
    };

    const MIB: u64 = 1 << 20;

    fn disk(name: &str, size: u64) -> DiskRules {
        DiskRules {
            name: name.into(),
            size,
            synced: size,
            queued: false,
        }
    }

    fn core(streams: u8, disks: Vec<DiskRules>) -> SessionCore {
        SessionCore::new(CoreConfig {
            streams,
            durable_epoch: 9,
            disks,
            stall_after: Duration::from_secs(30),
            paused: false,
            now_ms: 1_000_000,
            track_unsealed: true,
        })
    }

    fn write(disk: u16, offset: u64, len: u32, flags: WriteFlags) -> Frame {
        Frame::Write(Write {
            header: WriteHeader {
                disk,
                flags,
                offset,
                len,
                epoch: 10,
            },
            data: if flags.contains(WriteFlags::ZERO_FILL) {
                Vec::new()
            } else {
                vec![7; len as usize]
            },
        })
    }

    fn barrier(epoch: u64, progress: &[(u16, u64)], consistent: bool) -> Frame {
        Frame::Barrier(Barrier {
            epoch,
            sync_progress: progress
                .iter()
                .map(|&(disk, watermark)| SyncProgress { disk, watermark })
                .collect(),
            rescan_done: Vec::new(),
            consistent,
        })
    }

    fn accept(core: &mut SessionCore, stream: u8, frame: Frame) -> Result<Step, SessionError> {
        core.accept(stream, frame, Instant::now(), 0)
    }

    fn hello(disks: &[(&str, u64)]) -> Hello {
        Hello {
            agent_version: "test".into(),
            inventory: Inventory::default(),
            disks: disks
                .iter()
                .map(|&(name, size)| DiskSpec {
                    name: name.into(),
                    size,
                })
                .collect(),
            streams: 4,
            series: [1; 16],
            resume: ResumeClaim::NoRecord,
        }
    }

    #[test]
    fn a_connection_opens_with_hello_or_join_stream_and_nothing_else() {
        assert!(matches!(
            opening(Frame::Hello(hello(&[("vda", MIB)]))),
            Ok(Opening::Hello(_))
        ));
        assert!(matches!(
            opening(Frame::JoinStream(JoinStream {
                session_id: [0; 16],
                stream_index: 1
            })),
            Ok(Opening::Join(_))
        ));
        let err = opening(barrier(1, &[], true)).unwrap_err();
        assert!(matches!(err, SessionError::Protocol(_)), "{err}");
        assert!(err.to_string().contains("expected Hello or JoinStream"));
    }

    #[test]
    fn a_hello_is_checked_against_the_receivers_limits() {
        check_hello(&hello(&[("vda", MIB), ("vdb", 2 * MIB)]), 4 * MIB).unwrap();
        for (bad, what) in [
            (hello(&[]), "no disks"),
            (hello(&[("vda", MIB), ("vda", MIB)]), "appears twice"),
            (hello(&[("vda", 0)]), "size 0"),
            (hello(&[("../etc", MIB)]), "disk name"),
        ] {
            let err = check_hello(&bad, 4 * MIB).unwrap_err();
            assert!(matches!(err, SessionError::Protocol(_)), "{what}: {err}");
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
        let err = check_hello(&hello(&[("vda", 8 * MIB)]), 4 * MIB).unwrap_err();
        assert!(matches!(err, SessionError::Limit(_)), "{err}");
        assert!(err.to_string().contains("--max-disk-size"), "{err}");
    }

    #[test]
    fn an_agents_strings_are_escaped_before_anyone_prints_them() {
        let mut raw = hello(&[("vda", MIB)]);
        raw.inventory.host_name = "web\x1b[2J01".into();
        raw.agent_version = "1.0\n".into();
        let clean = printable_hello(raw);
        assert!(!clean.inventory.host_name.contains('\x1b'));
        assert!(!clean.agent_version.contains('\n'));
    }

    #[test]
    fn the_streams_granted_are_within_both_caps_and_at_least_one() {
        assert_eq!(granted_streams(4, 2), 2, "the receiver's cap");
        assert_eq!(granted_streams(2, 4), 2, "what the agent asked for");
        assert_eq!(granted_streams(0, 4), 1);
        assert_eq!(granted_streams(4, 0), 1);
        assert_eq!(granted_streams(u8::MAX, u8::MAX), MAX_STREAMS);
    }

    #[test]
    fn each_further_stream_joins_once_by_its_index() {
        let mut core = core(3, vec![disk("vda", MIB)]);
        assert!(
            matches!(core.join(0), Err(SessionError::Limit(_))),
            "0 is the first"
        );
        assert!(
            matches!(core.join(3), Err(SessionError::Limit(_))),
            "3 was not granted"
        );
        core.join(2).unwrap();
        assert!(
            matches!(core.join(2), Err(SessionError::Limit(_))),
            "joined already"
        );
        core.join(1).unwrap();
        let view = core.live_view(1_000_000, 0, 0.0, None);
        assert_eq!(view.streams, 3);
        let mut ending = self::core(3, vec![disk("vda", MIB)]);
        ending.drain();
        assert!(matches!(ending.join(1), Err(SessionError::Protocol(_))));
    }

    #[test]
    fn a_write_must_lie_inside_a_disk_of_the_session() {
        let mut core = core(1, vec![disk("vda", MIB)]);
        assert!(matches!(
            accept(
                &mut core,
                0,
                write(0, MIB - 4096, 4096, WriteFlags::default())
            ),
            Ok(Step::Apply(_))
        ));
        let err = accept(
            &mut core,
            0,
            write(0, MIB - 4095, 4096, WriteFlags::default()),
        )
        .unwrap_err();
        assert!(matches!(err, SessionError::OutOfRange(_)), "{err}");
        // Checked arithmetic: an offset that wraps around is beyond the end too.
        let err = accept(
            &mut core,
            0,
            write(0, u64::MAX - 10, 4096, WriteFlags::ZERO_FILL),
        )
        .unwrap_err();
        assert!(matches!(err, SessionError::OutOfRange(_)), "{err}");
        let err = accept(&mut core, 0, write(1, 0, 4096, WriteFlags::default())).unwrap_err();
        assert!(matches!(err, SessionError::Protocol(_)), "{err}");
        assert!(err.to_string().contains("disk index 1"), "{err}");
    }

    #[test]
    fn writes_with_flags_this_receiver_cannot_apply_are_refused() {
        let mut core = core(1, vec![disk("vda", MIB)]);
        let err = accept(&mut core, 0, write(0, 0, 4096, WriteFlags(0x8000))).unwrap_err();
        assert!(matches!(err, SessionError::Unsupported(_)), "{err}");
        assert!(matches!(
            accept(&mut core, 0, write(0, 0, 4096, WriteFlags::ZERO_FILL)),
            Ok(Step::Apply(_))
        ));
    }

    #[test]
    fn a_disk_waiting_for_its_sync_slot_takes_only_changes_below_its_watermark() {
        let queued = DiskRules {
            synced: 64 * 1024,
            queued: true,
            ..disk("vda", MIB)
        };
        let mut core = core(1, vec![queued]);
        assert!(matches!(
            accept(&mut core, 0, write(0, 0, 4096, WriteFlags::default())),
            Ok(Step::Apply(_))
        ));
        for frame in [
            write(0, 0, 4096, WriteFlags::INITIAL_SYNC),
            write(0, 64 * 1024 - 4096, 8192, WriteFlags::default()),
            barrier(10, &[(0, 128 * 1024)], true),
        ] {
            let err = accept(&mut core, 0, frame).unwrap_err();
            assert!(matches!(err, SessionError::Limit(_)), "{err}");
            assert!(err.to_string().contains("QUEUED"), "{err}");
        }
        let claim = Frame::Barrier(Barrier {
            epoch: 10,
            sync_progress: Vec::new(),
            rescan_done: vec![0],
            consistent: true,
        });
        assert!(matches!(
            accept(&mut core, 0, claim),
            Err(SessionError::Limit(_))
        ));
    }

    #[test]
    fn a_checksum_query_may_end_past_the_disk_only_within_its_last_block() {
        let mut core = core(1, vec![disk("vda", MIB + 1000)]);
        let query = |first_block, count| {
            Frame::SumRequest(SumRequest {
                disk: 0,
                first_block,
                count,
                block_size: 4096,
            })
        };
        // The last block holds the 1000 bytes past the last whole one.
        assert!(matches!(
            accept(&mut core, 0, query(250, 7)),
            Ok(Step::AnswerSums(_))
        ));
        for (first, count) in [(250, 8), (257, 1), (u64::MAX / 4096, 2)] {
            let err = accept(&mut core, 0, query(first, count)).unwrap_err();
            assert!(
                matches!(err, SessionError::OutOfRange(_)),
                "{first}+{count}: {err}"
            );
        }
        let other_disk = Frame::SumRequest(SumRequest {
            disk: 3,
            first_block: 0,
            count: 1,
            block_size: 4096,
        });
        assert!(matches!(
            accept(&mut core, 0, other_disk),
            Err(SessionError::Protocol(_))
        ));
    }

    #[test]
    fn an_epoch_seals_on_the_last_streams_barrier_covering_every_write_before_it() {
        let mut core = core(2, vec![disk("vda", MIB), disk("vdb", MIB)]);
        core.join(1).unwrap();
        let now = Instant::now();
        let step = core
            .accept(0, barrier(10, &[(0, 4096)], true), now, 5)
            .unwrap();
        assert!(matches!(step, Step::AwaitApplied(10)), "{step:?}");
        let step = core
            .accept(1, barrier(10, &[(1, 8192)], true), now, 3)
            .unwrap();
        let Step::Sealed(sealed) = step else {
            panic!("the last barrier seals: {step:?}")
        };
        assert_eq!(sealed.epoch, 10);
        assert_eq!(
            sealed.through, 5,
            "every write submitted before either barrier"
        );
        assert_eq!(sealed.progress, vec![(0, 4096), (1, 8192)]);
        assert!(sealed.consistent);
        // Epochs go in order, once per stream.
        let err = core.accept(0, barrier(12, &[], true), now, 5).unwrap_err();
        assert!(err.to_string().contains("next epoch is 11"), "{err}");
        core.accept(0, barrier(11, &[], false), now, 6).unwrap();
        let err = core.accept(0, barrier(11, &[], true), now, 6).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        let Step::Sealed(sealed) = core.accept(1, barrier(11, &[], true), now, 6).unwrap() else {
            panic!("sealed")
        };
        assert!(
            !sealed.consistent,
            "one stream said the epoch is not a consistent point"
        );
    }

    #[test]
    fn a_barrier_claims_progress_only_within_the_disks_of_the_session() {
        let mut core = core(1, vec![disk("vda", MIB)]);
        let err = accept(&mut core, 0, barrier(10, &[(0, MIB + 1)], true)).unwrap_err();
        assert!(matches!(err, SessionError::OutOfRange(_)), "{err}");
        let err = accept(&mut core, 0, barrier(10, &[(4, 0)], true)).unwrap_err();
        assert!(matches!(err, SessionError::Protocol(_)), "{err}");
        let rescan_of_nothing = Frame::Barrier(Barrier {
            epoch: 10,
            sync_progress: Vec::new(),
            rescan_done: vec![9],
            consistent: true,
        });
        assert!(matches!(
            accept(&mut core, 0, rescan_of_nothing),
            Err(SessionError::Protocol(_))
        ));
        // Refused barriers left the gate as it was: epoch 10 is still next.
        assert!(matches!(
            accept(&mut core, 0, barrier(10, &[(0, MIB)], true)),
            Ok(Step::Sealed(_))
        ));
    }

    #[test]
    fn durable_is_told_only_for_an_applied_epoch_in_order() {
        let mut core = core(1, vec![disk("vda", MIB)]);
        let Step::Sealed(sealed) = accept(&mut core, 0, barrier(10, &[], true)).unwrap() else {
            panic!("sealed")
        };
        assert_eq!(
            core.durable(&DurableRecord::for_test(10), 1_000_100),
            Err(LedgerError::NotApplied {
                epoch: 10,
                applied: 9
            }),
            "sealed is not applied: its writes may still be in flight"
        );
        assert_eq!(core.applied(&sealed), 10);
        assert_eq!(core.applied_through(), 10);
        assert_eq!(
            core.durable(&DurableRecord::for_test(10), 1_000_100),
            Ok(Durable { epoch: 10 })
        );
        assert_eq!(
            core.durable(&DurableRecord::for_test(10), 1_000_200),
            Err(LedgerError::OutOfOrder {
                epoch: 10,
                durable: 10
            }),
            "an epoch is acknowledged once"
        );
        assert!(
            core.durable(&DurableRecord::for_test(9), 1_000_200)
                .is_err(),
            "an epoch of an earlier session is no news"
        );
    }

    #[test]
    fn the_images_beyond_the_consistent_point_are_the_writes_no_barrier_sealed() {
        let mut core = core(1, vec![disk("vda", MIB)]);
        for seq in 1..=4 {
            core.submitted(Unsealed {
                seq,
                disk: 0,
                start: seq * 4096,
                end: (seq + 1) * 4096,
            });
        }
        let Step::Sealed(sealed) = core
            .accept(0, barrier(10, &[], true), Instant::now(), 2)
            .unwrap()
        else {
            panic!("sealed")
        };
        core.applied(&sealed);
        assert_eq!(
            core.sealed_mark(),
            SealedMark {
                through: 2,
                epoch: 10,
                consistent: true
            }
        );
        let left: Vec<u64> = core.take_unsealed().iter().map(|w| w.seq).collect();
        assert_eq!(left, vec![3, 4]);
        assert!(core.take_unsealed().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn checkpoint_commits_are_paced_however_many_an_agent_sends() {
        let mut core = core(1, vec![disk("vda", MIB)]);
        let start = Instant::now();
        let mut times = Vec::new();
        for seq in 0..5 {
            let step = core
                .accept(0, Frame::Checkpoint(Checkpoint { seq }), Instant::now(), 0)
                .unwrap();
            let Step::SaveCheckpoint {
                seq: got,
                not_before,
            } = step
            else {
                panic!("{step:?}")
            };
            assert_eq!(got, seq);
            times.push(not_before - start);
        }
        let spaced: Vec<Duration> = (0..5).map(|i| CHECKPOINT_INTERVAL * i).collect();
        assert_eq!(times, spaced, "the first at once, then one per interval");
        // Once the interval has passed, the next one is not held back.
        tokio::time::advance(Duration::from_secs(5)).await;
        let Step::SaveCheckpoint { not_before, .. } = core
            .accept(
                0,
                Frame::Checkpoint(Checkpoint { seq: 9 }),
                Instant::now(),
                0,
            )
            .unwrap()
        else {
            panic!("checkpoint")
        };
        assert_eq!(not_before, Instant::now());
    }

    #[test]
    fn a_heartbeat_names_only_disks_of_the_session_and_is_kept_for_status() {
        let mut core = core(1, vec![disk("vda", MIB)]);
        let beat = |disk| Heartbeat {
            backlog_bytes: 123,
            disks: vec![DiskBeat {
                disk,
                state: DiskState::CONTINUOUS,
                backlog_bytes: 123,
            }],
            ..Heartbeat::default()
        };
        let err = accept(&mut core, 0, Frame::Heartbeat(beat(1))).unwrap_err();
        assert!(matches!(err, SessionError::Protocol(_)), "{err}");
        let tracking = Heartbeat {
            tracking: Some(TrackingBeat {
                disks: vec![blockferry_proto::DiskCapture {
                    disk: 5,
                    mode: blockferry_proto::CaptureKind::BLOCK,
                }],
                ..TrackingBeat::default()
            }),
            ..Heartbeat::default()
        };
        let err = accept(&mut core, 0, Frame::Heartbeat(tracking)).unwrap_err();
        assert!(err.to_string().contains("tracking"), "{err}");
        assert!(matches!(
            accept(&mut core, 0, Frame::Heartbeat(beat(0))),
            Ok(Step::Heartbeat { backlog_bytes: 123 })
        ));
        let view = core.live_view(1_000_000, 0, 0.0, None);
        assert_eq!(
            view.heartbeat.as_ref().map(|hb| hb.backlog_bytes),
            Some(123)
        );
        assert_eq!(view.disk_index("vda"), Some(0));
    }

    #[test]
    fn frames_only_a_receiver_sends_are_refused_and_unknown_kinds_are_ignored() {
        let mut core = core(1, vec![disk("vda", MIB)]);
        for frame in [
            Frame::Hello(hello(&[("vda", MIB)])),
            Frame::Durable(Durable { epoch: 10 }),
            Frame::CheckpointSaved(Checkpoint { seq: 1 }),
        ] {
            let kind = frame.kind();
            let err = accept(&mut core, 0, frame).unwrap_err();
            assert!(matches!(err, SessionError::Protocol(_)), "{kind}: {err}");
        }
        assert!(matches!(
            accept(
                &mut core,
                0,
                Frame::Unknown {
                    kind: blockferry_proto::FrameKind(0x7f),
                    payload: vec![1, 2, 3],
                }
            ),
            Ok(Step::Ignore)
        ));
        assert!(matches!(
            accept(
                &mut core,
                0,
                Frame::Goodbye(Goodbye {
                    message: "bye".into()
                })
            ),
            Ok(Step::End(End::Goodbye))
        ));
    }

    #[test]
    fn a_session_that_is_ending_accepts_no_more_frames() {
        let mut core = core(1, vec![disk("vda", MIB)]);
        core.drain();
        assert!(matches!(
            accept(&mut core, 0, write(0, 0, 4096, WriteFlags::default())),
            Ok(Step::End(End::SessionEnded))
        ));
    }

    #[test]
    fn lag_and_the_stall_clock_follow_durable_progress_and_pauses() {
        const T0: u64 = 1_000_000;
        let mut core = core(1, vec![disk("vda", MIB)]);
        let idle = core.live_view(T0 + 60_000, 0, 0.0, None);
        assert_eq!(idle.lag_seconds, 0.0, "nothing waits: no lag");
        assert!(!idle.no_progress);
        assert!(
            idle.idle_too_long,
            "but nothing became durable for the stall time"
        );

        // A write waits; nothing is durable for 31 s: lag counts from the session's start.
        let waiting = core.live_view(T0 + 31_000, 1, 0.0, None);
        assert_eq!(waiting.lag_seconds, 31.0);
        assert!(waiting.no_progress);

        let Step::Sealed(sealed) = core
            .accept(0, barrier(10, &[], true), Instant::now(), 1)
            .unwrap()
        else {
            panic!("sealed")
        };
        core.applied(&sealed);
        core.durable(&DurableRecord::for_test(10), T0 + 40_000)
            .unwrap();
        let caught_up = core.live_view(T0 + 41_000, 1, 0.0, None);
        assert_eq!(caught_up.lag_seconds, 0.0);
        let behind = core.live_view(T0 + 45_000, 2, 0.0, None);
        assert_eq!(
            behind.lag_seconds, 5.0,
            "lag counts from the newest durable point"
        );
        assert!(!behind.no_progress);

        // Paused: no progress is expected. Resumed: the stall time starts again.
        core.set_paused(true, T0 + 50_000);
        assert!(!core.live_view(T0 + 200_000, 2, 0.0, None).idle_too_long);
        core.set_paused(false, T0 + 200_000);
        assert!(!core.live_view(T0 + 220_000, 2, 0.0, None).no_progress);
        assert!(core.live_view(T0 + 231_000, 2, 0.0, None).no_progress);
    }
}
