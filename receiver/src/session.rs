//! One agent session: Hello → Welcome → a stream of writes and barriers → end.
//!
//! A session runs three tasks: this reader (decodes frames, validates them against the
//! disks and submits writes to the [`ApplyPipeline`]), a writer (sends Welcome, Durable,
//! Error, Goodbye), and a barrier worker, which for each barrier in order waits for the
//! writes before it, flushes every staging store, records the watermarks, and only then
//! sends `Durable` (invariant 1).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use blockferry_proto::limits::{MAX_STREAMS, MAX_WRITE_DATA};
use blockferry_proto::{
    Barrier, DiskResume, Durable, ErrorCode, ErrorFrame, Frame, FrameBuffer, Goodbye, Hello,
    Settings, Welcome, Write, WriteFlags,
};
use blockferry_storage::{BlockStore, Engine, FileStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::apply::{ApplyPipeline, StagingDisk};
use crate::catalog::{Catalog, DurableEvidence};
use crate::pki::{AgentIdentity, validate_name};
use crate::registry::SessionRegistry;

/// An agent must say Hello this soon after its TLS handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
/// A session with no frame at all for this long is dead (agents heartbeat every few
/// seconds); it is closed so that its agent's next connection is not kept waiting.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Frames queued for the writer task.
const OUTGOING_QUEUE: usize = 64;
/// Barriers received but not yet durable. A full queue stops the reader: an agent that
/// sends barriers faster than the disks can flush is slowed down, not buffered.
const BARRIER_QUEUE: usize = 64;

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
}

#[derive(Debug, Clone)]
pub(crate) struct SessionSettings {
    pub(crate) barrier_interval: u64,
    pub(crate) in_flight_budget: u32,
    pub(crate) heartbeat_interval: Duration,
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
    #[error("connection failed")]
    Connection(#[from] std::io::Error),
    #[error("no Hello within {0:?}")]
    HelloTimeout(Duration),
    #[error("no frame for {0:?}: the agent or the network is gone")]
    Idle(Duration),
}

impl SessionError {
    fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Protocol(_) | Self::HelloTimeout(_) => Some(ErrorCode::PROTOCOL),
            Self::OutOfRange(_) => Some(ErrorCode::OUT_OF_RANGE),
            Self::Unsupported(_) => Some(ErrorCode::UNSUPPORTED),
            Self::Storage(_) => Some(ErrorCode::STORAGE),
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
        let mut reader = FrameReader {
            half: read_half,
            buf: FrameBuffer::new(),
        };
        let result = run(&ctx, &mut reader, &outgoing, &identity).await;
        match &result {
            Ok(end) => tracing::info!("session ended: {end}"),
            Err(err) => {
                tracing::warn!(error = %error_chain(err), "closing session");
                if let Some(code) = err.code() {
                    let message = format!("{err}");
                    let _ = outgoing
                        .send(Frame::Error(ErrorFrame { code, message }))
                        .await;
                }
            }
        }
        drop(outgoing);
        let _ = writer.await;
    }
    .instrument(span)
    .await;
}

