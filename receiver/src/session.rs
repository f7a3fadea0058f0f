//! One agent session: Hello → Welcome → a stream of writes and barriers → end.
//!
//! A session runs three tasks: this reader (decodes frames, validates them against the
//! disks and submits writes to the [`ApplyPipeline`]), a writer (sends Welcome, Durable,
//! Error, Goodbye), and a barrier worker, which for each barrier in order waits for the
//! writes before it, flushes every staging store, records the watermarks, and only then
//! sends `Durable` (invariant 1).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockferry_proto::limits::{MAX_CONTROL_PAYLOAD, MAX_STREAMS, MAX_WRITE_DATA};
use blockferry_proto::{
    Barrier, Checkpoint, DiskResume, DiskState, Durable, ErrorCode, ErrorFrame, Frame, FrameBuffer,
    FrameKind, Goodbye, Heartbeat, Hello, JoinStream, Settings, SumReply, SumRequest, Welcome,
    Write, WriteFlags, block_digest,
};
use blockferry_storage::{BlockStore, Engine};
pub(crate) use blockferry_util::error_chain;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use std::collections::HashMap;

use crate::apply::{ApplyPipeline, StagingDisk};
use crate::catalog::{Catalog, DurableEvidence, RescanProgress, now_ms};
use crate::gate::{EpochGate, Sealed};
use crate::lock;
use crate::pki::{AgentIdentity, validate_name};
use crate::registry::SessionRegistry;
use crate::slots::Slot;

/// An agent must say Hello this soon after its TLS handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
/// Frames queued for the writer task.
const OUTGOING_QUEUE: usize = 64;
/// Epochs sealed but not yet durable. A full queue stops the readers: an agent that
/// closes epochs faster than the disks can flush is slowed down, not buffered.
const BARRIER_QUEUE: usize = 64;
/// How long a frame may wait to be written to an agent that has stopped reading.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stream waits at a barrier for the session's other streams.
const BARRIER_WAIT: Duration = Duration::from_secs(60);
/// How long a server keeps its sync slots after a session ended to restart with one.
const SLOT_GRACE: Duration = Duration::from_secs(60);
/// Checksum queries of one session answered at once; more wait, and their stream with
/// them (the agent keeps many in flight, so the disks stay busy).
const SUMS_IN_PARALLEL: usize = 4;
/// Checkpoint commits of one session are at least this far apart.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);
/// How often an idle session looks whether a recovery point can be cut.
const RECOVERY_TICK: Duration = Duration::from_millis(250);

/// What every session of a receiver shares.
#[derive(Debug)]
pub(crate) struct SessionContext {
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) engine: Engine,
    pub(crate) images_dir: PathBuf,
    pub(crate) settings: SessionSettings,
    pub(crate) registry: Arc<SessionRegistry>,
    pub(crate) shutdown: CancellationToken,
    /// Bytes of writes in flight across all sessions.
    pub(crate) global_budget: Arc<tokio::sync::Semaphore>,
    pub(crate) revocations: Arc<crate::revocation::Revocations>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) events: Arc<crate::events::EventLog>,
    /// Staging into EBS snapshot chains (`--backend ebs`); `None` stages into files only.
    pub(crate) ebs: Option<Arc<crate::snapshots::EbsStaging>>,
    /// Receive buffers and connections waiting for a session.
    pub(crate) budget: Arc<crate::budget::ConnectionBudget>,
    /// Connection slots of every listener.
    pub(crate) admission: Arc<crate::admission::Admission>,
}

#[derive(Debug, Clone)]
pub(crate) struct SessionSettings {
    /// Streams granted to a session at most (never more than MAX_STREAMS).
    pub(crate) max_streams: u8,
    pub(crate) barrier_interval: u64,
    pub(crate) in_flight_budget: u32,
    pub(crate) heartbeat_interval: Duration,
    /// A stream with no frame at all for this long is dead (agents heartbeat on every
    /// stream); its session is closed so that the agent's next connection is not kept
    /// waiting.
    pub(crate) idle_timeout: Duration,
    /// A disk with changes waiting and no durable progress for this long is STALLED.
    pub(crate) stall_after: Duration,
    /// The largest disk a Hello may name.
    pub(crate) max_disk_size: u64,
}

/// Why a session ended badly. Each maps to the [`ErrorCode`] sent to the agent.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("staging storage failed: {0}")]
    Storage(String),
    /// The staging store of a disk failed in a way that stalls it (e.g. a full file
    /// system); the agent keeps its changes and retries.
    #[error(
        "disk {disk} is stalled ({reason}): {message}; the agent keeps its changes and retries"
    )]
    Stalled {
        disk: String,
        reason: &'static str,
        message: String,
    },
    #[error("not authorized: {0}")]
    NotAuthorized(String),
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// One of the receiver's resource bounds is reached for now; the agent retries later.
    #[error("receiver busy: {0}")]
    Busy(String),
    #[error("connection failed")]
    Connection(#[from] std::io::Error),
    #[error("no Hello within {0:?}")]
    HelloTimeout(Duration),
    #[error("no frame for {0:?}: the agent or the network is gone")]
    Idle(Duration),
}

impl SessionError {
    /// The Error frame that tells the agent, if it is to be told.
    fn frame(&self) -> Option<ErrorFrame> {
        Some(ErrorFrame {
            code: self.code()?,
            message: self.to_string(),
            retry_after_ms: Some(self.retry_after())
                .filter(|wait| !wait.is_zero())
                .map(|wait| u32::try_from(wait.as_millis()).unwrap_or(u32::MAX)),
        })
    }

    /// How long the agent should wait before it tries again: long enough that a disk that
    /// cannot progress is not hammered by reconnects (each one resends what is not yet
    /// acknowledged), short enough that it resumes soon once the cause is gone.
    fn retry_after(&self) -> Duration {
        match self {
            Self::Stalled {
                reason: crate::catalog::STAGING_MISSING,
                ..
            } => Duration::from_secs(60),
            Self::Stalled { .. } => Duration::from_secs(10),
            Self::Storage(_) => Duration::from_secs(5),
            Self::Busy(_) => Duration::from_secs(10),
            _ => Duration::ZERO,
        }
    }

    fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Protocol(_) | Self::HelloTimeout(_) => Some(ErrorCode::PROTOCOL),
            Self::OutOfRange(_) => Some(ErrorCode::OUT_OF_RANGE),
            Self::Unsupported(_) => Some(ErrorCode::UNSUPPORTED),
            Self::Storage(_) | Self::Stalled { .. } => Some(ErrorCode::STORAGE),
            Self::NotAuthorized(_) => Some(ErrorCode::NOT_AUTHORIZED),
            Self::Limit(_) => Some(ErrorCode::LIMIT),
            Self::Busy(_) => Some(ErrorCode::BUSY),
            Self::Connection(_) | Self::Idle(_) => None,
        }
    }
}

