//! The messages of the protocol and their payload encodings.
//!
//! All integers are big endian. Strings carry a u16 byte length, lists a u16 item count;
//! both have a named maximum in [`crate::limits`].

use std::fmt;

use crate::codec::{DecodeError, Put, Reader, finish_frame, start_frame};
use crate::limits::{
    MAX_CPUS, MAX_DISK_NAME_LEN, MAX_DISKS, MAX_INVENTORY_DISKS, MAX_IPS, MAX_STRING_LEN,
    MAX_SUM_BLOCK_SIZE, MAX_SUM_BLOCKS, MAX_SUM_RANGE, MAX_WRITE_DATA, MIN_SUM_BLOCK_SIZE,
};

/// The kind byte of a frame. Unknown kinds are carried through as [`Frame::Unknown`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameKind(pub u8);

impl FrameKind {
    pub const HELLO: Self = Self(1);
    pub const WELCOME: Self = Self(2);
    pub const JOIN_STREAM: Self = Self(3);
    pub const WRITE: Self = Self(4);
    pub const BARRIER: Self = Self(5);
    pub const DURABLE: Self = Self(6);
    pub const HEARTBEAT: Self = Self(7);
    pub const ERROR: Self = Self(8);
    pub const GOODBYE: Self = Self(9);
    pub const SUM_REQUEST: Self = Self(10);
    pub const SUM_REPLY: Self = Self(11);
    pub const CHECKPOINT: Self = Self(12);
    pub const CHECKPOINT_SAVED: Self = Self(13);
    pub const SETTINGS_UPDATE: Self = Self(14);

    fn name(self) -> Option<&'static str> {
        Some(match self {
            Self::HELLO => "Hello",
            Self::WELCOME => "Welcome",
            Self::JOIN_STREAM => "JoinStream",
            Self::WRITE => "Write",
            Self::BARRIER => "Barrier",
            Self::DURABLE => "Durable",
            Self::HEARTBEAT => "Heartbeat",
            Self::ERROR => "Error",
            Self::GOODBYE => "Goodbye",
            Self::SUM_REQUEST => "SumRequest",
            Self::SUM_REPLY => "SumReply",
            Self::CHECKPOINT => "Checkpoint",
            Self::CHECKPOINT_SAVED => "CheckpointSaved",
            Self::SETTINGS_UPDATE => "SettingsUpdate",
            _ => return None,
        })
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "unknown kind {}", self.0),
        }
    }
}

impl fmt::Debug for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    JoinStream(JoinStream),
    Write(Write),
    Barrier(Barrier),
    Durable(Durable),
    Heartbeat(Heartbeat),
    Error(ErrorFrame),
    Goodbye(Goodbye),
    SumRequest(SumRequest),
    SumReply(SumReply),
    Checkpoint(Checkpoint),
    CheckpointSaved(Checkpoint),
    SettingsUpdate(SettingsUpdate),
    /// A frame of a kind this version does not know, kept whole so that it can be logged
    /// or forwarded rather than mistaken for something else.
    Unknown {
        kind: FrameKind,
        payload: Vec<u8>,
    },
}

/// First frame of a session, agent → receiver. Identity is *not* in here: it comes from
/// the client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The agent's software version, for logs and status.
    pub agent_version: String,
    pub inventory: Inventory,
    /// The disks this agent replicates; a disk's position here is its `disk` index in
    /// every later frame of the session. At most [`MAX_DISKS`].
    pub disks: Vec<DiskSpec>,
    /// Streams (TCP connections) the agent would like for this session; the receiver
    /// grants at most [`crate::limits::MAX_STREAMS`] in [`Settings::max_streams`].
    pub streams: u8,
    /// Random per agent process: a reconnect of the same process names the same series,
    /// and a clean shutdown's checkpoint is recorded under it.
    pub series: [u8; 16],
    /// What the agent knows about the changes made since its last session.
    pub resume: ResumeClaim,
}

/// Why an agent believes (or does not) that its dirty map holds every change the
/// receiver is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeClaim {
    /// The same process as the session with this Hello's series: its dirty map is
    /// complete.
    Live,
    /// A new process that loaded the state record of a clean shutdown.
    Checkpoint { series: [u8; 16], seq: u64 },
    /// No state record: the agent crashed, the machine rebooted hard, or it is new.
    NoRecord,
    /// A state record that is damaged or does not fit the disks.
    InvalidRecord,
    /// The operator asked for a rescan (`--rescan`).
    RescanRequested,
    /// Block-layer tracking cannot vouch for every change: the kernel dropped events, or
    /// tracking started after the disks may have been written (a start of an agent that
    /// tracks the block layer, unless the kernel's write counters prove that nothing was
    /// written since its clean stop).
    TrackingLost,
    /// A claim this version does not know, with whatever followed its tag (kept so the
    /// frame re-encodes as it came); treated as no trustworthy record.
    Unknown { tag: u8, rest: Vec<u8> },
}

