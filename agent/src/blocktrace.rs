//! Block-layer change tracking without a kernel module: the kernel's
//! `block:block_rq_complete` tracepoint, read through an ftrace instance of the agent's
//! own ([`crate::ftrace`]), or through one perf ring buffer per CPU where tracefs
//! instances cannot be made (`--trace-source`).
//!
//! Every request that completes on a replicated disk — a write, a discard, a
//! write-zeroes, whatever file system, partition or device-mapper target sent it (their
//! bios are remapped onto the disk before they become its requests) — leaves a sample
//! with the disk's device number, its first sector and its length. The kernel filters
//! the samples to the replicated disks; [`Tracker::drain`] turns them into byte ranges.
//!
//! A sample is written when its request completes, before the writer hears of it, so a
//! range is reported after its write completed; what reads it afterwards sees the new
//! data. A buffer that overflows says how many samples it lost (ftrace's dropped
//! events, perf's `PERF_RECORD_LOST`): the caller must then rescan every tracked disk,
//! because nobody knows which blocks those samples named.
//!
//! The kernel can also drop a sample without counting it: on Linux 6.18 a completion
//! that runs in a softirq on top of some tasks leaves neither a perf sample nor a BPF
//! program run (the tracepoint fired; ftrace saw it), and nothing says so. That is why
//! ftrace is the first choice, and why, whichever source is used, every drain
//! also balances the samples against the disk's own statistics ([`Account`]): the kernel
//! counts a request's sectors in `/sys/dev/block/M:m/stat` just after its trace event,
//! so once the rings are drained after reading that file, the samples must cover at
//! least as many written and discarded sectors. Any shortfall is a loss like the others.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Where tracefs is found (mounted there if it is not).
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
const TRACEPOINT: &str = "events/block/block_rq_complete";

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_SAMPLE_RAW: u64 = 1 << 10;
/// `read(2)` of the event gives its count and its lost samples (Linux 6.0): a loss is
/// known as soon as it happens, not only when the ring has room again for a LOST record.
const PERF_FORMAT_LOST: u64 = 1 << 4;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
const ATTR_DISABLED: u64 = 1 << 0;
const ATTR_WATERMARK: u64 = 1 << 14;
const PERF_RECORD_LOST: u32 = 2;
const PERF_RECORD_SAMPLE: u32 = 9;
/// `_IO('$', 0)`, `_IO('$', 1)`, `_IOW('$', 6, char *)`.
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_DISABLE: libc::c_ulong = 0x2401;
const PERF_EVENT_IOC_SET_FILTER: libc::c_ulong = 0x4008_2406;
/// Offsets of `data_head`, `data_tail`, `data_offset`, `data_size` in
/// `struct perf_event_mmap_page` (stable since Linux 4.1).
const DATA_HEAD: usize = 1024;
const DATA_TAIL: usize = 1032;
const DATA_OFFSET: usize = 1040;
const DATA_SIZE: usize = 1048;

/// The first 112 bytes of `struct perf_event_attr` (`PERF_ATTR_SIZE_VER5`); the kernel
/// takes the fields it was not given as zero.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_watermark: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved: u16,
}

const _: () = assert!(std::mem::size_of::<PerfEventAttr>() == 112);

#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error(
        "the kernel's tracefs is not available ({0}); mount it (mount -t tracefs nodev /sys/kernel/tracing) or run with --capture tap or none"
    )]
    NoTracefs(String),
    #[error("cannot read the tracepoint's description {path}")]
    Format {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the tracepoint block_rq_complete lacks the field {0} on this kernel")]
    Field(&'static str),
    #[error(
        "the kernel refused a perf event on CPU {cpu} (needs root, or CAP_PERFMON; kernel.perf_event_paranoid and seccomp may forbid it)"
    )]
    Open {
        cpu: usize,
        #[source]
        source: io::Error,
    },
    #[error("cannot map the perf ring buffer of CPU {cpu}")]
    Map {
        cpu: usize,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused the device filter of the perf events")]
    Filter(#[source] io::Error),
    #[error(
        "cannot trace through an ftrace instance (needs root and a writable tracefs; --trace-source perf uses perf events instead)"
    )]
    Instance(#[from] crate::ftrace::InstanceError),
    #[error("neither source of block-layer events works here: {ftrace}; and {perf}")]
    NoSource { ftrace: String, perf: String },
    #[error("{path} is not a block device the block layer tracks ({why})")]
    NotTrackable { path: PathBuf, why: String },
    #[error(
        "cannot read the I/O statistics of disk {disk} ({path}); they prove that no write went unseen"
    )]
    Statistics {
        disk: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "disk {disk} keeps no I/O statistics (queue/iostats is 0 and cannot be set), so a write its trace events miss could not be noticed: run `echo 1 > /sys/dev/block/{disk}/queue/iostats`"
    )]
    NoStatistics { disk: String },
}

