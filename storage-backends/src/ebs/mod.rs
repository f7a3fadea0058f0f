//! Staging into EBS snapshots through the EBS direct APIs.
//!
//! A source disk is a chain of snapshots: the first holds the initial sync (it has no
//! parent, and may leave all-zero blocks out), and each later one is a child of the one
//! before, holding the blocks written during one recovery interval. The building blocks:
//!
//! - [`EbsClient`]: the six operations of the EBS direct API this backend uses, and EC2's
//!   DeleteSnapshot (retention), as one interface with two implementations — the real service through `aws-sdk-ebs`, and
//!   [`fake::FakeEbs`], a strict in-memory fake that rejects what EBS rejects and injects
//!   the faults EBS produces, for tests and benchmarks.
//! - [`upload::PendingSnapshot`]: one snapshot being written — bounded concurrency, never
//!   two PUTs of one block at once (the later data waits and wins), retries with backoff
//!   for what is worth retrying, completion with the count and the linear aggregate
//!   checksum.
//! - [`restore::restore`]: a completed snapshot downloaded into a raw image, every
//!   block's checksum verified.
//!
//! Facts of the service this follows: blocks are exactly 512 KiB, addressed by index
//! (offset / 512 KiB); every PUT carries the base64 SHA-256 of its block; CompleteSnapshot
//! takes the number of blocks written and the SHA-256 over their raw digests in ascending
//! block order (base64, `LINEAR`); a pending snapshot takes a block again (the last write
//! wins) but two concurrent PUTs of one block can fail (`CONFLICTING_BLOCK_UPDATE`);
//! "snapshot not found" just after StartSnapshot is normal for a while.

pub mod aws;
pub mod chain;
pub mod ec2;
pub mod fake;
pub mod image;
pub mod restore;
pub mod upload;

use std::fmt;
use std::future::Future;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;

/// The EBS direct API's block size: every block is exactly this long.
pub const BLOCK_SIZE: usize = 512 << 10;

/// A snapshot's blocks are addressed by `offset / BLOCK_SIZE`.
pub type BlockIndex = u32;

/// The SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// Base64 (standard alphabet, padded), as the EBS API writes checksums.
pub fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn from_base64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

/// The `LINEAR` aggregate checksum of CompleteSnapshot: SHA-256 over the raw 32-byte
/// digests of the blocks written, in ascending block order.
pub fn aggregate_checksum<'a>(digests_in_order: impl Iterator<Item = &'a [u8; 32]>) -> [u8; 32] {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for digest in digests_in_order {
        context.update(digest);
    }
    context
        .finish()
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

/// What StartSnapshot asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartSnapshot {
    /// The source disk's size, rounded up to whole GiB (the API counts GiB).
    pub volume_size_gib: u64,
    pub parent: Option<String>,
    pub description: String,
    pub tags: Vec<(String, String)>,
    /// Only for a snapshot without parent: the KMS key to encrypt it with.
    pub kms_key_arn: Option<String>,
    /// Minutes without activity after which the service fails the pending snapshot.
    pub timeout_minutes: u32,
    /// Makes a retried StartSnapshot return the same snapshot instead of a second one.
    pub client_token: String,
}

/// One page of a snapshot's block list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockPage {
    /// (block index, block token) of each block of the snapshot (inherited ones too).
    pub blocks: Vec<(BlockIndex, String)>,
    pub next_token: Option<String>,
}

/// Why an EBS call failed, sorted by what the caller should do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EbsError {
    /// Throttling, a 5xx, a timeout, a dropped connection: the same call again, later.
    Retryable(String),
    /// The snapshot is not (yet) visible: normal right after StartSnapshot.
    NotFound(String),
    /// Credentials or policy refuse the call: retrying cannot help.
    AccessDenied(String),
    /// The service rejected the request itself (bad size, checksum, state): a bug or a
    /// corrupt block, never retried.
    Rejected(String),
}

impl EbsError {
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Retryable(_) | Self::NotFound(_))
    }
}

impl fmt::Display for EbsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retryable(why) => write!(f, "EBS is unavailable for now: {why}"),
            Self::NotFound(why) => write!(f, "EBS does not know the snapshot: {why}"),
            Self::AccessDenied(why) => write!(
                f,
                "EBS refused access: {why}; check the receiver's IAM role or credentials \
                 (it needs ebs:StartSnapshot, ebs:PutSnapshotBlock, ebs:CompleteSnapshot, \
                 ebs:ListSnapshotBlocks, ebs:GetSnapshotBlock, and ec2:DeleteSnapshot for \
                 retention)"
            ),
            Self::Rejected(why) => write!(f, "EBS rejected the request: {why}"),
        }
    }
}

impl std::error::Error for EbsError {}

