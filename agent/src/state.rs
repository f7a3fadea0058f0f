//! The clean-shutdown state record (`<state-dir>/agent-state`): what the agent knew about
//! its disks when it stopped — the dirty runs not yet durable at the receiver, each disk's
//! size, and the chain id the receiver recorded for this record.
//!
//! A record is trusted only if it is complete (checksum), fits the disks exactly, and the
//! receiver knows its chain id; anything else makes the agent rescan. It is read once and
//! deleted before the first session, so a crash later can never make it trusted again.
//!
//! Layout (big endian): magic `BFSTATE2`, series (16 bytes), seq (u64), disk count (u16),
//! then per disk: name length (u16), name, size (u64), run count (u64), runs as
//! (offset u64, len u64), then 0, or 1 and the device's write counters at the stop
//! ([`crate::quiet`]); finally the xxh3-64 of everything before it. A `BFSTATE1` record
//! (no counters) is still read.

use std::io;
use std::path::{Path, PathBuf};

use blockferry_util::durable::{ensure_private_dir, write_atomic};

use crate::quiet::{self, WriteCounters};
use crate::volume::Volume;

const MAGIC: &[u8; 8] = b"BFSTATE2";
const MAGIC_V1: &[u8; 8] = b"BFSTATE1";
const FILE_NAME: &str = "agent-state";
/// More runs than this are coarsened to 4 MiB chunks, so the record stays small whatever
/// the workload did (coarser means more to resend, never something missed).
const MAX_RUNS: usize = 1 << 20;
const COARSE: u64 = 4 << 20;

/// What a valid record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRecord {
    pub series: [u8; 16],
    pub seq: u64,
    /// Per disk, in the agent's disk order: dirty runs (offset, len).
    pub dirty: Vec<Vec<(u64, u64)>>,
    /// Per disk: the kernel's write counters of the device when the dirty map was taken
    /// (block-tracked disks only), to prove at the next start that nothing was written.
    pub quiet: Vec<Option<WriteCounters>>,
}

/// Why a record on disk cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the state record {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the state record {path} is damaged: {why}")]
    Damaged { path: PathBuf, why: String },
    #[error("the state record {path} does not fit the disks: {why}")]
    Mismatch { path: PathBuf, why: String },
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// Writes the record atomically (temp file, fsync, rename, fsync of the directory).
pub fn save(state_dir: &Path, volumes: &[Volume], record: &StateRecord) -> io::Result<()> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&record.series);
    out.extend_from_slice(&record.seq.to_be_bytes());
    out.extend_from_slice(&(volumes.len() as u16).to_be_bytes());
    for (i, (volume, runs)) in volumes.iter().zip(&record.dirty).enumerate() {
        let name = volume.name.as_bytes();
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&volume.size.to_be_bytes());
        let runs = coarsen(runs);
        out.extend_from_slice(&(runs.len() as u64).to_be_bytes());
        for (offset, len) in runs {
            out.extend_from_slice(&offset.to_be_bytes());
            out.extend_from_slice(&len.to_be_bytes());
        }
        match record.quiet.get(i).copied().flatten() {
            Some(counters) => {
                out.push(1);
                counters.encode(&mut out);
            }
            None => out.push(0),
        }
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&out);
    out.extend_from_slice(&sum.to_be_bytes());
    ensure_private_dir(state_dir, "agent state").map_err(io::Error::other)?;
    write_atomic(&path(state_dir), &out, 0o600)
}

/// Reads and removes the record. `Ok(None)` when there is none.
pub fn take(state_dir: &Path, volumes: &[Volume]) -> Result<Option<StateRecord>, StateError> {
    let path = path(state_dir);
    let raw = match std::fs::read(&path) {
        Ok(raw) => raw,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StateError::Io { path, source }),
    };
    // Consumed whatever it holds: a record is good for one start.
    let removed = std::fs::remove_file(&path)
        .and_then(|()| std::fs::File::open(state_dir).and_then(|dir| dir.sync_all()));
    if let Err(source) = removed {
        return Err(StateError::Io { path, source });
    }
    parse(&raw, volumes).map(Some).map_err(|(damaged, why)| {
        if damaged {
            StateError::Damaged { path, why }
        } else {
            StateError::Mismatch { path, why }
        }
    })
}