/// Where a tracked volume lies on its disk: the disk's device number (as the kernel
/// encodes it in trace events, major << 20 | minor), its first byte and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub disk_dev: u32,
    pub start: u64,
    pub len: u64,
}

impl Placement {
    /// Where the block device at `path` lies: a whole disk, or a partition of one.
    /// Devices that complete bios without requests of their own (device-mapper, md)
    /// are refused: track the disks beneath them instead.
    pub fn of(path: &Path) -> Result<Self, TrackError> {
        use std::os::unix::fs::FileTypeExt;
        let not = |why: String| TrackError::NotTrackable {
            path: path.to_owned(),
            why,
        };
        let meta = std::fs::metadata(path).map_err(|e| not(e.to_string()))?;
        if !meta.file_type().is_block_device() {
            return Err(not("not a block device".into()));
        }
        use std::os::unix::fs::MetadataExt;
        let rdev = meta.rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let sectors = |p: &Path| -> Result<u64, TrackError> {
            std::fs::read_to_string(p)
                .map_err(|e| not(format!("{}: {e}", p.display())))?
                .trim()
                .parse::<u64>()
                .map_err(|e| not(format!("{}: {e}", p.display())))
        };
        let len = sectors(&sys.join("size"))? * 512;
        if sys.join("partition").exists() {
            let start = sectors(&sys.join("start"))? * 512;
            let parent = sys
                .canonicalize()
                .map_err(|e| not(e.to_string()))?
                .parent()
                .map(|p| p.join("dev"))
                .ok_or_else(|| not("a partition without a disk".into()))?;
            let text = std::fs::read_to_string(&parent).map_err(|e| not(e.to_string()))?;
            let (pmaj, pmin) = text
                .trim()
                .split_once(':')
                .ok_or_else(|| not(format!("{}: {text:?}", parent.display())))?;
            let disk_dev = kernel_dev(
                pmaj.parse().map_err(|_| not(text.clone()))?,
                pmin.parse().map_err(|_| not(text.clone()))?,
            );
            return Ok(Self {
                disk_dev,
                start,
                len,
            });
        }
        if !sys.join("mq").exists() {
            return Err(not(
                "it completes bios without requests of its own (device-mapper, md, …): replicate the disks beneath it".into(),
            ));
        }
        Ok(Self {
            disk_dev: kernel_dev(major, minor),
            start: 0,
            len,
        })
    }
}

/// The kernel's own encoding of a device number, as trace events carry it.
fn kernel_dev(major: u32, minor: u32) -> u32 {
    (major << 20) | (minor & ((1 << 20) - 1))
}

/// What a drain found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Volume `volume` changed in `[offset, offset + len)`.
    Written {
        volume: usize,
        offset: u64,
        len: u64,
    },
    /// The kernel dropped this many samples: any tracked volume may have changed anywhere.
    Lost(u64),
    /// A disk's statistics count more written or discarded sectors than the samples
    /// named: the kernel completed writes without a sample, and nobody knows where.
    Unseen { disk_dev: u32, sectors: u64 },
}

/// What a disk's statistics say it completed: sectors written (writes and write-zeroes)
/// and sectors discarded, as the kernel adds them up per disk (partitions included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completed {
    pub written: u64,
    pub discarded: u64,
}

impl Completed {
    /// Parses `/sys/dev/block/M:m/stat`: sectors written are its 7th field, sectors
    /// discarded its 14th (Documentation/block/stat.rst; kernels before 4.18 have no
    /// discard fields, and count discards as writes).
    pub fn parse(text: &str) -> Option<Self> {
        let fields = stat_fields(text)?;
        Some(Self {
            written: *fields.get(6)?,
            discarded: fields.get(13).copied().unwrap_or(0),
        })
    }
}

/// The numbers of a block device's `stat` file, in order (Documentation/block/stat.rst).
pub(crate) fn stat_fields(text: &str) -> Option<Vec<u64>> {
    text.split_whitespace().map(|f| f.parse().ok()).collect()
}

/// Balances one disk's samples against its statistics. Every request the statistics
/// count was sampled before it was counted, so samples drained after a reading cover at
/// least the sectors of that reading; more is fine (requests completing meanwhile).
#[derive(Debug, Clone)]
pub struct Account {
    /// The statistics when tracking started, plus the shortfalls already reported.
    base: Completed,
    /// Sectors the samples named since tracking started.
    sampled: Completed,
}