impl ResumeClaim {
    fn tag(&self) -> u8 {
        match self {
            Self::Live => 0,
            Self::Checkpoint { .. } => 1,
            Self::NoRecord => 2,
            Self::InvalidRecord => 3,
            Self::RescanRequested => 4,
            Self::TrackingLost => 5,
            Self::Unknown { tag, .. } => *tag,
        }
    }
}

/// Why a disk is rescanned (or fully synced). Unknown values are kept.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RescanReason(pub u8);

impl RescanReason {
    /// No rescan.
    pub const NONE: Self = Self(0);
    pub const FIRST_CONTACT: Self = Self(1);
    pub const UNCLEAN_SHUTDOWN: Self = Self(2);
    pub const AGENT_REINSTALLED: Self = Self(3);
    pub const DISK_ADDED: Self = Self(4);
    pub const DISK_RESIZED: Self = Self(5);
    pub const STATE_MISMATCH: Self = Self(6);
    pub const OPERATOR_REQUEST: Self = Self(7);
    /// An operator adopted a staging image the receiver could not vouch for (`disk
    /// adopt`): it is compared block by block before it is trusted again.
    pub const STAGING_ADOPTED: Self = Self(8);
    /// Block-layer tracking lost events, or started after the disk may have changed.
    pub const TRACKING_LOST: Self = Self(9);

    /// The reason code as shown in status, metrics and events.
    pub fn name(self) -> &'static str {
        match self {
            Self::NONE => "none",
            Self::FIRST_CONTACT => "first_contact",
            Self::UNCLEAN_SHUTDOWN => "unclean_shutdown",
            Self::AGENT_REINSTALLED => "agent_reinstalled",
            Self::DISK_ADDED => "disk_added",
            Self::DISK_RESIZED => "disk_resized",
            Self::STATE_MISMATCH => "state_mismatch",
            Self::OPERATOR_REQUEST => "operator_request",
            Self::STAGING_ADOPTED => "staging_adopted",
            Self::TRACKING_LOST => "tracking_lost",
            _ => "unknown",
        }
    }

    /// The reason named `name` (as [`Self::name`] spells it).
    pub fn from_name(name: &str) -> Option<Self> {
        (0..=9).map(Self).find(|r| r.name() == name)
    }

    pub fn is_some(self) -> bool {
        self != Self::NONE
    }
}

impl fmt::Display for RescanReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            "unknown" => write!(f, "unknown({})", self.0),
            name => f.write_str(name),
        }
    }
}

impl fmt::Debug for RescanReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Agent → receiver: the xxh3-128 digest of each of `count` blocks of `block_size` bytes
/// of `disk`, starting at block `first_block`. The decoder enforces
/// [`MAX_SUM_BLOCKS`], a power-of-two block size within
/// [`MIN_SUM_BLOCK_SIZE`]..=[`MAX_SUM_BLOCK_SIZE`], and at most [`MAX_SUM_RANGE`] bytes;
/// the receiver checks the range against the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SumRequest {
    pub disk: u16,
    pub first_block: u64,
    pub count: u32,
    pub block_size: u32,
}

impl SumRequest {
    /// Byte offset of the first block.
    pub fn offset(&self) -> Option<u64> {
        self.first_block.checked_mul(u64::from(self.block_size))
    }

    /// Bytes covered.
    pub fn len(&self) -> u64 {
        u64::from(self.count) * u64::from(self.block_size)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// The digest a [`SumReply`] carries for one block: xxh3-128 of its bytes. Both sides
/// call this, so what "equal" means is defined in one place.
pub fn block_digest(block: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(block)
}

/// Receiver → agent: the digests of a [`SumRequest`]'s blocks, in order. A block that
/// ends past the disk's end is hashed over the bytes that exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SumReply {
    pub disk: u16,
    pub first_block: u64,
    pub block_size: u32,
    pub digests: Vec<u128>,
}

/// Agent → receiver at a clean shutdown: record `seq` under the session's series as the
/// chain id of the state the agent is about to save. The receiver answers with
/// `CheckpointSaved` carrying the same value once it is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
}

/// What the agent found on its source server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inventory {
    pub host_name: String,
    /// machine-id or DMI product UUID.
    pub host_id: String,
    pub cpus: Vec<Cpu>,
    pub ram_bytes: u64,
    /// Operating system and kernel, e.g. "Debian GNU/Linux 12 (bookworm), Linux 6.1.0".
    pub os: String,
    /// Every disk of the server (device names on Linux), replicated or not.
    pub disks: Vec<DiskSpec>,
    pub private_ips: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpu {
    pub model: String,
    pub cores: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub name: String,
    pub size: u64,
}

/// Receiver → agent answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub session_id: [u8; 16],
    /// The epoch of the session's first barrier: epochs continue across sessions, so a
    /// server's consistent points are numbered once and for all.
    pub next_epoch: u64,
    pub settings: Settings,
    /// One entry per disk of the Hello, in the same order.
    pub disks: Vec<DiskResume>,
}

