//! The receiver's transactional store (redb, `<data-dir>/catalog.redb`): source servers,
//! their disks, and per-disk initial-sync watermarks.
//!
//! Durability order (invariant 1): a watermark is recorded only with a
//! [`DurableEvidence`], which can only be built from the flush proofs of the staging
//! stores; redb's commit is itself durable (fsync) before it returns.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use blockferry_proto::limits::MAX_DISKS;
use blockferry_proto::{DiskState, Hello, Inventory, RescanReason, ResumeClaim};
use blockferry_storage::Flushed;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::pki::AgentIdentity;

/// server id → [`ServerRecord`] as JSON.
mod launches;
mod retired;
pub use launches::{
    BootRecord, CutOverRecord, ImageFormat, LaunchMode, LaunchRecord, LaunchedDisk,
};

const SERVERS: TableDefinition<&str, &[u8]> = TableDefinition::new("servers");
/// (server id, disk name) → [`DiskRecord`] as JSON.
const DISKS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("disks");
/// agent id → Unix seconds of its revocation.
const REVOKED: TableDefinition<&str, u64> = TableDefinition::new("revoked_agents");
/// token id → [`TokenRecord`] as JSON. Only a hash of each secret is stored.
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("enrollment_tokens");
/// server id → [`EnrolledRecord`] (JSON): the agent the control API enrolled last for a
/// server, so that a server id is taken from its enrollment on, before it ever connects.
const ENROLLED: TableDefinition<&str, &[u8]> = TableDefinition::new("enrolled_servers");
/// Per-server replication settings, by server id; [`DEFAULT_SETTINGS`] holds the template
/// copied to each server at its first session.
const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("server_settings");
/// (server id, consistent epoch) → [`RecoveryPointRecord`] (JSON): recovery points, EBS
/// snapshots or image copies.
const RECOVERY_POINTS: TableDefinition<(&str, u64), &[u8]> =
    TableDefinition::new("recovery_points");
/// The stall of a disk whose staging image is not the one the catalog recorded.
pub const STAGING_MISSING: &str = "staging_missing";

/// The template's key: not a valid server id, so it never collides with one.
const DEFAULT_SETTINGS: &str = "*";

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(
        "the catalog at {path} is in use by another process (is a receiver running on this data dir?)"
    )]
    Locked { path: PathBuf },
    #[error(
        "cannot open the catalog at {path}; the receiver has not changed it. If it is damaged, restore it from a backup, or move it aside to start with an empty catalog (every server then syncs its disks again from scratch, and agents must be enrolled again)"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("catalog transaction failed")]
    Storage(#[from] redb::Error),
    #[error("no source server {0} in the catalog (see `blockferry-receiver status`)")]
    UnknownServer(String),
    #[error("catalog record for {key} is corrupt")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for CatalogError {
            fn from(e: $t) -> Self {
                Self::Storage(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A source server as the receiver knows it. JSON field names are part of the status
/// interface.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerRecord {
    pub server_id: String,
    /// The agent installation that last connected for this server.
    pub agent_id: String,
    pub agent_version: String,
    pub inventory: InventoryRecord,
    /// Unix seconds.
    pub first_seen: u64,
    pub last_seen: u64,
    /// The server's consistent epoch: the highest epoch made durable on all of its
    /// streams and disks. Epochs continue across sessions.
    pub durable_epoch: u64,
    /// Unix milliseconds when `durable_epoch` became durable (0: never).
    #[serde(default)]
    pub consistent_at_ms: u64,
    /// The series (hex) of the agent process of the latest session: a reconnect of that
    /// process may resume from its in-memory dirty map.
    #[serde(default)]
    pub live_series: String,
    /// The chain id recorded at the agent's last clean shutdown; consumed by the next
    /// session, whatever it claims.
    #[serde(default)]
    pub checkpoint: Option<ChainId>,
}

/// What an operator does to one disk's record (`disk adopt | reset | forget`).
#[derive(Debug, Clone)]
pub enum DiskChange {
    /// The file now at the image's path is this disk's image, with this identity; what it
    /// holds is rescanned by checksum before it is trusted.
    Adopt(ImageId),
    /// Start over: a new empty image and a full initial sync.
    Reset,
    /// Remove the disk from the catalog (its image is dealt with by the caller).
    Forget,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskCommandError {
    #[error("source server {server} has no disk named {disk:?} (see `blockferry-receiver status`)")]
    NoSuchDisk { server: String, disk: String },
    #[error(
        "disk {disk} of source server {server} is in a live session; stop its agent first (or, to forget it, remove it from the agent's --disk list)"
    )]
    Connected { server: String, disk: String },
    #[error("{0}")]
    Image(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// Why a session could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(
        "source server {server} has {known} disk(s) in the catalog and this Hello adds {added}: at most {MAX_DISKS} per server; forget the ones it no longer replicates with `blockferry-receiver disk forget --server {server} --disk NAME`"
    )]
    TooManyDisks {
        server: String,
        known: usize,
        added: usize,
    },
    #[error(
        "source server {server} was cut over to its launched copy (at Unix ms {at_ms}): its replication is over; stop and remove its agent"
    )]
    CutOver { server: String, at_ms: u64 },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

impl<E: Into<redb::Error>> From<E> for RegisterError {
    fn from(err: E) -> Self {
        Self::Catalog(CatalogError::Storage(err.into()))
    }
}

/// Series (hex) and sequence number of an agent's clean-shutdown state record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChainId {
    pub series: String,
    pub seq: u64,
}