impl Account {
    /// Starts balancing from a reading taken once the events were enabled.
    pub fn new(start: Completed) -> Self {
        Self {
            base: start,
            sampled: Completed::default(),
        }
    }

    /// A sample of `sectors`: a discard, or anything else that changes data.
    pub fn sampled(&mut self, sectors: u64, discard: bool) {
        if discard {
            self.sampled.discarded += sectors;
        } else {
            self.sampled.written += sectors;
        }
    }

    /// Checks a reading taken *before* the samples counted so far were drained; returns
    /// the sectors the samples miss, if any. A shortfall is reported once: it becomes part
    /// of the base. (If requests completed between the reading and the drain, the
    /// shortfall is underestimated by their sectors, and may be reported again later:
    /// a second rescan, never a silent loss.)
    pub fn check(&mut self, reading: Completed) -> Option<u64> {
        let counted = |now: u64, base: u64| now.saturating_sub(base);
        let written = counted(reading.written, self.base.written);
        let discarded = counted(reading.discarded, self.base.discarded);
        let missing = written.saturating_sub(self.sampled.written)
            + discarded.saturating_sub(self.sampled.discarded);
        if missing == 0 {
            return None;
        }
        self.base.written += written.saturating_sub(self.sampled.written);
        self.base.discarded += discarded.saturating_sub(self.sampled.discarded);
        Some(missing)
    }
}

/// One tracked disk's statistics file, kept open and re-read from its start.
#[derive(Debug)]
struct DiskStat {
    disk_dev: u32,
    file: std::fs::File,
    account: Account,
}

impl DiskStat {
    fn open(disk_dev: u32) -> Result<Self, TrackError> {
        let (major, minor) = (disk_dev >> 20, disk_dev & ((1 << 20) - 1));
        let disk = format!("{major}:{minor}");
        let sys = PathBuf::from(format!("/sys/dev/block/{disk}"));
        let iostats = sys.join("queue/iostats");
        if std::fs::read_to_string(&iostats).is_ok_and(|v| v.trim() == "0") {
            // Without statistics nothing proves that no write went unseen; they are
            // cheap, so they are turned on rather than given up.
            let _ = std::fs::write(&iostats, "1");
            if std::fs::read_to_string(&iostats).is_ok_and(|v| v.trim() == "0") {
                return Err(TrackError::NoStatistics { disk });
            }
            tracing::info!(disk = %disk, "turned the disk's I/O statistics on (queue/iostats), to check block tracking against them");
        }
        let path = sys.join("stat");
        let statistics = |source| TrackError::Statistics {
            disk: disk.clone(),
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(statistics)?;
        let start = read_completed(&file).map_err(statistics)?;
        Ok(Self {
            disk_dev,
            file,
            account: Account::new(start),
        })
    }

    fn read(&self) -> io::Result<Completed> {
        read_completed(&self.file)
    }
}

/// Reads a `stat` file kept open, from its start (sysfs regenerates it on each read).
fn read_completed(file: &std::fs::File) -> io::Result<Completed> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 512];
    let n = file.read_at(&mut buf, 0)?;
    std::str::from_utf8(&buf[..n])
        .ok()
        .and_then(Completed::parse)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected format"))
}

/// Field offsets in the tracepoint's raw record.
#[derive(Debug, Clone, Copy)]
struct Layout {
    dev: usize,
    sector: usize,
    nr_sector: usize,
    rwbs: (usize, usize),
}

impl Layout {
    fn parse(format: &str) -> Result<Self, TrackError> {
        let field = |name: &'static str| -> Result<(usize, usize), TrackError> {
            format
                .lines()
                .find_map(|line| {
                    let line = line.trim();
                    let decl = line.strip_prefix("field:")?.split(';').next()?;
                    let field_name = decl.split_whitespace().last()?;
                    let field_name = field_name.split('[').next()?;
                    if field_name != name {
                        return None;
                    }
                    let num = |key: &str| -> Option<usize> {
                        line.split(';')
                            .find_map(|part| part.trim().strip_prefix(key))?
                            .parse()
                            .ok()
                    };
                    Some((num("offset:")?, num("size:")?))
                })
                .ok_or(TrackError::Field(name))
        };
        let check = |name: &'static str, expected: usize| {
            let (offset, size) = field(name)?;
            if size == expected {
                Ok(offset)
            } else {
                Err(TrackError::Field(name))
            }
        };
        Ok(Self {
            dev: check("dev", 4)?,
            sector: check("sector", 8)?,
            nr_sector: check("nr_sector", 4)?,
            rwbs: field("rwbs")?,
        })
    }
}

