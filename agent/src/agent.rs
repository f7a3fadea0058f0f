//! The agent's top level: configuration, the reconnect loop with exponential backoff and
//! jitter, and the counters a run reports.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::capture::{Capture, DEFAULT_BUFFER};
use blockferry_util::error_chain;

use crate::credentials::Credentials;
use crate::freeze::FreezeMode;
use crate::progress::{Progress, ProgressMode};
use crate::quiet::WriteCounters;
use crate::session::{self, Identity, Outcome, SessionError};
use crate::state::{self, StateRecord};
use crate::tracking::{CaptureMode, Tracking};
use crate::volume::Volume;
use blockferry_proto::ResumeClaim;

/// Default for [`AgentConfig::epoch_interval`].
pub const DEFAULT_EPOCH_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The receiver's replication address, HOST:PORT.
    pub receiver: String,
    pub credentials: Credentials,
    pub exit_when_synced: bool,
    pub progress: ProgressMode,
    /// Streams (TLS connections) to open, 1 to 5; the receiver may grant fewer.
    pub streams: u8,
    /// Where the clean-shutdown state record lives; without one, every restart rescans.
    pub state_dir: Option<std::path::PathBuf>,
    /// Rescan every disk by checksum at start (for writes made behind the agent's back).
    pub rescan: bool,
    /// At a clean shutdown, how long to keep sending changes before saving the rest in
    /// the state record.
    pub drain_timeout: Duration,
    /// Under a sustained workload, how often a consistent point is cut (the dirty runs
    /// are frozen and shipped ahead of later writes). With a quiet workload a point is
    /// cut as soon as the changes are sent.
    pub epoch_interval: Duration,
    /// First reconnect delay; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How changes are learnt (`--capture`).
    pub capture: CaptureMode,
    /// Where changes cannot be tracked, every disk is rescanned this often.
    pub rescan_interval: Duration,
    /// Pages of trace buffer per CPU for block tracking (a power of two; tests make it
    /// tiny to force losses).
    pub tracking_ring_pages: usize,
    /// Where block tracking reads the kernel's events (`--trace-source`).
    pub trace_source: crate::blocktrace::TraceSource,
    /// Tests only: the tracking thread sleeps this long between drains instead of
    /// waking when its rings fill (a paused consumer, so that small rings lose events).
    pub tracking_paused_drain: Option<Duration>,
    /// Tests only: one write sample in this many is ignored, as the kernel sometimes
    /// drops one without a word, so that the check against the disks' statistics runs.
    pub tracking_ignore_samples: Option<u64>,
    /// Whether block-tracked points are cut under a file-system freeze (`--freeze`).
    pub freeze: FreezeMode,
    /// Longest a freeze may last (`--freeze-timeout-ms`).
    pub freeze_timeout: Duration,
    /// While the disks change, how often a frozen point is cut (`--freeze-interval-secs`).
    pub freeze_interval: Duration,
}

impl AgentConfig {
    pub fn new(receiver: impl Into<String>, credentials: Credentials) -> Self {
        Self {
            receiver: receiver.into(),
            credentials,
            exit_when_synced: false,
            progress: ProgressMode::Quiet,
            streams: 4,
            epoch_interval: DEFAULT_EPOCH_INTERVAL,
            state_dir: None,
            rescan: false,
            drain_timeout: Duration::from_secs(30),
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            capture: CaptureMode::Auto,
            rescan_interval: Duration::from_secs(3600),
            tracking_ring_pages: crate::tracking::RING_PAGES,
            trace_source: crate::blocktrace::TraceSource::Auto,
            tracking_paused_drain: None,
            tracking_ignore_samples: None,
            freeze: FreezeMode::Auto,
            freeze_timeout: crate::freeze::DEFAULT_FREEZE_TIMEOUT,
            freeze_interval: crate::freeze::DEFAULT_FREEZE_INTERVAL,
        }
    }
}