/// Serves one authenticated connection until it ends. Never panics on peer input.
pub(crate) async fn serve(
    ctx: Arc<SessionContext>,
    stream: TlsStream<TcpStream>,
    identity: AgentIdentity,
    peer: SocketAddr,
) {
    let span = tracing::info_span!(
        "session",
        agent = %identity.agent_id,
        server = %identity.server_id,
        %peer
    );
    async move {
        let (read_half, write_half) = tokio::io::split(stream);
        let (outgoing, queue) = mpsc::channel(OUTGOING_QUEUE);
        let writer = tokio::spawn(write_frames(write_half, queue));
        let result = match ctx.budget.admit(&identity.agent_id) {
            Ok(share) => {
                // Until its session exists, a connection may send control frames only.
                let mut reader = FrameReader {
                    half: read_half,
                    buf: FrameBuffer::with_max_payload(MAX_CONTROL_PAYLOAD),
                    meter: ctx.metrics.server(&identity.server_id),
                    share,
                };
                run(&ctx, &mut reader, &outgoing, &identity).await
            }
            Err(refusal) => Err(SessionError::Busy(refusal.to_string())),
        };
        match &result {
            Ok(end) => tracing::info!("session ended: {end}"),
            Err(err) => {
                tracing::warn!(error = %error_chain(err), "closing session");
                if let Some(frame) = err.frame() {
                    ctx.metrics.session_error(frame.code.name());
                    let _ = outgoing.send(Frame::Error(frame)).await;
                }
            }
        }
        drop(outgoing);
        let _ = writer.await;
    }
    .instrument(span)
    .await;
}

/// Tells an agent whose connection cannot be served now to come back later, and closes.
pub(crate) async fn refuse_busy(mut stream: TlsStream<TcpStream>, why: &str) {
    let error = SessionError::Busy(why.to_owned());
    if let Some(frame) = error.frame() {
        let _ = tokio::time::timeout(SEND_TIMEOUT, async {
            stream.write_all(&Frame::Error(frame).to_bytes()).await?;
            stream.shutdown().await
        })
        .await;
    }
}

async fn first_frame(reader: &mut FrameReader) -> Result<Option<Frame>, SessionError> {
    match tokio::time::timeout(HELLO_TIMEOUT, reader.first()).await {
        Err(_) => Err(SessionError::HelloTimeout(HELLO_TIMEOUT)),
        Ok(frame) => frame,
    }
}

async fn run(
    ctx: &Arc<SessionContext>,
    reader: &mut FrameReader,
    outgoing: &mpsc::Sender<Frame>,
    identity: &AgentIdentity,
) -> Result<&'static str, SessionError> {
    match first_frame(reader).await? {
        Some(Frame::Hello(hello)) => run_primary(ctx, reader, outgoing, identity, hello).await,
        Some(Frame::JoinStream(join)) => run_joined(ctx, reader, outgoing, identity, join).await,
        Some(other) => Err(SessionError::Protocol(format!(
            "expected Hello or JoinStream, got {}",
            other.kind()
        ))),
        None => Ok("the agent closed the connection before Hello"),
    }
}

/// State shared by the streams of one session.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) id: Uuid,
    identity: AgentIdentity,
    pipeline: Arc<ApplyPipeline>,
    gate: EpochGate,
    /// Streams granted in Welcome (the first one included).
    streams: u8,
    /// Bit i: stream i has joined.
    joined: Mutex<u8>,
    /// Each joined stream's outgoing queue, for Durable.
    outgoing: Mutex<Vec<mpsc::Sender<Frame>>>,
    /// Cancelled when any stream ends: a session is whole or it is over.
    end: CancellationToken,
    /// The joined streams (not the first), so that teardown waits for them.
    joined_streams: TaskTracker,
    barriers: Mutex<Option<mpsc::Sender<Sealed>>>,
    started_at_ms: u64,
    /// (epoch, unix ms) of the newest consistent point made durable.
    consistent: Mutex<(u64, u64)>,
    last_heartbeat: Mutex<Option<Heartbeat>>,
    /// The agent process's series, under which a clean shutdown's checkpoint is saved.
    series: [u8; 16],
    /// Permits for checksum queries being answered.
    sums: Arc<tokio::sync::Semaphore>,
    meter: crate::metrics::ServerMeter,
    /// Unix ms of the session's start or its latest durable epoch.
    progress_at_ms: AtomicU64,
    stall_after: Duration,
    /// An operator paused the server: no progress is expected, so none is missed.
    paused: std::sync::atomic::AtomicBool,
    /// The session's disks, in Hello order (heartbeats name disks by index).
    disk_names: Vec<String>,
    /// Ending to hear of a granted slot: the server keeps its slots for its next session.
    keeping_slots: std::sync::atomic::AtomicBool,
    /// The newest epoch applied on every stream: (its last write's sequence, the epoch,
    /// whether it ends at a crash-consistent point).
    sealed_mark: Mutex<(u64, u64, bool)>,
    /// Recovery points (EBS backend).
    recovery: Option<crate::snapshots::RecoveryClock>,
    /// (sequence, disk, start, end) of the writes not yet sealed (EBS backend): what the
    /// images hold beyond the consistent epoch if the session breaks now.
    unsealed: Mutex<std::collections::VecDeque<(u64, u16, u64, u64)>>,
    /// When the latest checkpoint commit was (or will be) allowed.
    last_checkpoint: Mutex<Option<tokio::time::Instant>>,
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

impl Session {
    pub(crate) fn live_view(&self) -> LiveView {
        let heartbeat = lock(&self.last_heartbeat).clone();
        let pending = self.pipeline.last_submitted() > lock(&self.sealed_mark).0
            || heartbeat.as_ref().is_some_and(|hb| hb.backlog_bytes > 0);
        let idle_ms = now_ms().saturating_sub(self.progress_at_ms.load(Ordering::Relaxed));
        let idle_too_long = !self.paused.load(Ordering::Relaxed)
            && u128::from(idle_ms) > self.stall_after.as_millis();
        let (_, at_ms) = *lock(&self.consistent);
        let since = if at_ms > 0 { at_ms } else { self.started_at_ms };
        LiveView {
            streams: u8::try_from(lock(&self.joined).count_ones()).unwrap_or(u8::MAX),
            lag_seconds: if pending {
                now_ms().saturating_sub(since) as f64 / 1000.0
            } else {
                0.0
            },
            heartbeat,
            receive_rate: self.meter.rate.rate(),
            no_progress: pending && idle_too_long,
            idle_too_long,
            recovery_point_error: self.recovery.as_ref().and_then(|r| r.last_error()),
            disk_names: self.disk_names.clone(),
        }
    }

    /// Keeps the server's sync slots and queue places when this session ends (it ends to
    /// let the agent hear of a granted slot); they are released if no session of the
    /// server follows within [`SLOT_GRACE`].
    pub(crate) fn keep_slots(&self) {
        self.keeping_slots.store(true, Ordering::Relaxed);
    }

