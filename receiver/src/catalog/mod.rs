//! The receiver's transactional store (redb, `<data-dir>/catalog.redb`): source servers,
//! their disks, and per-disk initial-sync watermarks. One file per concept, each adding
//! its part of [`Catalog`]: `sessions` (registration and resume), `disks`, `durability`
//! (watermarks, consistent epochs, checkpoints, rescans), `settings`, `enrollment`
//! (tokens, revocation), `points`, `retired` (EBS snapshots to delete), `launches`.
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

mod disks;
mod durability;
mod enrollment;
mod launches;
mod points;
mod retired;
mod sessions;
mod settings;
pub use disks::*;
pub use durability::*;
pub use enrollment::*;
pub use launches::{
    BootRecord, CutOverRecord, ImageFormat, LaunchMode, LaunchRecord, LaunchedDisk,
};
pub use points::*;
pub use sessions::*;
pub use settings::*;

/// server id → [`ServerRecord`] as JSON.
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
}