/// Counters of one agent run, across reconnects.
#[derive(Debug)]
pub struct AgentStats {
    /// Bytes of block data sent in Write frames (zero-fills carry none).
    pub payload_bytes: AtomicU64,
    /// Bytes covered by zero-fill frames.
    pub zero_fill_bytes: AtomicU64,
    /// Every byte of every frame sent (before TLS).
    pub wire_bytes: AtomicU64,
    /// Every byte of every frame received from the receiver (after TLS).
    pub received_bytes: AtomicU64,
    /// Sessions that got as far as Welcome.
    pub sessions: AtomicU64,
    /// Durable acknowledgements received (epochs made durable at the receiver).
    pub durable_acks: AtomicU64,
    /// Bytes compared by checksum with the receiver's copy.
    pub rescanned_bytes: AtomicU64,
    /// Bytes a rescan found different and marked to be sent again.
    pub rescan_marked_bytes: AtomicU64,
    pub synced: AtomicBool,
    /// The bandwidth limit the receiver set, shared by every stream.
    pub throttle: crate::throttle::Throttle,
    /// The operator's pause of this server's replication.
    pub pause: crate::throttle::Pause,
    /// Block tracking and freezes.
    pub tracking: Arc<crate::tracking::TrackingCounters>,
    /// Barriers sent that close a crash-consistent point, and those that do not.
    pub consistent_points: AtomicU64,
    pub inconsistent_points: AtomicU64,
    sizes: Vec<u64>,
    positions: Vec<AtomicU64>,
    durable: Vec<AtomicU64>,
}