async fn run(
    ctx: &Arc<SessionContext>,
    reader: &mut FrameReader,
    outgoing: &mpsc::Sender<Frame>,
    identity: &AgentIdentity,
) -> Result<&'static str, SessionError> {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, reader.next()).await {
        Err(_) => return Err(SessionError::HelloTimeout(HELLO_TIMEOUT)),
        Ok(frame) => match frame? {
            Some(Frame::Hello(hello)) => hello,
            Some(other) => {
                return Err(SessionError::Protocol(format!(
                    "expected Hello, got {}",
                    other.kind()
                )));
            }
            None => return Ok("the agent closed the connection before Hello"),
        },
    };
    validate_hello(&hello)?;
    tracing::info!(
        host = %hello.inventory.host_name,
        agent_version = %hello.agent_version,
        disks = hello.disks.len(),
        "agent connected"
    );

    // One session per source server: a newer one replaces the old, after the old one has
    // finished its in-flight writes, so that two sessions never write the same blocks.
    let session = ctx.registry.claim(identity).await;

    let catalog = Arc::clone(&ctx.catalog);
    let (identity_c, hello_c, images) = (identity.clone(), hello.clone(), ctx.images_dir.clone());
    let records = tokio::task::spawn_blocking(move || {
        catalog.register_session(&identity_c, &hello_c, &images)
    })
    .await
    .map_err(|e| SessionError::Storage(e.to_string()))?
    .map_err(|e| SessionError::Storage(error_chain(&e)))?;

    let mut disks = Vec::with_capacity(records.len());
    for record in &records {
        let store = open_store(&record.image, record.size, ctx.engine.clone()).map_err(|e| {
            SessionError::Storage(format!("disk {}: {}", record.name, error_chain(&*e)))
        })?;
        disks.push(Arc::new(StagingDisk::new(record.name.clone(), store)));
    }
    let pipeline = Arc::new(ApplyPipeline::new(
        disks,
        ctx.settings.in_flight_budget,
        Arc::clone(&ctx.global_budget),
    ));
    let disk_names: Vec<String> = records.iter().map(|r| r.name.clone()).collect();

    let welcome = Welcome {
        session_id: *session.id().as_bytes(),
        settings: Settings {
            bandwidth_limit: 0,
            // Multi-stream sessions come with continuous replication; until then one.
            max_streams: 1.min(MAX_STREAMS),
            block_size: 4096,
            alignment: 4096,
            barrier_interval: ctx.settings.barrier_interval,
            heartbeat_interval_ms: u32::try_from(ctx.settings.heartbeat_interval.as_millis())
                .unwrap_or(u32::MAX),
        },
        disks: records
            .iter()
            .map(|r| DiskResume {
                name: r.name.clone(),
                size: r.size,
                sync_watermark: r.sync_watermark,
                state: r.disk_state(),
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
            "disk resumes"
        );
    }
    send(outgoing, Frame::Welcome(welcome)).await?;

    let session_end = CancellationToken::new();
    let (barriers, barrier_queue) = mpsc::channel(BARRIER_QUEUE);
    let worker = tokio::spawn(
        barrier_worker(
            barrier_queue,
            Arc::clone(&pipeline),
            Arc::clone(&ctx.catalog),
            identity.server_id.clone(),
            outgoing.clone(),
            session_end.clone(),
        )
        .in_current_span(),
    );

    let result = stream_frames(
        ctx,
        reader,
        &pipeline,
        &barriers,
        session.cancelled(),
        &session_end,
    )
    .await;
    match &result {
        Ok(End::Shutdown) => {
            let _ = outgoing.try_send(Frame::Error(ErrorFrame {
                code: ErrorCode::SHUTTING_DOWN,
                message: "the receiver is shutting down; reconnect later".into(),
            }));
        }
        Ok(End::Replaced) => {
            let _ = outgoing.try_send(Frame::Goodbye(Goodbye {
                message: "replaced by a newer session of the same server".into(),
            }));
        }
        _ => {}
    }

    // Teardown: barriers already received are still made durable (their writes have
    // arrived), then every write completes before the disks are handed to a successor.
    drop(barriers);
    let worker_result = worker.await.unwrap_or(Ok(()));
    pipeline.wait_through(pipeline.last_submitted()).await;
    let catalog = Arc::clone(&ctx.catalog);
    let server_id = identity.server_id.clone();
    let _ = tokio::task::spawn_blocking(move || {
        catalog.mark_disconnected(&server_id, &disk_names, "session_ended")
    })
    .await;
    drop(session);
    let end = result?;
    worker_result?;
    Ok(end.describe())
}

/// How a session's stream of frames ended, when it ended without an error.
#[derive(Debug, Clone, Copy)]
enum End {
    AgentClosed,
    Goodbye,
    AgentError,
    Shutdown,
    Replaced,
}

impl End {
    fn describe(self) -> &'static str {
        match self {
            Self::AgentClosed => "the agent closed the connection",
            Self::Goodbye => "the agent said goodbye",
            Self::AgentError => "the agent reported an error",
            Self::Shutdown => "the receiver is shutting down",
            Self::Replaced => "replaced by a newer session of the same server",
        }
    }
}

async fn stream_frames(
    ctx: &SessionContext,
    reader: &mut FrameReader,
    pipeline: &ApplyPipeline,
    barriers: &mpsc::Sender<PendingBarrier>,
    replaced: tokio_util::sync::WaitForCancellationFuture<'_>,
    session_end: &CancellationToken,
) -> Result<End, SessionError> {
    tokio::pin!(replaced);
    loop {
        let frame = tokio::select! {
            biased;
            () = ctx.shutdown.cancelled() => return Ok(End::Shutdown),
            () = &mut replaced => return Ok(End::Replaced),
            () = session_end.cancelled() => {
                // The barrier worker failed; it has sent the Error frame.
                return Err(SessionError::Storage(
                    pipeline.failure().unwrap_or_else(|| "flush or catalog commit failed".into()),
                ));
            }
            frame = tokio::time::timeout(IDLE_TIMEOUT, reader.next()) => {
                frame.map_err(|_| SessionError::Idle(IDLE_TIMEOUT))??
            }
        };
        match frame {
            None => return Ok(End::AgentClosed),
            Some(Frame::Write(write)) => {
                validate_write(pipeline, &write)?;
                pipeline.submit(write.header, write.data).await;
            }
            Some(Frame::Barrier(barrier)) => {
                let pending = validate_barrier(pipeline, barrier)?;
                let pending = PendingBarrier {
                    through: pipeline.last_submitted(),
                    ..pending
                };
                barriers
                    .send(pending)
                    .await
                    .map_err(|_| SessionError::Storage("barrier worker stopped".into()))?;
            }
            Some(Frame::Heartbeat(hb)) => {
                tracing::debug!(
                    cpu_permille = hb.cpu_permille,
                    rss = hb.rss_bytes,
                    backlog = hb.backlog_bytes,
                    "heartbeat"
                );
            }
            Some(Frame::Goodbye(bye)) => {
                tracing::info!(message = %bye.message, "agent said goodbye");
                return Ok(End::Goodbye);
            }
            Some(Frame::Error(err)) => {
                tracing::warn!(code = %err.code, message = %err.message, "agent reported an error");
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
                | Frame::Durable(_)),
            ) => {
                return Err(SessionError::Protocol(format!(
                    "unexpected {} frame during replication",
                    other.kind()
                )));
            }
        }
    }
}

