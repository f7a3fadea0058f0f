//! One disk's chain of EBS snapshots, fed from the disk's local base copy.
//!
//! The receiver stages an EBS disk exactly as a file disk: into a local image (the *base
//! copy*), flushed before any `Durable` ack. This module turns that image into snapshots:
//!
//! - Every write marks the 512 KiB blocks it touches **dirty**.
//! - At a consistent point the receiver **cuts**: the dirty set is frozen as the content of
//!   the next snapshot, and a new dirty set starts. The cut is taken while no write of the
//!   next epoch has been submitted, so the frozen blocks hold exactly the consistent point.
//! - The snapshot is then uploaded while replication goes on. A write that would change a
//!   frozen block not yet uploaded first **preserves** the block's consistent-point bytes
//!   in memory (copy-on-write), up to a byte limit; beyond it, such writes wait for the
//!   upload to catch up.
//! - Each uploaded block is compared with the chain's latest snapshot through a **digest
//!   index** (SHA-256 per block, persisted next to the image after each snapshot): an
//!   unchanged block is skipped, a block that became zeros is written as zeros, and the
//!   chain's first snapshot skips zero blocks.
//! - A process that opens a chain cannot know what changed before it started, so its first
//!   cut compares every block with the index (a local read of the image, no download).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

use super::upload::{CompletedSnapshot, PendingSnapshot, UploadConfig};
use super::{BLOCK_SIZE, BlockIndex, EbsClient, EbsError, StartSnapshot, sha256};
use crate::error::StoreError;
use crate::file::FileStore;
use blockferry_util::lock;

const INDEX_MAGIC: &[u8; 8] = b"BFEBSIX1";

/// How a disk's snapshots are made.
#[derive(Debug, Clone)]
pub struct ChainSettings {
    pub upload: UploadConfig,
    /// Encrypts the chain's first snapshot (children inherit the parent's key).
    pub kms_key_arn: Option<String>,
    /// Tags of every snapshot, beside the source server, disk and recovery point.
    pub tags: Vec<(String, String)>,
    /// Minutes a pending snapshot may go without a request before EBS fails it.
    pub timeout_minutes: u32,
    /// Bytes of consistent-point blocks kept in memory for the running upload.
    pub preserve_limit: usize,
}

impl Default for ChainSettings {
    fn default() -> Self {
        Self {
            upload: UploadConfig::default(),
            kms_key_arn: None,
            tags: Vec::new(),
            timeout_minutes: 60,
            preserve_limit: 256 << 20,
        }
    }
}

/// Names one snapshot of the chain, for its description and tags.
#[derive(Debug, Clone)]
pub struct SnapshotLabel {
    pub server_id: String,
    pub disk: String,
    /// The recovery point: the server's consistent epoch at the cut.
    pub epoch: u64,
}

