//! How the agent learns what changed on its volumes (`--capture`), and what it does when
//! it cannot know.
//!
//! - `block` (the default for block devices under `auto`): the block layer's completed
//!   requests ([`crate::blocktrace`]) mark the dirty map; the sender re-reads the blocks
//!   from the device. Nothing written while the agent does not run is seen, so every
//!   start claims `tracking_lost` and the receiver has the disks rescanned by checksum;
//!   a loss of events mid-run ends the session for the same claim.
//! - `tap` (the default for image files under `auto`): only writes through the agent's
//!   NBD tap or its in-process capture are seen.
//! - `none`: nothing is tracked; the disks are rescanned every `--rescan-interval-secs`.
//!
//! Where block tracking cannot start (no tracefs, perf events refused, a device-mapper
//! device), the agent says why in one line and falls back to periodic rescans; it never
//! replicates silently without knowing what changes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::blocktrace::{Change, Placement, TrackError, Tracker};
use crate::capture::CaptureShared;
use crate::quiet::WriteCounters;
use crate::volume::Volume;
use blockferry_proto::CaptureKind;
use blockferry_util::DeviceKind;

/// Pages of buffer per CPU: 1 MiB, about 15,000 samples between two drains.
pub const RING_PAGES: usize = 256;
/// How long the tracking thread sleeps between drains when writes are few.
const DRAIN_EVERY: Duration = Duration::from_millis(20);

/// How the tracking thread reads its rings; tests change it to force losses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RingTuning {
    /// Pages of ring per CPU.
    pub(crate) pages: usize,
    /// Sleep this long between drains instead of waking when the rings fill.
    pub(crate) paused_drain: Option<Duration>,
    /// Ignore one write sample in this many.
    pub(crate) ignore_samples: Option<u64>,
    /// Where the samples come from (`--trace-source`).
    pub(crate) source: crate::blocktrace::TraceSource,
}

/// `--capture`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaptureMode {
    /// Block tracking for block devices, the tap for image files.
    #[default]
    Auto,
    Block,
    Tap,
    None,
}

impl std::str::FromStr for CaptureMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "block" => Ok(Self::Block),
            "tap" => Ok(Self::Tap),
            "none" => Ok(Self::None),
            _ => Err(format!(
                "unknown capture mode {s:?}: expected auto, block, tap or none"
            )),
        }
    }
}

/// What a run knows about its volumes' changes.
#[derive(Debug)]
pub(crate) struct Tracking {
    /// Block tracking runs for these volumes.
    pub(crate) tracked: bool,
    /// Changes made outside the agent's view cannot be known: rescan this often.
    pub(crate) rescan_every: Option<Duration>,
    /// Counts the losses of events; a session started before the latest must rescan.
    losses: watch::Sender<u64>,
    counters: Arc<TrackingCounters>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    shared: Option<Arc<Shared>>,
    /// Device numbers of the tracked volumes, for finding their file systems.
    devices: Vec<u64>,
    /// How each volume's changes are learnt, for heartbeats.
    pub(crate) modes: Vec<CaptureKind>,
}

/// What the tracking thread and a cut share.
#[derive(Debug)]
struct Shared {
    tracker: Mutex<Tracker>,
    /// Tracker volume → the agent's volume index.
    indices: Vec<usize>,
    capture: Arc<CaptureShared>,
    counters: Arc<TrackingCounters>,
    losses: watch::Sender<u64>,
}

impl Shared {
    /// Marks every write the rings hold dirty; returns how many there were. A loss is
    /// counted (and ends the sessions started before it).
    fn drain(&self, tracker: &mut Tracker) -> u64 {
        let (mut lost, mut writes) = (0, 0);
        tracker.drain(|change| match change {
            Change::Written {
                volume,
                offset,
                len,
            } => {
                writes += 1;
                self.capture.mark_dirty(self.indices[volume], offset, len);
            }
            Change::Lost(n) => lost += n,
            // Logged by the caller: this may run while file systems are frozen.
            Change::Unseen { .. } => lost += 1,
        });
        let (samples, total_lost, unseen) = tracker.counts();
        self.counters.samples.store(samples, Ordering::Relaxed);
        self.counters
            .lost
            .store(total_lost + unseen, Ordering::Relaxed);
        self.counters.writes.fetch_add(writes, Ordering::Relaxed);
        if lost > 0 {
            self.losses.send_modify(|n| *n += 1);
        }
        writes
    }
}

