//! A strict in-memory EBS direct API, for tests and benchmarks.
//!
//! It rejects what the service rejects — a block that is not exactly 512 KiB, a checksum
//! that does not match, a PUT to a completed snapshot, a CompleteSnapshot with the wrong
//! count or aggregate checksum, two concurrent PUTs of one block — and injects what the
//! service does to clients: throttling, 500s, "not found" just after StartSnapshot,
//! latency per PUT, stalls, and access denied. A pending snapshot without activity for its
//! timeout goes to error, as on the service.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use blockferry_util::lock;
use bytes::Bytes;
use tokio::time::Instant;

use super::{
    BLOCK_SIZE, BlockIndex, BlockPage, EbsClient, EbsError, StartSnapshot, aggregate_checksum,
    base64, sha256,
};

/// Blocks per GiB of volume size.
const BLOCKS_PER_GIB: u64 = (1 << 30) / BLOCK_SIZE as u64;
/// Blocks per page of ListSnapshotBlocks / ListChangedBlocks.
const PAGE: usize = 100;

/// A fault the fake injects into the next calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `ThrottlingException` (retryable).
    Throttle,
    /// A 500 from the service (retryable).
    ServerError,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Status {
    Pending,
    Completed,
    Error(String),
}

#[derive(Debug)]
struct Snapshot {
    parent: Option<String>,
    status: Status,
    size_gib: u64,
    blocks: BTreeMap<BlockIndex, (Bytes, [u8; 32])>,
    in_flight: HashSet<BlockIndex>,
    /// Calls that will still answer "not found" (the service's eventual consistency).
    hidden_for: u32,
    timeout: Duration,
    last_activity: Instant,
    tags: Vec<(String, String)>,
}

#[derive(Debug, Default)]
struct State {
    snapshots: HashMap<String, Snapshot>,
    by_client_token: HashMap<String, String>,
    faults: Vec<Fault>,
    hide_new_snapshots_for: u32,
    put_latency: Duration,
    stall_next_puts: Vec<Duration>,
    access_denied: bool,
}

#[derive(Debug, Default)]
pub struct FakeEbs {
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Every call that reached the fake, by operation.
    calls: Mutex<HashMap<&'static str, u64>>,
    puts_in_flight: AtomicUsize,
    max_puts_in_flight: AtomicUsize,
    /// PUTs that stored a block.
    puts_stored: AtomicU64,
}

impl FakeEbs {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next `count` calls (of any operation) fail with `fault`.
    pub fn inject(&self, fault: Fault, count: usize) {
        let mut state = self.lock();
        state.faults.extend(std::iter::repeat_n(fault, count));
    }

    /// Snapshots started from now on answer "not found" to their first `calls` calls.
    pub fn hide_new_snapshots_for(&self, calls: u32) {
        self.lock().hide_new_snapshots_for = calls;
    }

    /// Every PUT takes this long (the service's latency).
    pub fn set_put_latency(&self, latency: Duration) {
        self.lock().put_latency = latency;
    }

    /// The next PUT hangs this long before it is served (a stalled connection).
    pub fn stall_next_put(&self, stall: Duration) {
        self.lock().stall_next_puts.push(stall);
    }

    /// Every call fails with AccessDenied while set.
    pub fn deny_access(&self, denied: bool) {
        self.lock().access_denied = denied;
    }

    pub fn calls(&self, operation: &str) -> u64 {
        lock(&self.calls).get(operation).copied().unwrap_or(0)
    }

    /// The most PUTs that were ever in flight at once.
    pub fn max_puts_in_flight(&self) -> usize {
        self.max_puts_in_flight.load(Ordering::SeqCst)
    }

    pub fn puts_stored(&self) -> u64 {
        self.puts_stored.load(Ordering::SeqCst)
    }

    /// The tags a snapshot was started with.
    pub fn tags(&self, snapshot: &str) -> Option<Vec<(String, String)>> {
        self.lock().snapshots.get(snapshot).map(|s| s.tags.clone())
    }

    /// The snapshot's parent, as started.
    pub fn parent(&self, snapshot: &str) -> Option<String> {
        self.lock()
            .snapshots
            .get(snapshot)
            .and_then(|s| s.parent.clone())
    }

