//! What every session of a receiver shares: the catalog, the staging engine, the
//! registry of live sessions, the budgets and the operator-facing logs and metrics.
//!
//! It sits apart from the session code so that the operator-facing modules (admin,
//! control, status) can reach the receiver's state without importing the data path.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use blockferry_storage::Engine;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::registry::SessionRegistry;

/// What every session of a receiver shares.
#[derive(Debug)]
pub(crate) struct SessionContext {
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) engine: Engine,
    pub(crate) images_dir: PathBuf,
    pub(crate) settings: SessionSettings,
    pub(crate) registry: Arc<SessionRegistry>,
    pub(crate) shutdown: CancellationToken,
    /// Bytes of writes in flight across all sessions.
    pub(crate) global_budget: Arc<tokio::sync::Semaphore>,
    pub(crate) revocations: Arc<crate::revocation::Revocations>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) events: Arc<crate::events::EventLog>,
    /// Staging into EBS snapshot chains (`--backend ebs`); `None` stages into files only.
    pub(crate) ebs: Option<Arc<crate::snapshots::EbsStaging>>,
    /// Recovery points (EBS snapshots, or copies of the image files); `None`: none.
    pub(crate) points: Option<Arc<crate::points::RecoveryPoints>>,
    /// Receive buffers and connections waiting for a session.
    pub(crate) budget: Arc<crate::budget::ConnectionBudget>,
    /// Connection slots of every listener.
    pub(crate) admission: Arc<crate::admission::Admission>,
}

#[derive(Debug, Clone)]
pub(crate) struct SessionSettings {
    /// Streams granted to a session at most (never more than MAX_STREAMS).
    pub(crate) max_streams: u8,
    pub(crate) barrier_interval: u64,
    pub(crate) in_flight_budget: u32,
    pub(crate) heartbeat_interval: Duration,
    /// A stream with no frame at all for this long is dead (agents heartbeat on every
    /// stream); its session is closed so that the agent's next connection is not kept
    /// waiting.
    pub(crate) idle_timeout: Duration,
    /// A disk with changes waiting and no durable progress for this long is STALLED.
    pub(crate) stall_after: Duration,
    /// The largest disk a Hello may name.
    pub(crate) max_disk_size: u64,
}