/// One CPU's perf event and its mapped ring.
#[derive(Debug)]
struct Ring {
    /// Whether `read(2)` reports lost samples; otherwise the ring's LOST records do.
    counts_lost: bool,
    lost_seen: u64,
    fd: OwnedFd,
    base: *mut u8,
    mapped: usize,
    data_offset: usize,
    data_size: usize,
}

// SAFETY: the mapping is owned by the ring and touched only through &mut self (or, for
// the atomic head and tail words, atomically); moving it to another thread is fine.
unsafe impl Send for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: `base` and `mapped` are the mapping made in `Ring::open`, unmapped once.
        unsafe {
            libc::ioctl(self.fd.as_raw_fd(), PERF_EVENT_IOC_DISABLE, 0);
            libc::munmap(self.base.cast(), self.mapped);
        }
    }
}

impl Ring {
    fn open(id: u64, cpu: usize, pages: usize) -> Result<Self, TrackError> {
        let page = page_size();
        let open = |read_format: u64| {
            let attr = PerfEventAttr {
                kind: PERF_TYPE_TRACEPOINT,
                size: std::mem::size_of::<PerfEventAttr>() as u32,
                config: id,
                sample_period: 1,
                sample_type: PERF_SAMPLE_RAW,
                read_format,
                flags: ATTR_DISABLED | ATTR_WATERMARK,
                // Wake a waiting reader once a quarter of the ring is full.
                wakeup_watermark: (pages * page / 4).max(1) as u32,
                ..Default::default()
            };
            // SAFETY: perf_event_open reads one attribute struct of the size it names,
            // alive for the call; pid -1 with a cpu traces every process on that CPU.
            unsafe {
                libc::syscall(
                    libc::SYS_perf_event_open,
                    &attr as *const PerfEventAttr,
                    -1 as libc::pid_t,
                    cpu as libc::c_int,
                    -1 as libc::c_int,
                    PERF_FLAG_FD_CLOEXEC,
                )
            }
        };
        let (mut fd, mut counts_lost) = (open(PERF_FORMAT_LOST), true);
        if fd < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            // A kernel before 6.0: losses come as LOST records only.
            (fd, counts_lost) = (open(0), false);
        }
        if fd < 0 {
            return Err(TrackError::Open {
                cpu,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: the syscall returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mapped = (1 + pages) * page;
        // SAFETY: maps the event's metadata page and ring, shared, for reading and for
        // writing the tail; the length is 1 + 2^n pages as perf requires.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(TrackError::Map {
                cpu,
                source: io::Error::last_os_error(),
            });
        }
        let base = base.cast::<u8>();
        // SAFETY: the metadata page is mapped; these u64 fields are within it.
        let (data_offset, data_size) = unsafe {
            (
                std::ptr::read_volatile(base.add(DATA_OFFSET).cast::<u64>()) as usize,
                std::ptr::read_volatile(base.add(DATA_SIZE).cast::<u64>()) as usize,
            )
        };
        let (data_offset, data_size) = if data_size == 0 {
            (page, pages * page)
        } else {
            (data_offset, data_size)
        };
        Ok(Self {
            counts_lost,
            lost_seen: 0,
            fd,
            base,
            mapped,
            data_offset,
            data_size,
        })
    }

    /// Samples lost since the last call, by the event's counter (when it has one).
    fn newly_lost(&mut self) -> u64 {
        if !self.counts_lost {
            return 0;
        }
        let mut values = [0u64; 2];
        // SAFETY: read(2) of a perf event with read_format LOST writes two u64s into
        // the buffer, which is that large and alive for the call.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                values.as_mut_ptr().cast(),
                std::mem::size_of_val(&values),
            )
        };
        if n != std::mem::size_of_val(&values) as isize {
            // Unreadable: count it as a loss rather than trust a silence.
            return 1;
        }
        let lost = values[1].saturating_sub(self.lost_seen);
        self.lost_seen = values[1];
        lost
    }

    fn head(&self) -> &AtomicU64 {
        // SAFETY: data_head is a naturally aligned u64 in the mapped metadata page, which
        // lives as long as `self`; the kernel writes it, so it is read atomically.
        unsafe { &*self.base.add(DATA_HEAD).cast::<AtomicU64>() }
    }

    fn tail(&self) -> &AtomicU64 {
        // SAFETY: as for `head`; this side writes it.
        unsafe { &*self.base.add(DATA_TAIL).cast::<AtomicU64>() }
    }

    /// Copies `len` bytes of the ring from position `at` (wrapping) into `out`.
    fn copy(&self, at: u64, out: &mut [u8]) {
        let mut position = (at % self.data_size as u64) as usize;
        let mut done = 0;
        while done < out.len() {
            let chunk = (self.data_size - position).min(out.len() - done);
            // SAFETY: `position + chunk <= data_size`, inside the mapped data area; the
            // kernel does not write there until the tail moves past it.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.base.add(self.data_offset + position),
                    out[done..].as_mut_ptr(),
                    chunk,
                );
            }
            done += chunk;
            position = 0;
        }
    }

    /// Takes every record the kernel has written so far.
    fn drain(&mut self, mut record: impl FnMut(u32, &[u8])) {
        let head = self.head().load(Ordering::Acquire);
        let mut tail = self.tail().load(Ordering::Relaxed);
        let mut header = [0u8; 8];
        let mut body = Vec::new();
        while tail < head {
            self.copy(tail, &mut header);
            let kind = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]);
            let size = u16::from_ne_bytes([header[6], header[7]]) as u64;
            if size < 8 || tail + size > head {
                // Cannot happen with a sane kernel; skip what is there rather than loop.
                tail = head;
                break;
            }
            body.resize(size as usize - 8, 0);
            self.copy(tail + 8, &mut body);
            record(kind, &body);
            tail += size;
        }
        self.tail().store(tail, Ordering::Release);
    }
}

pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// Where tracefs is mounted (mounting it if need be), with the tracepoint in it.
fn tracefs_root() -> Result<PathBuf, TrackError> {
    for root in TRACEFS {
        if Path::new(root).join(TRACEPOINT).join("id").exists() {
            return Ok(PathBuf::from(root));
        }
    }
    let root = TRACEFS[0];
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (source, target, fstype) = (c("nodev"), c(root), c("tracefs"));
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call and no data.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 && Path::new(root).join(TRACEPOINT).join("id").exists() {
        return Ok(PathBuf::from(root));
    }
    Err(TrackError::NoTracefs(if rc == 0 {
        format!("{} has no {TRACEPOINT}", root)
    } else {
        format!("mounting it at {root}: {}", io::Error::last_os_error())
    }))
}

fn online_cpus() -> Vec<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    cpus.extend(a..=b);
                }
            }
            None => cpus.extend(part.parse::<usize>().ok()),
        }
    }
    if cpus.is_empty() {
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
        cpus.extend(0..n);
    }
    cpus
}

/// Where the tracker reads the tracepoint from (`--trace-source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TraceSource {
    /// An ftrace instance, else perf events.
    #[default]
    Auto,
    Ftrace,
    Perf,
}

impl std::str::FromStr for TraceSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "ftrace" => Ok(Self::Ftrace),
            "perf" => Ok(Self::Perf),
            other => Err(format!(
                "unknown trace source {other:?}: use auto, ftrace or perf"
            )),
        }
    }
}

/// The buffers the samples arrive in.
#[derive(Debug)]
enum Source {
    Ftrace(crate::ftrace::Instance),
    Perf(Vec<Ring>),
}

/// The completed requests of the tracked volumes.
#[derive(Debug)]
pub struct Tracker {
    source: Source,
    layout: Layout,
    volumes: Vec<Placement>,
    by_disk: HashMap<u32, Vec<usize>>,
    /// Each tracked disk's statistics, balanced against its samples at every drain.
    stats: Vec<DiskStat>,
    /// Test hook: every this many write samples, one is ignored as the kernel sometimes
    /// drops one, so that the balance against the statistics is exercised.
    ignore_every: Option<u64>,
    ignored_count: u64,
    /// Samples the kernel reported lost, all buffers together.
    lost: u64,
    /// Times the statistics showed completions that no sample named.
    unseen: u64,
    /// Samples taken, all buffers together.
    samples: u64,
}

impl Tracker {
    /// Starts tracking `volumes` (each tracked from now on) through the first source
    /// that works, with buffers of `pages` pages per CPU.
    pub fn start(volumes: &[Placement], pages: usize) -> Result<Self, TrackError> {
        Self::start_with(volumes, pages, TraceSource::Auto)
    }

