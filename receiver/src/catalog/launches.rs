//! Launches of recovery points, and servers cut over: what `launch` did, kept for the
//! operator's record, and the mark that ends a server's replication for good.

use std::path::PathBuf;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Catalog, CatalogError, SERVERS, decode, encode};

/// (server id, launch number) → [`LaunchRecord`] (JSON); numbers count from 1 per server.
pub(super) const LAUNCHES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("launches");
/// Server id → [`CutOverRecord`] (JSON): servers whose replication is over.
pub(super) const CUT_OVER: TableDefinition<&str, &[u8]> = TableDefinition::new("cut_over");

/// Test: a copy to try out, the source keeps replicating. Cutover: the copy replaces the
/// source, whose replication stops for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LaunchMode {
    Test,
    Cutover,
}

impl std::fmt::Display for LaunchMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Test => "test",
            Self::Cutover => "cutover",
        })
    }
}

/// One launch. The keys are an interface (`launch list --json`), documented in the README.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchRecord {
    /// Numbered from 1 per server; 0 until recorded.
    pub number: u64,
    pub server_id: String,
    pub mode: LaunchMode,
    /// The recovery point launched.
    pub epoch: u64,
    pub out: PathBuf,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    pub disks: Vec<LaunchedDisk>,
    /// What was changed inside the images so that the copy never replicates back.
    pub prepared: Vec<String>,
    /// The boot check's verdict, when the launch was booted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootRecord>,
    /// The machine image registered (`--ec2 ami`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchedDisk {
    pub disk: String,
    pub image: PathBuf,
    /// How the disk came from the point: `reflink` or `copy` (a file point's image), or
    /// `download` (an EBS point's snapshot).
    pub copy: String,
    /// The image's format (`--format`).
    #[serde(default)]
    pub format: ImageFormat,
    /// With `--ec2`: the snapshot the prepared copy was written into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// With `--ec2 volumes`: the volume made of that snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<String>,
    /// With `--ec2 ami`: the disk's device in the image (the root is `/dev/xvda`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// How a launched disk is written: raw (the point's bytes, a reflink where it can be) or
/// qcow2 (converted from the prepared raw copy; sparse on any file system, and what
/// OpenStack, Proxmox and libvirt import).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    #[default]
    Raw,
    Qcow2,
}

impl ImageFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootRecord {
    /// `kvm` or `tcg`.
    pub accelerator: String,
    pub healthy: bool,
    /// What was checked and what was seen.
    pub detail: String,
    pub seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutOverRecord {
    pub at_ms: u64,
}

impl Catalog {
    /// Marks `server_id` cut over: from this commit on, its agent's sessions are refused.
    /// Returns the mark, the earlier one when it was already cut over. A server the
    /// catalog does not know is an error naming it.
    pub fn cut_over(&self, server_id: &str) -> Result<CutOverRecord, CatalogError> {
        let txn = self.db.begin_write()?;
        let record = {
            if txn.open_table(SERVERS)?.get(server_id)?.is_none() {
                return Err(CatalogError::UnknownServer(server_id.to_owned()));
            }
            let mut table = txn.open_table(CUT_OVER)?;
            let earlier = table
                .get(server_id)?
                .map(|raw| decode::<CutOverRecord>(server_id, raw.value()))
                .transpose()?;
            match earlier {
                Some(earlier) => earlier,
                None => {
                    let record = CutOverRecord {
                        at_ms: super::now_ms(),
                    };
                    table.insert(server_id, encode(&record).as_slice())?;
                    record
                }
            }
        };
        txn.commit()?;
        Ok(record)
    }

    /// Whether (and when) `server_id` was cut over.
    pub fn cut_over_of(&self, server_id: &str) -> Result<Option<CutOverRecord>, CatalogError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CUT_OVER)?;
        let raw = table.get(server_id)?;
        raw.map(|raw| decode(server_id, raw.value())).transpose()
    }

    /// Records a finished launch under the server's next number, which it returns.
    pub fn record_launch(&self, record: &LaunchRecord) -> Result<u64, CatalogError> {
        let txn = self.db.begin_write()?;
        let number = {
            let mut table = txn.open_table(LAUNCHES)?;
            let server = record.server_id.as_str();
            let last = table
                .range((server, 0)..=(server, u64::MAX))?
                .next_back()
                .transpose()?
                .map_or(0, |(key, _)| key.value().1);
            let number = last + 1;
            let record = LaunchRecord {
                number,
                ..record.clone()
            };
            table.insert((server, number), encode(&record).as_slice())?;
            number
        };
        txn.commit()?;
        Ok(number)
    }

    /// The launches of `server_id` (of every server when `None`), oldest first.
    pub fn launches(&self, server_id: Option<&str>) -> Result<Vec<LaunchRecord>, CatalogError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LAUNCHES)?;
        let mut out = Vec::new();
        let range = match server_id {
            Some(server) => table.range((server, 0)..=(server, u64::MAX))?,
            None => table.range::<(&str, u64)>(..)?,
        };
        for entry in range {
            let (key, value) = entry?;
            let (server, number) = key.value();
            out.push(decode(
                &format!("launch {number} of {server}"),
                value.value(),
            )?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(server: &str, epoch: u64) -> LaunchRecord {
        LaunchRecord {
            number: 0,
            server_id: server.to_owned(),
            mode: LaunchMode::Test,
            epoch,
            out: PathBuf::from("/out"),
            started_at_ms: 1,
            finished_at_ms: 2,
            disks: vec![],
            prepared: vec![],
            boot: None,
            image_id: None,
        }
    }

    #[test]
    fn launches_are_numbered_per_server_and_listed_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();
        assert_eq!(catalog.record_launch(&launch("a", 5)).unwrap(), 1);
        assert_eq!(catalog.record_launch(&launch("b", 7)).unwrap(), 1);
        assert_eq!(catalog.record_launch(&launch("a", 9)).unwrap(), 2);
        let a: Vec<(u64, u64)> = catalog
            .launches(Some("a"))
            .unwrap()
            .iter()
            .map(|l| (l.number, l.epoch))
            .collect();
        assert_eq!(a, [(1, 5), (2, 9)]);
        assert_eq!(catalog.launches(None).unwrap().len(), 3);
        assert!(catalog.launches(Some("c")).unwrap().is_empty());
    }

    #[test]
    fn only_a_known_server_is_cut_over_and_the_first_mark_stays() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(dir.path()).unwrap();
        let err = catalog.cut_over("ghost").unwrap_err();
        assert!(err.to_string().contains("ghost"), "{err}");
        assert_eq!(catalog.cut_over_of("ghost").unwrap(), None);
    }
}
