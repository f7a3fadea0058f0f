//! Durability (invariant 1): each sealed and applied epoch, in order, waits for its
//! writes, flushes every staging store, commits the watermarks with the flush proofs, and
//! only then is `Durable` sent. A staging failure stalls the disk with its reason.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use blockferry_proto::Frame;
use blockferry_util::error_chain;
use tokio::sync::mpsc;

use super::Session;
use super::error::SessionError;
use crate::catalog::{Catalog, DurableEvidence, DurableRecord, RescanProgress, now_ms};
use crate::gate::Sealed;
use crate::lock;
use crate::registry::SessionRegistry;

/// Makes each sealed (and applied) epoch durable, in order, then tells every stream.
pub(crate) async fn barrier_worker(
    mut queue: mpsc::Receiver<Sealed>,
    session: Arc<Session>,
    catalog: Arc<Catalog>,
    registry: Arc<SessionRegistry>,
    barrier_seconds: prometheus_client::metrics::histogram::Histogram,
) -> Result<(), SessionError> {
    while let Some(sealed) = queue.recv().await {
        let started = std::time::Instant::now();
        let durable = match make_durable(&session, &catalog, &registry, &sealed).await {
            Ok(record) => lock(&session.core)
                .durable(&record, now_ms())
                .map_err(|e| SessionError::Storage(format!("the epoch ledger: {e}"))),
            Err(err) => Err(err),
        };
        let durable = match durable {
            Ok(durable) => durable,
            Err(err) => {
                // Every stream hears why before any of them closes.
                if let Some(frame) = err.frame() {
                    session.broadcast(Frame::Error(frame)).await;
                }
                session.close();
                return Err(err);
            }
        };
        barrier_seconds.observe(started.elapsed().as_secs_f64());
        // A stream may already be gone: the consistent point is recorded either way.
        session.broadcast(Frame::Durable(durable)).await;
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
) -> Result<DurableRecord, SessionError> {
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
    let record = tokio::task::spawn_blocking(move || {
        catalog.record_durable(evidence, &server, epoch, &progress, &recorded, &written)
    })
    .await
    .map_err(|e| SessionError::Storage(e.to_string()))?
    .map_err(|e| SessionError::Storage(error_chain(&e)))?;
    for disk in record.completed() {
        registry.grant(registry.slots.release(&(server_id.clone(), disk.clone())));
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
    Ok(record)
}

/// Records why a disk cannot make progress, and turns the failure into the session's end:
/// the agent hears it, keeps its changes, and retries. A full file system is
/// `staging_full`; any other failed write or flush (an I/O error of the staging disk, a
/// file system shut down after one) is `staging_error`. Either clears with the next write
/// made durable on the disk.
pub(crate) async fn stall(
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