/// Settings the receiver imposes on a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Bytes per second for the whole agent; 0 means unlimited.
    pub bandwidth_limit: u64,
    pub max_streams: u8,
    /// Granularity of digests and dirty tracking.
    pub block_size: u32,
    /// Writes must start and end on multiples of this (the disk's end excepted).
    pub alignment: u32,
    /// The agent sends a Barrier after at most this many bytes of writes.
    pub barrier_interval: u64,
    pub heartbeat_interval_ms: u32,
    /// An operator paused the server's replication: the agent sends no data, checksum
    /// requests or barriers until a `SettingsUpdate` resumes it, and keeps tracking
    /// changes meanwhile.
    pub paused: bool,
    /// Bits of the flags byte this version does not know (a later peer's settings):
    /// ignored, and kept so that the frame re-encodes as it came.
    pub unknown_flags: u8,
}

/// Where a disk stands at the receiver when a session starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskResume {
    pub name: String,
    pub size: u64,
    /// Bytes of the initial sync durably in place: the agent resumes reading here.
    pub sync_watermark: u64,
    pub state: DiskState,
    /// Why the agent must rescan this disk by checksum; [`RescanReason::NONE`] when its
    /// dirty map can be trusted (or the initial sync is not complete).
    pub rescan: RescanReason,
}

/// Replication state of a disk, as shown in status and metrics.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DiskState(pub u8);

impl DiskState {
    pub const INITIATING: Self = Self(0);
    pub const INITIAL_SYNC: Self = Self(1);
    pub const CONTINUOUS: Self = Self(2);
    pub const RESCAN: Self = Self(3);
    pub const BACKLOG: Self = Self(4);
    pub const STALLED: Self = Self(5);
    pub const DISCONNECTED: Self = Self(6);
    pub const PAUSED: Self = Self(7);
    /// Waiting for one of the receiver's initial-sync/rescan slots: the agent sends the
    /// disk's changes below its watermark but neither syncs nor rescans it this session.
    pub const QUEUED: Self = Self(8);

    pub fn name(self) -> &'static str {
        match self {
            Self::INITIATING => "INITIATING",
            Self::INITIAL_SYNC => "INITIAL_SYNC",
            Self::CONTINUOUS => "CONTINUOUS",
            Self::RESCAN => "RESCAN",
            Self::BACKLOG => "BACKLOG",
            Self::STALLED => "STALLED",
            Self::DISCONNECTED => "DISCONNECTED",
            Self::PAUSED => "PAUSED",
            Self::QUEUED => "QUEUED",
            _ => "UNKNOWN",
        }
    }
}

impl fmt::Display for DiskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            "UNKNOWN" => write!(f, "UNKNOWN({})", self.0),
            name => f.write_str(name),
        }
    }
}

impl fmt::Debug for DiskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Opens an additional stream of an existing session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinStream {
    pub session_id: [u8; 16],
    pub stream_index: u8,
}

/// Flags of a [`Write`]. Unknown bits are kept.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct WriteFlags(pub u16);

impl WriteFlags {
    /// The range reads as zeros; the frame carries no data.
    pub const ZERO_FILL: Self = Self(1);
    /// The write is part of the disk's initial sync (not a captured change).
    pub const INITIAL_SYNC: Self = Self(1 << 1);
    /// The data is compressed (reserved; a receiver that cannot decompress refuses it).
    pub const COMPRESSED: Self = Self(1 << 2);

    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for WriteFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl fmt::Debug for WriteFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WriteFlags({:#06x})", self.0)
    }
}

/// Data for `header.len` bytes of a disk at `header.offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub header: WriteHeader,
    /// Exactly `header.len` bytes, or empty when the flags have [`WriteFlags::ZERO_FILL`].
    pub data: Vec<u8>,
}

/// The fixed fields of a [`Write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteHeader {
    /// Index of the disk in the session's Hello.
    pub disk: u16,
    pub flags: WriteFlags,
    pub offset: u64,
    pub len: u32,
    pub epoch: u64,
}

impl WriteHeader {
    /// First byte after the write; `decode` has already checked that this cannot overflow.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.len))
    }
}

/// Closes an epoch: every write sent before it on this stream belongs to `epoch` or
/// earlier. The receiver answers with [`Durable`] once all of them are on stable storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Barrier {
    pub epoch: u64,
    /// Initial-sync progress the agent claims for this barrier: every byte of each listed
    /// disk below `watermark` was sent before this barrier. The receiver records it only
    /// once the barrier is durable.
    pub sync_progress: Vec<SyncProgress>,
    /// Disks whose rescan the agent claims complete: every block found different was
    /// sent before this barrier.
    pub rescan_done: Vec<u16>,
    /// The epoch ends at a crash-consistent point of the source: every write captured
    /// before it was sent, none after (an initial-sync chunk barrier, or one sent while
    /// changes are still being shipped out of order, is not). Recovery points are cut
    /// only at such epochs.
    pub consistent: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncProgress {
    pub disk: u16,
    pub watermark: u64,
}

/// Everything up to and including `epoch` is on the receiver's stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durable {
    pub epoch: u64,
}

