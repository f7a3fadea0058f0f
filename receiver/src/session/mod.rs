//! One agent session: Hello → Welcome → a stream of writes and barriers → end.
//!
//! The rules live in [`core::SessionCore`], which does no I/O; this module drives it. A
//! session runs a reader per stream (decodes frames, has the core decide on each, submits
//! writes to the [`ApplyPipeline`]), a writer per stream ([`transport::write_frames`]),
//! and a barrier worker ([`durability::barrier_worker`]), which for each sealed epoch in
//! order flushes every staging store, records the watermarks, and only then sends
//! `Durable` (invariant 1).

mod core;
mod durability;
mod error;
mod handle;
mod stores;
mod sums;
mod transport;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockferry_proto::{
    DiskResume, DiskState, ErrorCode, ErrorFrame, Frame, Goodbye, Hello, JoinStream, Settings,
    Welcome, WriteFlags,
};
use blockferry_util::error_chain;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use self::core::{CoreConfig, DiskRules, End, Opening, SessionCore, Step, Unsealed};
use self::error::SessionError;
use self::stores::{OpenedStore, open_store, refuse_missing_images};
use self::transport::{FrameReader, SEND_TIMEOUT, send, write_frames};
use crate::apply::{ApplyPipeline, StagingDisk};
use crate::catalog::now_ms;
use crate::context::SessionContext;
use crate::gate::Sealed;
use crate::lock;
use crate::pki::AgentIdentity;
use crate::slots::Slot;

pub(crate) use self::core::LiveView;
pub(crate) use self::handle::SessionHandle;
pub(crate) use self::transport::refuse_busy;

/// An agent must say Hello this soon after its TLS handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
/// Frames queued for the writer task.
const OUTGOING_QUEUE: usize = 64;
/// Epochs sealed but not yet durable. A full queue stops the readers: an agent that
/// closes epochs faster than the disks can flush is slowed down, not buffered.
const BARRIER_QUEUE: usize = 64;
/// How long a stream waits at a barrier for the session's other streams.
const BARRIER_WAIT: Duration = Duration::from_secs(60);
/// How long a server keeps its sync slots after a session ended to restart with one.
const SLOT_GRACE: Duration = Duration::from_secs(60);
/// Checksum queries of one session answered at once; more wait, and their stream with
/// them (the agent keeps many in flight, so the disks stay busy).
const SUMS_IN_PARALLEL: usize = 4;
/// How often an idle session looks whether a recovery point can be cut.
const RECOVERY_TICK: Duration = Duration::from_millis(250);

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
                let mut reader =
                    FrameReader::new(read_half, ctx.metrics.server(&identity.server_id), share);
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
    let Some(first) = first_frame(reader).await? else {
        return Ok("the agent closed the connection before Hello");
    };
    match core::opening(first)? {
        Opening::Hello(hello) => run_primary(ctx, reader, outgoing, identity, *hello).await,
        Opening::Join(join) => run_joined(ctx, reader, outgoing, identity, join).await,
    }
}

/// What the streams of one session share: the core that decides, and the I/O around it.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) id: Uuid,
    identity: AgentIdentity,
    pipeline: Arc<ApplyPipeline>,
    /// The session's protocol state. Never held across an await.
    core: Mutex<SessionCore>,
    /// The newest epoch applied, for the streams waiting at its barrier.
    applied: watch::Sender<u64>,
    /// Each joined stream's outgoing queue, for Durable.
    outgoing: Mutex<Vec<mpsc::Sender<Frame>>>,
    /// Cancelled when any stream ends: a session is whole or it is over.
    end: CancellationToken,
    /// The joined streams (not the first), so that teardown waits for them.
    joined_streams: TaskTracker,
    barriers: Mutex<Option<mpsc::Sender<Sealed>>>,
    /// The agent process's series, under which a clean shutdown's checkpoint is saved.
    series: [u8; 16],
    /// Permits for checksum queries being answered.
    sums: Arc<tokio::sync::Semaphore>,
    meter: crate::metrics::ServerMeter,
    /// Recovery points (EBS backend).
    recovery: Option<crate::points::RecoveryClock>,
}