/// Why a snapshot of the chain could not be made. The cut's blocks go back into the dirty
/// set, so the next cut includes them.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("EBS: {0}")]
    Ebs(#[from] EbsError),
    #[error("reading the base copy: {0}")]
    BaseCopy(#[from] StoreError),
    #[error("writing the digest index {path}: {source}")]
    Index {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no cut is waiting to be uploaded")]
    NoCut,
}

/// What a cut found to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cut {
    /// Nothing changed since the latest snapshot, which stands for this point too.
    Unchanged(String),
    /// Blocks changed (or must be compared): [`SnapshotChain::upload`] makes the snapshot.
    Started,
}

/// The latest completed snapshot of the chain.
#[derive(Debug, Clone)]
struct Latest {
    id: String,
    /// SHA-256 of every block of the disk as the snapshot holds it.
    digests: Vec<[u8; 32]>,
}

#[derive(Debug, Default)]
struct Frozen {
    /// Every block of the cut, for putting them back should the upload fail.
    blocks: Vec<BlockIndex>,
    /// Was a compare-everything cut.
    compare_all: bool,
    /// Blocks of the cut not yet taken by the uploader.
    remaining: BTreeSet<BlockIndex>,
    /// Blocks a writer is reading to preserve.
    preserving: HashSet<BlockIndex>,
    /// Consistent-point bytes of blocks a writer changed before the uploader took them.
    preserved: HashMap<BlockIndex, Bytes>,
    preserved_bytes: usize,
}

impl Frozen {
    /// The preserved bytes of `block`, which the uploader then has taken.
    fn take_preserved(&mut self, block: BlockIndex) -> Option<Bytes> {
        let data = self.preserved.remove(&block)?;
        self.preserved_bytes -= data.len();
        self.remaining.remove(&block);
        Some(data)
    }
}

#[derive(Debug)]
struct State {
    dirty: BTreeSet<BlockIndex>,
    /// The process cannot tell what changed before it opened the chain.
    compare_all: bool,
    frozen: Option<Frozen>,
    latest: Option<Latest>,
}

/// One disk's snapshot chain. Shared by every session of the disk in this process.
#[derive(Debug)]
pub struct SnapshotChain {
    size: u64,
    blocks: BlockIndex,
    index_path: PathBuf,
    preserve_limit: usize,
    state: Mutex<State>,
    changed: Notify,
}

impl SnapshotChain {
    /// Opens the chain of a `size`-byte disk whose digest index lives at `index_path`. A
    /// missing index, or one for another size, starts a new chain (a first snapshot
    /// without parent); an unreadable one is an error, not a silent new chain.
    pub fn open(size: u64, index_path: &Path, preserve_limit: usize) -> Result<Self, ChainError> {
        let blocks = BlockIndex::try_from(size.div_ceil(BLOCK_SIZE as u64)).map_err(|_| {
            ChainError::Ebs(EbsError::Rejected(format!(
                "a disk of {size} bytes has more blocks than an EBS snapshot can hold"
            )))
        })?;
        let latest = match std::fs::read(index_path) {
            Ok(raw) => read_index(&raw, size).map_err(|why| ChainError::Index {
                path: index_path.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, why),
            })?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(ChainError::Index {
                    path: index_path.to_owned(),
                    source,
                });
            }
        };
        Ok(Self {
            size,
            blocks,
            index_path: index_path.to_owned(),
            preserve_limit: preserve_limit.max(BLOCK_SIZE),
            state: Mutex::new(State {
                dirty: BTreeSet::new(),
                compare_all: true,
                frozen: None,
                latest,
            }),
            changed: Notify::new(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The id of the chain's latest completed snapshot.
    pub fn latest(&self) -> Option<String> {
        lock(&self.state).latest.as_ref().map(|l| l.id.clone())
    }

    /// Whether an upload is running (a cut waits for it).
    pub fn uploading(&self) -> bool {
        lock(&self.state).frozen.is_some()
    }

    /// Blocks changed since the latest cut.
    pub fn dirty_blocks(&self) -> usize {
        lock(&self.state).dirty.len()
    }

    /// Call before writing `[offset, offset + len)` of the base copy: marks the blocks
    /// dirty and preserves the consistent-point bytes of those the running upload has not
    /// taken yet.
    pub async fn before_write(
        &self,
        base: &FileStore,
        offset: u64,
        len: u64,
    ) -> Result<(), StoreError> {
        if len == 0 {
            return Ok(());
        }
        let first = block_of(offset);
        let last = block_of(offset + len - 1);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut to_preserve = Vec::new();
            let mut wait = false;
            {
                let mut state = lock(&self.state);
                state.dirty.extend(first..=last);
                if let Some(frozen) = state.frozen.as_mut() {
                    for block in frozen.remaining.range(first..=last) {
                        if frozen.preserved.contains_key(block) {
                            continue;
                        }
                        if frozen.preserving.contains(block)
                            || frozen.preserved_bytes >= self.preserve_limit
                        {
                            wait = true;
                        } else {
                            to_preserve.push(*block);
                        }
                    }
                    if wait {
                        to_preserve.clear();
                    } else {
                        frozen.preserving.extend(to_preserve.iter().copied());
                    }
                }
            }
            if wait {
                notified.await;
                continue;
            }
            for block in to_preserve {
                let read = self.read_block(base, block).await;
                let mut state = lock(&self.state);
                if let Some(frozen) = state.frozen.as_mut() {
                    frozen.preserving.remove(&block);
                    if let Ok(data) = &read {
                        frozen.preserved_bytes += data.len();
                        frozen.preserved.insert(block, data.clone());
                    }
                }
                drop(state);
                self.changed.notify_waiters();
                read?;
            }
            return Ok(());
        }
    }

    /// Freezes the dirty blocks as the next snapshot's content. Call only while no write
    /// of a later epoch has been submitted. Returns `None` while an upload still runs.
    pub fn cut(&self) -> Option<Cut> {
        let mut state = lock(&self.state);
        if state.frozen.is_some() {
            return None;
        }
        if !state.compare_all
            && state.dirty.is_empty()
            && let Some(latest) = &state.latest
        {
            return Some(Cut::Unchanged(latest.id.clone()));
        }
        let compare_all = std::mem::take(&mut state.compare_all);
        let dirty = std::mem::take(&mut state.dirty);
        let remaining: BTreeSet<BlockIndex> = if compare_all {
            (0..self.blocks).collect()
        } else {
            dirty
        };
        state.frozen = Some(Frozen {
            blocks: remaining.iter().copied().collect(),
            compare_all,
            remaining,
            ..Frozen::default()
        });
        Some(Cut::Started)
    }

    /// Uploads the cut as a child of the latest snapshot (or as the chain's first) and
    /// completes it; then it is the latest, and its digest index is on disk. On failure
    /// the cut's blocks are dirty again.
    pub async fn upload<C: EbsClient>(
        &self,
        client: Arc<C>,
        base: &FileStore,
        settings: &ChainSettings,
        label: &SnapshotLabel,
    ) -> Result<CompletedSnapshot, ChainError> {
        let result = self.try_upload(client, base, settings, label).await;
        if result.is_err() {
            self.abandon_cut();
        }
        result
    }

    async fn try_upload<C: EbsClient>(
        &self,
        client: Arc<C>,
        base: &FileStore,
        settings: &ChainSettings,
        label: &SnapshotLabel,
    ) -> Result<CompletedSnapshot, ChainError> {
        let latest = {
            let state = lock(&self.state);
            state.frozen.as_ref().ok_or(ChainError::NoCut)?;
            state.latest.clone()
        };
        let zero_digest = sha256(&[0u8; BLOCK_SIZE]);
        let mut digests = latest.as_ref().map_or_else(
            || vec![zero_digest; self.blocks as usize],
            |l| l.digests.clone(),
        );
        let parent = latest.as_ref().map(|l| l.id.clone());
        let mut tags = settings.tags.clone();
        tags.extend([
            ("blockferry:server".to_owned(), label.server_id.clone()),
            ("blockferry:disk".to_owned(), label.disk.clone()),
            (
                "blockferry:recovery-point".to_owned(),
                label.epoch.to_string(),
            ),
        ]);
        let request = StartSnapshot {
            volume_size_gib: self.size.div_ceil(1 << 30).max(1),
            kms_key_arn: if parent.is_none() {
                settings.kms_key_arn.clone()
            } else {
                None
            },
            parent,
            description: format!(
                "blockferry {} disk {} recovery point {}",
                label.server_id, label.disk, label.epoch
            ),
            tags,
            timeout_minutes: settings.timeout_minutes,
            // The same for the retries of this start, new for another attempt at the
            // same point (a token reused would return the abandoned snapshot).
            client_token: super::base64(
                &sha256(
                    format!(
                        "{}/{}/{}/{:?}",
                        label.server_id,
                        label.disk,
                        label.epoch,
                        std::time::SystemTime::now()
                    )
                    .as_bytes(),
                )[..24],
            ),
        };
        let mut snapshot = PendingSnapshot::start(client, request, settings.upload).await?;
        while let Some(block) = self.next_block() {
            let data = self.take_block(base, block).await?;
            let digest = sha256(&data);
            if digest == digests[block as usize] {
                continue;
            }
            digests[block as usize] = digest;
            snapshot.put(block, data).await?;
        }
        let completed = snapshot.complete().await?;
        self.write_index(&completed.id, &digests).await?;
        let mut state = lock(&self.state);
        state.frozen = None;
        state.latest = Some(Latest {
            id: completed.id.clone(),
            digests,
        });
        drop(state);
        self.changed.notify_waiters();
        Ok(completed)
    }

    /// Gives up the running cut: its blocks are dirty again.
    pub fn abandon_cut(&self) {
        let mut state = lock(&self.state);
        if let Some(frozen) = state.frozen.take() {
            state.dirty.extend(frozen.blocks);
            state.compare_all |= frozen.compare_all;
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// The consistent-point bytes of `block`: preserved by a writer, or read from the base
    /// copy if no writer changed it since the cut.
    async fn take_block(&self, base: &FileStore, block: BlockIndex) -> Result<Bytes, StoreError> {
        loop {
            if let Some(data) = self.take_preserved(block) {
                return Ok(data);
            }
            let read = self.read_block(base, block).await?;
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = lock(&self.state);
                let Some(frozen) = state.frozen.as_mut() else {
                    return Ok(read);
                };
                if let Some(data) = frozen.take_preserved(block) {
                    drop(state);
                    self.changed.notify_waiters();
                    return Ok(data);
                }
                if !frozen.preserving.contains(&block) {
                    // No writer touched the block since the cut (it would have preserved
                    // it first), so what was read is the consistent point.
                    frozen.remaining.remove(&block);
                    return Ok(read);
                }
            }
            notified.await;
        }
    }

    /// The next block to upload: preserved ones first, as they hold memory (and may hold
    /// up writers), then in ascending order.
    fn next_block(&self) -> Option<BlockIndex> {
        let state = lock(&self.state);
        let frozen = state.frozen.as_ref()?;
        frozen
            .preserved
            .keys()
            .next()
            .or_else(|| frozen.remaining.first())
            .copied()
    }

    fn take_preserved(&self, block: BlockIndex) -> Option<Bytes> {
        let mut state = lock(&self.state);
        let data = state.frozen.as_mut()?.take_preserved(block)?;
        drop(state);
        self.changed.notify_waiters();
        Some(data)
    }

    /// Block `block` of the base copy, zero-padded past the end of the disk.
    async fn read_block(&self, base: &FileStore, block: BlockIndex) -> Result<Bytes, StoreError> {
        let offset = u64::from(block) * BLOCK_SIZE as u64;
        let len = (self.size - offset).min(BLOCK_SIZE as u64) as usize;
        let mut data = base.read_at(offset, len).await?;
        data.resize(BLOCK_SIZE, 0);
        Ok(Bytes::from(data))
    }

    /// Writes the digest index of snapshot `id`: a temporary file, fsync, rename, fsync
    /// of the directory, so a crash leaves the old index or the new one.
    async fn write_index(&self, id: &str, digests: &[[u8; 32]]) -> Result<(), ChainError> {
        let mut raw = Vec::with_capacity(64 + id.len() + digests.len() * 32);
        raw.extend_from_slice(INDEX_MAGIC);
        raw.extend_from_slice(&self.size.to_le_bytes());
        raw.extend_from_slice(&u32::try_from(id.len()).unwrap_or(u32::MAX).to_le_bytes());
        raw.extend_from_slice(id.as_bytes());
        for digest in digests {
            raw.extend_from_slice(digest);
        }
        let check = sha256(&raw);
        raw.extend_from_slice(&check);
        let path = self.index_path.clone();
        tokio::task::spawn_blocking(move || write_atomically(&path, &raw))
            .await
            .map_err(|e| ChainError::Index {
                path: self.index_path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(|source| ChainError::Index {
                path: self.index_path.clone(),
                source,
            })
    }
}

fn block_of(offset: u64) -> BlockIndex {
    BlockIndex::try_from(offset / BLOCK_SIZE as u64).unwrap_or(BlockIndex::MAX)
}

fn write_atomically(path: &Path, raw: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(raw)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Parses a digest index; `None` if it describes a disk of another size.
fn read_index(raw: &[u8], size: u64) -> Result<Option<Latest>, String> {
    let body_len = raw
        .len()
        .checked_sub(32)
        .ok_or("shorter than its checksum")?;
    let (body, check) = raw.split_at(body_len);
    if sha256(body) != check {
        return Err("its checksum does not match (torn or corrupted)".into());
    }
    if body.len() < 20 || &body[..8] != INDEX_MAGIC {
        return Err("not a blockferry EBS digest index".into());
    }
    let indexed_size = u64::from_le_bytes(body[8..16].try_into().map_err(|_| "short header")?);
    if indexed_size != size {
        return Ok(None);
    }
    let id_len = u32::from_le_bytes(body[16..20].try_into().map_err(|_| "short header")?) as usize;
    let id_end = 20usize.checked_add(id_len).ok_or("id length overflows")?;
    let id = body
        .get(20..id_end)
        .and_then(|id| std::str::from_utf8(id).ok())
        .ok_or("its snapshot id is cut short or not UTF-8")?
        .to_owned();
    let digests = &body[id_end..];
    let blocks = size.div_ceil(BLOCK_SIZE as u64) as usize;
    if digests.len() != blocks * 32 {
        return Err(format!(
            "it holds {} bytes of digests for {blocks} blocks",
            digests.len()
        ));
    }
    let digests = digests
        .chunks_exact(32)
        .map(|d| <[u8; 32]>::try_from(d).map_err(|_| "short digest".to_owned()))
        .collect::<Result<_, _>>()?;
    Ok(Some(Latest { id, digests }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_round_trips_and_refuses_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.ebs-index");
        let chain = SnapshotChain::open(3 * BLOCK_SIZE as u64 - 5, &path, 1 << 20).unwrap();
        let digests = vec![[7u8; 32]; 3];
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(chain.write_index("snap-1", &digests)).unwrap();
        let raw = std::fs::read(&path).unwrap();
        let latest = read_index(&raw, 3 * BLOCK_SIZE as u64 - 5)
            .unwrap()
            .unwrap();
        assert_eq!(latest.id, "snap-1");
        assert_eq!(latest.digests, digests);
        assert!(read_index(&raw, 1 << 30).unwrap().is_none());
        let mut torn = raw.clone();
        torn[30] ^= 1;
        assert!(read_index(&torn, 3 * BLOCK_SIZE as u64 - 5).is_err());
        assert!(read_index(&raw[..10], 3 * BLOCK_SIZE as u64 - 5).is_err());
        std::fs::write(&path, &torn).unwrap();
        let err = SnapshotChain::open(3 * BLOCK_SIZE as u64 - 5, &path, 1 << 20).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }
}