    /// Tells the agent its server's settings as an operator just changed them.
    pub(crate) async fn apply_settings(&self, settings: &crate::catalog::ServerSettings) {
        tracing::info!(
            server = %self.identity.server_id,
            bytes_per_second = settings.bandwidth_limit(),
            paused = settings.paused,
            "settings changed"
        );
        if self.paused.swap(settings.paused, Ordering::Relaxed) != settings.paused {
            // The stall clock starts again: a pause is no lack of progress, and a resume
            // gives the agent the stall time to show some.
            self.progress_at_ms.store(now_ms(), Ordering::Relaxed);
        }
        self.broadcast(Frame::SettingsUpdate(blockferry_proto::SettingsUpdate {
            bandwidth_limit: settings.bandwidth_limit(),
            paused: settings.paused,
            unknown_flags: 0,
        }))
        .await;
    }

    /// Ends the session for good: the agent was revoked. It hears why, and gives up.
    pub(crate) async fn revoke(&self) {
        tracing::warn!(agent = %self.identity.agent_id, "agent revoked: closing its session");
        self.broadcast(Frame::Error(ErrorFrame::new(
            ErrorCode::NOT_AUTHORIZED,
            format!(
                "agent {} has been revoked by an operator; enroll again to replicate",
                self.identity.agent_id
            ),
        )))
        .await;
        self.end.cancel();
    }

    /// The agent this session speaks for.
    pub(crate) fn agent_id(&self) -> &str {
        &self.identity.agent_id
    }

    /// Ends the session so that the agent reconnects (and learns what changed, such as a
    /// requested rescan, from the next Welcome).
    pub(crate) async fn restart(&self, why: &str) {
        tracing::info!(
            reason = why,
            "ending the session for the agent to reconnect"
        );
        self.broadcast(Frame::Goodbye(Goodbye {
            message: why.to_owned(),
        }))
        .await;
        self.end.cancel();
    }

    /// Sends `frame` on every stream but the first.
    async fn broadcast_joined(&self, frame: Frame) {
        let senders: Vec<_> = lock(&self.outgoing).iter().skip(1).cloned().collect();
        for sender in senders {
            let _ = tokio::time::timeout(SEND_TIMEOUT, sender.send(frame.clone())).await;
        }
    }

    /// Sends `frame` (Durable, settings, an error) on every stream that is still up.
    async fn broadcast(&self, frame: Frame) {
        let senders: Vec<_> = lock(&self.outgoing).clone();
        for sender in senders {
            // A stream whose peer stopped reading must not hold up the others or the
            // session's teardown; its agent times out and reconnects.
            let _ = tokio::time::timeout(SEND_TIMEOUT, sender.send(frame.clone())).await;
        }
    }
}

