//! An ftrace instance of the agent's own: a private trace buffer in tracefs
//! (`instances/blockferry-PID-N`) with one tracepoint enabled and filtered to the
//! tracked disks, read page by page from each CPU's `trace_pipe_raw`.
//!
//! Why ftrace and not only perf: on Linux 6.18 here, a `block_rq_complete` that fires in
//! a softirq on top of some tasks reaches neither a perf sample nor a BPF program, and
//! nothing counts the miss, while ftrace's own buffer records it (see
//! [`crate::blocktrace`]). A trace instance is private to its creator, so it does not
//! disturb the system's own tracing (`/sys/kernel/tracing/trace`) or other tools.
//!
//! The buffer does not overwrite (`options/overwrite` 0): when it is full the kernel
//! drops new events and counts them in `per_cpu/cpuN/stats`, and the next page read
//! carries a "missed events" flag. Both are losses for the caller.
//!
//! The binary format is the kernel's ring-buffer page (`events/header_page`): a u64
//! timestamp, a `local_t` commit word (data length in the low 27 bits, flags above it),
//! then events, each a u32 header (type_len:5, time_delta:27, `events/header_event`)
//! and its payload, which is the tracepoint's record as `format` describes it.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of data in a page, from the commit word.
const COMMIT_MASK: u64 = (1 << 27) - 1;
/// The commit word's flags: events were dropped before this page; their count follows
/// the data (when there was room for it).
const MISSED_EVENTS: u64 = 1 << 31;
const MISSED_STORED: u64 = 1 << 30;
/// The page header: u64 timestamp, then the 8-byte commit word (64-bit kernels).
const PAGE_HEADER: usize = 16;
const TYPE_PADDING: u32 = 29;
const TYPE_TIME_EXTEND: u32 = 30;
const TYPE_TIME_STAMP: u32 = 31;
const MAX_DATA_TYPE_LEN: u32 = 28;

/// Prefix of the agent's instance names; the rest is the creating process and a count.
const PREFIX: &str = "blockferry-";

/// One CPU's buffer of the instance.
#[derive(Debug)]
struct CpuBuffer {
    cpu: usize,
    pipe: File,
    stats: File,
    /// Dropped and overrun events by the stats file when last read.
    lost_seen: u64,
}

/// A private trace instance with one event enabled.
#[derive(Debug)]
pub(crate) struct Instance {
    dir: PathBuf,
    event: PathBuf,
    /// `common_type` of the enabled event: anything else in the buffer is skipped.
    id: u16,
    cpus: Vec<CpuBuffer>,
    page: Vec<u8>,
}