impl Session {
    /// The session is over: the core accepts no more frames, and every stream stops.
    pub(super) fn close(&self) {
        lock(&self.core).drain();
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
    pub(super) async fn broadcast(&self, frame: Frame) {
        let senders: Vec<_> = lock(&self.outgoing).clone();
        for sender in senders {
            // A stream whose peer stopped reading must not hold up the others or the
            // session's teardown; its agent times out and reconnects.
            let _ = tokio::time::timeout(SEND_TIMEOUT, sender.send(frame.clone())).await;
        }
    }

    /// Waits until `epoch` is applied on every stream.
    async fn wait_applied(&self, epoch: u64) {
        let mut applied = self.applied.subscribe();
        let _ = applied.wait_for(|&through| through >= epoch).await;
    }
}

async fn run_primary(
    ctx: &Arc<SessionContext>,
    reader: &mut FrameReader,
    outgoing: &mpsc::Sender<Frame>,
    identity: &AgentIdentity,
    hello: Hello,
) -> Result<&'static str, SessionError> {
    core::check_hello(&hello, ctx.settings.max_disk_size)?;
    let hello = core::printable_hello(hello);
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
        e @ crate::catalog::RegisterError::CutOver { .. } => SessionError::Finished(e.to_string()),
        e => SessionError::Storage(error_chain(&e)),
    })?;
    let started = match previous_agent {
        None => Some("first_contact"),
        Some(previous) if previous != identity.agent_id => Some("agent_reinstalled"),
        Some(_) => None,
    };
    if let (Some("first_contact"), Some(points)) = (started, &ctx.points) {
        // A server never seen: no earlier session can have left bytes in its images.
        points.leftovers().all_durable(&identity.server_id);
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
    let streams = core::granted_streams(hello.streams, ctx.settings.max_streams);
    let (barriers, barrier_queue) = mpsc::channel(BARRIER_QUEUE);
    let recovery = match &ctx.points {
        Some(points) => Some(
            crate::points::RecoveryClock::new(
                Arc::clone(points),
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
    let rules = disks
        .iter()
        .zip(&records)
        .map(|(disk, record)| DiskRules {
            name: disk.name.clone(),
            size: disk.store.size(),
            synced: record.sync_watermark,
            queued: matches!(slots.get(&disk.name), Some(Slot::Queued(_))),
        })
        .collect();
    let core = SessionCore::new(CoreConfig {
        streams,
        durable_epoch,
        disks: rules,
        stall_after: ctx.settings.stall_after,
        paused: settings.paused,
        now_ms: now_ms(),
        track_unsealed: ctx.points.is_some(),
    });
    let next_epoch = core.next_epoch();
    let session = Arc::new(Session {
        id: guard.id(),
        identity: identity.clone(),
        pipeline: Arc::new(ApplyPipeline::new(
            disks,
            ctx.settings.in_flight_budget,
            Arc::clone(&ctx.global_budget),
            ctx.metrics.apply_seconds.clone(),
        )),
        applied: watch::Sender::new(core.applied_through()),
        core: Mutex::new(core),
        outgoing: Mutex::new(vec![outgoing.clone()]),
        end: CancellationToken::new(),
        joined_streams: TaskTracker::new(),
        barriers: Mutex::new(Some(barriers)),
        series: hello.series,
        sums: Arc::new(tokio::sync::Semaphore::new(SUMS_IN_PARALLEL)),
        meter: ctx.metrics.server(&identity.server_id),
        recovery,
    });
    let disk_names: Vec<String> = records.iter().map(|r| r.name.clone()).collect();
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
        // An idle server's next point: cut once the running one is done, at the epoch the
        // images hold while no newer write has come.
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
                    let mark = lock(&session.core).sealed_mark();
                    if mark.consistent {
                        recovery
                            .cut_idle(&session.pipeline, mark.through, mark.epoch)
                            .await;
                    }
                }
            }
            .in_current_span(),
        );
    }
    let worker = tokio::spawn(
        durability::barrier_worker(
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
    session.close();
    ctx.registry.unpublish(session.id);
    session.joined_streams.close();
    session.joined_streams.wait().await;
    lock(&session.barriers).take();
    let worker_result = worker.await.unwrap_or(Ok(()));
    session
        .pipeline
        .wait_through(session.pipeline.last_submitted())
        .await;
    if let Some(points) = &ctx.points {
        let disks = session.pipeline.disks();
        let unsealed = lock(&session.core).take_unsealed();
        points.leftovers().left_over(
            &identity.server_id,
            unsealed
                .into_iter()
                .map(|w| (disks[usize::from(w.disk)].name.clone(), w.start, w.end)),
        );
    }
    let catalog = Arc::clone(&ctx.catalog);
    let server_id = identity.server_id.clone();
    let _ = tokio::task::spawn_blocking(move || {
        catalog.mark_disconnected(&server_id, &disk_names, "session_ended")
    })
    .await;
    let keeping_slots = lock(&session.core).keeping_slots();
    if keeping_slots {
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
    let session = ctx.registry.joinable(id).ok_or_else(|| {
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
    lock(&session.core).join(index).map_err(|e| match e {
        SessionError::Limit(why) => SessionError::Limit(format!("session {id}: {why}")),
        e => e,
    })?;
    lock(&session.outgoing).push(outgoing.clone());
    let _tracked = session.joined_streams.token();
    if let Err(err) = reader.enter_session() {
        session.close();
        return Err(err);
    }
    tracing::info!(stream = index, "stream joined");
    let result = stream_frames(ctx, reader, &session, index, outgoing).await;
    session.close();
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
        let Some(frame) = frame else {
            return Ok(End::AgentClosed);
        };
        if let Frame::Goodbye(bye) = &frame {
            tracing::info!(message = %blockferry_util::text::printable(&bye.message), "agent said goodbye");
        } else if let Frame::Error(err) = &frame {
            tracing::warn!(code = %err.code, message = %blockferry_util::text::printable(&err.message), "agent reported an error");
        }
        let step = lock(&session.core).accept(
            stream,
            frame,
            tokio::time::Instant::now(),
            pipeline.last_submitted(),
        )?;
        match step {
            Step::Apply(write) => {
                let disk = &pipeline.disks()[usize::from(write.header.disk)];
                if !write.header.flags.contains(WriteFlags::INITIAL_SYNC)
                    && disk.rescanning.load(Ordering::Relaxed)
                {
                    disk.resent_bytes
                        .fetch_add(u64::from(write.header.len), Ordering::Relaxed);
                }
                let (start, end) = (write.header.offset, write.header.end());
                let index = write.header.disk;
                let seq = pipeline.submit(write.header, write.data).await;
                if let Some(points) = &ctx.points {
                    points
                        .leftovers()
                        .written(&session.identity.server_id, &disk.name, start, end);
                    lock(&session.core).submitted(Unsealed {
                        seq,
                        disk: index,
                        start,
                        end,
                    });
                }
            }
            Step::AnswerSums(request) => {
                let disk = Arc::clone(&pipeline.disks()[usize::from(request.disk)]);
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
                        sums::answer_sums(&session, &disk, request, &outgoing).await;
                    }
                    .in_current_span(),
                );
            }
            Step::SaveCheckpoint { seq, not_before } => {
                tokio::time::sleep_until(not_before).await;
                let catalog = Arc::clone(&ctx.catalog);
                let (server_id, series) = (session.identity.server_id.clone(), session.series);
                tokio::task::spawn_blocking(move || {
                    catalog.record_checkpoint(&server_id, &series, seq)
                })
                .await
                .map_err(|e| SessionError::Storage(e.to_string()))?
                .map_err(|e| SessionError::Storage(error_chain(&e)))?;
                tracing::info!(seq, "agent checkpoint recorded");
                send(
                    outgoing,
                    Frame::CheckpointSaved(blockferry_proto::Checkpoint { seq }),
                )
                .await?;
            }
            Step::Sealed(sealed) => {
                // Every write of the epoch, on every stream, completes before any write of
                // the next one is read (invariant 3).
                pipeline.wait_through(sealed.through).await;
                if let Some(recovery) = &session.recovery {
                    recovery.sealed(pipeline, &sealed.progress, &sealed.rescan_done);
                    // The other streams wait for this epoch to be marked applied, so no
                    // write of the next one has been submitted: a recovery point can be
                    // cut here even on a server that is never idle.
                    if sealed.consistent {
                        recovery
                            .cut_at_gate(pipeline, sealed.through, sealed.epoch)
                            .await;
                    }
                }
                let applied = lock(&session.core).applied(&sealed);
                session.applied.send_replace(applied);
                let queue = lock(&session.barriers).clone();
                match queue {
                    Some(queue) => {
                        if queue.send(sealed).await.is_err() {
                            return Ok(End::SessionEnded);
                        }
                    }
                    None => return Ok(End::SessionEnded),
                }
            }
            Step::AwaitApplied(epoch) => loop {
                tokio::select! {
                    () = session.wait_applied(epoch) => break,
                    () = ctx.shutdown.cancelled() => return Ok(End::Shutdown),
                    () = session.end.cancelled() => return Ok(End::SessionEnded),
                    () = tokio::time::sleep(BARRIER_WAIT) => {
                        // Sealed, the epoch is being applied (a recovery point may be
                        // copied meanwhile): only missing barriers are the agent's fault.
                        if !lock(&session.core).is_sealed(epoch) {
                            return Err(SessionError::Protocol(format!(
                                "the other streams did not deliver barrier {epoch} within {BARRIER_WAIT:?}"
                            )));
                        }
                    }
                }
            },
            Step::Heartbeat { backlog_bytes } => {
                tracing::debug!(backlog = backlog_bytes, "heartbeat");
                if let Some(recovery) = &session.recovery {
                    recovery.heartbeat(backlog_bytes);
                }
            }
            Step::Ignore => tracing::debug!("ignoring a frame of unknown kind"),
            Step::End(end) => return Ok(end),
        }
    }
}
