//! Rescan by checksum: for each range of a disk the agent asks the receiver for block
//! digests (many requests in flight, spread over the streams), hashes its own blocks
//! meanwhile, and marks the blocks that differ dirty. The ordinary change pipeline then
//! sends them, reading the volume at that moment, so a block written during the rescan
//! always travels with its latest content: the rescan never sends data itself.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use blockferry_proto::{Frame, SumReply, SumRequest, block_digest};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::agent::AgentStats;
use crate::capture::CaptureShared;
use crate::volume::Volume;
use blockferry_proto::route::stream_for;

/// Digest block: the dirty map's block, so a single changed 4 KiB block costs 4 KiB.
pub(crate) const SUM_BLOCK: u32 = 4096;
/// Blocks per request: 8 MiB of disk, 32 KiB of digests.
const REQUEST_BLOCKS: u32 = 2048;
/// Requests awaiting their reply: enough to keep the receiver's reads and the network
/// busy while the agent hashes.
const IN_FLIGHT: usize = 16;
/// Local windows hashed at once (each reads 8 MiB).
const HASHING: usize = 2;

/// A disk to rescan, over `[0, end)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RescanJob {
    pub(crate) disk: usize,
    pub(crate) end: u64,
}

/// What the rescan task reports to the session.
#[derive(Debug)]
pub(crate) enum RescanEvent {
    /// Every block of the disk that differed is marked dirty.
    Done(usize),
    /// The volume could not be read.
    Failed { disk: usize, error: std::io::Error },
}

#[derive(Default)]
struct Window {
    local: Option<Vec<u128>>,
    remote: Option<Vec<u128>>,
}

/// Rescans `jobs` one disk after another. Ends when all are done, or when the session
/// goes away (a send or the replies channel fails).
pub(crate) async fn run(
    jobs: Vec<RescanJob>,
    volumes: Vec<Volume>,
    capture: Arc<CaptureShared>,
    streams: Vec<mpsc::Sender<Vec<u8>>>,
    mut replies: mpsc::Receiver<SumReply>,
    events: mpsc::Sender<RescanEvent>,
    stats: Arc<AgentStats>,
) {
    for job in jobs {
        let volume = volumes[job.disk].clone();
        tracing::info!(disk = %volume.name, bytes = job.end, "rescan by checksum");
        let result = rescan_disk(job, &volume, &capture, &streams, &mut replies, &stats).await;
        let event = match result {
            Ok(true) => RescanEvent::Done(job.disk),
            Ok(false) => return,
            Err(error) => RescanEvent::Failed {
                disk: job.disk,
                error,
            },
        };
        let failed = matches!(event, RescanEvent::Failed { .. });
        if events.send(event).await.is_err() || failed {
            return;
        }
    }
}

