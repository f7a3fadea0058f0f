//! A completed snapshot, downloaded into a raw image with every block's checksum checked.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use tokio::task::JoinSet;

use super::{BLOCK_SIZE, BlockIndex, EbsClient, EbsError, RetryPolicy, base64, sha256};

/// Blocks downloaded at once.
const DOWNLOADS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Ebs(#[from] EbsError),
    #[error("block {index} of snapshot {snapshot}: {problem}; the download is not trustworthy")]
    Corrupt {
        snapshot: String,
        index: BlockIndex,
        problem: String,
    },
    #[error("writing {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Writes snapshot `snapshot` into `out` as a raw image of `size` bytes (blocks the
/// snapshot does not hold are zeros) and returns the number of blocks downloaded. Each
/// block must be 512 KiB and match both the checksum the service reports and that
/// checksum's recomputation here.
pub async fn restore<C: EbsClient>(
    client: Arc<C>,
    snapshot: &str,
    size: u64,
    out: &Path,
    retry: RetryPolicy,
) -> Result<u64, RestoreError> {
    let io = |source| RestoreError::Io {
        path: out.display().to_string(),
        source,
    };
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(out)
        .map_err(io)?;
    file.set_len(size).map_err(io)?;
    let file = Arc::new(file);
    let mut downloads: JoinSet<Result<(), RestoreError>> = JoinSet::new();
    let mut next_token = None;
    let mut blocks = 0u64;
    loop {
        let page = retry
            .run("ListSnapshotBlocks", || {
                client.list_snapshot_blocks(snapshot, next_token.clone())
            })
            .await?;
        for (index, token) in page.blocks {
            let offset = u64::from(index) * BLOCK_SIZE as u64;
            if offset >= size {
                return Err(RestoreError::Corrupt {
                    snapshot: snapshot.to_owned(),
                    index,
                    problem: format!("beyond the disk's {size} bytes"),
                });
            }
            while downloads.len() >= DOWNLOADS {
                downloads
                    .join_next()
                    .await
                    .expect("not empty")
                    .expect("no panic")?;
            }
            let (client, file, snapshot, out) = (
                Arc::clone(&client),
                Arc::clone(&file),
                snapshot.to_owned(),
                out.display().to_string(),
            );
            downloads.spawn(async move {
                let (data, checksum) = retry
                    .run("GetSnapshotBlock", || {
                        client.get_snapshot_block(&snapshot, index, &token)
                    })
                    .await?;
                let corrupt = |problem: String| RestoreError::Corrupt {
                    snapshot: snapshot.clone(),
                    index,
                    problem,
                };
                if data.len() != BLOCK_SIZE {
                    return Err(corrupt(format!("{} bytes, not {BLOCK_SIZE}", data.len())));
                }
                let computed = base64(&sha256(&data));
                if computed != checksum {
                    return Err(corrupt(format!(
                        "SHA-256 {computed}, the service says {checksum}"
                    )));
                }
                let len = (size - offset).min(BLOCK_SIZE as u64) as usize;
                tokio::task::spawn_blocking(move || file.write_all_at(&data[..len], offset))
                    .await
                    .expect("no panic")
                    .map_err(|source| RestoreError::Io { path: out, source })
            });
            blocks += 1;
        }
        next_token = page.next_token;
        if next_token.is_none() {
            break;
        }
    }
    while let Some(joined) = downloads.join_next().await {
        joined.expect("no panic")?;
    }
    file.sync_all().map_err(io)?;
    Ok(blocks)
}