    /// Whether the snapshot exists (not deleted).
    pub fn exists(&self, snapshot: &str) -> bool {
        self.lock().snapshots.contains_key(snapshot)
    }

    /// Blocks written to this snapshot itself (not inherited).
    pub fn own_blocks(&self, snapshot: &str) -> Vec<BlockIndex> {
        self.lock()
            .snapshots
            .get(snapshot)
            .map(|s| s.blocks.keys().copied().collect())
            .unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Counts the call and applies access denial and injected faults.
    fn enter(&self, operation: &'static str) -> Result<(), EbsError> {
        *lock(&self.calls).entry(operation).or_default() += 1;
        let mut state = self.lock();
        if state.access_denied {
            return Err(EbsError::AccessDenied(format!(
                "AccessDeniedException: not authorized to perform ebs:{operation}"
            )));
        }
        if !state.faults.is_empty() {
            return Err(match state.faults.remove(0) {
                Fault::Throttle => {
                    EbsError::Retryable(format!("ThrottlingException on {operation}"))
                }
                Fault::ServerError => {
                    EbsError::Retryable(format!("InternalServerException (500) on {operation}"))
                }
            });
        }
        Ok(())
    }

    /// The snapshot, visible and not failed by its timeout.
    fn snapshot<'a>(state: &'a mut State, id: &str) -> Result<&'a mut Snapshot, EbsError> {
        let snapshot = state
            .snapshots
            .get_mut(id)
            .ok_or_else(|| EbsError::NotFound(format!("ResourceNotFoundException: {id}")))?;
        if snapshot.hidden_for > 0 {
            snapshot.hidden_for -= 1;
            return Err(EbsError::NotFound(format!(
                "ResourceNotFoundException: {id} (just started)"
            )));
        }
        if snapshot.status == Status::Pending && snapshot.last_activity.elapsed() > snapshot.timeout
        {
            snapshot.status = Status::Error("no activity within its timeout".into());
        }
        Ok(snapshot)
    }

    /// Every block of a snapshot, its parents' included (the child's own win).
    fn chain_blocks(state: &State, id: &str) -> BTreeMap<BlockIndex, (String, [u8; 32])> {
        let mut chain = Vec::new();
        let mut at = Some(id.to_owned());
        while let Some(id) = at {
            let Some(snapshot) = state.snapshots.get(&id) else {
                break;
            };
            at = snapshot.parent.clone();
            chain.push((id, snapshot));
        }
        let mut blocks = BTreeMap::new();
        for (id, snapshot) in chain.into_iter().rev() {
            for (&index, (_, digest)) in &snapshot.blocks {
                blocks.insert(index, (id.clone(), *digest));
            }
        }
        blocks
    }
}

impl EbsClient for FakeEbs {
    async fn start_snapshot(&self, request: StartSnapshot) -> Result<String, EbsError> {
        self.enter("StartSnapshot")?;
        let mut state = self.lock();
        if let Some(id) = state.by_client_token.get(&request.client_token) {
            return Ok(id.clone());
        }
        if request.volume_size_gib == 0 || request.volume_size_gib > 64 * 1024 {
            return Err(EbsError::Rejected(format!(
                "ValidationException: VolumeSize {} GiB",
                request.volume_size_gib
            )));
        }
        if !(10..=4320).contains(&request.timeout_minutes) {
            return Err(EbsError::Rejected(format!(
                "ValidationException: Timeout {} minutes (10 to 4320)",
                request.timeout_minutes
            )));
        }
        if let Some(parent) = &request.parent {
            match state.snapshots.get(parent) {
                Some(p) if p.status == Status::Completed => {
                    if request.volume_size_gib < p.size_gib {
                        return Err(EbsError::Rejected(
                            "ValidationException: VolumeSize below the parent's".into(),
                        ));
                    }
                }
                Some(_) => {
                    return Err(EbsError::Rejected(format!(
                        "ValidationException: parent {parent} is not completed"
                    )));
                }
                None => {
                    return Err(EbsError::Rejected(format!(
                        "ResourceNotFoundException: parent {parent}"
                    )));
                }
            }
        }
        let id = format!(
            "snap-{:017x}",
            self.next_id.fetch_add(1, Ordering::SeqCst) + 1
        );
        let hidden_for = state.hide_new_snapshots_for;
        state.snapshots.insert(
            id.clone(),
            Snapshot {
                parent: request.parent,
                status: Status::Pending,
                size_gib: request.volume_size_gib,
                blocks: BTreeMap::new(),
                in_flight: HashSet::new(),
                hidden_for,
                timeout: Duration::from_secs(u64::from(request.timeout_minutes) * 60),
                last_activity: Instant::now(),
                tags: request.tags,
            },
        );
        state
            .by_client_token
            .insert(request.client_token, id.clone());
        Ok(id)
    }