/// Why an instance could not be made.
#[derive(Debug, thiserror::Error)]
#[error("{what} {path}")]
pub struct InstanceError {
    what: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

fn error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstanceError {
    let path = path.to_owned();
    move |source| InstanceError { what, path, source }
}

impl Instance {
    /// Makes an instance under `tracefs` with `event` (e.g. `block/block_rq_complete`)
    /// enabled on `cpus`, filtered by the first of `filters` the kernel accepts, with
    /// `kib_per_cpu` of buffer per CPU. Events are recorded from the moment this returns.
    pub(crate) fn create(
        tracefs: &Path,
        event: &str,
        id: u16,
        filters: &[String],
        kib_per_cpu: usize,
        cpus: &[usize],
    ) -> Result<Self, InstanceError> {
        let instances = tracefs.join("instances");
        remove_abandoned(&instances);
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = instances.join(name);
        std::fs::create_dir(&dir).map_err(error("cannot create the trace instance", &dir))?;
        // From here on, Drop removes the directory again whatever fails.
        let mut instance = Self {
            event: dir.join("events").join(event),
            dir,
            id,
            cpus: Vec::new(),
            page: Vec::new(),
        };
        let write = |path: PathBuf, value: &str| {
            std::fs::write(&path, value).map_err(error("cannot write", &path))
        };
        write(instance.dir.join("options/overwrite"), "0")?;
        write(
            instance.dir.join("buffer_size_kb"),
            &kib_per_cpu.max(4).to_string(),
        )?;
        // Poll wakes a reader once a quarter of a CPU's buffer is full; the tracking
        // thread drains on a timer as well, so few writes still reach it quickly.
        write(instance.dir.join("buffer_percent"), "25")?;
        let filter_path = instance.event.join("filter");
        let mut refused = None;
        let accepted = filters
            .iter()
            .any(|filter| match std::fs::write(&filter_path, filter) {
                Ok(()) => true,
                Err(err) => {
                    refused = Some(err);
                    false
                }
            });
        if !accepted {
            return Err(InstanceError {
                what: "the kernel refused the device filter",
                path: filter_path,
                source: refused.unwrap_or_else(|| io::Error::other("no filter given")),
            });
        }
        let page_size = std::fs::read_to_string(instance.dir.join("buffer_subbuf_size_kb"))
            .ok()
            .and_then(|kb| kb.trim().parse::<usize>().ok())
            .map_or_else(crate::blocktrace::page_size, |kb| kb * 1024);
        instance.page = vec![0; page_size];
        for &cpu in cpus {
            let per_cpu = instance.dir.join(format!("per_cpu/cpu{cpu}"));
            let path = per_cpu.join("trace_pipe_raw");
            let pipe = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)
                .map_err(error("cannot open", &path))?;
            let path = per_cpu.join("stats");
            let stats = File::open(&path).map_err(error("cannot open", &path))?;
            instance.cpus.push(CpuBuffer {
                cpu,
                pipe,
                stats,
                lost_seen: 0,
            });
        }
        write(instance.event.join("enable"), "1")?;
        Ok(instance)
    }

    /// The instance's directory in tracefs.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The descriptors to poll for data (readable once a buffer is a quarter full).
    pub(crate) fn pipes(&self) -> impl Iterator<Item = &File> {
        self.cpus.iter().map(|c| &c.pipe)
    }

    /// Hands every event recorded so far, on every CPU, to `record` (the tracepoint's
    /// record, common fields first); returns the events the kernel dropped since the
    /// last drain (at least 1 for a drop of unknown size).
    pub(crate) fn drain(&mut self, mut record: impl FnMut(&[u8])) -> u64 {
        let mut lost = 0;
        let id = self.id;
        for cpu in &mut self.cpus {
            loop {
                match cpu.pipe.read(&mut self.page) {
                    Ok(0) => break,
                    Ok(n) => {
                        lost += parse_page(&self.page[..n], |data| {
                            if data.get(..2) == Some(&id.to_ne_bytes()[..]) {
                                record(data);
                            }
                        });
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => {
                        tracing::warn!(cpu = cpu.cpu, error = %err, "cannot read the trace buffer: counted as a loss");
                        lost += 1;
                        break;
                    }
                }
            }
            // After the pages, so that a drop counted here is never older than the
            // events handed on: a drop between the two is reported at the next drain.
            match read_lost(&cpu.stats) {
                Ok(total) => {
                    if total > cpu.lost_seen {
                        // The page flags may have reported the same drop; a loss
                        // counted twice costs nothing more than once.
                        lost += total - cpu.lost_seen;
                    }
                    cpu.lost_seen = total;
                }
                Err(err) => {
                    tracing::warn!(cpu = cpu.cpu, error = %err, "cannot read the trace buffer's statistics: counted as a loss");
                    lost += 1;
                }
            }
        }
        lost
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = std::fs::write(self.event.join("enable"), "0");
        // The directory cannot go while its files are open.
        self.cpus.clear();
        if let Err(err) = std::fs::remove_dir(&self.dir) {
            tracing::warn!(instance = %self.dir.display(), error = %err, "cannot remove the agent's trace instance; remove it with rmdir");
        }
    }
}

/// Removes the instances of agents that no longer run (killed before they could):
/// each holds a buffer of kernel memory per CPU until it is removed.
fn remove_abandoned(instances: &Path) {
    let Ok(entries) = std::fs::read_dir(instances) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // Events off first: an instance with enabled events may refuse to go.
        if let Ok(events) = std::fs::read_dir(entry.path().join("events")) {
            for system in events.flatten() {
                let _ = std::fs::write(system.path().join("enable"), "0");
            }
        }
        // Another tracker starting at the same moment may be removing it too, and holds
        // its files open for a moment (EBUSY): retry briefly; gone is gone.
        let mut attempt = 0;
        loop {
            match std::fs::remove_dir(entry.path()) {
                Ok(()) => {
                    tracing::info!(instance = %entry.path().display(), "removed the trace instance of an agent that no longer runs");
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) if attempt < 20 && err.raw_os_error() == Some(libc::EBUSY) => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    continue;
                }
                Err(err) => {
                    tracing::warn!(instance = %entry.path().display(), error = %err, "cannot remove the trace instance of an agent that no longer runs");
                }
            }
            break;
        }
    }
}