/// Agent → receiver, every few seconds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Heartbeat {
    /// CPU used by the agent process since the last heartbeat, in thousandths of a core.
    pub cpu_permille: u32,
    pub rss_bytes: u64,
    /// Bytes dirty at the agent and not yet durable at the receiver.
    pub backlog_bytes: u64,
    /// Each disk of the session, as the agent sees it. At most [`MAX_DISKS`].
    pub disks: Vec<DiskBeat>,
    /// How the agent learns of changes, and what its block tracking and freezes did
    /// (after the fields above; absent from agents that predate it).
    pub tracking: Option<TrackingBeat>,
}

/// The change-tracking part of a [`Heartbeat`]. Counters run from the agent's start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrackingBeat {
    /// Completed writes, discards and write-zeroes block tracking marked dirty.
    pub writes: u64,
    /// Block-layer events the kernel dropped (each loss makes every disk rescan).
    pub lost: u64,
    /// Crash-consistent points cut under a file-system freeze, and attempts given up.
    pub frozen_points: u64,
    pub freeze_failures: u64,
    /// Microseconds the file systems stayed frozen: the last freeze, and the longest.
    pub last_freeze_us: u64,
    pub max_freeze_us: u64,
    /// Each disk's capture. At most [`MAX_DISKS`].
    pub disks: Vec<DiskCapture>,
}

/// How the agent learns of one disk's changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskCapture {
    pub disk: u16,
    pub mode: CaptureKind,
}

/// How changes of a disk are learnt, as shown in status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CaptureKind(pub u8);

impl CaptureKind {
    /// Block-layer tracking runs.
    pub const BLOCK: Self = Self(1);
    /// Only writes through the agent's NBD tap or in-process capture are seen.
    pub const TAP: Self = Self(2);
    /// Nothing is tracked (`--capture none`): periodic rescans.
    pub const RESCANS: Self = Self(3);
    /// Block tracking was asked for but cannot start: periodic rescans.
    pub const TRACKING_UNAVAILABLE: Self = Self(4);

    pub fn name(self) -> &'static str {
        match self {
            Self::BLOCK => "block",
            Self::TAP => "tap",
            Self::RESCANS => "rescans",
            Self::TRACKING_UNAVAILABLE => "tracking_unavailable",
            _ => "unknown",
        }
    }
}

/// One disk in a [`Heartbeat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskBeat {
    /// Index into the session's Hello disks.
    pub disk: u16,
    /// What the agent is doing with the disk: INITIAL_SYNC, RESCAN, CONTINUOUS or
    /// BACKLOG (changes beyond what its capture buffer holds, to be re-read).
    pub state: DiskState,
    /// Bytes of the disk dirty at the agent and not yet durable at the receiver.
    pub backlog_bytes: u64,
}

/// Receiver → agent, whenever an operator changes a setting that applies live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingsUpdate {
    /// Bytes per second for the whole agent (all streams together); 0 means unlimited.
    pub bandwidth_limit: u64,
    /// As [`Settings::paused`].
    pub paused: bool,
    /// As [`Settings::unknown_flags`].
    pub unknown_flags: u8,
}

/// Bits of the settings flags byte. Bits this side does not know are ignored, so that a
/// later setting can be added without breaking older peers.
const SETTINGS_PAUSED: u8 = 1;

fn settings_flags(paused: bool, unknown: u8) -> u8 {
    (unknown & !SETTINGS_PAUSED) | if paused { SETTINGS_PAUSED } else { 0 }
}

/// A fatal error, sent before closing a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
    /// For a retryable error: wait at least this long before reconnecting, so that a
    /// receiver that cannot make progress (a full staging disk, a missing image, a
    /// budget used up) is not hammered. `None`: no hint (the agent's own backoff), and
    /// nothing on the wire, as from peers that predate the field.
    pub retry_after_ms: Option<u32>,
}

impl ErrorFrame {
    /// An error without a retry hint.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
}

/// Machine-readable class of an [`ErrorFrame`]. Unknown codes are kept.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// The peer sent something that violates the protocol.
    pub const PROTOCOL: Self = Self(1);
    /// The identity in the certificate may not do what was asked.
    pub const NOT_AUTHORIZED: Self = Self(2);
    /// A write or query addresses bytes outside the disk.
    pub const OUT_OF_RANGE: Self = Self(3);
    /// The receiver's staging storage failed; retry later.
    pub const STORAGE: Self = Self(4);
    /// The request is valid but this receiver does not support it.
    pub const UNSUPPORTED: Self = Self(5);
    /// A limit of the product was exceeded (disks, streams, sizes).
    pub const LIMIT: Self = Self(6);
    /// The receiver is shutting down; reconnect later.
    pub const SHUTTING_DOWN: Self = Self(7);
    /// The receiver is at one of its resource bounds right now (connections, buffer
    /// memory, pending queries); retry later. Unlike [`Self::LIMIT`], waiting helps.
    pub const BUSY: Self = Self(8);
    /// Replication of this server is over: an operator cut it over to its launched copy.
    /// The agent stops for good; retrying cannot help.
    pub const FINISHED: Self = Self(9);

    /// Whether an agent should retry the session after this error, rather than give up and
    /// ask an operator.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::STORAGE | Self::SHUTTING_DOWN | Self::BUSY)
    }
}

