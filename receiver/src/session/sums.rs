//! Checksum queries: the digests of staged blocks, which let an agent rescan a disk
//! instead of sending it whole again.

use std::sync::atomic::Ordering;

use blockferry_proto::{Frame, SumReply, SumRequest, block_digest};
use blockferry_util::error_chain;
use tokio::sync::mpsc;

use super::Session;
use super::transport::SEND_TIMEOUT;
use crate::apply::StagingDisk;

/// Reads the blocks a query names from the staging store, once every write received
/// before it has been applied, and sends their digests back on the query's stream. A
/// read failure ends the session (the agent reconnects and rescans again).
pub(crate) async fn answer_sums(
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
            session.close();
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
