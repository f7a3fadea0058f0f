//! A raw image on disk written into a snapshot: the way a launched copy gets to EC2.
//!
//! With a parent, only the blocks that differ from the parent's are sent (the parent's
//! digests say which), so a launch of an EBS point uploads what preparing it changed —
//! a few blocks — instead of the disk. Without one, every block but the all-zero ones
//! (which a snapshot without parent reads as zeros anyway).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

use super::upload::{CompletedSnapshot, PendingSnapshot, UploadConfig};
use super::{BLOCK_SIZE, BlockIndex, EbsClient, EbsError, StartSnapshot, sha256};

#[derive(Debug, thiserror::Error)]
pub enum ImageUploadError {
    #[error(transparent)]
    Ebs(#[from] EbsError),
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} has {blocks} blocks of 512 KiB, its parent's digests {parent_blocks}: they are not the same disk"
    )]
    Mismatch {
        path: String,
        blocks: usize,
        parent_blocks: usize,
    },
}

/// The image's size in EBS blocks (the last one padded with zeros).
pub fn block_count(size: u64) -> usize {
    usize::try_from(size.div_ceil(BLOCK_SIZE as u64)).expect("an image fits the address space")
}

fn read_block(file: &File, size: u64, index: usize) -> std::io::Result<Vec<u8>> {
    let offset = index as u64 * BLOCK_SIZE as u64;
    let len = BLOCK_SIZE.min(usize::try_from(size - offset).unwrap_or(usize::MAX));
    let mut block = vec![0u8; BLOCK_SIZE];
    file.read_exact_at(&mut block[..len], offset)?;
    Ok(block)
}

/// The SHA-256 of each 512 KiB block of the image at `path`, in order.
pub fn block_digests(path: &Path) -> Result<Vec<[u8; 32]>, ImageUploadError> {
    let io = |source| ImageUploadError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    (0..block_count(size))
        .map(|index| Ok(sha256(&read_block(&file, size, index).map_err(io)?)))
        .collect()
}

/// The blocks of `path` a snapshot must be given: those whose digest differs from
/// `parent_digests` (with a parent), or those not all zeros (without).
fn blocks_to_send(
    path: &Path,
    parent_digests: Option<&[[u8; 32]]>,
) -> Result<Vec<usize>, ImageUploadError> {
    let digests = block_digests(path)?;
    let zero = sha256(&vec![0u8; BLOCK_SIZE]);
    if let Some(parent) = parent_digests
        && parent.len() != digests.len()
    {
        return Err(ImageUploadError::Mismatch {
            path: path.display().to_string(),
            blocks: digests.len(),
            parent_blocks: parent.len(),
        });
    }
    Ok(digests
        .iter()
        .enumerate()
        .filter(|(index, digest)| match parent_digests {
            Some(parent) => parent[*index] != **digest,
            None => **digest != zero,
        })
        .map(|(index, _)| index)
        .collect())
}

/// Writes the image at `path` into a new snapshot, a child of `request.parent` when set
/// (then `parent_digests` must be the parent's [`block_digests`]), and completes it.
pub async fn upload_image<C: EbsClient>(
    client: Arc<C>,
    path: &Path,
    parent_digests: Option<Vec<[u8; 32]>>,
    request: StartSnapshot,
    config: UploadConfig,
) -> Result<CompletedSnapshot, ImageUploadError> {
    debug_assert_eq!(request.parent.is_some(), parent_digests.is_some());
    let io = |source| ImageUploadError::Io {
        path: path.display().to_string(),
        source,
    };
    let owned = path.to_owned();
    let to_send =
        tokio::task::spawn_blocking(move || blocks_to_send(&owned, parent_digests.as_deref()))
            .await
            .expect("the digest task does not panic")?;
    let file = Arc::new(File::open(path).map_err(io)?);
    let size = file.metadata().map_err(io)?.len();
    let mut snapshot = PendingSnapshot::start(client, request, config).await?;
    for index in to_send {
        let reader = Arc::clone(&file);
        let block = tokio::task::spawn_blocking(move || read_block(&reader, size, index))
            .await
            .expect("the read task does not panic")
            .map_err(io)?;
        let index = BlockIndex::try_from(index)
            .map_err(|_| EbsError::Rejected(format!("{} is too large for EBS", path.display())))?;
        snapshot.put(index, Bytes::from(block)).await?;
    }
    Ok(snapshot.complete().await?)
}
