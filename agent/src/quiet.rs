//! Proof that a block device was not written while the agent was stopped, so that a
//! restart of a block-tracking agent can resume from its state record without a rescan.
//!
//! The kernel counts every completed write and discard of a device (`/sys/dev/block/
//! M:m/stat`; a whole disk's counters include its partitions'), from the moment the
//! device appears until it goes away. `diskseq` numbers each appearance, and `boot_id`
//! each boot. At a clean stop the agent reads the counters first and only then takes the
//! last events from its rings (a write is traced before it is counted), so the saved
//! dirty map covers every write the counters include. At the next start, after tracking
//! has started, the same boot, the same device appearance and the same counters prove
//! that nothing was written in between. Anything else (a reboot, a re-attached device,
//! one more write, a kernel without `diskseq`) proves nothing, and the disk is rescanned.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The kernel's write accounting of one device at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteCounters {
    pub boot_id: [u8; 16],
    /// Which appearance of the device (of its disk, for a partition) this is.
    pub diskseq: u64,
    /// Completed writes and sectors written; completed discards and sectors discarded.
    pub writes: u64,
    pub write_sectors: u64,
    pub discards: u64,
    pub discard_sectors: u64,
}

/// Bytes of a [`WriteCounters`] in a state record.
pub const ENCODED_LEN: usize = 16 + 5 * 8;

impl WriteCounters {
    /// The counters of the block device at `path` now; None where the kernel does not
    /// provide all of them (then nothing can be proved).
    pub fn read(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        if !meta.file_type().is_block_device() {
            return None;
        }
        let rdev = meta.rdev();
        let sys = PathBuf::from(format!(
            "/sys/dev/block/{}:{}",
            libc::major(rdev),
            libc::minor(rdev)
        ))
        .canonicalize()
        .ok()?;
        // A partition has no diskseq of its own: its disk's, the directory above it.
        let seq_dir = if sys.join("partition").exists() {
            sys.parent()?.to_owned()
        } else {
            sys.clone()
        };
        let diskseq = std::fs::read_to_string(seq_dir.join("diskseq"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let stat = std::fs::read_to_string(sys.join("stat")).ok()?;
        let fields = crate::blocktrace::stat_fields(&stat)?;
        // Documentation/block/stat.rst: write I/Os, write sectors, discard I/Os, discard
        // sectors are fields 5, 7, 12 and 14.
        let field = |n: usize| fields.get(n - 1).copied();
        Some(Self {
            boot_id: boot_id()?,
            diskseq,
            writes: field(5)?,
            write_sectors: field(7)?,
            discards: field(12)?,
            discard_sectors: field(14)?,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.boot_id);
        for n in [
            self.diskseq,
            self.writes,
            self.write_sectors,
            self.discards,
            self.discard_sectors,
        ] {
            out.extend_from_slice(&n.to_be_bytes());
        }
    }

    /// The inverse of [`Self::encode`], from exactly [`ENCODED_LEN`] bytes.
    pub fn decode(raw: &[u8; ENCODED_LEN]) -> Self {
        let n = |i: usize| {
            let at = 16 + i * 8;
            u64::from_be_bytes(raw[at..at + 8].try_into().expect("8 bytes"))
        };
        Self {
            boot_id: raw[..16].try_into().expect("16 bytes"),
            diskseq: n(0),
            writes: n(1),
            write_sectors: n(2),
            discards: n(3),
            discard_sectors: n(4),
        }
    }
}

/// This boot's id, from `/proc/sys/kernel/random/boot_id` (a UUID).
fn boot_id() -> Option<[u8; 16]> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let hex: String = text.trim().chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_survive_their_encoding() {
        let counters = WriteCounters {
            boot_id: *b"0123456789abcdef",
            diskseq: 9,
            writes: 1,
            write_sectors: u64::MAX,
            discards: 3,
            discard_sectors: 4,
        };
        let mut out = Vec::new();
        counters.encode(&mut out);
        assert_eq!(out.len(), ENCODED_LEN);
        assert_eq!(WriteCounters::decode(&out.try_into().unwrap()), counters);
    }

    #[test]
    fn an_image_file_proves_nothing() {
        let file = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(WriteCounters::read(file.path()), None);
    }
}
