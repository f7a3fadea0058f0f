//! Source volumes: block devices or image files, opened read-only and read sequentially
//! in large chunks by a blocking reader thread that stays a few chunks ahead.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockferry_util::{DeviceKind, device_size};
use tokio::sync::mpsc;

/// Bytes per read: one full write frame.
pub const CHUNK: usize = blockferry_proto::limits::MAX_WRITE_DATA as usize;

// Chunks split writes at multiples of CHUNK; a chunk never crosses a block group, so
// each write has one stream.
const _: () = assert!(blockferry_proto::route::BLOCK_GROUP.is_multiple_of(CHUNK as u64));
/// Chunks read ahead of the sender; bounds the reader's memory to this many MiB.
const READ_AHEAD: usize = 4;

/// Chunks of a volume as the reader thread delivers them: (offset, data).
pub type ChunkReader = mpsc::Receiver<io::Result<(u64, Vec<u8>)>>;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("cannot open volume {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("volume {path} is neither a block device nor a regular file")]
    NotAVolume { path: PathBuf },
    #[error("volume {path} is empty")]
    Empty { path: PathBuf },
    #[error(
        "invalid disk name {name:?} for {path}: use 1 to 64 characters from A-Z a-z 0-9 . _ - (or name it explicitly: --disk NAME=PATH)"
    )]
    BadName { name: String, path: PathBuf },
    #[error("two volumes are named {name:?}; name them explicitly with --disk NAME=PATH")]
    DuplicateName { name: String },
    #[error("{count} volumes given; one agent replicates at most {max}")]
    TooMany { count: usize, max: usize },
}

#[derive(Debug, Clone)]
pub struct Volume {
    /// The disk's name at the receiver (block device name, or file name).
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    /// A block device or an image file.
    pub kind: DeviceKind,
    file: Arc<File>,
    /// A block device opened with O_DIRECT, for reads that bypass its page cache.
    direct: Option<Arc<File>>,
}

impl Volume {
    /// Reads `buf.len()` bytes at `offset` as the volume holds them now. A block device
    /// is read with O_DIRECT, past its page cache: a file system writes to the device
    /// beneath that cache, so pages an earlier read left in it can be stale.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if let Some(direct) = &self.direct {
            return read_direct(direct, buf, offset, self.size);
        }
        if self.kind == DeviceKind::BlockDevice {
            use std::os::fd::AsRawFd;
            // SAFETY: posix_fadvise on a descriptor the volume owns; it only advises.
            unsafe {
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    offset as libc::off_t,
                    buf.len() as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
        }
        self.file.read_exact_at(buf, offset)
    }

    /// Makes every write to the volume that has completed durable on it (`fdatasync`;
    /// Linux flushes the file's or the device's dirty pages whichever descriptor does).
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Opens `spec`, which is `PATH` (named after its last component) or `NAME=PATH`.
    pub fn open(spec: &str) -> Result<Self, VolumeError> {
        let (name, path) = match spec.split_once('=') {
            Some((name, path)) if !name.contains('/') => (name.to_owned(), PathBuf::from(path)),
            _ => {
                let path = PathBuf::from(spec);
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (name, path)
            }
        };
        if !valid_name(&name) {
            return Err(VolumeError::BadName { name, path });
        }
        let open_err = |source| VolumeError::Open {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(open_err)?;
        let (kind, size) = device_size(&file)
            .map_err(open_err)?
            .ok_or_else(|| VolumeError::NotAVolume { path: path.clone() })?;
        if size == 0 {
            return Err(VolumeError::Empty { path });
        }
        // Without O_DIRECT (a file system or driver that refuses it) the page cache is
        // bypassed by dropping the range before each read instead.
        let direct = (kind == DeviceKind::BlockDevice)
            .then(|| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&path)
                    .ok()
            })
            .flatten()
            .map(Arc::new);
        Ok(Self {
            name,
            path,
            size,
            kind,
            file: Arc::new(file),
            direct,
        })
    }

    /// Opens every spec, checking the product limit and that names are unique.
    pub fn open_all(specs: &[String]) -> Result<Vec<Self>, VolumeError> {
        let max = blockferry_proto::limits::MAX_DISKS;
        if specs.len() > max {
            return Err(VolumeError::TooMany {
                count: specs.len(),
                max,
            });
        }
        let volumes = specs
            .iter()
            .map(|s| Self::open(s))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, v) in volumes.iter().enumerate() {
            if volumes[..i].iter().any(|o| o.name == v.name) {
                return Err(VolumeError::DuplicateName {
                    name: v.name.clone(),
                });
            }
        }
        Ok(volumes)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads `[start, size)` in chunks aligned to [`CHUNK`] (the first one may be
    /// shorter), on a blocking thread, a few chunks ahead of the consumer. `before_read`
    /// is told the end of each chunk just before it is read.
    pub fn read_from(&self, start: u64, before_read: impl Fn(u64) + Send + 'static) -> ChunkReader {
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let (volume, size) = (self.clone(), self.size);
        tokio::task::spawn_blocking(move || {
            let mut offset = start;
            while offset < size {
                let next = ((offset / CHUNK as u64) + 1) * CHUNK as u64;
                let len = (next.min(size) - offset) as usize;
                before_read(offset + len as u64);
                let mut buf = vec![0u8; len];
                let result = volume
                    .read_exact_at(&mut buf, offset)
                    .map(|()| (offset, buf));
                let failed = result.is_err();
                if tx.blocking_send(result).is_err() || failed {
                    return;
                }
                offset += len as u64;
            }
        });
        rx
    }
}