/// What tracking and freezing did, for heartbeats, metrics and tests.
#[derive(Debug, Default)]
pub struct TrackingCounters {
    /// Samples taken from the kernel's rings.
    pub samples: AtomicU64,
    /// Samples the kernel dropped, counted by the kernel, plus drains whose samples fell
    /// short of the disks' statistics.
    pub lost: AtomicU64,
    /// Completed writes, discards and write-zeroes marked dirty.
    pub writes: AtomicU64,
    /// Points cut under a freeze, and attempts that were given up.
    pub frozen_points: AtomicU64,
    pub freeze_failures: AtomicU64,
    /// Microseconds the file systems stayed frozen: the last freeze, the longest.
    pub last_freeze_us: AtomicU64,
    pub max_freeze_us: AtomicU64,
}

/// A point cut under a freeze.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrozenPoint {
    /// Bytes copied into the generation (0: nothing was dirty; the point is now).
    pub(crate) copied: u64,
    /// The capture write sequence number the point covers.
    pub(crate) write_seq: u64,
    pub(crate) file_systems: usize,
    pub(crate) frozen_for: Duration,
}

/// Why a frozen point could not be cut.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CutError {
    #[error("block tracking is not running")]
    NotTracking,
    #[error("cannot list the mounted file systems")]
    Mounts(#[source] std::io::Error),
    #[error(transparent)]
    Freeze(#[from] crate::freeze::FreezeError),
    #[error(transparent)]
    Copy(#[from] crate::capture::CopyError),
    #[error(
        "{0} writes reached the disks while their file systems were frozen: something writes to them outside a file system (a raw device, a file system that cannot be frozen)"
    )]
    WrittenWhileFrozen(u64),
    #[error("block-layer events were lost during the freeze")]
    Lost,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "--capture block tracks block devices only; {0} is an image file (use --capture auto or tap)"
    )]
    NotABlockDevice(String),
}

impl Tracking {
    /// Starts what `mode` asks for `volumes`, marking `capture`'s dirty map.
    pub(crate) fn start(
        mode: CaptureMode,
        volumes: &[Volume],
        capture: Arc<CaptureShared>,
        rescan_interval: Duration,
        tuning: RingTuning,
        counters: Arc<TrackingCounters>,
    ) -> Result<Self, CaptureError> {
        let (losses, _) = watch::channel(0u64);
        let mut tracking = Self {
            tracked: false,
            rescan_every: None,
            losses,
            counters,
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
            shared: None,
            devices: Vec::new(),
            modes: vec![CaptureKind::TAP; volumes.len()],
        };
        let block = |v: &Volume| v.kind == DeviceKind::BlockDevice;
        let devices = volumes.iter().any(|v| v.kind == DeviceKind::BlockDevice);
        match mode {
            CaptureMode::Tap => return Ok(tracking),
            CaptureMode::None => {
                tracing::warn!(
                    every_s = rescan_interval.as_secs(),
                    "--capture none: changes are not tracked; every disk is rescanned by checksum periodically"
                );
                tracking.rescan_every = Some(rescan_interval);
                tracking.modes = vec![CaptureKind::RESCANS; volumes.len()];
                return Ok(tracking);
            }
            CaptureMode::Block => {
                if let Some(file) = volumes.iter().find(|v| v.kind != DeviceKind::BlockDevice) {
                    return Err(CaptureError::NotABlockDevice(
                        file.path.display().to_string(),
                    ));
                }
            }
            CaptureMode::Auto if !devices => return Ok(tracking),
            CaptureMode::Auto => {}
        }
        match tracking.start_thread(volumes, capture, tuning) {
            Ok(()) => {
                tracking.tracked = true;
                for (mode, volume) in tracking.modes.iter_mut().zip(volumes) {
                    if block(volume) {
                        *mode = CaptureKind::BLOCK;
                    }
                }
            }
            Err(err) => {
                tracing::warn!(
                    error = %blockferry_util::error_chain(&err),
                    every_s = rescan_interval.as_secs(),
                    "block-layer change tracking cannot start; every disk is rescanned by checksum periodically instead"
                );
                tracking.rescan_every = Some(rescan_interval);
                // Rescans cover every disk, the tap's too.
                tracking.modes = vec![CaptureKind::TRACKING_UNAVAILABLE; volumes.len()];
            }
        }
        Ok(tracking)
    }