    /// As [`Self::start`], through `source`.
    pub fn start_with(
        volumes: &[Placement],
        pages: usize,
        source: TraceSource,
    ) -> Result<Self, TrackError> {
        let root = tracefs_root()?;
        let dir = root.join(TRACEPOINT);
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|source| TrackError::Format {
                path: dir.join(name),
                source,
            })
        };
        let id: u64 = read("id")?
            .trim()
            .parse()
            .map_err(|_| TrackError::Field("id"))?;
        let layout = Layout::parse(&read("format")?)?;
        let mut by_disk: HashMap<u32, Vec<usize>> = HashMap::new();
        for (index, volume) in volumes.iter().enumerate() {
            by_disk.entry(volume.disk_dev).or_default().push(index);
        }
        let mut disks: Vec<u32> = by_disk.keys().copied().collect();
        disks.sort_unstable();
        let devices = disks
            .iter()
            .map(|dev| format!("dev == {dev}"))
            .collect::<Vec<_>>()
            .join(" || ");
        // Only requests that carry data and may change it: the kernel drops reads and
        // flushes before they cost a sample. Kernels that cannot glob get the devices only.
        let filters = [
            format!(
                "({devices}) && nr_sector > 0 && (rwbs ~ \"*W*\" || rwbs ~ \"*D*\" || rwbs ~ \"*N*\")"
            ),
            devices,
        ];
        let pages = pages.next_power_of_two().max(1);
        let cpus = online_cpus();
        let ftrace = || -> Result<Source, TrackError> {
            let id = u16::try_from(id).map_err(|_| TrackError::Field("id"))?;
            let kib = pages * page_size() / 1024;
            Ok(Source::Ftrace(crate::ftrace::Instance::create(
                &root,
                TRACEPOINT.trim_start_matches("events/"),
                id,
                &filters,
                kib,
                &cpus,
            )?))
        };
        let perf = || -> Result<Source, TrackError> {
            let filters = filters
                .clone()
                .map(|f| std::ffi::CString::new(f).expect("no NUL in a filter of numbers"));
            let mut rings = Vec::new();
            for &cpu in &cpus {
                let ring = Ring::open(id, cpu, pages)?;
                // SAFETY: each filter is a NUL-terminated string alive for the call.
                let set = filters.iter().any(|filter| unsafe {
                    libc::ioctl(
                        ring.fd.as_raw_fd(),
                        PERF_EVENT_IOC_SET_FILTER,
                        filter.as_ptr(),
                    ) == 0
                });
                if !set {
                    return Err(TrackError::Filter(io::Error::last_os_error()));
                }
                rings.push(ring);
            }
            for ring in &rings {
                // SAFETY: enabling an event we own.
                if unsafe { libc::ioctl(ring.fd.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0) } != 0 {
                    return Err(TrackError::Filter(io::Error::last_os_error()));
                }
            }
            Ok(Source::Perf(rings))
        };
        let source = match source {
            TraceSource::Ftrace => ftrace()?,
            TraceSource::Perf => perf()?,
            TraceSource::Auto => match ftrace() {
                Ok(source) => source,
                Err(ftrace_error) => match perf() {
                    Ok(source) => {
                        tracing::info!(error = %blockferry_util::error_chain(&ftrace_error), "block tracking reads perf events: no ftrace instance");
                        source
                    }
                    Err(perf_error) => {
                        return Err(TrackError::NoSource {
                            ftrace: blockferry_util::error_chain(&ftrace_error),
                            perf: blockferry_util::error_chain(&perf_error),
                        });
                    }
                },
            },
        };
        // Read once the events are on: what they count from here on, samples name.
        let stats = disks
            .iter()
            .map(|&dev| DiskStat::open(dev))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            source,
            layout,
            volumes: volumes.to_vec(),
            by_disk,
            stats,
            ignore_every: None,
            ignored_count: 0,
            lost: 0,
            unseen: 0,
            samples: 0,
        })
    }

    /// Which source the samples come from: "ftrace" or "perf".
    pub fn source(&self) -> &'static str {
        match self.source {
            Source::Ftrace(_) => "ftrace",
            Source::Perf(_) => "perf",
        }
    }

    /// The ftrace instance's directory, when the samples come from one.
    pub fn instance(&self) -> Option<&Path> {
        match &self.source {
            Source::Ftrace(instance) => Some(instance.dir()),
            Source::Perf(_) => None,
        }
    }

    /// Test hook: ignores one write sample in every `every`, as if the kernel had dropped
    /// it without counting it (see the module's documentation).
    pub fn ignore_samples(&mut self, every: Option<u64>) {
        self.ignore_every = every.filter(|&n| n > 0);
    }

    /// Waits up to `timeout` for any buffer to hold a quarter of its size (returns early
    /// then); callers drain after it either way.
    pub fn wait(&self, timeout: std::time::Duration) {
        let fds: Vec<_> = match &self.source {
            Source::Ftrace(instance) => instance.pipes().map(|p| p.as_raw_fd()).collect(),
            Source::Perf(rings) => rings.iter().map(|r| r.fd.as_raw_fd()).collect(),
        };
        poll_readable(&fds, timeout);
    }

    /// A waiter of its own on the buffers (duplicated descriptors), so that one thread
    /// can wait while another drains.
    pub fn waiter(&self) -> io::Result<RingWaiter> {
        let fds = match &self.source {
            Source::Ftrace(instance) => crate::ftrace::duplicate(instance)?,
            Source::Perf(rings) => rings
                .iter()
                .map(|r| r.fd.try_clone())
                .collect::<io::Result<_>>()?,
        };
        Ok(RingWaiter { fds })
    }

    /// Takes every sample recorded so far, on every CPU, and reports the volume ranges
    /// they name (reads are skipped, should a kernel that cannot glob pass them), and
    /// any loss.
    pub fn drain(&mut self, mut change: impl FnMut(Change)) {
        // The statistics first: every request they count has its sample in a buffer now.
        let readings: Vec<Option<Completed>> = self
            .stats
            .iter()
            .map(|stat| match stat.read() {
                Ok(reading) => Some(reading),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read a tracked disk's statistics; this drain is not checked against them");
                    None
                }
            })
            .collect();
        let layout = self.layout;
        let (volumes, by_disk) = (&self.volumes, &self.by_disk);
        let stats = &mut self.stats;
        let (ignore_every, ignored_count) = (self.ignore_every, &mut self.ignored_count);
        let mut samples = 0u64;
        let mut sample = |raw: &[u8]| {
            let Some(event) = parse(&layout, raw) else {
                return;
            };
            samples += 1;
            if !event.writes {
                return;
            }
            if let Some(every) = ignore_every {
                *ignored_count += 1;
                if *ignored_count % every == 0 {
                    return;
                }
            }
            if let Some(stat) = stats.iter_mut().find(|s| s.disk_dev == event.dev) {
                stat.account
                    .sampled((event.end - event.offset) / 512, event.discard);
            }
            for &index in by_disk.get(&event.dev).into_iter().flatten() {
                let volume = volumes[index];
                let start = event.offset.max(volume.start);
                let end = event.end.min(volume.start + volume.len);
                if start < end {
                    change(Change::Written {
                        volume: index,
                        offset: start - volume.start,
                        len: end - start,
                    });
                }
            }
        };
        let lost = match &mut self.source {
            Source::Ftrace(instance) => instance.drain(&mut sample),
            Source::Perf(rings) => {
                let mut lost = 0u64;
                for ring in rings {
                    let counts_lost = ring.counts_lost;
                    ring.drain(|kind, body| match kind {
                        // u32 size, then the raw tracepoint record.
                        PERF_RECORD_SAMPLE => {
                            if let Some(raw) = body.get(4..) {
                                sample(raw);
                            }
                        }
                        PERF_RECORD_LOST if !counts_lost => {
                            // u64 id, u64 lost.
                            lost += body
                                .get(8..16)
                                .and_then(|b| b.try_into().ok())
                                .map_or(1, u64::from_ne_bytes);
                        }
                        _ => {}
                    });
                    lost += ring.newly_lost();
                }
                lost
            }
        };
        if lost > 0 {
            change(Change::Lost(lost));
        }
        self.samples += samples;
        self.lost += lost;
        for (stat, reading) in self.stats.iter_mut().zip(readings) {
            if let Some(sectors) = reading.and_then(|r| stat.account.check(r)) {
                self.unseen += 1;
                change(Change::Unseen {
                    disk_dev: stat.disk_dev,
                    sectors,
                });
            }
        }
    }

    /// Samples taken, samples the kernel reported lost, and times the disks' statistics
    /// showed completions that no sample named, so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        (self.samples, self.lost, self.unseen)
    }
}