impl ErrorCode {
    /// The code's name, lower case (`storage`, `limit`, …), or `unknown`.
    pub fn name(self) -> &'static str {
        match self {
            Self::PROTOCOL => "protocol",
            Self::NOT_AUTHORIZED => "not_authorized",
            Self::OUT_OF_RANGE => "out_of_range",
            Self::STORAGE => "storage",
            Self::UNSUPPORTED => "unsupported",
            Self::LIMIT => "limit",
            Self::SHUTTING_DOWN => "shutting_down",
            Self::BUSY => "busy",
            Self::FINISHED => "finished",
            _ => "unknown",
        }
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match *self {
            Self::PROTOCOL => "PROTOCOL",
            Self::NOT_AUTHORIZED => "NOT_AUTHORIZED",
            Self::OUT_OF_RANGE => "OUT_OF_RANGE",
            Self::STORAGE => "STORAGE",
            Self::UNSUPPORTED => "UNSUPPORTED",
            Self::LIMIT => "LIMIT",
            Self::SHUTTING_DOWN => "SHUTTING_DOWN",
            Self::BUSY => "BUSY",
            Self::FINISHED => "FINISHED",
            Self(code) => return write!(f, "ErrorCode({code})"),
        };
        f.write_str(name)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Orderly end of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Goodbye {
    pub message: String,
}

impl Frame {
    pub fn kind(&self) -> FrameKind {
        match self {
            Self::Hello(_) => FrameKind::HELLO,
            Self::Welcome(_) => FrameKind::WELCOME,
            Self::JoinStream(_) => FrameKind::JOIN_STREAM,
            Self::Write(_) => FrameKind::WRITE,
            Self::Barrier(_) => FrameKind::BARRIER,
            Self::Durable(_) => FrameKind::DURABLE,
            Self::Heartbeat(_) => FrameKind::HEARTBEAT,
            Self::Error(_) => FrameKind::ERROR,
            Self::Goodbye(_) => FrameKind::GOODBYE,
            Self::SumRequest(_) => FrameKind::SUM_REQUEST,
            Self::SumReply(_) => FrameKind::SUM_REPLY,
            Self::Checkpoint(_) => FrameKind::CHECKPOINT,
            Self::CheckpointSaved(_) => FrameKind::CHECKPOINT_SAVED,
            Self::SettingsUpdate(_) => FrameKind::SETTINGS_UPDATE,
            Self::Unknown { kind, .. } => *kind,
        }
    }

    /// Appends the encoded frame to `out`.
    ///
    /// # Panics
    /// If a list or a write exceeds its wire limit. Our own code builds every frame
    /// within the limits (an inventory is capped when collected, writes are split at
    /// [`MAX_WRITE_DATA`]), so this is a bug, not an input error.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = start_frame(out, self.kind());
        match self {
            Self::Hello(m) => m.encode(out),
            Self::Welcome(m) => m.encode(out),
            Self::JoinStream(m) => {
                out.extend_from_slice(&m.session_id);
                out.put_u8(m.stream_index);
            }
            Self::Write(m) => {
                put_write_fixed(out, &m.header);
                out.extend_from_slice(&m.data);
            }
            Self::Barrier(m) => {
                out.put_u64(m.epoch);
                out.put_count(m.sync_progress.len(), MAX_DISKS);
                for p in &m.sync_progress {
                    out.put_u16(p.disk);
                    out.put_u64(p.watermark);
                }
                out.put_count(m.rescan_done.len(), MAX_DISKS);
                for &disk in &m.rescan_done {
                    out.put_u16(disk);
                }
                out.put_u8(u8::from(m.consistent));
            }
            Self::SumRequest(m) => {
                out.put_u16(m.disk);
                out.put_u64(m.first_block);
                out.put_u32(m.count);
                out.put_u32(m.block_size);
            }
            Self::SumReply(m) => {
                out.put_u16(m.disk);
                out.put_u64(m.first_block);
                out.put_u32(m.block_size);
                out.put_count(m.digests.len(), MAX_SUM_BLOCKS as usize);
                for d in &m.digests {
                    out.extend_from_slice(&d.to_be_bytes());
                }
            }
            Self::Checkpoint(m) | Self::CheckpointSaved(m) => out.put_u64(m.seq),
            Self::Durable(m) => out.put_u64(m.epoch),
            Self::Heartbeat(m) => {
                out.put_u32(m.cpu_permille);
                out.put_u64(m.rss_bytes);
                out.put_u64(m.backlog_bytes);
                out.put_count(m.disks.len(), MAX_DISKS);
                for d in &m.disks {
                    out.put_u16(d.disk);
                    out.put_u8(d.state.0);
                    out.put_u64(d.backlog_bytes);
                }
                if let Some(t) = &m.tracking {
                    out.put_u64(t.writes);
                    out.put_u64(t.lost);
                    out.put_u64(t.frozen_points);
                    out.put_u64(t.freeze_failures);
                    out.put_u64(t.last_freeze_us);
                    out.put_u64(t.max_freeze_us);
                    out.put_count(t.disks.len(), MAX_DISKS);
                    for d in &t.disks {
                        out.put_u16(d.disk);
                        out.put_u8(d.mode.0);
                    }
                }
            }
            Self::SettingsUpdate(m) => {
                out.put_u64(m.bandwidth_limit);
                out.put_u8(settings_flags(m.paused, m.unknown_flags));
            }
            Self::Error(m) => {
                out.put_u16(m.code.0);
                out.put_str(&m.message, MAX_STRING_LEN);
                if let Some(ms) = m.retry_after_ms {
                    out.put_u32(ms);
                }
            }
            Self::Goodbye(m) => out.put_str(&m.message, MAX_STRING_LEN),
            Self::Unknown { payload, .. } => out.extend_from_slice(payload),
        }
        finish_frame(out, start);
    }