async fn run_primary(
    ctx: &Arc<SessionContext>,
    reader: &mut FrameReader,
    outgoing: &mpsc::Sender<Frame>,
    identity: &AgentIdentity,
    hello: Hello,
) -> Result<&'static str, SessionError> {
    validate_hello(&hello, ctx.settings.max_disk_size)?;
    let hello = printable_hello(hello);
    reader.enter_session()?;
    tracing::info!(
        host = %hello.inventory.host_name,
        agent_version = %hello.agent_version,
        disks = hello.disks.len(),
        streams = hello.streams,
        "agent connected"
    );

    // One session per source server: a newer one replaces the old, after the old one has
    // finished its in-flight writes, so that two sessions never write the same blocks.
    let guard = ctx.registry.claim(identity).await;

    let catalog = Arc::clone(&ctx.catalog);
    let (identity_c, hello_c, images) = (identity.clone(), hello.clone(), ctx.images_dir.clone());
    let crate::catalog::Registered {
        durable_epoch,
        disks: records,
        previous_agent,
        settings,
    } = tokio::task::spawn_blocking(move || {
        catalog.register_session(&identity_c, &hello_c, &images)
    })
    .await
    .map_err(|e| SessionError::Storage(e.to_string()))?
    .map_err(|e| match e {
        e @ crate::catalog::RegisterError::TooManyDisks { .. } => {
            SessionError::Limit(e.to_string())
        }
        e => SessionError::Storage(error_chain(&e)),
    })?;
    let started = match previous_agent {
        None => Some("first_contact"),
        Some(previous) if previous != identity.agent_id => Some("agent_reinstalled"),
        Some(_) => None,
    };
    if let (Some("first_contact"), Some(ebs)) = (started, &ctx.ebs) {
        // A server never seen: no earlier session can have left bytes in its images.
        ebs.all_durable(&identity.server_id);
    }
    if let Some(reason) = started {
        ctx.events.record(
            &identity.server_id,
            crate::events::EventKind::Started,
            reason,
            &format!(
                "agent {} on host {} with {} disk(s)",
                identity.agent_id,
                hello.inventory.host_name,
                hello.disks.len()
            ),
        );
    }

    let mut disks = Vec::with_capacity(records.len());
    let (mut stamped, mut found, mut missing) = (Vec::new(), Vec::new(), Vec::new());
    for record in &records {
        let store = match open_store(ctx, &identity.server_id, record).map_err(|e| {
            SessionError::Storage(format!("disk {}: {}", record.name, error_chain(&*e)))
        })? {
            OpenedStore::Ready(store, stamp) => {
                match stamp {
                    Some(stamp) => stamped.push((record.name.clone(), stamp)),
                    None if record.stall == crate::catalog::STAGING_MISSING => {
                        found.push(record.name.clone());
                    }
                    None => {}
                }
                store
            }
            OpenedStore::Missing(why) => {
                missing.push((
                    record.name.clone(),
                    format!("{} {why}", record.image.display()),
                ));
                continue;
            }
        };
        let disk = StagingDisk::new(
            record.name.clone(),
            store,
            ctx.metrics.written(&identity.server_id, &record.name),
            record.sync_watermark,
        );
        if record.rescan().is_some() {
            disk.start_rescan(record.rescanned_bytes, record.resent_bytes);
        }
        disks.push(Arc::new(disk));
    }
    if let Some(refusal) = refuse_missing_images(ctx, &identity.server_id, missing).await {
        return Err(refusal);
    }
    if !stamped.is_empty() || !found.is_empty() {
        let catalog = Arc::clone(&ctx.catalog);
        let server = identity.server_id.clone();
        tokio::task::spawn_blocking(move || catalog.record_images(&server, &stamped, &found))
            .await
            .map_err(|e| SessionError::Storage(e.to_string()))?
            .map_err(|e| SessionError::Storage(error_chain(&e)))?;
    }
    let streams = hello
        .streams
        .clamp(1, ctx.settings.max_streams.clamp(1, MAX_STREAMS));
    let next_epoch = durable_epoch + 1;
    let (barriers, barrier_queue) = mpsc::channel(BARRIER_QUEUE);
    let recovery = match &ctx.ebs {
        Some(ebs) => Some(
            crate::snapshots::RecoveryClock::new(
                Arc::clone(ebs),
                &identity.server_id,
                records
                    .iter()
                    .map(|r| r.sync_complete() && !r.rescan().is_some())
                    .collect(),
            )
            .map_err(|e| SessionError::Storage(error_chain(&e)))?,
        ),
        None => None,
    };
    let session = Arc::new(Session {
        id: guard.id(),
        identity: identity.clone(),
        pipeline: Arc::new(ApplyPipeline::new(
            disks,
            ctx.settings.in_flight_budget,
            Arc::clone(&ctx.global_budget),
            ctx.metrics.apply_seconds.clone(),
        )),
        gate: EpochGate::new(streams, next_epoch),
        streams,
        joined: Mutex::new(1),
        outgoing: Mutex::new(vec![outgoing.clone()]),
        end: CancellationToken::new(),
        joined_streams: TaskTracker::new(),
        barriers: Mutex::new(Some(barriers)),
        started_at_ms: now_ms(),
        consistent: Mutex::new((durable_epoch, 0)),
        last_heartbeat: Mutex::new(None),
        series: hello.series,
        sums: Arc::new(tokio::sync::Semaphore::new(SUMS_IN_PARALLEL)),
        meter: ctx.metrics.server(&identity.server_id),
        progress_at_ms: AtomicU64::new(now_ms()),
        stall_after: ctx.settings.stall_after,
        paused: std::sync::atomic::AtomicBool::new(settings.paused),
        disk_names: records.iter().map(|r| r.name.clone()).collect(),
        keeping_slots: std::sync::atomic::AtomicBool::new(false),
        // Whatever the images hold at the start, no barrier of this session vouched for
        // it.
        sealed_mark: Mutex::new((0, durable_epoch, false)),
        unsealed: Mutex::default(),
        last_checkpoint: Mutex::new(None),
        recovery,
    });
    let disk_names: Vec<String> = records.iter().map(|r| r.name.clone()).collect();

    // Disks with an initial sync or a rescan to do take a slot, or wait in line.
    let slots: HashMap<String, Slot> = records
        .iter()
        .filter(|r| !r.sync_complete() || r.rescan().is_some())
        .map(|r| {
            let slot = ctx
                .registry
                .slots
                .acquire(&(identity.server_id.clone(), r.name.clone()));
            if let Slot::Queued(position) = slot {
                tracing::info!(disk = %r.name, position, "queued for an initial sync or rescan slot");
            }
            (r.name.clone(), slot)
        })
        .collect();
    for disk in session.pipeline.disks() {
        if matches!(slots.get(&disk.name), Some(Slot::Queued(_))) {
            disk.queued.store(true, Ordering::Relaxed);
        }
    }
    let welcome = Welcome {
        session_id: *session.id.as_bytes(),
        next_epoch,
        settings: Settings {
            bandwidth_limit: settings.bandwidth_limit(),
            max_streams: streams,
            block_size: 4096,
            // EBS snapshot blocks: whole blocks are what the snapshots take. (Partial
            // blocks are fine too: the base copy completes them.)
            alignment: if ctx.ebs.is_some() {
                blockferry_storage::ebs::BLOCK_SIZE as u32
            } else {
                4096
            },
            barrier_interval: ctx.settings.barrier_interval,
            heartbeat_interval_ms: u32::try_from(ctx.settings.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
            paused: settings.paused,
            unknown_flags: 0,
        },
        disks: records
            .iter()
            .map(|r| DiskResume {
                name: r.name.clone(),
                size: r.size,
                sync_watermark: r.sync_watermark,
                state: match slots.get(&r.name) {
                    Some(Slot::Queued(_)) => DiskState::QUEUED,
                    _ => r.disk_state(),
                },
                rescan: r.rescan(),
            })
            .collect(),
    };
    for r in &records {
        tracing::info!(
            disk = %r.name,
            size = r.size,
            watermark = r.sync_watermark,
            state = %r.state,
            reason = %r.reason,
            rescan = %r.rescan(),
            "disk resumes"
        );
    }
    ctx.registry.publish(&session);
    send(outgoing, Frame::Welcome(welcome)).await?;
    ctx.metrics.sessions_started.inc();

    if session.recovery.is_some() {
        // An idle server's next point: cut once the running upload is done, at the
        // epoch the images hold while no newer write has come.
        let session = Arc::clone(&session);
        tokio::spawn(
            async move {
                loop {
                    tokio::select! {
                        () = session.end.cancelled() => return,
                        () = tokio::time::sleep(RECOVERY_TICK) => {}
                    }
                    let Some(recovery) = &session.recovery else {
                        return;
                    };
                    let (through, epoch, consistent) = *lock(&session.sealed_mark);
                    if consistent {
                        recovery.maybe_cut(&session.pipeline, through, epoch);
                    }
                }
            }
            .in_current_span(),
        );
    }
    let worker = tokio::spawn(
        barrier_worker(
            barrier_queue,
            Arc::clone(&session),
            Arc::clone(&ctx.catalog),
            Arc::clone(&ctx.registry),
            ctx.metrics.barrier_seconds.clone(),
        )
        .in_current_span(),
    );

    let result = tokio::select! {
        result = stream_frames(ctx, reader, &session, 0, outgoing) => result,
        () = guard.cancelled() => Ok(End::Replaced),
    };
    match &result {
        Ok(End::Shutdown) => {
            let _ = outgoing.try_send(Frame::Error(ErrorFrame {
                code: ErrorCode::SHUTTING_DOWN,
                message: "the receiver is shutting down; reconnect later".into(),
                retry_after_ms: Some(2_000),
            }));
        }
        Ok(End::Replaced) => {
            let _ = outgoing.try_send(Frame::Goodbye(Goodbye {
                message: "replaced by a newer session of the same server".into(),
            }));
        }
        // The other streams hear why too (this one hears it from `serve`): the agent
        // must not mistake their closing for a network failure and miss the retry hint.
        Err(err) => {
            if let Some(frame) = err.frame() {
                session.broadcast_joined(Frame::Error(frame)).await;
            }
        }
        _ => {}
    }

    // Teardown: every stream stops, epochs already sealed are still made durable (their
    // writes have arrived), then every write completes before the disks are handed to a
    // successor.
    session.end.cancel();
    ctx.registry.unpublish(session.id);
    session.joined_streams.close();
    session.joined_streams.wait().await;
    lock(&session.barriers).take();
    let worker_result = worker.await.unwrap_or(Ok(()));
    session
        .pipeline
        .wait_through(session.pipeline.last_submitted())
        .await;
    if let Some(ebs) = &ctx.ebs {
        let disks = session.pipeline.disks();
        let unsealed = std::mem::take(&mut *lock(&session.unsealed));
        ebs.left_over(
            &identity.server_id,
            unsealed
                .into_iter()
                .map(|(_, disk, start, end)| (disks[usize::from(disk)].name.clone(), start, end)),
        );
    }
    let catalog = Arc::clone(&ctx.catalog);
    let server_id = identity.server_id.clone();
    let _ = tokio::task::spawn_blocking(move || {
        catalog.mark_disconnected(&server_id, &disk_names, "session_ended")
    })
    .await;
    if session.keeping_slots.load(Ordering::Relaxed) {
        let (registry, server) = (Arc::clone(&ctx.registry), identity.server_id.clone());
        tokio::spawn(async move {
            tokio::time::sleep(SLOT_GRACE).await;
            if !registry.is_connected(&server) {
                registry.grant(registry.slots.release_server(&server));
            }
        });
    } else {
        ctx.registry
            .grant(ctx.registry.slots.release_server(&identity.server_id));
    }
    drop(guard);
    let end = result?;
    worker_result?;
    Ok(end.describe())
}