impl AgentStats {
    fn new(volumes: &[Volume]) -> Self {
        Self {
            payload_bytes: AtomicU64::new(0),
            zero_fill_bytes: AtomicU64::new(0),
            wire_bytes: AtomicU64::new(0),
            received_bytes: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
            durable_acks: AtomicU64::new(0),
            rescanned_bytes: AtomicU64::new(0),
            rescan_marked_bytes: AtomicU64::new(0),
            synced: AtomicBool::new(false),
            throttle: crate::throttle::Throttle::default(),
            pause: crate::throttle::Pause::default(),
            tracking: Arc::default(),
            consistent_points: AtomicU64::new(0),
            inconsistent_points: AtomicU64::new(0),
            sizes: volumes.iter().map(|v| v.size).collect(),
            positions: volumes.iter().map(|_| AtomicU64::new(0)).collect(),
            durable: volumes.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.sizes.iter().sum()
    }

    /// Bytes read and sent, per the current session.
    pub fn sent_bytes(&self) -> u64 {
        self.positions
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .sum()
    }

    /// Bytes durable at the receiver.
    pub fn durable_bytes(&self) -> u64 {
        self.durable.iter().map(|p| p.load(Ordering::Relaxed)).sum()
    }

    /// Whether disk `disk`'s initial sync is durable at the receiver.
    pub fn disk_synced(&self, disk: usize) -> bool {
        self.durable[disk].load(Ordering::Relaxed) >= self.sizes[disk]
    }

    /// Sent but not yet durable.
    pub fn backlog_bytes(&self) -> u64 {
        self.sent_bytes().saturating_sub(self.durable_bytes())
    }

    pub(crate) fn set_position(&self, disk: usize, at: u64) {
        self.positions[disk].store(at, Ordering::Relaxed);
    }

    pub(crate) fn set_durable(&self, disk: usize, at: u64) {
        self.durable[disk].store(at, Ordering::Relaxed);
    }

    /// An epoch became durable, with the initial-sync progress it settled.
    pub(crate) fn durable_through(&self, watermarks: &[(usize, u64)]) {
        self.durable_acks.fetch_add(1, Ordering::Relaxed);
        for &(disk, watermark) in watermarks {
            self.durable[disk].fetch_max(watermark, Ordering::Relaxed);
        }
    }
}

/// A session that stayed up this long was healthy, even if it had nothing to make
/// durable (an idle, synced server): the reconnect after it starts the backoff over.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);

/// What a finished run did.
#[derive(Debug, Clone)]
pub struct AgentReport {
    pub payload_bytes: u64,
    pub zero_fill_bytes: u64,
    pub wire_bytes: u64,
    pub sessions: u64,
    pub total_bytes: u64,
    pub elapsed: Duration,
    pub outcome: Outcome,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("giving up: {0}")]
    Fatal(#[source] SessionError),
    #[error(transparent)]
    Capture(#[from] crate::tracking::CaptureError),
}

/// A running agent's handle on its counters, for progress displays and tests.
#[derive(Debug, Clone)]
pub struct Agent {
    stats: Arc<AgentStats>,
    capture: Capture,
}

impl Agent {
    /// An agent for `volumes` with the default capture buffer.
    pub fn new(volumes: &[Volume]) -> Self {
        Self::with_buffer(volumes, DEFAULT_BUFFER)
    }

    /// An agent whose capture buffer holds at most `buffer_bytes` of changes.
    pub fn with_buffer(volumes: &[Volume], buffer_bytes: usize) -> Self {
        Self {
            stats: Arc::new(AgentStats::new(volumes)),
            capture: Capture::new(volumes, buffer_bytes),
        }
    }

    pub fn stats(&self) -> &Arc<AgentStats> {
        &self.stats
    }

    /// The in-process write capture: writes through it reach the volume and the receiver.
    pub fn capture(&self) -> &Capture {
        &self.capture
    }

    /// Replicates `volumes` until shut down, or until synced with `exit_when_synced`.
    /// Reconnects after any retryable failure with exponential backoff and jitter.
    pub async fn run(
        &self,
        config: &AgentConfig,
        volumes: &[Volume],
        shutdown: CancellationToken,
    ) -> Result<AgentReport, AgentError> {
        let started = Instant::now();
        let (claim, quiet) = self.initial_claim(config, volumes);
        let mut identity = Identity {
            series: *uuid::Uuid::new_v4().as_bytes(),
            claim,
            next_seq: 1,
            checkpoints: config.state_dir.is_some(),
        };
        let progress = Progress::start(config.progress, Arc::clone(&self.stats));
        // An enrolled agent keeps its certificate renewed while it runs.
        let renewal = CancellationToken::new();
        if let Some(dir) = &config.state_dir
            && config.credentials.dir == *dir
        {
            tokio::spawn(crate::enroll::keep_renewed(
                dir.clone(),
                config.credentials.clone(),
                renewal.clone(),
            ));
        }
        let _stop_renewal = renewal.drop_guard();
        // Tracking starts before the first session reads anything, so that no write
        // between the two is missed.
        let tracking = Arc::new(Tracking::start(
            config.capture,
            volumes,
            Arc::clone(self.capture.shared()),
            config.rescan_interval,
            crate::tracking::RingTuning {
                pages: config.tracking_ring_pages,
                paused_drain: config.tracking_paused_drain,
                ignore_samples: config.tracking_ignore_samples,
                source: config.trace_source,
            },
            Arc::clone(&self.stats.tracking),
        )?);
        if tracking.tracked && config.freeze == FreezeMode::Off {
            tracing::warn!(
                "--freeze off: block-tracked changes are replicated, but no point is crash-consistent and the receiver cuts no recovery point"
            );
        }
        if tracking.tracked && matches!(identity.claim, ResumeClaim::Checkpoint { .. }) {
            // A clean stop's record holds what was dirty then; what was written after
            // the agent stopped is known only if nothing was (crate::quiet).
            match tracking.unwritten_since(volumes, &quiet) {
                Ok(()) => tracing::info!(
                    "no write reached the tracked disks while the agent was stopped (same boot, same devices, same write counters): resuming without a rescan"
                ),
                Err(why) => {
                    tracing::info!(%why, "block tracking saw nothing while the agent was stopped: the disks are rescanned by checksum");
                    identity.claim = ResumeClaim::TrackingLost;
                }
            }
        }
        let mut losses_handled = tracking.losses();
        let mut backoff = config.initial_backoff;
        let result = loop {
            let restart = tracking.restart_token(losses_handled);
            let (acks_before, session_started) = (
                self.stats.durable_acks.load(Ordering::Relaxed),
                Instant::now(),
            );
            let mut retry_after = Duration::ZERO;
            let ran = session::run(
                config,
                volumes,
                &self.stats,
                self.capture.shared(),
                &shutdown,
                session::Changes {
                    tracking: &tracking,
                    restart: &restart,
                },
                &mut identity,
            )
            .await;
            restart.cancel();
            match ran {
                Ok(Outcome::Checkpointed(seq)) => {
                    let quiet = tracking.quiesce(volumes, losses_handled);
                    self.save_state(config, volumes, identity.series, seq, quiet);
                    break Ok(Outcome::Shutdown);
                }
                Ok(outcome @ (Outcome::Synced | Outcome::Shutdown | Outcome::Finished(_))) => {
                    break Ok(outcome);
                }
                Ok(Outcome::Closed(why)) => tracing::info!(%why, "session closed; reconnecting"),
                Err(SessionError::Stopping) => break Ok(Outcome::Shutdown),
                Err(SessionError::Refused {
                    code: blockferry_proto::ErrorCode::FINISHED,
                    message,
                    ..
                }) => {
                    tracing::warn!(%message, "the receiver ended this server's replication for good; stopping");
                    break Ok(Outcome::Finished(message));
                }
                Err(SessionError::Restart) => {
                    // Events were lost, or a periodic rescan is due: the next session
                    // has the receiver rescan every disk, at once.
                    losses_handled = tracking.losses();
                    identity.claim = ResumeClaim::TrackingLost;
                    continue;
                }
                Err(err) if err.is_retryable() => {
                    retry_after = err.retry_after();
                    tracing::warn!(error = %error_chain(&err), "session failed; reconnecting")
                }
                Err(err) => break Err(AgentError::Fatal(err)),
            }
            // Only a session that made progress starts the backoff over: one that is let
            // in but cannot make anything durable (a full staging disk) would otherwise
            // reconnect twice a second, resending everything unacknowledged each time.
            if self.stats.durable_acks.load(Ordering::Relaxed) > acks_before
                || session_started.elapsed() >= HEALTHY_SESSION
            {
                backoff = config.initial_backoff;
            }
            let delay = jitter(backoff).max(retry_after);
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                "waiting before reconnecting"
            );
            tokio::select! {
                () = shutdown.cancelled() => break Ok(Outcome::Shutdown),
                () = tokio::time::sleep(delay) => {}
            }
            backoff = (backoff * 2).min(config.max_backoff);
        };
        progress.finish();
        let outcome = result?;
        Ok(AgentReport {
            payload_bytes: self.stats.payload_bytes.load(Ordering::Relaxed),
            zero_fill_bytes: self.stats.zero_fill_bytes.load(Ordering::Relaxed),
            wire_bytes: self.stats.wire_bytes.load(Ordering::Relaxed),
            sessions: self.stats.sessions.load(Ordering::Relaxed),
            total_bytes: self.stats.total_bytes(),
            elapsed: started.elapsed(),
            outcome,
        })
    }
}

impl Agent {
    /// What the first Hello claims: a clean shutdown's record restores the dirty map;
    /// anything else means the receiver must have the disks rescanned.
    fn initial_claim(
        &self,
        config: &AgentConfig,
        volumes: &[Volume],
    ) -> (ResumeClaim, Vec<Option<WriteCounters>>) {
        let nothing = vec![None; volumes.len()];
        let Some(dir) = &config.state_dir else {
            let claim = if config.rescan {
                ResumeClaim::RescanRequested
            } else {
                ResumeClaim::NoRecord
            };
            return (claim, nothing);
        };
        // Read (and so consumed) even when a rescan is asked for: it must never be
        // trusted later.
        let record = state::take(dir, volumes);
        if config.rescan {
            tracing::info!("rescan requested: every disk is compared with the receiver");
            return (ResumeClaim::RescanRequested, nothing);
        }
        match record {
            Ok(Some(record)) => {
                for (disk, runs) in record.dirty.iter().enumerate() {
                    for &(offset, len) in runs {
                        self.capture.shared().mark_dirty(disk, offset, len);
                    }
                }
                tracing::info!(
                    seq = record.seq,
                    dirty = self.capture.backlog_bytes(),
                    "resuming from the clean-shutdown state record"
                );
                (
                    ResumeClaim::Checkpoint {
                        series: record.series,
                        seq: record.seq,
                    },
                    record.quiet,
                )
            }
            Ok(None) => {
                tracing::info!(
                    "no clean-shutdown state record: the disks will be rescanned by checksum"
                );
                (ResumeClaim::NoRecord, nothing)
            }
            Err(err) => {
                tracing::warn!(error = %error_chain(&err), "not trusting the state record: the disks will be rescanned by checksum");
                (ResumeClaim::InvalidRecord, nothing)
            }
        }
    }