/// Waits on a tracker's buffers without holding the tracker.
#[derive(Debug)]
pub struct RingWaiter {
    fds: Vec<OwnedFd>,
}

impl RingWaiter {
    /// As [`Tracker::wait`].
    pub fn wait(&self, timeout: std::time::Duration) {
        let fds: Vec<_> = self.fds.iter().map(|fd| fd.as_raw_fd()).collect();
        poll_readable(&fds, timeout);
    }
}

fn poll_readable(fds: &[std::os::fd::RawFd], timeout: std::time::Duration) {
    let mut fds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: poll on descriptors the caller owns, with an array that outlives the call.
    unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            timeout.as_millis().min(i32::MAX as u128) as i32,
        );
    }
}

/// A completed request, as a byte range of its disk.
struct Request {
    dev: u32,
    offset: u64,
    end: u64,
    /// Anything but a read or a bare flush: a write, discard, write-zeroes, or an
    /// operation this code does not know (marked dirty rather than missed).
    writes: bool,
    /// A discard (or secure erase), which the statistics count apart.
    discard: bool,
}

fn parse(layout: &Layout, raw: &[u8]) -> Option<Request> {
    let u32_at = |at: usize| raw.get(at..at + 4)?.try_into().ok().map(u32::from_ne_bytes);
    let u64_at = |at: usize| raw.get(at..at + 8)?.try_into().ok().map(u64::from_ne_bytes);
    let dev = u32_at(layout.dev)?;
    let sector = u64_at(layout.sector)?;
    let sectors = u32_at(layout.nr_sector)?;
    let rwbs = raw.get(layout.rwbs.0..layout.rwbs.0 + layout.rwbs.1)?;
    let op = rwbs
        .iter()
        .take_while(|&&b| b != 0)
        .copied()
        .collect::<Vec<u8>>();
    // 'F' first is a preflush; the operation letter follows it (a bare flush is "F").
    let letters: &[u8] = match op.as_slice() {
        [b'F', rest @ ..] if !rest.is_empty() => rest,
        other => other,
    };
    let writes = sectors > 0 && !matches!(letters.first(), Some(b'R') | Some(b'F') | None);
    let discard = letters.first() == Some(&b'D');
    let offset = sector.checked_mul(512)?;
    let end = offset.checked_add(u64::from(sectors) * 512)?;
    Some(Request {
        dev,
        offset,
        end,
        writes,
        discard,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: block_rq_complete\nID: 2107\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;\n\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;\n\tfield:int error;\toffset:28;\tsize:4;\tsigned:1;\n\tfield:unsigned short ioprio;\toffset:32;\tsize:2;\tsigned:0;\n\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;\n";

    fn record(dev: u32, sector: u64, sectors: u32, rwbs: &str) -> Vec<u8> {
        let mut raw = vec![0u8; 48];
        raw[8..12].copy_from_slice(&dev.to_ne_bytes());
        raw[16..24].copy_from_slice(&sector.to_ne_bytes());
        raw[24..28].copy_from_slice(&sectors.to_ne_bytes());
        raw[34..34 + rwbs.len()].copy_from_slice(rwbs.as_bytes());
        raw
    }

    #[test]
    fn the_disk_statistics_give_written_and_discarded_sectors() {
        let stat = " 6705836       21 4088970490   956121  2372670   135133 46948582   314355        0   621256  1312210      271      246  1711108      341    68968    41392\n";
        assert_eq!(
            Completed::parse(stat),
            Some(Completed {
                written: 46_948_582,
                discarded: 1_711_108
            })
        );
        // Before Linux 4.18: no discard fields.
        assert_eq!(
            Completed::parse("1 2 3 4 5 6 7 8 9 10 11"),
            Some(Completed {
                written: 7,
                discarded: 0
            })
        );
        assert_eq!(Completed::parse("1 2 3"), None);
        assert_eq!(Completed::parse("1 2 3 4 5 6 x 8 9 10 11"), None);
    }

    fn at(written: u64, discarded: u64) -> Completed {
        Completed { written, discarded }
    }

    #[test]
    fn an_account_reports_each_shortfall_once_and_tolerates_a_surplus() {
        let mut account = Account::new(at(1000, 50));
        assert_eq!(account.check(at(1000, 50)), None);
        // Samples ahead of the reading: requests that completed after it.
        account.sampled(8, false);
        account.sampled(16, true);
        assert_eq!(account.check(at(1000, 50)), None);
        assert_eq!(account.check(at(1008, 66)), None, "balanced");
        // 8 written sectors with no sample, then 8 discarded ones.
        assert_eq!(account.check(at(1016, 66)), Some(8));
        assert_eq!(account.check(at(1016, 66)), None, "reported once");
        account.sampled(8, false);
        assert_eq!(account.check(at(1024, 66)), None);
        assert_eq!(account.check(at(1024, 74)), Some(8));
        assert_eq!(account.check(at(1024, 74)), None);
        // A reading that went backwards (a counter reset) is no shortfall.
        assert_eq!(account.check(at(0, 0)), None);
    }

    #[test]
    fn records_are_read_by_the_layout_the_kernel_describes() {
        let layout = Layout::parse(FORMAT).unwrap();
        assert_eq!((layout.dev, layout.sector, layout.nr_sector), (8, 16, 24));
        assert_eq!(layout.rwbs, (34, 10));
        for (rwbs, writes) in [
            ("W", true),
            ("WS", true),
            ("FWFS", true),
            ("D", true),
            ("N", true),
            ("R", false),
            ("RA", false),
            ("F", false),
            ("FF", false),
        ] {
            let event = parse(&layout, &record(7 << 20, 8, 16, rwbs)).unwrap();
            assert_eq!(event.writes, writes, "{rwbs}");
            assert_eq!((event.offset, event.end), (4096, 4096 + 8192));
        }
        // A flush without data changes nothing; a truncated record is ignored.
        assert!(!parse(&layout, &record(1, 0, 0, "W")).unwrap().writes);
        assert!(parse(&layout, &record(1, 0, 8, "W")[..20]).is_none());
        assert!(Layout::parse("format:\n").is_err());
    }
}