    /// Encodes the frame into a fresh buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    pub(crate) fn decode_payload(kind: FrameKind, payload: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(kind, payload);
        let frame = match kind {
            FrameKind::HELLO => Self::Hello(Hello::decode(&mut r)?),
            FrameKind::WELCOME => Self::Welcome(Welcome::decode(&mut r)?),
            FrameKind::JOIN_STREAM => Self::JoinStream(JoinStream {
                session_id: r.bytes16("session_id")?,
                stream_index: r.u8("stream_index")?,
            }),
            FrameKind::WRITE => Self::Write(decode_write(&mut r)?),
            FrameKind::BARRIER => Self::Barrier(Barrier {
                epoch: r.u64("epoch")?,
                sync_progress: r.list("sync_progress", MAX_DISKS, |r| {
                    Ok(SyncProgress {
                        disk: r.u16("sync_progress.disk")?,
                        watermark: r.u64("sync_progress.watermark")?,
                    })
                })?,
                rescan_done: r.list("rescan_done", MAX_DISKS, |r| r.u16("rescan_done.disk"))?,
                consistent: match r.u8("flags")? {
                    0 => false,
                    1 => true,
                    _ => {
                        return Err(DecodeError::Invalid {
                            kind,
                            field: "flags",
                            reason: "only bit 0 (consistent) is defined",
                        });
                    }
                },
            }),
            FrameKind::SUM_REQUEST => Self::SumRequest(decode_sum_request(&mut r)?),
            FrameKind::SUM_REPLY => Self::SumReply(SumReply {
                disk: r.u16("disk")?,
                first_block: r.u64("first_block")?,
                block_size: r.u32("block_size")?,
                digests: r.list("digests", MAX_SUM_BLOCKS as usize, |r| {
                    let hi = u128::from(r.u64("digest")?);
                    let lo = u128::from(r.u64("digest")?);
                    Ok(hi << 64 | lo)
                })?,
            }),
            FrameKind::CHECKPOINT => Self::Checkpoint(Checkpoint { seq: r.u64("seq")? }),
            FrameKind::CHECKPOINT_SAVED => Self::CheckpointSaved(Checkpoint { seq: r.u64("seq")? }),
            FrameKind::DURABLE => Self::Durable(Durable {
                epoch: r.u64("epoch")?,
            }),
            FrameKind::HEARTBEAT => Self::Heartbeat(Heartbeat {
                cpu_permille: r.u32("cpu_permille")?,
                rss_bytes: r.u64("rss_bytes")?,
                backlog_bytes: r.u64("backlog_bytes")?,
                disks: r.list("disks", MAX_DISKS, |r| {
                    Ok(DiskBeat {
                        disk: r.u16("disks.disk")?,
                        state: DiskState(r.u8("disks.state")?),
                        backlog_bytes: r.u64("disks.backlog_bytes")?,
                    })
                })?,
                tracking: if r.remaining().is_empty() {
                    None
                } else {
                    Some(TrackingBeat {
                        writes: r.u64("tracking.writes")?,
                        lost: r.u64("tracking.lost")?,
                        frozen_points: r.u64("tracking.frozen_points")?,
                        freeze_failures: r.u64("tracking.freeze_failures")?,
                        last_freeze_us: r.u64("tracking.last_freeze_us")?,
                        max_freeze_us: r.u64("tracking.max_freeze_us")?,
                        disks: r.list("tracking.disks", MAX_DISKS, |r| {
                            Ok(DiskCapture {
                                disk: r.u16("tracking.disks.disk")?,
                                mode: CaptureKind(r.u8("tracking.disks.mode")?),
                            })
                        })?,
                    })
                },
            }),
            FrameKind::SETTINGS_UPDATE => {
                let bandwidth_limit = r.u64("bandwidth_limit")?;
                let flags = r.u8("flags")?;
                Self::SettingsUpdate(SettingsUpdate {
                    bandwidth_limit,
                    paused: flags & SETTINGS_PAUSED != 0,
                    unknown_flags: flags & !SETTINGS_PAUSED,
                })
            }
            FrameKind::ERROR => Self::Error(ErrorFrame {
                code: ErrorCode(r.u16("code")?),
                message: r.string("message", MAX_STRING_LEN)?,
                retry_after_ms: if r.remaining().is_empty() {
                    None
                } else {
                    Some(r.u32("retry_after_ms")?)
                },
            }),
            FrameKind::GOODBYE => Self::Goodbye(Goodbye {
                message: r.string("message", MAX_STRING_LEN)?,
            }),
            _ => {
                let payload = r.remaining().to_vec();
                return Ok(Self::Unknown { kind, payload });
            }
        };
        r.finish()?;
        Ok(frame)
    }
}