/// An additional stream of a live session.
async fn run_joined(
    ctx: &Arc<SessionContext>,
    reader: &mut FrameReader,
    outgoing: &mpsc::Sender<Frame>,
    identity: &AgentIdentity,
    join: JoinStream,
) -> Result<&'static str, SessionError> {
    let id = Uuid::from_bytes(join.session_id);
    let session = ctx.registry.find(id).ok_or_else(|| {
        SessionError::Protocol(format!(
            "JoinStream names session {id}, which does not exist (any more)"
        ))
    })?;
    if session.identity != *identity {
        return Err(SessionError::NotAuthorized(format!(
            "JoinStream for session {id} of server {} by agent {} of server {}",
            session.identity.server_id, identity.agent_id, identity.server_id
        )));
    }
    let index = join.stream_index;
    {
        let mut joined = lock(&session.joined);
        if index == 0 || index >= session.streams || *joined & (1 << index) != 0 {
            return Err(SessionError::Limit(format!(
                "stream {index} refused: session {id} was granted {} streams (at most {MAX_STREAMS}), numbered 1 to {} beyond the first, each joining once",
                session.streams,
                session.streams - 1
            )));
        }
        *joined |= 1 << index;
        lock(&session.outgoing).push(outgoing.clone());
    }
    let _tracked = session.joined_streams.token();
    if let Err(err) = reader.enter_session() {
        session.end.cancel();
        return Err(err);
    }
    tracing::info!(stream = index, "stream joined");
    let result = stream_frames(ctx, reader, &session, index, outgoing).await;
    session.end.cancel();
    result.map(End::describe)
}

async fn stream_frames(
    ctx: &SessionContext,
    reader: &mut FrameReader,
    session: &Arc<Session>,
    stream: u8,
    outgoing: &mpsc::Sender<Frame>,
) -> Result<End, SessionError> {
    let pipeline = &session.pipeline;
    loop {
        let frame = tokio::select! {
            biased;
            () = ctx.shutdown.cancelled() => return Ok(End::Shutdown),
            () = session.end.cancelled() => return Ok(End::SessionEnded),
            frame = tokio::time::timeout(ctx.settings.idle_timeout, reader.next()) => {
                frame.map_err(|_| SessionError::Idle(ctx.settings.idle_timeout))??
            }
        };
        match frame {
            None => return Ok(End::AgentClosed),
            Some(Frame::Write(write)) => {
                let disk = validate_write(pipeline, &write)?;
                // A queued disk waits for its slot: only changes to what is synced
                // already may go on (an initial-sync write in disguise may not).
                if disk.queued.load(Ordering::Relaxed)
                    && (write.header.flags.contains(WriteFlags::INITIAL_SYNC)
                        || write.header.end() > disk.synced)
                {
                    return Err(SessionError::Limit(format!(
                        "write of {} bytes at {} to disk {}, which waits for a sync slot (Welcome said QUEUED): only changes below its watermark of {} may be sent",
                        write.header.len, write.header.offset, disk.name, disk.synced
                    )));
                }
                if !write.header.flags.contains(WriteFlags::INITIAL_SYNC)
                    && disk.rescanning.load(Ordering::Relaxed)
                {
                    disk.resent_bytes
                        .fetch_add(u64::from(write.header.len), Ordering::Relaxed);
                }
                let (start, end) = (write.header.offset, write.header.end());
                let seq = pipeline.submit(write.header, write.data).await;
                if let Some(ebs) = &ctx.ebs {
                    ebs.written(&session.identity.server_id, &disk.name, start, end);
                    lock(&session.unsealed).push_back((seq, write.header.disk, start, end));
                }
            }
            Some(Frame::SumRequest(request)) => {
                let disk = validate_sum_request(pipeline, &request)?;
                // Bounded: beyond SUMS_IN_PARALLEL, this stream waits for a permit.
                let permit = Arc::clone(&session.sums)
                    .acquire_owned()
                    .await
                    .map_err(|_| SessionError::Protocol("session closing".into()))?;
                // The bytes it reads count against the in-flight budgets, like writes.
                let memory = pipeline.reserve_read(request.len()).await;
                let (session, outgoing) = (Arc::clone(session), outgoing.clone());
                tokio::spawn(
                    async move {
                        let _permits = (permit, memory);
                        answer_sums(&session, &disk, request, &outgoing).await;
                    }
                    .in_current_span(),
                );
            }
            Some(Frame::Checkpoint(checkpoint)) => {
                // One catalog commit per CHECKPOINT_INTERVAL at most: an agent sends one at
                // a clean stop; a flood of them waits here (and so does its stream).
                let wait = {
                    let mut last = lock(&session.last_checkpoint);
                    let now = tokio::time::Instant::now();
                    let at = last.map_or(now, |t| (t + CHECKPOINT_INTERVAL).max(now));
                    *last = Some(at);
                    at
                };
                tokio::time::sleep_until(wait).await;
                let catalog = Arc::clone(&ctx.catalog);
                let (server_id, series) = (session.identity.server_id.clone(), session.series);
                tokio::task::spawn_blocking(move || {
                    catalog.record_checkpoint(&server_id, &series, checkpoint.seq)
                })
                .await
                .map_err(|e| SessionError::Storage(e.to_string()))?
                .map_err(|e| SessionError::Storage(error_chain(&e)))?;
                tracing::info!(seq = checkpoint.seq, "agent checkpoint recorded");
                send(
                    outgoing,
                    Frame::CheckpointSaved(Checkpoint {
                        seq: checkpoint.seq,
                    }),
                )
                .await?;
            }
            Some(Frame::Barrier(barrier)) => {
                let epoch = barrier.epoch;
                let progress = validate_barrier(pipeline, &barrier)?;
                let through = pipeline.last_submitted();
                let sealed = session
                    .gate
                    .arrive(
                        stream,
                        epoch,
                        through,
                        &progress,
                        &barrier.rescan_done,
                        barrier.consistent,
                    )
                    .map_err(|e| SessionError::Protocol(e.to_string()))?;
                if let Some(sealed) = sealed {
                    // Every write of the epoch, on every stream, completes before any
                    // write of the next one is read (invariant 3).
                    pipeline.wait_through(sealed.through).await;
                    *lock(&session.sealed_mark) = (sealed.through, epoch, sealed.consistent);
                    lock(&session.unsealed).retain(|w| w.0 > sealed.through);
                    if let Some(recovery) = &session.recovery {
                        recovery.sealed(pipeline, &sealed.progress, &sealed.rescan_done);
                        // The other streams wait for this epoch to be marked applied, so
                        // no write of the next one has been submitted: a recovery point
                        // can be cut here even on a server that is never idle.
                        if sealed.consistent {
                            recovery.maybe_cut(pipeline, sealed.through, epoch);
                        }
                    }
                    session.gate.mark_applied(epoch);
                    let queue = lock(&session.barriers).clone();
                    match queue {
                        Some(queue) => {
                            if queue.send(sealed).await.is_err() {
                                return Ok(End::SessionEnded);
                            }
                        }
                        None => return Ok(End::SessionEnded),
                    }
                } else {
                    tokio::select! {
                        () = session.gate.wait_applied(epoch) => {}
                        () = ctx.shutdown.cancelled() => return Ok(End::Shutdown),
                        () = session.end.cancelled() => return Ok(End::SessionEnded),
                        () = tokio::time::sleep(BARRIER_WAIT) => {
                            return Err(SessionError::Protocol(format!(
                                "the other streams did not deliver barrier {epoch} within {BARRIER_WAIT:?}"
                            )));
                        }
                    }
                }
            }
            Some(Frame::Heartbeat(hb)) => {
                tracing::debug!(
                    cpu_permille = hb.cpu_permille,
                    rss = hb.rss_bytes,
                    backlog = hb.backlog_bytes,
                    "heartbeat"
                );
                if let Some(beat) = hb
                    .disks
                    .iter()
                    .find(|b| usize::from(b.disk) >= pipeline.disks().len())
                {
                    return Err(SessionError::Protocol(format!(
                        "heartbeat names disk index {}, which does not exist",
                        beat.disk
                    )));
                }
                if let Some(capture) = hb
                    .tracking
                    .iter()
                    .flat_map(|t| &t.disks)
                    .find(|c| usize::from(c.disk) >= pipeline.disks().len())
                {
                    return Err(SessionError::Protocol(format!(
                        "heartbeat names disk index {} in its tracking, which does not exist",
                        capture.disk
                    )));
                }
                if let Some(recovery) = &session.recovery {
                    recovery.heartbeat(hb.backlog_bytes);
                }
                *lock(&session.last_heartbeat) = Some(hb);
            }
            Some(Frame::Goodbye(bye)) => {
                tracing::info!(message = %blockferry_util::text::printable(&bye.message), "agent said goodbye");
                return Ok(End::Goodbye);
            }
            Some(Frame::Error(err)) => {
                tracing::warn!(code = %err.code, message = %blockferry_util::text::printable(&err.message), "agent reported an error");
                return Ok(End::AgentError);
            }
            Some(Frame::Unknown { kind, .. }) => {
                // A newer agent may send frames we do not know; they are not ours to act on.
                tracing::debug!(%kind, "ignoring a frame of unknown kind");
            }
            Some(
                other @ (Frame::Hello(_)
                | Frame::Welcome(_)
                | Frame::JoinStream(_)
                | Frame::Durable(_)
                | Frame::SumReply(_)
                | Frame::CheckpointSaved(_)
                | Frame::SettingsUpdate(_)),
            ) => {
                return Err(SessionError::Protocol(format!(
                    "unexpected {} frame during replication",
                    other.kind()
                )));
            }
        }
    }
}