/// Events the kernel dropped or overwrote in one CPU's buffer, by its `stats` file.
fn read_lost(stats: &File) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 1024];
    let n = stats.read_at(&mut buf, 0)?;
    let text = std::str::from_utf8(&buf[..n])
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not text"))?;
    let mut total = 0u64;
    let mut found = false;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        if matches!(key.trim(), "overrun" | "commit overrun" | "dropped events") {
            let value = value
                .trim()
                .parse::<u64>()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, line.to_owned()))?;
            total += value;
            found = true;
        }
    }
    if !found {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no overrun or dropped events counts",
        ));
    }
    Ok(total)
}

/// Hands each data event of one ring-buffer page to `event`; returns the events the
/// page says were dropped before it (1 when it says so without a count).
fn parse_page(page: &[u8], mut event: impl FnMut(&[u8])) -> u64 {
    let Some(commit) = page
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_ne_bytes)
    else {
        return 0;
    };
    let end = (PAGE_HEADER + (commit & COMMIT_MASK) as usize).min(page.len());
    let mut lost = 0;
    if commit & MISSED_EVENTS != 0 {
        lost = 1;
        if commit & MISSED_STORED != 0
            && let Some(count) = page
                .get(end..end + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_ne_bytes)
        {
            lost = count.max(1);
        }
    }
    let u32_at = |at: usize| {
        page.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
    };
    let mut at = PAGE_HEADER;
    while at + 4 <= end {
        let Some(header) = u32_at(at) else { break };
        let (type_len, time_delta) = (header & 0x1f, header >> 5);
        at += 4;
        match type_len {
            0 => {
                // Length in the next word, which it counts itself.
                let Some(length) = u32_at(at) else { break };
                let length = length as usize;
                if length < 4 || at + length > end {
                    break;
                }
                event(&page[at + 4..at + length]);
                at += length.next_multiple_of(4);
            }
            1..=MAX_DATA_TYPE_LEN => {
                let length = type_len as usize * 4;
                if at + length > end {
                    break;
                }
                event(&page[at..at + length]);
                at += length;
            }
            TYPE_PADDING => {
                if time_delta == 0 {
                    // The rest of the page is unused.
                    break;
                }
                let Some(length) = u32_at(at) else { break };
                at += length as usize;
            }
            TYPE_TIME_EXTEND | TYPE_TIME_STAMP => at += 4,
            _ => unreachable!("type_len has 5 bits"),
        }
    }
    lost
}