/// Lower-case hex of a series id.
pub fn series_hex(series: &[u8; 16]) -> String {
    series.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct InventoryRecord {
    pub host_name: String,
    pub host_id: String,
    pub cpus: Vec<CpuRecord>,
    pub ram_bytes: u64,
    pub os: String,
    pub disks: Vec<DiskSpecRecord>,
    pub private_ips: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CpuRecord {
    pub model: String,
    pub cores: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskSpecRecord {
    pub name: String,
    pub size: u64,
}

impl From<&Inventory> for InventoryRecord {
    fn from(inv: &Inventory) -> Self {
        Self {
            host_name: inv.host_name.clone(),
            host_id: inv.host_id.clone(),
            cpus: inv
                .cpus
                .iter()
                .map(|c| CpuRecord {
                    model: c.model.clone(),
                    cores: c.cores,
                })
                .collect(),
            ram_bytes: inv.ram_bytes,
            os: inv.os.clone(),
            disks: inv
                .disks
                .iter()
                .map(|d| DiskSpecRecord {
                    name: d.name.clone(),
                    size: d.size,
                })
                .collect(),
            private_ips: inv.private_ips.clone(),
        }
    }
}

/// What [`Catalog::register_session`] recorded and found.
#[derive(Debug)]
pub struct Registered {
    /// The server's consistent epoch.
    pub durable_epoch: u64,
    /// The disks, in Hello order.
    pub disks: Vec<DiskRecord>,
    /// The agent of the server's previous session (None: first contact).
    pub previous_agent: Option<String>,
    pub settings: ServerSettings,
}

/// One staging disk. JSON field names are part of the status interface.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskRecord {
    pub name: String,
    pub size: u64,
    /// Bytes of the initial sync durably in place.
    pub sync_watermark: u64,
    /// One of the DESIGN states: INITIAL_SYNC, CONTINUOUS, DISCONNECTED, …
    pub state: String,
    /// Why the disk entered its state: first_contact, disk_resized, …
    pub reason: String,
    /// The staging image (file or block device).
    pub image: PathBuf,
    /// Unix seconds.
    pub updated: u64,
    /// Why the disk must be rescanned, while a rescan is pending or running ("" when
    /// none): it survives reconnects until the agent's rescan is durable.
    #[serde(default)]
    pub rescan_reason: String,
    /// An operator asked for a rescan (`blockferry-receiver rescan`); taken by the next
    /// session.
    #[serde(default)]
    pub rescan_requested: bool,
    /// The reason of the latest rescan, kept after it completes ("" if there was none).
    #[serde(default)]
    pub last_rescan_reason: String,
    /// Bytes compared by checksum in the latest rescan.
    #[serde(default)]
    pub rescanned_bytes: u64,
    /// Bytes written to the disk (other than its initial sync) while the latest rescan
    /// ran: the blocks found different, plus changes made meanwhile.
    #[serde(default)]
    pub resent_bytes: u64,
    /// Why the disk cannot make progress whatever the agent does ("" when it can):
    /// `staging_full` or `staging_error` (a write or flush failed otherwise; both cleared
    /// by the next write made durable on it) or `staging_missing`
    /// (cleared once the image the catalog recorded is found again, or by an operator's
    /// `disk adopt` or `disk reset`).
    #[serde(default)]
    pub stall: String,
    /// What the stall is about, for people (the path of a missing image, say).
    #[serde(default)]
    pub stall_detail: String,
    /// Which file the staging image is; `None` until the first session that opens it
    /// (and for records of older receivers).
    #[serde(default)]
    pub image_id: Option<ImageId>,
}

/// The identity of a staging image: a random id kept beside it (`DISK.img.id`) and the
/// file it was created as. An image that is missing, or another file in its place (a
/// volume not mounted, a restore, a copy), does not have it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageId {
    pub uuid: String,
    /// `st_dev` and `st_ino` of a file; 0 and `st_rdev` of a block device.
    pub device: u64,
    pub inode: u64,
    /// The file's birth time (ns), 0 where the file system keeps none.
    #[serde(default)]
    pub born_ns: u64,
}

impl DiskRecord {
    /// A disk seen for the first time: nothing synced, its image at `image`.
    pub fn new(name: &str, size: u64, image: PathBuf) -> Self {
        Self {
            name: name.to_owned(),
            size,
            sync_watermark: 0,
            state: String::new(),
            reason: String::new(),
            image,
            updated: 0,
            rescan_reason: String::new(),
            rescan_requested: false,
            last_rescan_reason: String::new(),
            rescanned_bytes: 0,
            resent_bytes: 0,
            stall: String::new(),
            stall_detail: String::new(),
            image_id: None,
        }
    }

    pub fn sync_complete(&self) -> bool {
        self.sync_watermark >= self.size
    }

    /// Why the agent must rescan this disk now.
    pub fn rescan(&self) -> RescanReason {
        if self.rescan_reason.is_empty() {
            RescanReason::NONE
        } else {
            // A reason written by a newer receiver is still a reason to rescan.
            RescanReason::from_name(&self.rescan_reason).unwrap_or(RescanReason::STATE_MISMATCH)
        }
    }

    pub fn disk_state(&self) -> DiskState {
        match self.state.as_str() {
            "INITIATING" => DiskState::INITIATING,
            "CONTINUOUS" => DiskState::CONTINUOUS,
            "RESCAN" => DiskState::RESCAN,
            "BACKLOG" => DiskState::BACKLOG,
            "STALLED" => DiskState::STALLED,
            "DISCONNECTED" => DiskState::DISCONNECTED,
            "PAUSED" => DiskState::PAUSED,
            _ => DiskState::INITIAL_SYNC,
        }
    }

    fn set_state(&mut self, state: DiskState, reason: &str) {
        self.state = state.name().to_owned();
        self.reason = reason.to_owned();
        self.updated = now();
    }
}

/// What an operator sets per source server (`settings set`). JSON field names are part
/// of the status interface.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerSettings {
    /// The agent's bandwidth limit, all streams together, in megabits per second
    /// (10^6 bit/s); 0 is unlimited.
    pub bandwidth_mbps: u64,
    /// An operator paused the server's replication (`pause`): its agent sends nothing
    /// but heartbeats, and keeps tracking changes, until `resume`.
    #[serde(default)]
    pub paused: bool,
    /// Which recovery points are kept; `None`: the template's, or the built-in default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<crate::retention::RetentionPolicy>,
}

/// What an operator changes of a server's settings; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SettingsChange {
    pub bandwidth_mbps: Option<u64>,
    pub paused: Option<bool>,
    #[serde(default)]
    pub retention: Option<crate::retention::RetentionPolicy>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("no source server {0} in the catalog (see `blockferry-receiver status`)")]
    NoSuchServer(String),
    #[error(
        "a pause applies to one server (`--server ID`), not to the template for servers to come"
    )]
    PauseTemplate,
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

impl ServerSettings {
    /// The limit in bytes per second, as the agent enforces it (0: unlimited).
    pub fn bandwidth_limit(&self) -> u64 {
        self.bandwidth_mbps.saturating_mul(125_000)
    }
}

/// An enrollment token as stored: the SHA-256 of its secret (hex), never the secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    /// The first 16 hex digits of the hash: what `token list` shows and `token revoke`
    /// takes.
    pub id: String,
    pub secret_sha256: String,
    /// Unix seconds.
    pub created: u64,
    pub expires: u64,
    /// Enrollments allowed, and made.
    pub uses: u32,
    pub used: u32,
    pub revoked: bool,
    /// The one server this token enrolls; `None`: any server id the catalog does not know
    /// yet. Tokens from before binding existed read as `None`.
    #[serde(default)]
    pub server: Option<String>,
    /// The token re-enrolls `server`, which must exist (a reinstall: its previous agent is
    /// revoked and its disks rescan). Without it a token only ever creates a new server.
    #[serde(default)]
    pub reinstall: bool,
}

/// The agent the control API enrolled last for a server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnrolledRecord {
    pub agent_id: String,
    /// Unix seconds.
    pub enrolled_at: u64,
    /// The id of the token used.
    pub token: String,
}

/// What an enrollment committed: the token as used, and the agents it revoked (a
/// reinstall's predecessors).
#[derive(Debug)]
pub struct Enrollment {
    pub token: TokenRecord,
    pub revoked: Vec<String>,
}

/// The id of the token whose secret hashes to `secret_sha256`.
pub fn token_id(secret_sha256: &str) -> String {
    secret_sha256.chars().take(16).collect()
}