fn decode_sum_request(r: &mut Reader<'_>) -> Result<SumRequest, DecodeError> {
    let request = SumRequest {
        disk: r.u16("disk")?,
        first_block: r.u64("first_block")?,
        count: r.u32("count")?,
        block_size: r.u32("block_size")?,
    };
    if request.count > MAX_SUM_BLOCKS {
        return Err(DecodeError::FieldTooLong {
            kind: r.kind(),
            field: "count",
            len: request.count as usize,
            max: MAX_SUM_BLOCKS as usize,
        });
    }
    if request.count == 0 {
        return Err(r.invalid("count", "a SumRequest must ask for at least one block"));
    }
    if !request.block_size.is_power_of_two()
        || !(MIN_SUM_BLOCK_SIZE..=MAX_SUM_BLOCK_SIZE).contains(&request.block_size)
    {
        return Err(r.invalid("block_size", "must be a power of two from 4 KiB to 1 MiB"));
    }
    if request.len() > MAX_SUM_RANGE {
        return Err(r.invalid("count", "the request covers more than MAX_SUM_RANGE bytes"));
    }
    if request
        .offset()
        .and_then(|o| o.checked_add(request.len()))
        .is_none()
    {
        return Err(r.invalid("first_block", "the range overflows"));
    }
    Ok(request)
}

/// Encodes a complete Write frame whose data is `data`, without first copying the data
/// into a [`Write`]. The agent uses this on its hot path.
///
/// # Panics
/// If `data` is longer than [`MAX_WRITE_DATA`], or non-empty with `ZERO_FILL` set.
pub fn encode_write(out: &mut Vec<u8>, header: &WriteHeader, data: &[u8]) {
    let zero = header.flags.contains(WriteFlags::ZERO_FILL);
    assert!(
        if zero {
            data.is_empty()
        } else {
            data.len() == header.len as usize
        },
        "write data does not match its header"
    );
    let start = start_frame(out, FrameKind::WRITE);
    put_write_fixed(out, header);
    out.extend_from_slice(data);
    finish_frame(out, start);
}

fn put_write_fixed(out: &mut Vec<u8>, h: &WriteHeader) {
    assert!(
        h.len <= MAX_WRITE_DATA,
        "write of {} bytes exceeds MAX_WRITE_DATA",
        h.len
    );
    out.put_u16(h.disk);
    out.put_u16(h.flags.0);
    out.put_u64(h.offset);
    out.put_u32(h.len);
    out.put_u64(h.epoch);
}

fn decode_write(r: &mut Reader<'_>) -> Result<Write, DecodeError> {
    let header = WriteHeader {
        disk: r.u16("disk")?,
        flags: WriteFlags(r.u16("flags")?),
        offset: r.u64("offset")?,
        len: r.u32("len")?,
        epoch: r.u64("epoch")?,
    };
    let (zero, compressed) = (
        header.flags.contains(WriteFlags::ZERO_FILL),
        header.flags.contains(WriteFlags::COMPRESSED),
    );
    if header.len > MAX_WRITE_DATA {
        return Err(DecodeError::FieldTooLong {
            kind: r.kind(),
            field: "len",
            len: header.len as usize,
            max: MAX_WRITE_DATA as usize,
        });
    }
    if header.len == 0 {
        return Err(r.invalid("len", "a write must cover at least one byte"));
    }
    if header.offset.checked_add(u64::from(header.len)).is_none() {
        return Err(r.invalid("offset", "offset + len overflows"));
    }
    if zero && compressed {
        return Err(r.invalid("flags", "a zero-fill write carries no data to decompress"));
    }
    let data_len = match (zero, compressed) {
        (true, _) => 0,
        // Compressed data is shorter than `len` and bounded by the frame limit.
        (false, true) => r.remaining().len(),
        (false, false) => header.len as usize,
    };
    let data = r.take(data_len, "data")?.to_vec();
    Ok(Write { header, data })
}

