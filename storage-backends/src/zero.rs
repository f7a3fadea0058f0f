//! How a zero-fill becomes I/O: hole punching on files, `FALLOC_FL_ZERO_RANGE` on block
//! devices (which need aligned ranges), and plain zero writes for the unaligned edges or
//! where the file system supports neither.

use blockferry_util::device::DeviceKind;

/// Block devices take zeroing requests only in whole logical blocks; 4 KiB is a multiple
/// of every logical block size in use (512 or 4096).
const DEVICE_ZERO_ALIGN: u64 = 4096;

/// Largest zero buffer written at once when zeroing by writes.
pub(crate) const ZERO_WRITE_CHUNK: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroStep {
    /// `fallocate(mode)`; if the file system refuses it, write zeros instead.
    Fallocate {
        offset: u64,
        len: u64,
        mode: i32,
    },
    Write {
        offset: u64,
        len: u64,
    },
}

pub(crate) fn plan(kind: DeviceKind, offset: u64, len: u64) -> Vec<ZeroStep> {
    match kind {
        // A punched hole reads as zeros and gives the space back; file systems zero the
        // partial blocks at either end themselves.
        DeviceKind::File => vec![ZeroStep::Fallocate {
            offset,
            len,
            mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        }],
        DeviceKind::BlockDevice => {
            let end = offset + len;
            let mid_start = offset.next_multiple_of(DEVICE_ZERO_ALIGN).min(end);
            let mid_end = (end / DEVICE_ZERO_ALIGN * DEVICE_ZERO_ALIGN).max(mid_start);
            let mut steps = Vec::with_capacity(3);
            if mid_start > offset {
                steps.push(ZeroStep::Write {
                    offset,
                    len: mid_start - offset,
                });
            }
            if mid_end > mid_start {
                steps.push(ZeroStep::Fallocate {
                    offset: mid_start,
                    len: mid_end - mid_start,
                    mode: libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                });
            }
            if end > mid_end {
                steps.push(ZeroStep::Write {
                    offset: mid_end,
                    len: end - mid_end,
                });
            }
            steps
        }
    }
}

/// Whether a failed `fallocate` means "this file system cannot do that" (so zeros are
/// written instead) rather than a real I/O failure.
pub(crate) fn is_unsupported(err: &std::io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL)
    )
}

/// Splits a zero write into buffers of at most [`ZERO_WRITE_CHUNK`].
pub(crate) fn write_chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize)> {
    let end = offset + len;
    (offset..end)
        .step_by(ZERO_WRITE_CHUNK as usize)
        .map(move |at| {
            (
                at,
                usize::try_from((end - at).min(ZERO_WRITE_CHUNK)).unwrap_or(0),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_device_plan_splits_unaligned_edges() {
        let steps = plan(DeviceKind::BlockDevice, 100, 10_000);
        assert_eq!(
            steps,
            vec![
                ZeroStep::Write {
                    offset: 100,
                    len: 3996
                },
                ZeroStep::Fallocate {
                    offset: 4096,
                    len: 4096,
                    mode: libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                },
                ZeroStep::Write {
                    offset: 8192,
                    len: 1908
                },
            ]
        );
        // A range inside one block is a single write.
        assert_eq!(
            plan(DeviceKind::BlockDevice, 10, 20),
            vec![ZeroStep::Write {
                offset: 10,
                len: 20
            }]
        );
    }

    #[test]
    fn write_chunks_cover_the_range_exactly() {
        let chunks: Vec<_> = write_chunks(5, 2 * ZERO_WRITE_CHUNK + 7).collect();
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[0], (5, ZERO_WRITE_CHUNK as usize));
        assert_eq!(chunks[2], (5 + 2 * ZERO_WRITE_CHUNK, 7));
    }
}