fn validate_hello(hello: &Hello) -> Result<(), SessionError> {
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
    }
    Ok(())
}

/// Flags this receiver knows how to apply.
const KNOWN_FLAGS: u16 = WriteFlags::ZERO_FILL.0 | WriteFlags::INITIAL_SYNC.0;

fn validate_write(pipeline: &ApplyPipeline, write: &Write) -> Result<(), SessionError> {
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
        Some(end) if end <= size => Ok(()),
        _ => Err(SessionError::OutOfRange(format!(
            "write of {} bytes at offset {} is beyond the end of disk {} ({} bytes)",
            h.len, h.offset, disk.name, size
        ))),
    }
}

#[derive(Debug)]
struct PendingBarrier {
    epoch: u64,
    /// Sequence number of the last write before the barrier.
    through: u64,
    /// (disk name, claimed initial-sync watermark).
    progress: Vec<(String, u64)>,
}

fn validate_barrier(
    pipeline: &ApplyPipeline,
    barrier: Barrier,
) -> Result<PendingBarrier, SessionError> {
    let mut progress = Vec::with_capacity(barrier.sync_progress.len());
    for p in barrier.sync_progress {
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
        progress.push((disk.name.clone(), p.watermark));
    }
    Ok(PendingBarrier {
        epoch: barrier.epoch,
        through: 0,
        progress,
    })
}

async fn barrier_worker(
    mut queue: mpsc::Receiver<PendingBarrier>,
    pipeline: Arc<ApplyPipeline>,
    catalog: Arc<Catalog>,
    server_id: String,
    outgoing: mpsc::Sender<Frame>,
    session_end: CancellationToken,
) -> Result<(), SessionError> {
    while let Some(barrier) = queue.recv().await {
        let result = make_durable(&pipeline, &catalog, &server_id, &barrier).await;
        if let Err(err) = result {
            session_end.cancel();
            return Err(err);
        }
        // The connection may already be gone: the watermark is recorded either way.
        let _ = outgoing
            .send(Frame::Durable(Durable {
                epoch: barrier.epoch,
            }))
            .await;
    }
    Ok(())
}

/// Data first, then the metadata that points at it.
async fn make_durable(
    pipeline: &ApplyPipeline,
    catalog: &Arc<Catalog>,
    server_id: &str,
    barrier: &PendingBarrier,
) -> Result<(), SessionError> {
    pipeline.wait_through(barrier.through).await;
    if let Some(failure) = pipeline.failure() {
        return Err(SessionError::Storage(failure));
    }
    let flushed = pipeline
        .flush_all()
        .await
        .map_err(|e| SessionError::Storage(error_chain(&e)))?;
    let evidence = DurableEvidence::new(flushed);
    let catalog = Arc::clone(catalog);
    let (server_id, epoch, progress) = (
        server_id.to_owned(),
        barrier.epoch,
        barrier.progress.clone(),
    );
    tokio::task::spawn_blocking(move || {
        catalog.record_durable(evidence, &server_id, epoch, &progress)
    })
    .await
    .map_err(|e| SessionError::Storage(e.to_string()))?
    .map_err(|e| SessionError::Storage(error_chain(&e)))
}

fn open_store(
    image: &std::path::Path,
    size: u64,
    engine: Engine,
) -> Result<BlockStore, Box<dyn std::error::Error + Send + Sync>> {
    if let Some(dir) = image.parent() {
        blockferry_storage::durable::create_dir_durable(dir, 0o700)?;
    }
    Ok(BlockStore::File(FileStore::open_or_create(
        image, size, engine,
    )?))
}

struct FrameReader {
    half: ReadHalf<TlsStream<TcpStream>>,
    buf: FrameBuffer,
}

impl FrameReader {
    /// The next frame, or `None` at a clean end of stream.
    async fn next(&mut self) -> Result<Option<Frame>, SessionError> {
        loop {
            if let Some(frame) = self
                .buf
                .next_frame()
                .map_err(|e| SessionError::Protocol(e.to_string()))?
            {
                return Ok(Some(frame));
            }
            let n = self.half.read(self.buf.spare()).await?;
            if n == 0 {
                if self.buf.buffered() > 0 {
                    return Err(SessionError::Protocol(format!(
                        "connection closed inside a frame ({} bytes pending)",
                        self.buf.buffered()
                    )));
                }
                return Ok(None);
            }
            self.buf.filled(n);
        }
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
        if half.write_all(&out).await.is_err() || half.flush().await.is_err() {
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

/// An error with its causes, for one log line.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