/// Alignment of O_DIRECT buffers, offsets and lengths: a page, which covers every
/// logical block size (512 or 4096).
const DIRECT_ALIGN: u64 = 4096;

/// Reads `buf.len()` bytes at `offset` through `direct` (opened with O_DIRECT): the range
/// widened to whole aligned blocks (within `size`, itself a multiple of the logical
/// block size) in an aligned buffer, then copied out.
fn read_direct(direct: &File, buf: &mut [u8], offset: u64, size: u64) -> std::io::Result<()> {
    let start = offset / DIRECT_ALIGN * DIRECT_ALIGN;
    let end = (offset + buf.len() as u64).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    let end = end
        .min(size.div_ceil(512) * 512)
        .max(offset + buf.len() as u64);
    let len = (end - start) as usize;
    let layout = std::alloc::Layout::from_size_align(len.max(1), DIRECT_ALIGN as usize)
        .map_err(std::io::Error::other)?;
    // SAFETY: a non-zero layout; the memory is freed below with the same layout.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    // SAFETY: `len` initialized bytes at `ptr`, exclusively ours until freed.
    let aligned = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    let result = direct.read_exact_at(aligned, start);
    if result.is_ok() {
        let from = (offset - start) as usize;
        buf.copy_from_slice(&aligned[from..from + buf.len()]);
    }
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
    result
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Splits a chunk into runs of all-zero and non-zero 4 KiB blocks: `(offset within the
/// chunk, len, is_zero)`. Zero runs travel as zero-fill frames without payload.
pub fn zero_runs(data: &[u8]) -> Vec<(usize, usize, bool)> {
    const BLOCK: usize = 4096;
    static ZEROS: [u8; BLOCK] = [0; BLOCK];
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, block) in data.chunks(BLOCK).enumerate() {
        let zero = block == &ZEROS[..block.len()];
        match runs.last_mut() {
            Some((_, len, z)) if *z == zero => *len += block.len(),
            _ => runs.push((i * BLOCK, block.len(), zero)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_coalesce_blocks() {
        let mut data = vec![0u8; 5 * 4096 + 100];
        data[4096 + 7] = 1;
        data[2 * 4096] = 1;
        let runs = zero_runs(&data);
        assert_eq!(
            runs,
            vec![
                (0, 4096, true),
                (4096, 8192, false),
                (12288, 3 * 4096 - 4096 + 100, true)
            ]
        );
    }

    #[test]
    fn bad_specs_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk a.img");
        std::fs::write(&img, [1u8; 4096]).unwrap();
        let err = Volume::open(img.to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains("--disk NAME=PATH"), "{err}");
        let named = Volume::open(&format!("data={}", img.display())).unwrap();
        assert_eq!((named.name.as_str(), named.size), ("data", 4096));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, []).unwrap();
        assert!(matches!(
            Volume::open(empty.to_str().unwrap()),
            Err(VolumeError::Empty { .. })
        ));
        assert!(matches!(
            Volume::open(dir.path().join("missing").to_str().unwrap()),
            Err(VolumeError::Open { .. })
        ));
        let spec = format!("x={}", img.display());
        assert!(matches!(
            Volume::open_all(&[spec.clone(), spec]),
            Err(VolumeError::DuplicateName { .. })
        ));
    }
}
