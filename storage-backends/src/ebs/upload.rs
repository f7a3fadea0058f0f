//! One snapshot being written: blocks go up with bounded concurrency, never two PUTs of
//! one block at once, and the snapshot is completed with the right count and checksum.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{
    BLOCK_SIZE, BlockIndex, EbsClient, EbsError, RetryPolicy, StartSnapshot, aggregate_checksum,
    base64, sha256,
};
use blockferry_util::lock;

/// How a snapshot's blocks are uploaded.
#[derive(Debug, Clone, Copy)]
pub struct UploadConfig {
    /// PUTs in flight at most (the service needs about 100 for 500 MB/s).
    pub concurrency: usize,
    pub retry: RetryPolicy,
}

impl Default for UploadConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            retry: RetryPolicy::default(),
        }
    }
}

/// What a completed snapshot holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedSnapshot {
    pub id: String,
    pub parent: Option<String>,
    /// Blocks written to this snapshot (its parent's not counted).
    pub changed_blocks: u32,
}

#[derive(Debug, Default)]
struct Blocks {
    /// The digest of each block whose latest data the service acknowledged.
    written: BTreeMap<BlockIndex, [u8; 32]>,
    /// Blocks with a PUT in flight, and the newer data that must follow it, if any.
    uploading: HashMap<BlockIndex, Option<Bytes>>,
}

/// A pending snapshot and its uploads.
#[derive(Debug)]
pub struct PendingSnapshot<C: EbsClient> {
    client: Arc<C>,
    id: String,
    parent: Option<String>,
    blocks: Arc<Mutex<Blocks>>,
    permits: Arc<Semaphore>,
    uploads: JoinSet<Result<(), EbsError>>,
    retry: RetryPolicy,
}

impl<C: EbsClient> PendingSnapshot<C> {
    /// Starts a snapshot (a retried start returns the same one: `request.client_token`).
    pub async fn start(
        client: Arc<C>,
        request: StartSnapshot,
        config: UploadConfig,
    ) -> Result<Self, EbsError> {
        let parent = request.parent.clone();
        let id = config
            .retry
            .run("StartSnapshot", || client.start_snapshot(request.clone()))
            .await?;
        tracing::debug!(snapshot = %id, parent = ?parent, "snapshot started");
        Ok(Self {
            client,
            id,
            parent,
            blocks: Arc::default(),
            permits: Arc::new(Semaphore::new(config.concurrency.max(1))),
            uploads: JoinSet::new(),
            retry: config.retry,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Queues block `index` for upload. Waits while `concurrency` PUTs are in flight, so
    /// at most that many blocks are held in memory. A block already being uploaded is
    /// sent again with this data once its PUT is done: the last write wins, and the
    /// service never sees two PUTs of one block at once.
    pub async fn put(&mut self, index: BlockIndex, data: Bytes) -> Result<(), EbsError> {
        if data.len() != BLOCK_SIZE {
            return Err(EbsError::Rejected(format!(
                "block {index} of snapshot {} has {} bytes; EBS blocks are {BLOCK_SIZE}",
                self.id,
                data.len()
            )));
        }
        self.reap()?;
        {
            let mut blocks = lock(&self.blocks);
            if let Some(next) = blocks.uploading.get_mut(&index) {
                *next = Some(data);
                return Ok(());
            }
            blocks.uploading.insert(index, None);
        }
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (client, blocks, id, retry) = (
            Arc::clone(&self.client),
            Arc::clone(&self.blocks),
            self.id.clone(),
            self.retry,
        );
        self.uploads.spawn(async move {
            let _permit = permit;
            let mut data = data;
            loop {
                let digest = sha256(&data);
                let checksum = base64(&digest);
                let result = retry
                    .run("PutSnapshotBlock", || {
                        client.put_snapshot_block(&id, index, data.clone(), &checksum)
                    })
                    .await;
                let mut blocks = lock(&blocks);
                if let Err(err) = result {
                    blocks.uploading.remove(&index);
                    return Err(err);
                }
                blocks.written.insert(index, digest);
                match blocks.uploading.get_mut(&index).and_then(Option::take) {
                    Some(newer) => data = newer,
                    None => {
                        blocks.uploading.remove(&index);
                        return Ok(());
                    }
                }
            }
        });
        Ok(())
    }

    /// Waits until every block queued so far is acknowledged by the service: from then
    /// on their data is safe in the pending snapshot.
    pub async fn flush(&mut self) -> Result<(), EbsError> {
        let mut first_error = None;
        while let Some(joined) = self.uploads.join_next().await {
            let result = joined.unwrap_or_else(|panic| {
                Err(EbsError::Rejected(format!(
                    "an upload task failed: {panic}"
                )))
            });
            if let Err(err) = result {
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Flushes, then completes the snapshot with the count and the aggregate checksum of
    /// the blocks written to it.
    pub async fn complete(mut self) -> Result<CompletedSnapshot, EbsError> {
        self.flush().await?;
        let (count, aggregate) = {
            let blocks = lock(&self.blocks);
            (
                u32::try_from(blocks.written.len()).expect("fewer than 2^32 blocks"),
                base64(&aggregate_checksum(blocks.written.values())),
            )
        };
        let (client, id) = (Arc::clone(&self.client), self.id.clone());
        self.retry
            .run("CompleteSnapshot", || {
                client.complete_snapshot(&id, count, &aggregate)
            })
            .await?;
        tracing::debug!(snapshot = %self.id, blocks = count, "snapshot completed");
        Ok(CompletedSnapshot {
            id: self.id,
            parent: self.parent,
            changed_blocks: count,
        })
    }

    /// Surfaces a failed upload early, without waiting for the others.
    fn reap(&mut self) -> Result<(), EbsError> {
        while let Some(joined) = self.uploads.try_join_next() {
            joined.unwrap_or_else(|panic| {
                Err(EbsError::Rejected(format!(
                    "an upload task failed: {panic}"
                )))
            })?;
        }
        Ok(())
    }
}