/// Why a token was not accepted. The enrollment API tells the agent which.
#[derive(Debug, thiserror::Error)]
pub enum TokenRefusal {
    #[error(
        "the enrollment token is not known to this receiver (forged, mistyped, or from another receiver)"
    )]
    Unknown,
    #[error(
        "the enrollment token has expired; create a new one with `blockferry-receiver token create`"
    )]
    Expired,
    #[error("the enrollment token has already been used as many times as it allows")]
    UsedUp,
    #[error("the enrollment token was revoked by an operator")]
    Revoked,
    #[error(
        "the enrollment token is for server {token_server} only, not {requested}; enroll with --server-id {token_server}, or ask for a token for {requested}"
    )]
    WrongServer {
        token_server: String,
        requested: String,
    },
    #[error(
        "server {0} is already enrolled; re-enrolling it (a reinstall, which revokes its agent) needs a token made for it: blockferry-receiver token create --server {0} --reinstall"
    )]
    ServerExists(String),
    #[error(
        "the token re-enrolls server {0}, which this receiver does not know; a new server needs a token without --reinstall"
    )]
    NothingToReinstall(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

impl TokenRefusal {
    /// The reason label of `blockferry_enrollment_refusals_total`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unknown => "unknown_token",
            Self::Expired => "expired",
            Self::UsedUp => "used_up",
            Self::Revoked => "revoked",
            Self::WrongServer { .. } => "wrong_server",
            Self::ServerExists(_) => "server_exists",
            Self::NothingToReinstall(_) => "nothing_to_reinstall",
            Self::Catalog(_) => "catalog_error",
        }
    }
}

/// Compares secrets without leaking where they differ through timing.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A rescan's counters at a durable barrier, and whether the agent claimed it complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RescanProgress {
    pub disk: String,
    pub rescanned_bytes: u64,
    pub resent_bytes: u64,
    pub done: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RescanRequestError {
    #[error("no source server {0} in the catalog (see `blockferry-receiver status`)")]
    NoSuchServer(String),
    #[error("source server {server} has no disk named {disk:?}")]
    NoSuchDisk { server: String, disk: String },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// Why the agent's claim about its changes cannot be trusted, or `None` if it can.
fn resume_verdict(
    previous: &ServerRecord,
    identity: &AgentIdentity,
    hello: &Hello,
) -> Option<RescanReason> {
    if previous.agent_id != identity.agent_id {
        return Some(RescanReason::AGENT_REINSTALLED);
    }
    match hello.resume {
        ResumeClaim::Live if previous.live_series == series_hex(&hello.series) => None,
        ResumeClaim::Checkpoint { series, seq }
            if previous
                .checkpoint
                .as_ref()
                .is_some_and(|c| c.series == series_hex(&series) && c.seq == seq) =>
        {
            None
        }
        ResumeClaim::NoRecord => Some(RescanReason::UNCLEAN_SHUTDOWN),
        ResumeClaim::RescanRequested => Some(RescanReason::OPERATOR_REQUEST),
        ResumeClaim::TrackingLost => Some(RescanReason::TRACKING_LOST),
        ResumeClaim::Live
        | ResumeClaim::Checkpoint { .. }
        | ResumeClaim::InvalidRecord
        | ResumeClaim::Unknown { .. } => Some(RescanReason::STATE_MISMATCH),
    }
}

/// Evidence that every staging store of a session was flushed after the writes a barrier
/// covers. Only flush proofs make one.
/// A crash-consistent point of all of a server's disks, held as one EBS snapshot per disk.
/// The keys are an interface (status JSON), documented in the README.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryPointRecord {
    /// The server's consistent epoch the point was cut at; its id.
    pub epoch: u64,
    /// Unix ms of the cut, and of the completion of its last snapshot.
    pub cut_at_ms: u64,
    pub completed_at_ms: u64,
    pub disks: Vec<SnapshotRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub disk: String,
    pub size: u64,
    pub snapshot_id: String,
    /// The snapshot this one is a child of (none for a chain's first).
    pub parent: Option<String>,
    /// Blocks written to this snapshot; 0 when the disk did not change since the previous
    /// point (whose snapshot this point shares).
    pub changed_blocks: u32,
    /// File backend: the point's image (`snapshot_id` is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// File backend: how the image was made, `reflink` or `copy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<String>,
}

impl SnapshotRecord {
    /// Where the disk's point is: its snapshot, or its image file.
    pub fn location(&self) -> String {
        match &self.image {
            Some(image) => image.display().to_string(),
            None => self.snapshot_id.clone(),
        }
    }
}

#[derive(Debug)]
pub struct DurableEvidence {
    _flushed: Vec<Flushed>,
}

impl DurableEvidence {
    pub fn new(flushed: Vec<Flushed>) -> Self {
        Self { _flushed: flushed }
    }
}

/// An epoch committed durable by [`Catalog::record_durable`], which only takes it with the
/// flush proofs of the staging stores: what a session needs to tell its agent `Durable`.
#[derive(Debug)]
pub struct DurableRecord {
    epoch: u64,
    completed: Vec<String>,
}

impl DurableRecord {
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Disks whose initial sync or rescan this epoch completed.
    pub fn completed(&self) -> &[String] {
        &self.completed
    }

    /// A record for the session core's unit tests, which have no staging stores.
    #[cfg(test)]
    pub(crate) fn for_test(epoch: u64) -> Self {
        Self {
            epoch,
            completed: Vec::new(),
        }
    }
}

#[derive(Debug)]
pub struct Catalog {
    db: Database,
}