/// How a stream ended, when it ended without an error.
#[derive(Debug, Clone, Copy)]
enum End {
    AgentClosed,
    Goodbye,
    AgentError,
    Shutdown,
    Replaced,
    /// Another stream of the session ended, or a flush failed.
    SessionEnded,
}

impl End {
    fn describe(self) -> &'static str {
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

fn validate_hello(hello: &Hello, max_disk_size: u64) -> Result<(), SessionError> {
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
fn printable_hello(mut hello: Hello) -> Hello {
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

/// Flags this receiver knows how to apply.
const KNOWN_FLAGS: u16 = WriteFlags::ZERO_FILL.0 | WriteFlags::INITIAL_SYNC.0;

fn validate_write(
    pipeline: &ApplyPipeline,
    write: &Write,
) -> Result<Arc<StagingDisk>, SessionError> {
    let h = &write.header;
    let disk = pipeline.disks().get(usize::from(h.disk)).ok_or_else(|| {
        SessionError::Protocol(format!(
            "write to disk index {}, but the session has {} disks",
            h.disk,
            pipeline.disks().len()
        ))
    })?;
    if h.flags.0 & !KNOWN_FLAGS != 0 {
        return Err(SessionError::Unsupported(format!(
            "write flags {:#06x} on disk {} (compression and unknown flags are not supported by this receiver)",
            h.flags.0, disk.name
        )));
    }
    debug_assert!(h.len <= MAX_WRITE_DATA);
    let size = disk.store.size();
    match h.offset.checked_add(u64::from(h.len)) {
        Some(end) if end <= size => Ok(Arc::clone(disk)),
        _ => Err(SessionError::OutOfRange(format!(
            "write of {} bytes at offset {} is beyond the end of disk {} ({} bytes)",
            h.len, h.offset, disk.name, size
        ))),
    }
}

/// A checksum query must name a disk of the session and start inside it; its last block
/// may run past the end (it is hashed over the bytes that exist). Count and block size
/// were checked by the decoder.
fn validate_sum_request(
    pipeline: &ApplyPipeline,
    request: &SumRequest,
) -> Result<Arc<StagingDisk>, SessionError> {
    let disk = pipeline
        .disks()
        .get(usize::from(request.disk))
        .ok_or_else(|| {
            SessionError::Protocol(format!(
                "SumRequest for disk index {}, but the session has {} disks",
                request.disk,
                pipeline.disks().len()
            ))
        })?;
    let size = disk.store.size();
    let block = u64::from(request.block_size);
    let in_range = request.offset().is_some_and(|offset| {
        offset < size && offset + request.len() <= size.div_ceil(block) * block
    });
    if !in_range {
        return Err(SessionError::OutOfRange(format!(
            "SumRequest for {} blocks of {} bytes from block {} is beyond the end of disk {} ({} bytes)",
            request.count, request.block_size, request.first_block, disk.name, size
        )));
    }
    Ok(Arc::clone(disk))
}

/// Reads the blocks a query names from the staging store, once every write received
/// before it has been applied, and sends their digests back on the query's stream. A
/// read failure ends the session (the agent reconnects and rescans again).
async fn answer_sums(
    session: &Session,
    disk: &StagingDisk,
    request: SumRequest,
    outgoing: &mpsc::Sender<Frame>,
) {
    let pipeline = &session.pipeline;
    pipeline.wait_through(pipeline.last_submitted()).await;
    let size = disk.store.size();
    let offset = request.offset().unwrap_or(size);
    let len = request.len().min(size.saturating_sub(offset));
    let data = match disk.store.read_at(offset, len as usize).await {
        Ok(data) => data,
        Err(err) => {
            tracing::warn!(disk = %disk.name, error = %error_chain(&err), "cannot answer a checksum query; ending the session");
            session.end.cancel();
            return;
        }
    };
    disk.rescanned_bytes.fetch_add(len, Ordering::Relaxed);
    let digests = tokio::task::spawn_blocking(move || {
        data.chunks(request.block_size as usize)
            .map(block_digest)
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let reply = Frame::SumReply(SumReply {
        disk: request.disk,
        first_block: request.first_block,
        block_size: request.block_size,
        digests,
    });
    let _ = tokio::time::timeout(SEND_TIMEOUT, outgoing.send(reply)).await;
}

fn validate_barrier(
    pipeline: &ApplyPipeline,
    barrier: &Barrier,
) -> Result<Vec<(u16, u64)>, SessionError> {
    for &index in &barrier.rescan_done {
        let disk = pipeline.disks().get(usize::from(index)).ok_or_else(|| {
            SessionError::Protocol(format!(
                "barrier claims the rescan of disk index {index}, which does not exist"
            ))
        })?;
        if disk.queued.load(Ordering::Relaxed) {
            return Err(SessionError::Limit(format!(
                "barrier claims the rescan of disk {}, which waits for a sync slot (Welcome said QUEUED)",
                disk.name
            )));
        }
    }
    barrier
        .sync_progress
        .iter()
        .map(|p| {
            let disk = pipeline.disks().get(usize::from(p.disk)).ok_or_else(|| {
                SessionError::Protocol(format!(
                    "barrier names disk index {}, which does not exist",
                    p.disk
                ))
            })?;
            if p.watermark > disk.store.size() {
                return Err(SessionError::OutOfRange(format!(
                    "barrier claims a watermark of {} on disk {}, beyond its size of {}",
                    p.watermark,
                    disk.name,
                    disk.store.size()
                )));
            }
            if disk.queued.load(Ordering::Relaxed) && p.watermark > disk.synced {
                return Err(SessionError::Limit(format!(
                    "barrier claims initial-sync progress to {} on disk {}, which waits for a sync slot (Welcome said QUEUED) at {}",
                    p.watermark, disk.name, disk.synced
                )));
            }
            Ok((p.disk, p.watermark))
        })
        .collect()
}

/// Makes each sealed (and applied) epoch durable, in order, then tells every stream.
async fn barrier_worker(
    mut queue: mpsc::Receiver<Sealed>,
    session: Arc<Session>,
    catalog: Arc<Catalog>,
    registry: Arc<SessionRegistry>,
    barrier_seconds: prometheus_client::metrics::histogram::Histogram,
) -> Result<(), SessionError> {
    while let Some(sealed) = queue.recv().await {
        let started = std::time::Instant::now();
        if let Err(err) = make_durable(&session, &catalog, &registry, &sealed).await {
            // Every stream hears why before any of them closes.
            if let Some(frame) = err.frame() {
                session.broadcast(Frame::Error(frame)).await;
            }
            session.end.cancel();
            return Err(err);
        }
        barrier_seconds.observe(started.elapsed().as_secs_f64());
        let at = now_ms();
        *lock(&session.consistent) = (sealed.epoch, at);
        session.progress_at_ms.store(at, Ordering::Relaxed);
        // A stream may already be gone: the consistent point is recorded either way.
        session
            .broadcast(Frame::Durable(Durable {
                epoch: sealed.epoch,
            }))
            .await;
    }
    Ok(())
}

/// Data first, then the metadata that points at it: the epoch's writes have completed
/// (the gate waited for them), every staging store is flushed, and only then is the
/// consistent point committed.
async fn make_durable(
    session: &Session,
    catalog: &Arc<Catalog>,
    registry: &SessionRegistry,
    sealed: &Sealed,
) -> Result<(), SessionError> {
    let pipeline = &session.pipeline;
    pipeline.wait_through(sealed.through).await;
    let server_id = session.identity.server_id.clone();
    if let Some(failure) = pipeline.failure() {
        return Err(stall(catalog, &server_id, failure).await);
    }
    let flushed = match pipeline.flush_all().await {
        Ok(flushed) => flushed,
        Err((disk, err)) => {
            let failure = crate::apply::StagingFailure {
                message: format!("disk {disk}: {}", error_chain(&err)),
                disk,
                out_of_space: err.is_out_of_space(),
            };
            return Err(stall(catalog, &server_id, failure).await);
        }
    };
    let written: Vec<String> = pipeline
        .disks()
        .iter()
        .filter(|d| d.take_wrote())
        .map(|d| d.name.clone())
        .collect();
    let evidence = DurableEvidence::new(flushed);
    let progress: Vec<(String, u64)> = sealed
        .progress
        .iter()
        .map(|&(disk, watermark)| (pipeline.disks()[usize::from(disk)].name.clone(), watermark))
        .collect();
    let rescans: Vec<RescanProgress> = pipeline
        .disks()
        .iter()
        .enumerate()
        .filter(|(_, d)| d.rescanning.load(Ordering::Relaxed))
        .map(|(index, d)| RescanProgress {
            disk: d.name.clone(),
            rescanned_bytes: d.rescanned_bytes.load(Ordering::Relaxed),
            resent_bytes: d.resent_bytes.load(Ordering::Relaxed),
            done: sealed.rescan_done.iter().any(|&i| usize::from(i) == index),
        })
        .collect();
    let catalog = Arc::clone(catalog);
    let epoch = sealed.epoch;
    let recorded = rescans.clone();
    let server = server_id.clone();
    let completed = tokio::task::spawn_blocking(move || {
        catalog.record_durable(evidence, &server, epoch, &progress, &recorded, &written)
    })
    .await
    .map_err(|e| SessionError::Storage(e.to_string()))?
    .map_err(|e| SessionError::Storage(error_chain(&e)))?;
    for disk in completed {
        registry.grant(registry.slots.release(&(server_id.clone(), disk)));
    }
    for rescan in rescans.iter().filter(|r| r.done) {
        if let Some(disk) = pipeline.disks().iter().find(|d| d.name == rescan.disk) {
            disk.rescanning.store(false, Ordering::Relaxed);
            tracing::info!(
                disk = %disk.name,
                rescanned = rescan.rescanned_bytes,
                resent = rescan.resent_bytes,
                "rescan complete"
            );
        }
    }
    Ok(())
}

/// Records why a disk cannot make progress, and turns the failure into the session's end:
/// the agent hears it, keeps its changes, and retries. A full file system is
/// `staging_full`; any other failed write or flush (an I/O error of the staging disk, a
/// file system shut down after one) is `staging_error`. Either clears with the next write
/// made durable on the disk.
async fn stall(
    catalog: &Arc<Catalog>,
    server_id: &str,
    failure: crate::apply::StagingFailure,
) -> SessionError {
    let (reason, message) = if failure.out_of_space {
        (
            "staging_full",
            format!(
                "the staging file system is full ({}); free space on the receiver",
                failure.message
            ),
        )
    } else {
        (
            "staging_error",
            format!(
                "the staging image cannot be written ({}); check the receiver's disk (dmesg). Nothing acknowledged is lost: the agent keeps what is not durable and retries",
                failure.message
            ),
        )
    };
    tracing::error!(server = %server_id, disk = %failure.disk, reason, "{message}");
    let (catalog, server, disk, detail) = (
        Arc::clone(catalog),
        server_id.to_owned(),
        failure.disk.clone(),
        if failure.out_of_space {
            String::new()
        } else {
            failure.message.clone()
        },
    );
    let recorded =
        tokio::task::spawn_blocking(move || catalog.mark_stalled(&server, &disk, reason, &detail))
            .await;
    if !matches!(recorded, Ok(Ok(()))) {
        tracing::warn!(disk = %failure.disk, "could not record the stall in the catalog");
    }
    SessionError::Stalled {
        disk: failure.disk,
        reason,
        message,
    }
}

enum OpenedStore {
    /// The store, and the image identity the catalog must record, if any.
    Ready(BlockStore, Option<crate::catalog::ImageId>),
    /// The image is not one the catalog can vouch for: why.
    Missing(String),
}

fn open_store(
    ctx: &SessionContext,
    server_id: &str,
    record: &crate::catalog::DiskRecord,
) -> Result<OpenedStore, Box<dyn std::error::Error + Send + Sync>> {
    if let Some(dir) = record.image.parent() {
        blockferry_util::durable::ensure_private_dir(dir, "staging images")?;
    }
    let (store, stamp) = match crate::staging::open(server_id, record, ctx.engine.clone())? {
        crate::staging::Opened::Ready { store, stamp } => (store, stamp),
        crate::staging::Opened::Missing { why } => return Ok(OpenedStore::Missing(why)),
    };
    let store = match &ctx.ebs {
        Some(ebs) => ebs.open_store(server_id, &record.name, store, &record.image, record.size)?,
        None => BlockStore::File(store),
    };
    Ok(OpenedStore::Ready(store, stamp))
}

/// With any of a server's images missing, its session cannot start: each such disk is
/// recorded STALLED (`staging_missing`, naming the image), and the agent is told to come
/// back later. It keeps its changes meanwhile.
async fn refuse_missing_images(
    ctx: &SessionContext,
    server_id: &str,
    missing: Vec<(String, String)>,
) -> Option<SessionError> {
    let (first, detail) = missing.first().cloned()?;
    for (disk, detail) in &missing {
        tracing::error!(disk = %disk, "the staging image {detail}; the disk is STALLED until the image is back, or an operator runs `blockferry-receiver disk adopt` (keep this file, rescan it) or `disk reset` (sync again) for it");
    }
    let catalog = Arc::clone(&ctx.catalog);
    let server = server_id.to_owned();
    let recorded = tokio::task::spawn_blocking(move || {
        missing.iter().try_for_each(|(disk, detail)| {
            catalog.mark_stalled(&server, disk, crate::catalog::STAGING_MISSING, detail)
        })
    })
    .await;
    if !matches!(recorded, Ok(Ok(()))) {
        tracing::warn!("could not record the staging_missing stall in the catalog");
    }
    Some(SessionError::Stalled {
        disk: first,
        reason: crate::catalog::STAGING_MISSING,
        message: format!(
            "the staging image {detail}; an operator must bring it back, or run `blockferry-receiver disk adopt` or `disk reset`"
        ),
    })
}

struct FrameReader {
    half: ReadHalf<TlsStream<TcpStream>>,
    buf: FrameBuffer,
    meter: crate::metrics::ServerMeter,
    /// This connection's share of the receive-buffer budget.
    share: crate::budget::Share,
}

impl FrameReader {
    /// The first frame: Hello or JoinStream. Any other kind is refused as soon as its
    /// header has arrived, without waiting for (or holding) its payload.
    async fn first(&mut self) -> Result<Option<Frame>, SessionError> {
        loop {
            match self.buf.pending_kind() {
                Some(FrameKind::HELLO | FrameKind::JOIN_STREAM) | None => {}
                Some(kind) => {
                    return Err(SessionError::Protocol(format!(
                        "expected Hello or JoinStream, got {kind}"
                    )));
                }
            }
            if let Some(frame) = self.decoded()? {
                return Ok(Some(frame));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// The connection is part of a session now: it may send writes.
    fn enter_session(&mut self) -> Result<(), SessionError> {
        self.share
            .enter_session(&mut self.buf)
            .map_err(|refusal| SessionError::Busy(refusal.to_string()))
    }

    /// The next frame, or `None` at a clean end of stream.
    async fn next(&mut self) -> Result<Option<Frame>, SessionError> {
        loop {
            if let Some(frame) = self.decoded()? {
                return Ok(Some(frame));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// A whole frame already received, if there is one.
    fn decoded(&mut self) -> Result<Option<Frame>, SessionError> {
        self.buf.next_frame().map_err(|e| match e {
            blockferry_proto::DecodeError::FieldTooLong {
                kind: FrameKind::HELLO,
                field: "disks",
                len,
                max,
            } => SessionError::Limit(format!(
                "a source server replicates at most {max} disks; this agent offered {len}: name at most {max} with --disk"
            )),
            e => SessionError::Protocol(e.to_string()),
        })
    }

    /// Reads more; false at a clean end of stream.
    async fn fill(&mut self) -> Result<bool, SessionError> {
        let n = self.half.read(self.buf.spare()).await?;
        self.meter.received.inc_by(n as u64);
        self.meter.rate.add(n as u64);
        if n == 0 {
            if self.buf.buffered() > 0 {
                return Err(SessionError::Protocol(format!(
                    "connection closed inside a frame ({} bytes pending)",
                    self.buf.buffered()
                )));
            }
            return Ok(false);
        }
        self.buf.filled(n);
        Ok(true)
    }
}

async fn write_frames(mut half: WriteHalf<TlsStream<TcpStream>>, mut queue: mpsc::Receiver<Frame>) {
    let mut out = Vec::with_capacity(64 << 10);
    while let Some(frame) = queue.recv().await {
        out.clear();
        frame.encode(&mut out);
        // Send everything already queued in the same write.
        while let Ok(more) = queue.try_recv() {
            more.encode(&mut out);
        }
        let written = tokio::time::timeout(SEND_TIMEOUT, async {
            half.write_all(&out).await?;
            half.flush().await
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            return;
        }
    }
    let _ = half.shutdown().await;
}

async fn send(outgoing: &mpsc::Sender<Frame>, frame: Frame) -> Result<(), SessionError> {
    outgoing.send(frame).await.map_err(|_| {
        SessionError::Connection(std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "the connection's writer has stopped",
        ))
    })
}