impl Hello {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_str(&self.agent_version, MAX_STRING_LEN);
        let inv = &self.inventory;
        out.put_str(&inv.host_name, MAX_STRING_LEN);
        out.put_str(&inv.host_id, MAX_STRING_LEN);
        out.put_count(inv.cpus.len(), MAX_CPUS);
        for cpu in &inv.cpus {
            out.put_str(&cpu.model, MAX_STRING_LEN);
            out.put_u32(cpu.cores);
        }
        out.put_u64(inv.ram_bytes);
        out.put_str(&inv.os, MAX_STRING_LEN);
        put_disks(out, &inv.disks, MAX_INVENTORY_DISKS);
        out.put_count(inv.private_ips.len(), MAX_IPS);
        for ip in &inv.private_ips {
            out.put_str(ip, MAX_STRING_LEN);
        }
        put_disks(out, &self.disks, MAX_DISKS);
        out.put_u8(self.streams);
        out.extend_from_slice(&self.series);
        out.put_u8(self.resume.tag());
        match &self.resume {
            ResumeClaim::Checkpoint { series, seq } => {
                out.extend_from_slice(series);
                out.put_u64(*seq);
            }
            ResumeClaim::Unknown { rest, .. } => out.extend_from_slice(rest),
            _ => {}
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let agent_version = r.string("agent_version", MAX_STRING_LEN)?;
        let inventory = Inventory {
            host_name: r.string("host_name", MAX_STRING_LEN)?,
            host_id: r.string("host_id", MAX_STRING_LEN)?,
            cpus: r.list("cpus", MAX_CPUS, |r| {
                Ok(Cpu {
                    model: r.string("cpu.model", MAX_STRING_LEN)?,
                    cores: r.u32("cpu.cores")?,
                })
            })?,
            ram_bytes: r.u64("ram_bytes")?,
            os: r.string("os", MAX_STRING_LEN)?,
            disks: get_disks(r, "inventory.disks", MAX_INVENTORY_DISKS)?,
            private_ips: r.list("private_ips", MAX_IPS, |r| {
                r.string("private_ip", MAX_STRING_LEN)
            })?,
        };
        let disks = get_disks(r, "disks", MAX_DISKS)?;
        let streams = r.u8("streams")?;
        let series = r.bytes16("series")?;
        let resume = match r.u8("resume")? {
            0 => ResumeClaim::Live,
            1 => ResumeClaim::Checkpoint {
                series: r.bytes16("resume.series")?,
                seq: r.u64("resume.seq")?,
            },
            2 => ResumeClaim::NoRecord,
            3 => ResumeClaim::InvalidRecord,
            4 => ResumeClaim::RescanRequested,
            5 => ResumeClaim::TrackingLost,
            // A newer agent's claim may carry fields this version cannot parse; it is
            // kept as "no trustworthy record", never guessed at.
            tag => {
                let rest = r.remaining().len();
                ResumeClaim::Unknown {
                    tag,
                    rest: r.take(rest, "resume")?.to_vec(),
                }
            }
        };
        Ok(Self {
            agent_version,
            inventory,
            disks,
            streams,
            series,
            resume,
        })
    }
}

fn put_disks(out: &mut Vec<u8>, disks: &[DiskSpec], max: usize) {
    out.put_count(disks.len(), max);
    for d in disks {
        out.put_str(&d.name, MAX_DISK_NAME_LEN);
        out.put_u64(d.size);
    }
}

fn get_disks(
    r: &mut Reader<'_>,
    field: &'static str,
    max: usize,
) -> Result<Vec<DiskSpec>, DecodeError> {
    r.list(field, max, |r| {
        Ok(DiskSpec {
            name: r.string("disk.name", MAX_DISK_NAME_LEN)?,
            size: r.u64("disk.size")?,
        })
    })
}

impl Welcome {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.session_id);
        out.put_u64(self.next_epoch);
        let s = &self.settings;
        out.put_u64(s.bandwidth_limit);
        out.put_u8(s.max_streams);
        out.put_u32(s.block_size);
        out.put_u32(s.alignment);
        out.put_u64(s.barrier_interval);
        out.put_u32(s.heartbeat_interval_ms);
        out.put_u8(settings_flags(s.paused, s.unknown_flags));
        out.put_count(self.disks.len(), MAX_DISKS);
        for d in &self.disks {
            out.put_str(&d.name, MAX_DISK_NAME_LEN);
            out.put_u64(d.size);
            out.put_u64(d.sync_watermark);
            out.put_u8(d.state.0);
            out.put_u8(d.rescan.0);
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let session_id = r.bytes16("session_id")?;
        let next_epoch = r.u64("next_epoch")?;
        let (bandwidth_limit, max_streams, block_size, alignment) = (
            r.u64("bandwidth_limit")?,
            r.u8("max_streams")?,
            r.u32("block_size")?,
            r.u32("alignment")?,
        );
        let (barrier_interval, heartbeat_interval_ms, flags) = (
            r.u64("barrier_interval")?,
            r.u32("heartbeat_interval_ms")?,
            r.u8("flags")?,
        );
        Ok(Self {
            session_id,
            next_epoch,
            settings: Settings {
                bandwidth_limit,
                max_streams,
                block_size,
                alignment,
                barrier_interval,
                heartbeat_interval_ms,
                paused: flags & SETTINGS_PAUSED != 0,
                unknown_flags: flags & !SETTINGS_PAUSED,
            },
            disks: r.list("disks", MAX_DISKS, |r| {
                Ok(DiskResume {
                    name: r.string("disk.name", MAX_DISK_NAME_LEN)?,
                    size: r.u64("disk.size")?,
                    sync_watermark: r.u64("disk.sync_watermark")?,
                    state: DiskState(r.u8("disk.state")?),
                    rescan: RescanReason(r.u8("disk.rescan")?),
                })
            })?,
        })
    }
}