/// A record being parsed; every read is checked against what is left.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], (bool, String)> {
        let Some((head, rest)) = self.0.split_first_chunk::<N>() else {
            return Err((true, "truncated".to_owned()));
        };
        self.0 = rest;
        Ok(*head)
    }

    fn slice(&mut self, n: usize) -> Result<&'a [u8], (bool, String)> {
        if self.0.len() < n {
            return Err((true, "truncated".to_owned()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, (bool, String)> {
        self.bytes().map(u16::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, (bool, String)> {
        self.bytes().map(u64::from_be_bytes)
    }
}

/// Parses a record; the error says whether it is damaged (`true`) or does not fit.
fn parse(raw: &[u8], volumes: &[Volume]) -> Result<StateRecord, (bool, String)> {
    let damaged = |why: &str| (true, why.to_owned());
    let Some((body, sum)) = raw.split_last_chunk::<8>() else {
        return Err(damaged("shorter than its checksum"));
    };
    if xxhash_rust::xxh3::xxh3_64(body) != u64::from_be_bytes(*sum) {
        return Err(damaged("checksum mismatch (truncated or altered)"));
    }
    let mut r = Cursor(body);
    let version = match &r.bytes::<8>()? {
        m if m == MAGIC => 2,
        m if m == MAGIC_V1 => 1,
        _ => return Err(damaged("not a blockferry state record")),
    };
    let series = r.bytes::<16>()?;
    let seq = r.u64()?;
    let disks = usize::from(r.u16()?);
    if disks != volumes.len() {
        return Err((
            false,
            format!(
                "it lists {disks} disks, the agent replicates {}",
                volumes.len()
            ),
        ));
    }
    let mut dirty = Vec::with_capacity(disks);
    let mut quiet = Vec::with_capacity(disks);
    for volume in volumes {
        let name_len = usize::from(r.u16()?);
        let name = String::from_utf8_lossy(r.slice(name_len)?).into_owned();
        let size = r.u64()?;
        if name != volume.name || size != volume.size {
            return Err((
                false,
                format!(
                    "it describes disk {name} of {size} bytes where the agent has {} of {} bytes",
                    volume.name, volume.size
                ),
            ));
        }
        let count = r.u64()?;
        if count > (MAX_RUNS as u64).max(volume.size.div_ceil(COARSE)) {
            return Err(damaged("too many runs"));
        }
        let mut runs = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let (offset, len) = (r.u64()?, r.u64()?);
            if offset.checked_add(len).is_none_or(|end| end > volume.size) {
                return Err(damaged("a run lies beyond its disk"));
            }
            runs.push((offset, len));
        }
        dirty.push(runs);
        quiet.push(match version {
            1 => None,
            _ => match r.bytes::<1>()? {
                [0] => None,
                [1] => Some(WriteCounters::decode(&r.bytes::<{ quiet::ENCODED_LEN }>()?)),
                _ => return Err(damaged("bad write-counter flag")),
            },
        });
    }
    if !r.0.is_empty() {
        return Err(damaged("trailing bytes"));
    }
    Ok(StateRecord {
        series,
        seq,
        dirty,
        quiet,
    })
}

/// Runs as they are, or merged into whole 4 MiB chunks when there are too many.
fn coarsen(runs: &[(u64, u64)]) -> Vec<(u64, u64)> {
    if runs.len() <= MAX_RUNS {
        return runs.to_vec();
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut sorted = runs.to_vec();
    sorted.sort_unstable();
    for (offset, len) in sorted {
        let start = offset / COARSE * COARSE;
        let end = (offset + len).div_ceil(COARSE) * COARSE;
        match out.last_mut() {
            Some((s, l)) if *s + *l >= start => *l = (*l).max(end - *s),
            _ => out.push((start, end - start)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volumes(dir: &Path) -> Vec<Volume> {
        ["a", "b"]
            .iter()
            .map(|name| {
                let path = dir.join(format!("{name}.img"));
                std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
                Volume::open(&format!("{name}={}", path.display())).unwrap()
            })
            .collect()
    }

    fn record() -> StateRecord {
        StateRecord {
            series: [7; 16],
            seq: 3,
            dirty: vec![vec![(0, 4096), (65536, 8192)], vec![]],
            quiet: vec![
                Some(WriteCounters {
                    boot_id: [9; 16],
                    diskseq: 12,
                    writes: 345,
                    write_sectors: 6789,
                    discards: 1,
                    discard_sectors: 2048,
                }),
                None,
            ],
        }
    }

    #[test]
    fn a_saved_record_is_read_back_once() {
        let dir = tempfile::tempdir().unwrap();
        let vols = volumes(dir.path());
        save(dir.path(), &vols, &record()).unwrap();
        assert_eq!(take(dir.path(), &vols).unwrap(), Some(record()));
        assert_eq!(take(dir.path(), &vols).unwrap(), None, "consumed");
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vols = volumes(dir.path());
        save(dir.path(), &vols, &record()).unwrap();
        let good = std::fs::read(path(dir.path())).unwrap();
        for cut in 0..good.len() {
            std::fs::write(path(dir.path()), &good[..cut]).unwrap();
            assert!(
                matches!(take(dir.path(), &vols), Err(StateError::Damaged { .. })),
                "truncated to {cut} bytes"
            );
        }
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            std::fs::write(path(dir.path()), &bad).unwrap();
            assert!(
                matches!(take(dir.path(), &vols), Err(StateError::Damaged { .. })),
                "byte {at} flipped"
            );
        }
    }

    #[test]
    fn a_record_for_other_disks_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vols = volumes(dir.path());
        save(dir.path(), &vols, &record()).unwrap();
        let err = take(dir.path(), &vols[..1]).unwrap_err();
        assert!(matches!(err, StateError::Mismatch { .. }), "{err}");
        save(dir.path(), &vols, &record()).unwrap();
        std::fs::write(vols[1].path(), vec![0u8; 2 << 20]).unwrap();
        let resized = volumes_no_write(dir.path());
        let err = take(dir.path(), &resized).unwrap_err();
        assert!(err.to_string().contains("2097152"), "{err}");
    }

    fn volumes_no_write(dir: &Path) -> Vec<Volume> {
        ["a", "b"]
            .iter()
            .map(|name| {
                Volume::open(&format!(
                    "{name}={}",
                    dir.join(format!("{name}.img")).display()
                ))
                .unwrap()
            })
            .collect()
    }

    #[test]
    fn too_many_runs_are_coarsened_never_dropped() {
        let runs: Vec<(u64, u64)> = (0..(MAX_RUNS as u64 + 10))
            .map(|i| (i * 8192, 4096))
            .collect();
        let coarse = coarsen(&runs);
        assert!(coarse.len() < 10);
        for (offset, len) in runs {
            assert!(
                coarse
                    .iter()
                    .any(|&(s, l)| s <= offset && offset + len <= s + l),
                "run at {offset} lost"
            );
        }
    }
}