/// Returns `Ok(false)` if the session ended first.
async fn rescan_disk(
    job: RescanJob,
    volume: &Volume,
    capture: &CaptureShared,
    streams: &[mpsc::Sender<Vec<u8>>],
    replies: &mut mpsc::Receiver<SumReply>,
    stats: &AgentStats,
) -> std::io::Result<bool> {
    let file = Arc::new(volume.clone());
    let block = u64::from(SUM_BLOCK);
    let total_blocks = job.end.div_ceil(block);
    let disk16 = u16::try_from(job.disk).expect("at most MAX_DISKS volumes");
    let mut next_block = 0u64;
    let mut windows: HashMap<u64, Window> = HashMap::new();
    let mut to_hash: VecDeque<(u64, u32)> = VecDeque::new();
    let mut hashing: JoinSet<std::io::Result<(u64, Vec<u128>)>> = JoinSet::new();
    loop {
        while windows.len() < IN_FLIGHT && next_block < total_blocks {
            // Paused by an operator: no new questions (each costs a read of the
            // volume); the answers to those asked still come in.
            if stats.pause.is_paused() && !windows.is_empty() {
                break;
            }
            stats.pause.resumed().await;
            let count = (total_blocks - next_block).min(u64::from(REQUEST_BLOCKS)) as u32;
            let request = SumRequest {
                disk: disk16,
                first_block: next_block,
                count,
                block_size: SUM_BLOCK,
            };
            let stream = stream_for(disk16, next_block * block, streams.len());
            if streams[stream]
                .send(Frame::SumRequest(request).to_bytes())
                .await
                .is_err()
            {
                return Ok(false);
            }
            windows.insert(next_block, Window::default());
            to_hash.push_back((next_block, count));
            next_block += u64::from(count);
        }
        while hashing.len() < HASHING
            && let Some((first, count)) = to_hash.pop_front()
        {
            let (file, size) = (Arc::clone(&file), volume.size);
            hashing.spawn_blocking(move || hash_window(&file, size, first, count));
        }
        if windows.is_empty() {
            return Ok(true);
        }
        let (first, side, digests) = tokio::select! {
            reply = replies.recv() => match reply {
                None => return Ok(false),
                Some(reply) => (reply.first_block, true, reply.digests),
            },
            Some(hashed) = hashing.join_next(), if !hashing.is_empty() => {
                let (first, digests) = hashed.map_err(std::io::Error::other)??;
                (first, false, digests)
            }
        };
        let Some(window) = windows.get_mut(&first) else {
            tracing::warn!(disk = %volume.name, first, "ignoring a checksum reply nobody asked for");
            continue;
        };
        if side {
            window.remote = Some(digests);
        } else {
            window.local = Some(digests);
        }
        if let Window {
            local: Some(local),
            remote: Some(remote),
        } = window
        {
            let (local, remote) = (std::mem::take(local), std::mem::take(remote));
            windows.remove(&first);
            compare(
                job.disk,
                volume.size,
                first,
                &local,
                &remote,
                capture,
                stats,
            );
        }
    }
}

/// Reads blocks `first..first + count` and hashes each (the last one over the bytes
/// the disk has).
fn hash_window(
    file: &Volume,
    size: u64,
    first: u64,
    count: u32,
) -> std::io::Result<(u64, Vec<u128>)> {
    let block = u64::from(SUM_BLOCK);
    let offset = first * block;
    let len = (u64::from(count) * block).min(size - offset) as usize;
    let mut data = vec![0u8; len];
    file.read_exact_at(&mut data, offset)?;
    Ok((
        first,
        data.chunks(SUM_BLOCK as usize).map(block_digest).collect(),
    ))
}

/// Marks every block whose digests differ (or that the receiver did not answer for)
/// dirty, as runs.
fn compare(
    disk: usize,
    size: u64,
    first: u64,
    local: &[u128],
    remote: &[u128],
    capture: &CaptureShared,
    stats: &AgentStats,
) {
    let block = u64::from(SUM_BLOCK);
    let mut run: Option<(u64, u64)> = None;
    let mut marked = 0u64;
    let flush = |run: &mut Option<(u64, u64)>, marked: &mut u64| {
        if let Some((start, end)) = run.take() {
            let end = end.min(size);
            capture.mark_dirty(disk, start, end - start);
            *marked += end - start;
        }
    };
    for (i, digest) in local.iter().enumerate() {
        let at = (first + i as u64) * block;
        if remote.get(i) == Some(digest) {
            flush(&mut run, &mut marked);
            continue;
        }
        run = match run {
            Some((start, end)) if end == at => Some((start, at + block)),
            Some(_) => {
                flush(&mut run, &mut marked);
                Some((at, at + block))
            }
            None => Some((at, at + block)),
        };
    }
    flush(&mut run, &mut marked);
    let compared = (local.len() as u64 * block).min(size - first * block);
    stats.rescanned_bytes.fetch_add(compared, Ordering::Relaxed);
    stats
        .rescan_marked_bytes
        .fetch_add(marked, Ordering::Relaxed);
}