/// Waits on an instance's pipes without holding the instance.
pub(crate) fn duplicate(instance: &Instance) -> io::Result<Vec<std::os::fd::OwnedFd>> {
    instance
        .pipes()
        .map(|f| f.as_raw_fd())
        .map(|fd| {
            // SAFETY: borrowing a descriptor the instance owns, only to duplicate it.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page as the kernel lays it out, from (type_len word, payload) events.
    fn page(commit_flags: u64, events: &[(u32, Vec<u8>)], tail: &[u8]) -> Vec<u8> {
        let mut data = Vec::new();
        for (header, payload) in events {
            data.extend_from_slice(&header.to_ne_bytes());
            data.extend_from_slice(payload);
        }
        let mut page = Vec::new();
        page.extend_from_slice(&7u64.to_ne_bytes());
        page.extend_from_slice(&(data.len() as u64 | commit_flags).to_ne_bytes());
        page.extend_from_slice(&data);
        page.extend_from_slice(tail);
        page.resize(4096, 0);
        page
    }

    fn events_of(page: &[u8]) -> (Vec<Vec<u8>>, u64) {
        let mut events = Vec::new();
        let lost = parse_page(page, |e| events.push(e.to_vec()));
        (events, lost)
    }

    #[test]
    fn a_page_gives_its_events_of_every_length_encoding() {
        let small = vec![1u8; 12];
        // A 120-byte record does not fit type_len (max 112 bytes): its length comes first,
        // counting itself.
        let mut large = (124u32).to_ne_bytes().to_vec();
        large.extend(std::iter::repeat_n(2u8, 120));
        let extend = 5u32.to_ne_bytes().to_vec();
        let padding = {
            let mut p = 8u32.to_ne_bytes().to_vec();
            p.extend([0u8; 4]);
            p
        };
        let page = page(
            0,
            &[
                (3 | (9 << 5), small.clone()),
                (TYPE_TIME_EXTEND, extend),
                (0, large),
                (TYPE_PADDING | (1 << 5), padding),
                (3, vec![3u8; 12]),
            ],
            &[],
        );
        let (events, lost) = events_of(&page);
        assert_eq!(lost, 0);
        assert_eq!(events.len(), 3, "{events:?}");
        assert_eq!(events[0], small);
        assert_eq!(events[1], vec![2u8; 120]);
        assert_eq!(events[2], vec![3u8; 12]);
    }

    #[test]
    fn a_page_after_dropped_events_says_how_many() {
        let page_with_count = page(
            MISSED_EVENTS | MISSED_STORED,
            &[(2, vec![0; 8])],
            &42u64.to_ne_bytes(),
        );
        assert_eq!(events_of(&page_with_count), (vec![vec![0; 8]], 42));
        let page_without = page(MISSED_EVENTS, &[(2, vec![0; 8])], &[]);
        assert_eq!(
            events_of(&page_without).1,
            1,
            "a drop of unknown size is one"
        );
    }

    #[test]
    fn a_torn_or_empty_page_gives_what_it_holds_and_no_more() {
        assert_eq!(events_of(&[]), (vec![], 0));
        // The end-of-page padding stops the walk.
        let page = page(0, &[(2, vec![5; 8]), (TYPE_PADDING, vec![])], &[]);
        assert_eq!(events_of(&page).0, vec![vec![5; 8]]);
        // A length running past the data is not read.
        let mut bad = 4000u32.to_ne_bytes().to_vec();
        bad.extend([0u8; 8]);
        let page = super::tests::page(0, &[(0, bad)], &[]);
        assert_eq!(events_of(&page), (vec![], 0));
    }

    #[test]
    fn the_statistics_give_dropped_and_overrun_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stats");
        std::fs::write(
            &path,
            "entries: 3\noverrun: 2\ncommit overrun: 1\nbytes: 96\noldest event ts:  1.5\nnow ts:  2.0\ndropped events: 4\nread events: 9\n",
        )
        .unwrap();
        assert_eq!(read_lost(&File::open(&path).unwrap()).unwrap(), 7);
        std::fs::write(&path, "entries: 3\n").unwrap();
        assert!(read_lost(&File::open(&path).unwrap()).is_err());
    }
}