    fn start_thread(
        &mut self,
        volumes: &[Volume],
        capture: Arc<CaptureShared>,
        tuning: RingTuning,
    ) -> Result<(), TrackError> {
        // Volumes that are files are left to the tap (auto); placements keep the
        // volumes' indices for the dirty map.
        let mut placements = Vec::new();
        let mut indices = Vec::new();
        let mut devices = Vec::new();
        for (index, volume) in volumes.iter().enumerate() {
            if volume.kind == DeviceKind::BlockDevice {
                placements.push(Placement::of(&volume.path)?);
                indices.push(index);
                use std::os::unix::fs::MetadataExt;
                if let Ok(meta) = std::fs::metadata(&volume.path) {
                    devices.push(meta.rdev());
                }
            }
        }
        let mut tracker = Tracker::start_with(&placements, tuning.pages, tuning.source)?;
        tracing::info!(
            source = tracker.source(),
            disks = placements.len(),
            "block-layer change tracking started"
        );
        tracker.ignore_samples(tuning.ignore_samples);
        let waiter = tracker.waiter().map_err(TrackError::Filter)?;
        let shared = Arc::new(Shared {
            tracker: Mutex::new(tracker),
            indices,
            capture,
            counters: Arc::clone(&self.counters),
            losses: self.losses.clone(),
        });
        self.devices = devices;
        self.shared = Some(Arc::clone(&shared));
        let stop = Arc::clone(&self.stop);
        self.thread = Some(
            std::thread::Builder::new()
                .name("block-tracking".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        // Waiting without the tracker, so that a cut can take it at once.
                        match tuning.paused_drain {
                            Some(pause) => std::thread::sleep(pause),
                            None => waiter.wait(DRAIN_EVERY),
                        }
                        let mut tracker = shared.tracker.lock().unwrap_or_else(|p| p.into_inner());
                        let (_, lost_before, unseen_before) = tracker.counts();
                        shared.drain(&mut tracker);
                        let (_, lost, unseen) = tracker.counts();
                        if lost > lost_before {
                            tracing::warn!(
                                lost,
                                "the kernel dropped block-layer events: every tracked disk is rescanned by checksum (tracking_lost)"
                            );
                        }
                        if unseen > unseen_before {
                            tracing::warn!(
                                "a tracked disk's I/O statistics count writes that no block-layer event reported (the kernel dropped their events without counting them): every tracked disk is rescanned by checksum (tracking_lost)"
                            );
                        }
                    }
                })
                .map_err(|source| TrackError::Open { cpu: 0, source })?,
        );
        Ok(())
    }

    /// Cuts a crash-consistent point (blocking; see [`crate::freeze`]): freezes the file
    /// systems on the tracked disks, marks every write completed before, copies every
    /// dirty block into a frozen generation, checks that nothing was written meanwhile,
    /// and thaws. The file systems stay frozen for at most about `timeout`. On success
    /// the generation (if anything was dirty) is the capture's frozen one.
    pub(crate) fn cut_point(&self, timeout: Duration) -> Result<FrozenPoint, CutError> {
        let shared = self.shared.as_ref().ok_or(CutError::NotTracking)?;
        let mounts = crate::freeze::mounts_on(&self.devices).map_err(CutError::Mounts)?;
        // Taken before the freeze, so that waiting for it is not part of the window.
        let mut tracker = shared.tracker.lock().unwrap_or_else(|p| p.into_inner());
        let losses_before = *shared.losses.borrow();
        // Only a generation this cut makes is given up with it.
        let shipping = shared.capture.frozen_generation();
        let started = Instant::now();
        let frozen = crate::freeze::freeze(&mounts)?;
        let deadline = started + timeout;
        // Nothing below may log or touch a frozen file system until the thaw.
        shared.drain(&mut tracker);
        let copied = shared.capture.freeze_copied(deadline);
        let written_meanwhile = shared.drain(&mut tracker);
        let lost = *shared.losses.borrow() > losses_before;
        let generation = shared.capture.frozen_generation();
        let outcome = match copied {
            Err(err) => Err(CutError::Copy(err)),
            Ok(_) if lost => Err(CutError::Lost),
            Ok(_) if written_meanwhile > 0 => Err(CutError::WrittenWhileFrozen(written_meanwhile)),
            Ok(point) => Ok(point),
        };
        if outcome.is_err()
            && let Some(generation) = generation.filter(|&g| Some(g) != shipping)
        {
            shared.capture.abandon_generation(generation);
        }
        let file_systems = frozen.count();
        let thaw_failures = frozen.thaw();
        let frozen_for = started.elapsed();
        drop(tracker);
        for (point, err) in thaw_failures {
            tracing::error!(
                mount = %point.display(),
                error = %err,
                "cannot thaw a file system the agent froze: run `fsfreeze -u {}`",
                point.display()
            );
        }
        let us = frozen_for.as_micros().min(u128::from(u64::MAX)) as u64;
        self.counters.last_freeze_us.store(us, Ordering::Relaxed);
        self.counters.max_freeze_us.fetch_max(us, Ordering::Relaxed);
        match outcome {
            Ok(point) => {
                self.counters.frozen_points.fetch_add(1, Ordering::Relaxed);
                Ok(FrozenPoint {
                    copied: point.bytes,
                    write_seq: point.write_seq,
                    file_systems,
                    frozen_for,
                })
            }
            Err(err) => {
                self.counters
                    .freeze_failures
                    .fetch_add(1, Ordering::Relaxed);
                Err(err)
            }
        }
    }

    /// At a clean stop, before the dirty map is saved: reads the tracked volumes' write
    /// counters, then takes every event still in the rings (a write is traced before it
    /// is counted), so that the map then covers every write the counters include. No
    /// counters (nothing to prove) when events were lost since `losses_handled`.
    pub(crate) fn quiesce(
        &self,
        volumes: &[Volume],
        losses_handled: u64,
    ) -> Vec<Option<WriteCounters>> {
        let counters: Vec<Option<WriteCounters>> = volumes
            .iter()
            .zip(&self.modes)
            .map(|(volume, &mode)| {
                (mode == CaptureKind::BLOCK)
                    .then(|| WriteCounters::read(&volume.path))
                    .flatten()
            })
            .collect();
        let Some(shared) = &self.shared else {
            return vec![None; volumes.len()];
        };
        let mut tracker = shared.tracker.lock().unwrap_or_else(|p| p.into_inner());
        shared.drain(&mut tracker);
        if *shared.losses.borrow() > losses_handled {
            return vec![None; volumes.len()];
        }
        counters
    }

    /// Whether every tracked volume is provably unwritten since the stop that saved
    /// `saved` ([`crate::quiet`]); if not, why.
    pub(crate) fn unwritten_since(
        &self,
        volumes: &[Volume],
        saved: &[Option<WriteCounters>],
    ) -> Result<(), String> {
        for ((volume, &mode), saved) in volumes.iter().zip(&self.modes).zip(saved) {
            if mode != CaptureKind::BLOCK {
                continue;
            }
            let name = &volume.name;
            let Some(saved) = saved else {
                return Err(format!(
                    "the state record holds no write counters for {name}"
                ));
            };
            let Some(now) = WriteCounters::read(&volume.path) else {
                return Err(format!(
                    "the kernel reports no write counters (or no diskseq) for {name}"
                ));
            };
            if now.boot_id != saved.boot_id {
                return Err("the server booted since the agent stopped".to_owned());
            }
            if now.diskseq != saved.diskseq {
                return Err(format!(
                    "{name} is not the device it was at the stop (diskseq {} then, {} now)",
                    saved.diskseq, now.diskseq
                ));
            }
            if now != *saved {
                return Err(format!(
                    "{name} was written while the agent was stopped ({} writes, {} discards)",
                    now.writes.saturating_sub(saved.writes),
                    now.discards.saturating_sub(saved.discards)
                ));
            }
        }
        Ok(())
    }

    /// The heartbeat's account of tracking.
    pub(crate) fn beat(&self) -> blockferry_proto::TrackingBeat {
        let c = &self.counters;
        blockferry_proto::TrackingBeat {
            writes: c.writes.load(Ordering::Relaxed),
            lost: c.lost.load(Ordering::Relaxed),
            frozen_points: c.frozen_points.load(Ordering::Relaxed),
            freeze_failures: c.freeze_failures.load(Ordering::Relaxed),
            last_freeze_us: c.last_freeze_us.load(Ordering::Relaxed),
            max_freeze_us: c.max_freeze_us.load(Ordering::Relaxed),
            disks: self
                .modes
                .iter()
                .enumerate()
                .map(|(disk, &mode)| blockferry_proto::DiskCapture {
                    disk: u16::try_from(disk).expect("at most MAX_DISKS volumes"),
                    mode,
                })
                .collect(),
        }
    }

    /// Losses of events so far.
    pub(crate) fn losses(&self) -> u64 {
        *self.losses.borrow()
    }

    /// A token cancelled once a loss after `seen` happens, or when the periodic rescan
    /// is due: the session it is given to ends so that the next one claims
    /// `tracking_lost`.
    pub(crate) fn restart_token(&self, seen: u64) -> tokio_util::sync::CancellationToken {
        let token = tokio_util::sync::CancellationToken::new();
        let mut losses = self.losses.subscribe();
        let rescan = self.rescan_every;
        let cancel = token.clone();
        tokio::spawn(async move {
            let lost = losses.wait_for(|n| *n > seen);
            let due = async {
                match rescan {
                    Some(every) => tokio::time::sleep(every).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = lost => cancel.cancel(),
                () = due => cancel.cancel(),
                () = cancel.cancelled() => {}
            }
        });
        token
    }
}

impl Drop for Tracking {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