    /// Saves the dirty map under the checkpoint the receiver recorded. A failure leaves
    /// no record, so the next start rescans: slower, never wrong.
    fn save_state(
        &self,
        config: &AgentConfig,
        volumes: &[Volume],
        series: [u8; 16],
        seq: u64,
        quiet: Vec<Option<WriteCounters>>,
    ) {
        let Some(dir) = &config.state_dir else { return };
        let record = StateRecord {
            series,
            seq,
            dirty: self.capture.shared().dirty_runs(),
            quiet,
        };
        let dirty: u64 = record.dirty.iter().flatten().map(|r| r.1).sum();
        match state::save(dir, volumes, &record) {
            Ok(()) => tracing::info!(
                path = %state::path(dir).display(),
                seq,
                dirty,
                "saved the state record: the next start resumes without a rescan"
            ),
            Err(err) => tracing::error!(
                path = %state::path(dir).display(),
                error = %err,
                "cannot save the state record: the next start rescans"
            ),
        }
    }
}

/// A delay between 50% and 150% of `base`, so that many agents cut off at once by a
/// receiver restart do not all come back in the same instant.
fn jitter(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut x = u64::from(nanos) ^ u64::from(std::process::id()).rotate_left(32);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    let factor = 0.5 + (x % 1000) as f64 / 1000.0;
    base.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_to_one_and_a_half() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(2));
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(3),
                "{d:?}"
            );
        }
    }
}