/// The operations of the EBS direct API this backend uses.
pub trait EbsClient: Send + Sync + 'static {
    /// Returns the new snapshot's id.
    fn start_snapshot(
        &self,
        request: StartSnapshot,
    ) -> impl Future<Output = Result<String, EbsError>> + Send;

    /// Writes one whole block; `checksum` is the base64 SHA-256 of `data`.
    fn put_snapshot_block(
        &self,
        snapshot: &str,
        index: BlockIndex,
        data: Bytes,
        checksum: &str,
    ) -> impl Future<Output = Result<(), EbsError>> + Send;

    /// Seals the snapshot: `changed_blocks` blocks were written, `aggregate` is their
    /// LINEAR aggregate checksum (base64).
    fn complete_snapshot(
        &self,
        snapshot: &str,
        changed_blocks: u32,
        aggregate: &str,
    ) -> impl Future<Output = Result<(), EbsError>> + Send;

    /// One page of the blocks of a completed snapshot.
    fn list_snapshot_blocks(
        &self,
        snapshot: &str,
        next_token: Option<String>,
    ) -> impl Future<Output = Result<BlockPage, EbsError>> + Send;

    /// One block and its base64 SHA-256, as the service reports it.
    fn get_snapshot_block(
        &self,
        snapshot: &str,
        index: BlockIndex,
        block_token: &str,
    ) -> impl Future<Output = Result<(Bytes, String), EbsError>> + Send;

    /// The blocks that differ between two snapshots of a chain (or every block of
    /// `second` without `first`).
    fn list_changed_blocks(
        &self,
        first: Option<&str>,
        second: &str,
        next_token: Option<String>,
    ) -> impl Future<Output = Result<BlockPage, EbsError>> + Send;

    /// Deletes a completed snapshot (EC2's DeleteSnapshot, not an EBS direct API). As on
    /// the service, its children stay whole: the blocks they inherit from it are kept for
    /// them. A snapshot already gone is not an error.
    fn delete_snapshot(&self, snapshot: &str) -> impl Future<Output = Result<(), EbsError>> + Send;
}

/// How calls are retried: exponential backoff with full jitter, a bounded number of
/// attempts. Only [`EbsError::retryable`] errors are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 10,
            first_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// Runs `call` until it succeeds, fails for good, or runs out of attempts.
    pub async fn run<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, EbsError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, EbsError>>,
    {
        let mut delay = self.first_delay;
        let mut attempt = 1;
        loop {
            match call().await {
                Ok(value) => return Ok(value),
                Err(err) if err.retryable() && attempt < self.attempts => {
                    let wait = jitter(delay);
                    tracing::debug!(%err, attempt, ?wait, "{what}: retrying");
                    tokio::time::sleep(wait).await;
                    delay = (delay * 2).min(self.max_delay);
                    attempt += 1;
                }
                Err(err) if err.retryable() => {
                    return Err(EbsError::Retryable(format!(
                        "{what}: gave up after {attempt} attempts: {err}"
                    )));
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// A random duration in [delay/2, delay]: retries of many blocks spread out.
fn jitter(delay: Duration) -> Duration {
    let nanos = delay.as_nanos() as u64;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let mut x = seed ^ 0x9e37_79b9_7f4a_7c15 ^ nanos;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    Duration::from_nanos(nanos / 2 + x % (nanos / 2 + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_sha256_in_standard_base64() {
        // SHA-256 of the empty string.
        assert_eq!(
            base64(&sha256(b"")),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        let a = sha256(b"a");
        let b = sha256(b"b");
        let mut both = Vec::new();
        both.extend_from_slice(&a);
        both.extend_from_slice(&b);
        assert_eq!(aggregate_checksum([&a, &b].into_iter()), sha256(&both));
        assert_eq!(from_base64(&base64(&a)).unwrap(), a);
        assert!(from_base64("not base64!").is_none());
    }
}

/// The EBS service a receiver stages into: the real one, or the in-memory fake (tests,
/// benchmarks, and the demo).
#[derive(Debug, Clone)]
pub enum AnyEbs {
    Aws(aws::AwsEbs),
    Fake(std::sync::Arc<fake::FakeEbs>),
}

impl EbsClient for AnyEbs {
    async fn start_snapshot(&self, request: StartSnapshot) -> Result<String, EbsError> {
        match self {
            Self::Aws(c) => c.start_snapshot(request).await,
            Self::Fake(c) => c.start_snapshot(request).await,
        }
    }

    async fn put_snapshot_block(
        &self,
        snapshot: &str,
        index: BlockIndex,
        data: Bytes,
        checksum: &str,
    ) -> Result<(), EbsError> {
        match self {
            Self::Aws(c) => c.put_snapshot_block(snapshot, index, data, checksum).await,
            Self::Fake(c) => c.put_snapshot_block(snapshot, index, data, checksum).await,
        }
    }

    async fn complete_snapshot(
        &self,
        snapshot: &str,
        changed_blocks: u32,
        aggregate: &str,
    ) -> Result<(), EbsError> {
        match self {
            Self::Aws(c) => {
                c.complete_snapshot(snapshot, changed_blocks, aggregate)
                    .await
            }
            Self::Fake(c) => {
                c.complete_snapshot(snapshot, changed_blocks, aggregate)
                    .await
            }
        }
    }

    async fn list_snapshot_blocks(
        &self,
        snapshot: &str,
        next_token: Option<String>,
    ) -> Result<BlockPage, EbsError> {
        match self {
            Self::Aws(c) => c.list_snapshot_blocks(snapshot, next_token).await,
            Self::Fake(c) => c.list_snapshot_blocks(snapshot, next_token).await,
        }
    }

    async fn get_snapshot_block(
        &self,
        snapshot: &str,
        index: BlockIndex,
        block_token: &str,
    ) -> Result<(Bytes, String), EbsError> {
        match self {
            Self::Aws(c) => c.get_snapshot_block(snapshot, index, block_token).await,
            Self::Fake(c) => c.get_snapshot_block(snapshot, index, block_token).await,
        }
    }

    async fn list_changed_blocks(
        &self,
        first: Option<&str>,
        second: &str,
        next_token: Option<String>,
    ) -> Result<BlockPage, EbsError> {
        match self {
            Self::Aws(c) => c.list_changed_blocks(first, second, next_token).await,
            Self::Fake(c) => c.list_changed_blocks(first, second, next_token).await,
        }
    }

    async fn delete_snapshot(&self, snapshot: &str) -> Result<(), EbsError> {
        match self {
            Self::Aws(c) => c.delete_snapshot(snapshot).await,
            Self::Fake(c) => c.delete_snapshot(snapshot).await,
        }
    }
}