    async fn put_snapshot_block(
        &self,
        snapshot: &str,
        index: BlockIndex,
        data: Bytes,
        checksum: &str,
    ) -> Result<(), EbsError> {
        self.enter("PutSnapshotBlock")?;
        let (latency, stall) = {
            let mut state = self.lock();
            let stall =
                (!state.stall_next_puts.is_empty()).then(|| state.stall_next_puts.remove(0));
            let latency = state.put_latency;
            let s = Self::snapshot(&mut state, snapshot)?;
            match &s.status {
                Status::Pending => {}
                Status::Completed => {
                    return Err(EbsError::Rejected(format!(
                        "ValidationException: snapshot {snapshot} is completed"
                    )));
                }
                Status::Error(why) => {
                    return Err(EbsError::Rejected(format!(
                        "ValidationException: snapshot {snapshot} is in error: {why}"
                    )));
                }
            }
            if data.len() != BLOCK_SIZE {
                return Err(EbsError::Rejected(format!(
                    "ValidationException: block {index} has {} bytes, not {BLOCK_SIZE}",
                    data.len()
                )));
            }
            if u64::from(index) >= s.size_gib * BLOCKS_PER_GIB {
                return Err(EbsError::Rejected(format!(
                    "ValidationException: block {index} beyond the volume's {} GiB",
                    s.size_gib
                )));
            }
            if base64(&sha256(&data)) != checksum {
                return Err(EbsError::Rejected(format!(
                    "ValidationException: checksum of block {index} does not match"
                )));
            }
            if !s.in_flight.insert(index) {
                return Err(EbsError::Rejected(format!(
                    "ConflictException: CONFLICTING_BLOCK_UPDATE of block {index}"
                )));
            }
            s.last_activity = Instant::now();
            (latency, stall)
        };
        let now = self.puts_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_puts_in_flight.fetch_max(now, Ordering::SeqCst);
        if let Some(stall) = stall {
            tokio::time::sleep(stall).await;
        }
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        self.puts_in_flight.fetch_sub(1, Ordering::SeqCst);
        let mut state = self.lock();
        let s = state
            .snapshots
            .get_mut(snapshot)
            .expect("a snapshot is never removed");
        s.in_flight.remove(&index);
        let digest = sha256(&data);
        s.blocks.insert(index, (data, digest));
        s.last_activity = Instant::now();
        self.puts_stored.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn complete_snapshot(
        &self,
        snapshot: &str,
        changed_blocks: u32,
        aggregate: &str,
    ) -> Result<(), EbsError> {
        self.enter("CompleteSnapshot")?;
        let mut state = self.lock();
        let s = Self::snapshot(&mut state, snapshot)?;
        match &s.status {
            Status::Pending => {}
            Status::Completed => return Ok(()),
            Status::Error(why) => {
                return Err(EbsError::Rejected(format!(
                    "ValidationException: snapshot {snapshot} is in error: {why}"
                )));
            }
        }
        if !s.in_flight.is_empty() {
            return Err(EbsError::Rejected(format!(
                "ValidationException: {} PUTs still in flight",
                s.in_flight.len()
            )));
        }
        let expected = base64(&aggregate_checksum(s.blocks.values().map(|(_, d)| d)));
        if changed_blocks as usize != s.blocks.len() || aggregate != expected {
            // As the service does: a snapshot completed with a wrong count or checksum
            // goes to error, and its data is lost.
            s.status = Status::Error("wrong changed-block count or aggregate checksum".into());
            return Err(EbsError::Rejected(format!(
                "ValidationException: CompleteSnapshot of {snapshot} with {changed_blocks} blocks \
                 and checksum {aggregate}; it holds {} blocks",
                s.blocks.len()
            )));
        }
        s.status = Status::Completed;
        Ok(())
    }

    async fn list_snapshot_blocks(
        &self,
        snapshot: &str,
        next_token: Option<String>,
    ) -> Result<BlockPage, EbsError> {
        self.enter("ListSnapshotBlocks")?;
        let mut state = self.lock();
        if Self::snapshot(&mut state, snapshot)?.status != Status::Completed {
            return Err(EbsError::Rejected(format!(
                "ValidationException: snapshot {snapshot} is not completed"
            )));
        }
        let from: BlockIndex = match next_token {
            None => 0,
            Some(token) => token.parse().map_err(|_| {
                EbsError::Rejected(format!("ValidationException: NextToken {token}"))
            })?,
        };
        let blocks = Self::chain_blocks(&state, snapshot);
        let page: Vec<(BlockIndex, String)> = blocks
            .range(from..)
            .take(PAGE + 1)
            .map(|(&index, (owner, _))| (index, format!("{owner}/{index}")))
            .collect();
        Ok(page_of(page))
    }

    async fn get_snapshot_block(
        &self,
        snapshot: &str,
        index: BlockIndex,
        block_token: &str,
    ) -> Result<(Bytes, String), EbsError> {
        self.enter("GetSnapshotBlock")?;
        let mut state = self.lock();
        if Self::snapshot(&mut state, snapshot)?.status != Status::Completed {
            return Err(EbsError::Rejected(format!(
                "ValidationException: snapshot {snapshot} is not completed"
            )));
        }
        let blocks = Self::chain_blocks(&state, snapshot);
        let (owner, digest) = blocks
            .get(&index)
            .ok_or_else(|| EbsError::Rejected(format!("ValidationException: no block {index}")))?;
        if block_token != format!("{owner}/{index}") {
            return Err(EbsError::Rejected(format!(
                "ValidationException: BlockToken {block_token} is not block {index}'s"
            )));
        }
        let data = state.snapshots[owner].blocks[&index].0.clone();
        Ok((data, base64(digest)))
    }

    async fn list_changed_blocks(
        &self,
        first: Option<&str>,
        second: &str,
        next_token: Option<String>,
    ) -> Result<BlockPage, EbsError> {
        self.enter("ListChangedBlocks")?;
        let mut state = self.lock();
        for id in first.into_iter().chain([second]) {
            if Self::snapshot(&mut state, id)?.status != Status::Completed {
                return Err(EbsError::Rejected(format!(
                    "ValidationException: snapshot {id} is not completed"
                )));
            }
        }
        let from: BlockIndex = next_token.and_then(|t| t.parse().ok()).unwrap_or(0);
        let old = first
            .map(|f| Self::chain_blocks(&state, f))
            .unwrap_or_default();
        let new = Self::chain_blocks(&state, second);
        let page: Vec<(BlockIndex, String)> = new
            .range(from..)
            .filter(|(index, (_, digest))| old.get(index).is_none_or(|(_, d)| d != digest))
            .take(PAGE + 1)
            .map(|(&index, (owner, _))| (index, format!("{owner}/{index}")))
            .collect();
        Ok(page_of(page))
    }

    async fn delete_snapshot(&self, snapshot: &str) -> Result<(), EbsError> {
        self.enter("DeleteSnapshot")?;
        let mut state = self.lock();
        let Some(deleted) = state.snapshots.remove(snapshot) else {
            return Ok(());
        };
        if deleted.status == Status::Pending {
            let why = format!("IncorrectState: snapshot {snapshot} is pending");
            state.snapshots.insert(snapshot.to_owned(), deleted);
            return Err(EbsError::Rejected(why));
        }
        // The service keeps what the children inherit: fold it into them.
        for child in state
            .snapshots
            .values_mut()
            .filter(|s| s.parent.as_deref() == Some(snapshot))
        {
            for (&index, block) in &deleted.blocks {
                child.blocks.entry(index).or_insert_with(|| block.clone());
            }
            child.parent = deleted.parent.clone();
        }
        Ok(())
    }
}

/// At most [`PAGE`] blocks; the one beyond, if any, is where the next page starts.
fn page_of(mut blocks: Vec<(BlockIndex, String)>) -> BlockPage {
    let next_token = (blocks.len() > PAGE).then(|| blocks[PAGE].0.to_string());
    blocks.truncate(PAGE);
    BlockPage { blocks, next_token }
}