impl Catalog {
    /// Opens (creating if needed) the catalog in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, CatalogError> {
        let path = data_dir.join("catalog.redb");
        let db = Database::create(&path).map_err(|source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => CatalogError::Locked { path: path.clone() },
            source => CatalogError::Open {
                path: path.clone(),
                source: source.into(),
            },
        })?;
        // A file that opens may still be damaged inside, or be some other redb database:
        // its tables say so, and the error names the file as above.
        let tables = || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(SERVERS)?;
            txn.open_table(DISKS)?;
            txn.open_table(REVOKED)?;
            txn.open_table(TOKENS)?;
            txn.open_table(SETTINGS)?;
            txn.open_table(RECOVERY_POINTS)?;
            txn.open_table(ENROLLED)?;
            txn.open_table(launches::LAUNCHES)?;
            txn.open_table(launches::CUT_OVER)?;
            txn.open_table(retired::RETIRED_SNAPSHOTS)?;
            txn.commit()?;
            Ok(())
        };
        tables().map_err(|source| CatalogError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Self { db })
    }

    /// Records a new session of `identity`: the server's inventory, and each disk of the
    /// Hello, created or resumed, with the reason it must be rescanned if the agent's
    /// claim about its changes cannot be trusted. Returns the server's consistent epoch,
    /// the disks in Hello order, the previous session's agent and the server's settings.
    /// A disk whose size changed starts its initial sync again into the resized image.
    ///
    /// A server has at most [`MAX_DISKS`] disks in the catalog, counting those of earlier
    /// sessions that this Hello does not name: a Hello that would go beyond is refused
    /// and records nothing.
    pub fn register_session(
        &self,
        identity: &AgentIdentity,
        hello: &Hello,
        images_dir: &Path,
    ) -> Result<Registered, RegisterError> {
        let txn = self.db.begin_write()?;
        {
            let server = identity.server_id.as_str();
            if let Some(raw) = txn.open_table(launches::CUT_OVER)?.get(server)? {
                let mark: CutOverRecord = decode(server, raw.value())?;
                return Err(RegisterError::CutOver {
                    server: server.to_owned(),
                    at_ms: mark.at_ms,
                });
            }
        }
        {
            let disks = txn.open_table(DISKS)?;
            let server = identity.server_id.as_str();
            let mut known = Vec::new();
            for entry in disks.range((server, "")..)? {
                let (key, _) = entry?;
                let (disk_server, name) = key.value();
                if disk_server != server {
                    break;
                }
                known.push(name.to_owned());
            }
            let added = hello
                .disks
                .iter()
                .filter(|d| !known.contains(&d.name))
                .count();
            if known.len() + added > MAX_DISKS {
                return Err(RegisterError::TooManyDisks {
                    server: server.to_owned(),
                    known: known.len(),
                    added,
                });
            }
        }
        let mut disks_out = Vec::with_capacity(hello.disks.len());
        let durable_epoch;
        let previous_agent;
        let server_settings;
        {
            let mut servers = txn.open_table(SERVERS)?;
            let now = now();
            let previous: Option<ServerRecord> = match servers.get(identity.server_id.as_str())? {
                Some(raw) => Some(decode(&identity.server_id, raw.value())?),
                None => None,
            };
            // Whether the changes the receiver lacks are exactly the agent's dirty map.
            let untrusted = previous
                .as_ref()
                .and_then(|p| resume_verdict(p, identity, hello));
            let record = ServerRecord {
                server_id: identity.server_id.clone(),
                agent_id: identity.agent_id.clone(),
                agent_version: hello.agent_version.clone(),
                inventory: InventoryRecord::from(&hello.inventory),
                first_seen: previous.as_ref().map_or(now, |p| p.first_seen),
                last_seen: now,
                durable_epoch: previous.as_ref().map_or(0, |p| p.durable_epoch),
                consistent_at_ms: previous.as_ref().map_or(0, |p| p.consistent_at_ms),
                live_series: series_hex(&hello.series),
                // A checkpoint is good for one resume, matched or not.
                checkpoint: None,
            };
            durable_epoch = record.durable_epoch;
            previous_agent = previous.as_ref().map(|p| p.agent_id.clone());
            servers.insert(identity.server_id.as_str(), encode(&record).as_slice())?;
            // A new server gets the template's settings, unless an operator set its own
            // before it first connected.
            let mut settings = txn.open_table(SETTINGS)?;
            let own = settings
                .get(identity.server_id.as_str())?
                .map(|raw| raw.value().to_vec());
            let raw = match own {
                Some(raw) => raw,
                None => {
                    let template = match settings.get(DEFAULT_SETTINGS)? {
                        Some(raw) => raw.value().to_vec(),
                        None => encode(&ServerSettings::default()),
                    };
                    settings.insert(identity.server_id.as_str(), template.as_slice())?;
                    template
                }
            };
            server_settings = decode(&identity.server_id, &raw)?;

            let mut disks = txn.open_table(DISKS)?;
            for spec in &hello.disks {
                let key = (identity.server_id.as_str(), spec.name.as_str());
                let existing: Option<DiskRecord> = match disks.get(key)? {
                    Some(raw) => Some(decode(&spec.name, raw.value())?),
                    None => None,
                };
                let mut disk = match existing {
                    Some(d) if d.size == spec.size => {
                        let mut d = d;
                        let reason = if !d.rescan_reason.is_empty() {
                            // An unfinished rescan goes on, for its original reason.
                            None
                        } else if d.rescan_requested {
                            Some(RescanReason::OPERATOR_REQUEST)
                        } else {
                            untrusted
                        };
                        // Nothing below the watermark is in place for a disk that has
                        // not synced anything yet: no rescan needed.
                        if let Some(reason) = reason.filter(|_| d.sync_watermark > 0) {
                            d.rescan_reason = reason.name().to_owned();
                            d.last_rescan_reason = d.rescan_reason.clone();
                            d.rescanned_bytes = 0;
                            d.resent_bytes = 0;
                        }
                        d.rescan_requested = false;
                        d
                    }
                    Some(mut d) => {
                        d.size = spec.size;
                        d.sync_watermark = 0;
                        d.rescan_reason.clear();
                        d.rescan_requested = false;
                        d.set_state(DiskState::INITIAL_SYNC, "disk_resized");
                        d
                    }
                    None => {
                        let mut d = DiskRecord::new(
                            &spec.name,
                            spec.size,
                            images_dir
                                .join(&identity.server_id)
                                .join(format!("{}.img", spec.name)),
                        );
                        let reason = if previous.is_some() {
                            RescanReason::DISK_ADDED
                        } else {
                            RescanReason::FIRST_CONTACT
                        };
                        d.set_state(DiskState::INITIAL_SYNC, reason.name());
                        d
                    }
                };
                if disk.sync_complete() {
                    if !disk.rescan_reason.is_empty() {
                        let reason = disk.rescan_reason.clone();
                        disk.set_state(DiskState::RESCAN, &reason);
                    } else if disk.disk_state() != DiskState::CONTINUOUS {
                        disk.set_state(DiskState::CONTINUOUS, "reconnected");
                    }
                } else if disk.disk_state() != DiskState::INITIAL_SYNC {
                    disk.set_state(DiskState::INITIAL_SYNC, "reconnected");
                }
                disks.insert(key, encode(&disk).as_slice())?;
                disks_out.push(disk);
            }
        }
        txn.commit().map_err(CatalogError::from)?;
        Ok(Registered {
            durable_epoch,
            disks: disks_out,
            previous_agent,
            settings: server_settings,
        })
    }

    /// Records the chain id of the state an agent is about to save at a clean shutdown.
    /// Durable when this returns.
    pub fn record_checkpoint(
        &self,
        server_id: &str,
        series: &[u8; 16],
        seq: u64,
    ) -> Result<(), CatalogError> {
        let txn = self.db.begin_write()?;
        {
            let mut servers = txn.open_table(SERVERS)?;
            let server = match servers.get(server_id)? {
                Some(raw) => Some(decode::<ServerRecord>(server_id, raw.value())?),
                None => None,
            };
            if let Some(mut server) = server {
                server.checkpoint = Some(ChainId {
                    series: series_hex(series),
                    seq,
                });
                servers.insert(server_id, encode(&server).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Asks for a rescan of `disk` (or every disk) of `server_id` at the agent's next
    /// session. Returns the disks marked; an unknown server or disk is an error.
    pub fn request_rescan(
        &self,
        server_id: &str,
        disk: Option<&str>,
    ) -> Result<Vec<String>, RescanRequestError> {
        let txn = self.db.begin_write().map_err(CatalogError::from)?;
        let mut marked = Vec::new();
        {
            let servers = txn.open_table(SERVERS).map_err(CatalogError::from)?;
            if servers
                .get(server_id)
                .map_err(CatalogError::from)?
                .is_none()
            {
                return Err(RescanRequestError::NoSuchServer(server_id.to_owned()));
            }
            let mut disks = txn.open_table(DISKS).map_err(CatalogError::from)?;
            let mut records = Vec::new();
            for entry in disks.range((server_id, "")..).map_err(CatalogError::from)? {
                let (key, value) = entry.map_err(CatalogError::from)?;
                let (disk_server, name) = key.value();
                if disk_server != server_id {
                    break;
                }
                if disk.is_none_or(|d| d == name) {
                    records.push(decode::<DiskRecord>(name, value.value())?);
                }
            }
            if records.is_empty() {
                return Err(RescanRequestError::NoSuchDisk {
                    server: server_id.to_owned(),
                    disk: disk.unwrap_or_default().to_owned(),
                });
            }
            for mut record in records {
                record.rescan_requested = true;
                record.updated = now();
                disks
                    .insert(
                        (server_id, record.name.as_str()),
                        encode(&record).as_slice(),
                    )
                    .map_err(CatalogError::from)?;
                marked.push(record.name);
            }
        }
        txn.commit().map_err(CatalogError::from)?;
        Ok(marked)
    }

    /// Records that `epoch` is durable for `server_id`, with the initial-sync progress the
    /// barrier claimed (disk name, watermark). Watermarks only move forward. A stall of a
    /// disk in `written` (disks with writes in the epoch) is over.
    pub fn record_durable(
        &self,
        _evidence: DurableEvidence,
        server_id: &str,
        epoch: u64,
        progress: &[(String, u64)],
        rescans: &[RescanProgress],
        written: &[String],
    ) -> Result<DurableRecord, CatalogError> {
        let txn = self.db.begin_write()?;
        // Disks whose initial sync or rescan this epoch completed.
        let mut completed = Vec::new();
        {
            let mut servers = txn.open_table(SERVERS)?;
            let server = match servers.get(server_id)? {
                Some(raw) => Some(decode::<ServerRecord>(server_id, raw.value())?),
                None => None,
            };
            if let Some(mut server) = server {
                server.durable_epoch = server.durable_epoch.max(epoch);
                server.consistent_at_ms = now_ms();
                servers.insert(server_id, encode(&server).as_slice())?;
            }
            let mut disks = txn.open_table(DISKS)?;
            for (name, watermark) in progress {
                let key = (server_id, name.as_str());
                let disk = match disks.get(key)? {
                    Some(raw) => Some(decode::<DiskRecord>(name, raw.value())?),
                    None => None,
                };
                let Some(mut disk) = disk else { continue };
                let watermark = (*watermark).min(disk.size);
                if watermark <= disk.sync_watermark {
                    continue;
                }
                disk.sync_watermark = watermark;
                disk.updated = now();
                if disk.sync_complete() {
                    if disk.rescan_reason.is_empty() {
                        disk.set_state(DiskState::CONTINUOUS, "initial_sync_complete");
                        completed.push(disk.name.clone());
                    } else {
                        let reason = disk.rescan_reason.clone();
                        disk.set_state(DiskState::RESCAN, &reason);
                    }
                }
                disks.insert(key, encode(&disk).as_slice())?;
            }
            for rescan in rescans {
                let key = (server_id, rescan.disk.as_str());
                let disk = match disks.get(key)? {
                    Some(raw) => Some(decode::<DiskRecord>(&rescan.disk, raw.value())?),
                    None => None,
                };
                let Some(mut disk) = disk else { continue };
                disk.rescanned_bytes = rescan.rescanned_bytes;
                disk.resent_bytes = rescan.resent_bytes;
                if rescan.done && !disk.rescan_reason.is_empty() {
                    disk.rescan_reason.clear();
                    if disk.sync_complete() {
                        disk.set_state(DiskState::CONTINUOUS, "rescan_complete");
                        completed.push(disk.name.clone());
                    }
                }
                disks.insert(key, encode(&disk).as_slice())?;
            }
            for name in written {
                let key = (server_id, name.as_str());
                let disk = match disks.get(key)? {
                    Some(raw) => Some(decode::<DiskRecord>(name, raw.value())?),
                    None => None,
                };
                // A missing image is not cured by writes to whatever is there now.
                if let Some(mut disk) =
                    disk.filter(|d| !d.stall.is_empty() && d.stall != STAGING_MISSING)
                {
                    disk.stall.clear();
                    disk.stall_detail.clear();
                    disk.updated = now();
                    disks.insert(key, encode(&disk).as_slice())?;
                }
            }
        }
        txn.commit()?;
        Ok(DurableRecord { epoch, completed })
    }

    /// Records that a disk cannot make progress for `reason` (e.g. `staging_full`), until
    /// a write to it is made durable again.
    pub fn mark_stalled(
        &self,
        server_id: &str,
        disk: &str,
        reason: &str,
        detail: &str,
    ) -> Result<(), CatalogError> {
        let txn = self.db.begin_write()?;
        {
            let mut disks = txn.open_table(DISKS)?;
            let key = (server_id, disk);
            let record = match disks.get(key)? {
                Some(raw) => Some(decode::<DiskRecord>(disk, raw.value())?),
                None => None,
            };
            if let Some(mut record) = record {
                record.stall = reason.to_owned();
                record.stall_detail = detail.to_owned();
                record.updated = now();
                disks.insert(key, encode(&record).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Changes the settings of `server_id`, or of the template for servers to come
    /// (`None`), and returns them as they now are. A server without settings of its own
    /// starts from the template, as it would at its first connection. Only a server the
    /// catalog knows can be paused: a pause of a mistyped id would pause nothing.
    pub fn update_settings(
        &self,
        server_id: Option<&str>,
        change: SettingsChange,
    ) -> Result<ServerSettings, SettingsError> {
        let txn = self.db.begin_write().map_err(CatalogError::from)?;
        let settings = {
            match (server_id, change.paused) {
                (None, Some(_)) => return Err(SettingsError::PauseTemplate),
                (Some(server), Some(_)) => {
                    let servers = txn.open_table(SERVERS).map_err(CatalogError::from)?;
                    if servers.get(server).map_err(CatalogError::from)?.is_none() {
                        return Err(SettingsError::NoSuchServer(server.to_owned()));
                    }
                }
                (_, None) => {}
            }
            let mut table = txn.open_table(SETTINGS).map_err(CatalogError::from)?;
            let key = server_id.unwrap_or(DEFAULT_SETTINGS);
            let current = match table.get(key).map_err(CatalogError::from)? {
                Some(raw) => Some(decode::<ServerSettings>(key, raw.value())?),
                None => None,
            };
            let current = match current {
                Some(own) => own,
                None => match table.get(DEFAULT_SETTINGS).map_err(CatalogError::from)? {
                    Some(raw) => decode(DEFAULT_SETTINGS, raw.value())?,
                    None => ServerSettings::default(),
                },
            };
            let settings = ServerSettings {
                bandwidth_mbps: change.bandwidth_mbps.unwrap_or(current.bandwidth_mbps),
                paused: change.paused.unwrap_or(current.paused),
                retention: change.retention.or(current.retention),
            };
            table
                .insert(key, encode(&settings).as_slice())
                .map_err(CatalogError::from)?;
            settings
        };
        txn.commit().map_err(CatalogError::from)?;
        Ok(settings)
    }

    /// The template, and every server's own settings, by server id.
    pub fn all_settings(
        &self,
    ) -> Result<(ServerSettings, Vec<(String, ServerSettings)>), CatalogError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SETTINGS)?;
        let mut template = ServerSettings::default();
        let mut servers = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let settings: ServerSettings = decode(key.value(), value.value())?;
            if key.value() == DEFAULT_SETTINGS {
                template = settings;
            } else {
                servers.push((key.value().to_owned(), settings));
            }
        }
        Ok((template, servers))
    }

    /// The retention policy of `server_id`: its own, else the template's, else the
    /// built-in one.
    pub fn retention(
        &self,
        server_id: &str,
    ) -> Result<crate::retention::RetentionPolicy, CatalogError> {
        let (template, servers) = self.all_settings()?;
        let own = servers
            .into_iter()
            .find(|(id, _)| id == server_id)
            .and_then(|(_, s)| s.retention);
        Ok(own.or(template.retention).unwrap_or_default())
    }

    /// Removes recovery point `epoch` of `server_id` from the catalog; returns it, if it
    /// was there. Its copies (images, snapshots) are the caller's to delete, after.
    pub fn delete_recovery_point(
        &self,
        server_id: &str,
        epoch: u64,
    ) -> Result<Option<RecoveryPointRecord>, CatalogError> {
        let txn = self.db.begin_write()?;
        let removed = {
            let mut table = txn.open_table(RECOVERY_POINTS)?;
            let removed = table.remove((server_id, epoch))?;
            match removed {
                Some(raw) => Some(decode::<RecoveryPointRecord>(
                    &format!("{server_id}@{epoch}"),
                    raw.value(),
                )?),
                None => None,
            }
        };
        txn.commit()?;
        Ok(removed)
    }

    /// Marks the disks of a server whose session ended.
    pub fn mark_disconnected(
        &self,
        server_id: &str,
        disk_names: &[String],
        reason: &str,
    ) -> Result<(), CatalogError> {
        let txn = self.db.begin_write()?;
        {
            let mut disks = txn.open_table(DISKS)?;
            for name in disk_names {
                let key = (server_id, name.as_str());
                let disk = match disks.get(key)? {
                    Some(raw) => Some(decode::<DiskRecord>(name, raw.value())?),
                    None => None,
                };
                if let Some(mut disk) = disk {
                    disk.set_state(DiskState::DISCONNECTED, reason);
                    disks.insert(key, encode(&disk).as_slice())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Every server with its disks, ordered by server id and disk name.
    pub fn servers(&self) -> Result<Vec<(ServerRecord, Vec<DiskRecord>)>, CatalogError> {
        let txn = self.db.begin_read()?;
        let servers = txn.open_table(SERVERS)?;
        let disks = txn.open_table(DISKS)?;
        let mut out = Vec::new();
        for entry in servers.iter()? {
            let (key, value) = entry?;
            let server: ServerRecord = decode(key.value(), value.value())?;
            let mut server_disks = Vec::new();
            let id = server.server_id.as_str();
            for entry in disks.range((id, "")..)? {
                let (key, value) = entry?;
                let (disk_server, disk_name) = key.value();
                if disk_server != id {
                    break;
                }
                server_disks.push(decode(disk_name, value.value())?);
            }
            out.push((server, server_disks));
        }
        Ok(out)
    }

    /// Revokes `agent_id` for good. Returns the server it last connected for, if any
    /// (an agent that never connected can be revoked too).
    pub fn revoke_agent(&self, agent_id: &str) -> Result<Option<String>, CatalogError> {
        let txn = self.db.begin_write()?;
        let mut server = None;
        {
            let servers = txn.open_table(SERVERS)?;
            for entry in servers.iter()? {
                let (key, value) = entry?;
                let record: ServerRecord = decode(key.value(), value.value())?;
                if record.agent_id == agent_id {
                    server = Some(record.server_id);
                }
            }
            let mut revoked = txn.open_table(REVOKED)?;
            if revoked.get(agent_id)?.is_none() {
                revoked.insert(agent_id, now())?;
            }
        }
        txn.commit()?;
        Ok(server)
    }

    /// Stores a new enrollment token (its secret's hash, never the secret). A token bound
    /// to a server must fit what the catalog knows now: a reinstall token needs the
    /// server, a new-server token needs its id free (both are checked again at
    /// enrollment).
    pub fn add_token(&self, record: &TokenRecord) -> Result<(), TokenRefusal> {
        let txn = self.db.begin_write().map_err(CatalogError::from)?;
        if let Some(server) = &record.server {
            let known = txn
                .open_table(SERVERS)
                .map_err(CatalogError::from)?
                .get(server.as_str())
                .map_err(CatalogError::from)?
                .is_some()
                || txn
                    .open_table(ENROLLED)
                    .map_err(CatalogError::from)?
                    .get(server.as_str())
                    .map_err(CatalogError::from)?
                    .is_some();
            match (known, record.reinstall) {
                (true, false) => return Err(TokenRefusal::ServerExists(server.clone())),
                (false, true) => return Err(TokenRefusal::NothingToReinstall(server.clone())),
                _ => {}
            }
        }
        txn.open_table(TOKENS)
            .map_err(CatalogError::from)?
            .insert(record.id.as_str(), encode(record).as_slice())
            .map_err(CatalogError::from)?;
        txn.commit().map_err(CatalogError::from)?;
        Ok(())
    }

    /// Enrolls `identity` with the token whose secret hashes to `secret_sha256`, in one
    /// transaction: checks that the token exists, is not revoked, expired or used up, and
    /// that it may enroll this server — a token bound to a server enrolls only that one; a
    /// server the catalog knows (it connected, or was enrolled) can only be re-enrolled by
    /// a reinstall token made for it, which revokes its previous agents — then counts the
    /// use and records the server's new agent. Nothing is written if anything is refused.
    pub fn enroll(
        &self,
        secret_sha256: &str,
        identity: &AgentIdentity,
    ) -> Result<Enrollment, TokenRefusal> {
        let txn = self.db.begin_write().map_err(CatalogError::from)?;
        let enrollment = {
            let mut tokens = txn.open_table(TOKENS).map_err(CatalogError::from)?;
            let id = token_id(secret_sha256);
            let record = match tokens.get(id.as_str()).map_err(CatalogError::from)? {
                Some(raw) => decode::<TokenRecord>(&id, raw.value())?,
                None => return Err(TokenRefusal::Unknown),
            };
            // The id is a prefix of the hash; the whole hash must match.
            if !constant_time_eq(record.secret_sha256.as_bytes(), secret_sha256.as_bytes()) {
                return Err(TokenRefusal::Unknown);
            }
            if record.revoked {
                return Err(TokenRefusal::Revoked);
            }
            if now() >= record.expires {
                return Err(TokenRefusal::Expired);
            }
            if record.used >= record.uses {
                return Err(TokenRefusal::UsedUp);
            }
            let server = identity.server_id.as_str();
            if let Some(bound) = record.server.as_deref().filter(|&b| b != server) {
                return Err(TokenRefusal::WrongServer {
                    token_server: bound.to_owned(),
                    requested: server.to_owned(),
                });
            }
            let servers = txn.open_table(SERVERS).map_err(CatalogError::from)?;
            let mut enrolled = txn.open_table(ENROLLED).map_err(CatalogError::from)?;
            let connected_agent = match servers.get(server).map_err(CatalogError::from)? {
                Some(raw) => Some(decode::<ServerRecord>(server, raw.value())?.agent_id),
                None => None,
            };
            let enrolled_agent = match enrolled.get(server).map_err(CatalogError::from)? {
                Some(raw) => Some(decode::<EnrolledRecord>(server, raw.value())?.agent_id),
                None => None,
            };
            let known = connected_agent.is_some() || enrolled_agent.is_some();
            match (known, record.reinstall) {
                (true, false) => return Err(TokenRefusal::ServerExists(server.to_owned())),
                (false, true) => {
                    return Err(TokenRefusal::NothingToReinstall(server.to_owned()));
                }
                _ => {}
            }
            let mut revoked: Vec<String> =
                connected_agent.into_iter().chain(enrolled_agent).collect();
            revoked.sort();
            revoked.dedup();
            let mut revoked_table = txn.open_table(REVOKED).map_err(CatalogError::from)?;
            for agent in &revoked {
                if revoked_table
                    .get(agent.as_str())
                    .map_err(CatalogError::from)?
                    .is_none()
                {
                    revoked_table
                        .insert(agent.as_str(), now())
                        .map_err(CatalogError::from)?;
                }
            }
            enrolled
                .insert(
                    server,
                    encode(&EnrolledRecord {
                        agent_id: identity.agent_id.clone(),
                        enrolled_at: now(),
                        token: record.id.clone(),
                    })
                    .as_slice(),
                )
                .map_err(CatalogError::from)?;
            let mut record = record;
            record.used += 1;
            tokens
                .insert(id.as_str(), encode(&record).as_slice())
                .map_err(CatalogError::from)?;
            Enrollment {
                token: record,
                revoked,
            }
        };
        txn.commit().map_err(CatalogError::from)?;
        Ok(enrollment)
    }

    /// Whether `server_id` is known: it connected, or the control API enrolled it.
    pub fn server_known(&self, server_id: &str) -> Result<bool, CatalogError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(SERVERS)?.get(server_id)?.is_some()
            || txn.open_table(ENROLLED)?.get(server_id)?.is_some())
    }

    pub fn tokens(&self) -> Result<Vec<TokenRecord>, CatalogError> {
        let txn = self.db.begin_read()?;
        let tokens = txn.open_table(TOKENS)?;
        let mut out = Vec::new();
        for entry in tokens.iter()? {
            let (key, value) = entry?;
            out.push(decode(key.value(), value.value())?);
        }
        out.sort_by_key(|t: &TokenRecord| t.created);
        Ok(out)
    }

    /// Revokes token `id`; returns whether it existed.
    pub fn revoke_token(&self, id: &str) -> Result<bool, CatalogError> {
        let txn = self.db.begin_write()?;
        let found = {
            let mut tokens = txn.open_table(TOKENS)?;
            let record = match tokens.get(id)? {
                Some(raw) => Some(decode::<TokenRecord>(id, raw.value())?),
                None => None,
            };
            match record {
                Some(mut record) => {
                    record.revoked = true;
                    tokens.insert(id, encode(&record).as_slice())?;
                    true
                }
                None => false,
            }
        };
        txn.commit()?;
        Ok(found)
    }

    /// Every revoked agent id.
    pub fn revoked_agents(&self) -> Result<Vec<String>, CatalogError> {
        let txn = self.db.begin_read()?;
        let revoked = txn.open_table(REVOKED)?;
        let mut out = Vec::new();
        for entry in revoked.iter()? {
            out.push(entry?.0.value().to_owned());
        }
        Ok(out)
    }

    /// Records a recovery point whose every snapshot is complete.
    pub fn record_recovery_point(
        &self,
        server_id: &str,
        point: &RecoveryPointRecord,
    ) -> Result<(), CatalogError> {
        let txn = self.db.begin_write()?;
        txn.open_table(RECOVERY_POINTS)?
            .insert((server_id, point.epoch), encode(point).as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// A server's recovery points, oldest first.
    pub fn recovery_points(
        &self,
        server_id: &str,
    ) -> Result<Vec<RecoveryPointRecord>, CatalogError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(RECOVERY_POINTS)?;
        let mut out = Vec::new();
        for entry in table.range((server_id, 0)..=(server_id, u64::MAX))? {
            let (key, value) = entry?;
            out.push(decode(
                &format!("{server_id}@{}", key.value().1),
                value.value(),
            )?);
        }
        Ok(out)
    }

    /// Records the staging images a session opened: new identities (`stamped`), and the
    /// end of a `staging_missing` stall for every disk in `found` (its recorded image is
    /// back). One transaction, before the session's Welcome.
    pub fn record_images(
        &self,
        server_id: &str,
        stamped: &[(String, ImageId)],
        found: &[String],
    ) -> Result<(), CatalogError> {
        let txn = self.db.begin_write()?;
        {
            let mut disks = txn.open_table(DISKS)?;
            let names = stamped.iter().map(|(n, _)| n).chain(found);
            for name in names {
                let key = (server_id, name.as_str());
                let record = match disks.get(key)? {
                    Some(raw) => Some(decode::<DiskRecord>(name, raw.value())?),
                    None => None,
                };
                let Some(mut record) = record else { continue };
                if let Some((_, id)) = stamped.iter().find(|(n, _)| n == name) {
                    record.image_id = Some(id.clone());
                }
                if record.stall == STAGING_MISSING {
                    record.stall.clear();
                    record.stall_detail.clear();
                }
                record.updated = now();
                disks.insert(key, encode(&record).as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Does `change` to the record of disk `name` of `server_id`, in one transaction,
    /// and returns the record as it was before.
    pub fn change_disk(
        &self,
        server_id: &str,
        name: &str,
        change: DiskChange,
    ) -> Result<DiskRecord, DiskCommandError> {
        let txn = self.db.begin_write().map_err(CatalogError::from)?;
        let before = {
            let mut disks = txn.open_table(DISKS).map_err(CatalogError::from)?;
            let key = (server_id, name);
            let record = match disks.get(key).map_err(CatalogError::from)? {
                Some(raw) => decode::<DiskRecord>(name, raw.value())?,
                None => {
                    return Err(DiskCommandError::NoSuchDisk {
                        server: server_id.to_owned(),
                        disk: name.to_owned(),
                    });
                }
            };
            let mut after = record.clone();
            let remove = matches!(change, DiskChange::Forget);
            match change {
                DiskChange::Adopt(id) => {
                    after.image_id = Some(id);
                    after.stall.clear();
                    after.stall_detail.clear();
                    // Whatever the adopted file holds is compared with the source before
                    // anything of it is trusted again.
                    if after.sync_watermark > 0 {
                        after.rescan_reason = RescanReason::STAGING_ADOPTED.name().to_owned();
                        after.last_rescan_reason = after.rescan_reason.clone();
                        after.rescanned_bytes = 0;
                        after.resent_bytes = 0;
                    }
                    after.updated = now();
                }
                DiskChange::Reset => {
                    after.image_id = None;
                    after.sync_watermark = 0;
                    after.stall.clear();
                    after.stall_detail.clear();
                    after.rescan_reason.clear();
                    after.rescan_requested = false;
                    after.set_state(DiskState::INITIAL_SYNC, "staging_reset");
                }
                DiskChange::Forget => {}
            }
            if remove {
                disks.remove(key).map_err(CatalogError::from)?;
            } else {
                disks
                    .insert(key, encode(&after).as_slice())
                    .map_err(CatalogError::from)?;
            }
            record
        };
        txn.commit().map_err(CatalogError::from)?;
        Ok(before)
    }

    pub fn disk(&self, server_id: &str, name: &str) -> Result<Option<DiskRecord>, CatalogError> {
        let txn = self.db.begin_read()?;
        let disks = txn.open_table(DISKS)?;
        let raw = disks.get((server_id, name))?;
        raw.map(|raw| decode(name, raw.value())).transpose()
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("catalog records always serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, raw: &[u8]) -> Result<T, CatalogError> {
    serde_json::from_slice(raw).map_err(|source| CatalogError::Corrupt {
        key: key.to_owned(),
        source,
    })
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A damaged catalog (its header, its pages, or a file that is no catalog at all)
    /// stops the start with an error that names the file and says what to do, and the
    /// file is left exactly as it was, for whoever restores or inspects it.
    #[test]
    fn a_damaged_catalog_is_refused_by_name_and_left_as_it_was() {
        type Damage = fn(&mut Vec<u8>);
        let damages: [(&str, Damage); 3] = [
            ("header", |b| b[..64].iter_mut().for_each(|x| *x ^= 0x5a)),
            ("pages", |b| {
                for i in (4096..b.len()).step_by(61) {
                    b[i] ^= 0x5a;
                }
            }),
            ("not a catalog", |b| {
                b.clear();
                b.extend_from_slice(b"servers = []\n");
            }),
        ];
        for (what, damage) in damages {
            let dir = tempfile::tempdir().unwrap();
            drop(Catalog::open(dir.path()).unwrap());
            let path = dir.path().join("catalog.redb");
            let mut bytes = std::fs::read(&path).unwrap();
            damage(&mut bytes);
            std::fs::write(&path, &bytes).unwrap();
            let err = Catalog::open(dir.path()).expect_err(what);
            let message = err.to_string();
            assert!(
                message.contains(&path.display().to_string()) && message.contains("move it aside"),
                "{what}: {message}"
            );
            assert_eq!(
                std::fs::read(&path).unwrap(),
                bytes,
                "{what}: the receiver changed the damaged catalog"
            );
        }
    }

    fn server(agent: &str, live_series: [u8; 16], checkpoint: Option<ChainId>) -> ServerRecord {
        ServerRecord {
            server_id: "srv".into(),
            agent_id: agent.into(),
            agent_version: String::new(),
            inventory: InventoryRecord::default(),
            first_seen: 0,
            last_seen: 0,
            durable_epoch: 0,
            consistent_at_ms: 0,
            live_series: series_hex(&live_series),
            checkpoint,
        }
    }

    fn hello(series: [u8; 16], resume: ResumeClaim) -> Hello {
        Hello {
            agent_version: String::new(),
            inventory: Inventory::default(),
            disks: Vec::new(),
            streams: 1,
            series,
            resume,
        }
    }

    /// Only a claim the receiver can check against its own record is trusted; every
    /// other one makes the disks rescan, each for its own reason.
    #[test]
    fn the_resume_verdict_trusts_only_what_the_catalog_recorded() {
        let identity = AgentIdentity {
            agent_id: "a1".into(),
            server_id: "srv".into(),
        };
        let chain = ChainId {
            series: series_hex(&[3; 16]),
            seq: 7,
        };
        let known = server("a1", [1; 16], Some(chain));
        let verdict = |record: &ServerRecord, claim| {
            resume_verdict(record, &identity, &hello([1; 16], claim))
        };
        assert_eq!(verdict(&known, ResumeClaim::Live), None);
        assert_eq!(
            verdict(
                &known,
                ResumeClaim::Checkpoint {
                    series: [3; 16],
                    seq: 7
                }
            ),
            None
        );
        for (claim, reason) in [
            (
                ResumeClaim::Checkpoint {
                    series: [3; 16],
                    seq: 8,
                },
                RescanReason::STATE_MISMATCH,
            ),
            (ResumeClaim::NoRecord, RescanReason::UNCLEAN_SHUTDOWN),
            (ResumeClaim::InvalidRecord, RescanReason::STATE_MISMATCH),
            (ResumeClaim::RescanRequested, RescanReason::OPERATOR_REQUEST),
            (ResumeClaim::TrackingLost, RescanReason::TRACKING_LOST),
            (
                ResumeClaim::Unknown {
                    tag: 77,
                    rest: vec![],
                },
                RescanReason::STATE_MISMATCH,
            ),
        ] {
            assert_eq!(verdict(&known, claim.clone()), Some(reason), "{claim:?}");
        }
        // Another process's series is not live; another agent is a reinstall.
        let other = server("a1", [2; 16], None);
        assert_eq!(
            verdict(&other, ResumeClaim::Live),
            Some(RescanReason::STATE_MISMATCH)
        );
        let reinstalled = server("a0", [1; 16], None);
        assert_eq!(
            verdict(&reinstalled, ResumeClaim::Live),
            Some(RescanReason::AGENT_REINSTALLED)
        );
        assert_eq!(
            RescanReason::from_name("tracking_lost"),
            Some(RescanReason::TRACKING_LOST)
        );
    }

    /// A server cut over stays cut over, and its agent's sessions are refused with why.
    #[test]
    fn a_server_cut_over_is_refused_at_registration() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();
        let identity = AgentIdentity {
            agent_id: "a1".into(),
            server_id: "srv".into(),
        };
        let hello = hello([1; 16], ResumeClaim::NoRecord);
        catalog
            .register_session(&identity, &hello, dir.path())
            .unwrap();
        let mark = catalog.cut_over("srv").unwrap();
        assert_eq!(
            catalog.cut_over("srv").unwrap(),
            mark,
            "the first mark stays"
        );
        assert_eq!(catalog.cut_over_of("srv").unwrap(), Some(mark.clone()));
        let refused = catalog
            .register_session(&identity, &hello, dir.path())
            .unwrap_err();
        assert!(
            matches!(&refused, RegisterError::CutOver { server, at_ms } if server == "srv" && *at_ms == mark.at_ms),
            "{refused}"
        );
        assert!(refused.to_string().contains("cut over"), "{refused}");
    }
}
