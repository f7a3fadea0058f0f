//! The agent's own footprint, reported in heartbeats: CPU since the last sample and RSS,
//! from /proc/self.

use std::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Thousandths of one core, averaged since the previous sample.
    pub cpu_permille: u32,
    pub rss_bytes: u64,
}

#[derive(Debug)]
pub struct ProcessSampler {
    last_cpu_ticks: u64,
    last_at: Instant,
    ticks_per_second: u64,
    page_size: u64,
}

impl Default for ProcessSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl ProcessSampler {
    pub fn new() -> Self {
        // SAFETY: sysconf only reads configuration values.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        Self {
            last_cpu_ticks: cpu_ticks().unwrap_or(0),
            last_at: Instant::now(),
            ticks_per_second: u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100),
            page_size: u64::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096),
        }
    }

    pub fn sample(&mut self) -> Sample {
        let ticks = cpu_ticks().unwrap_or(self.last_cpu_ticks);
        let now = Instant::now();
        let elapsed = now.duration_since(self.last_at).as_secs_f64();
        let used = ticks.saturating_sub(self.last_cpu_ticks) as f64 / self.ticks_per_second as f64;
        self.last_cpu_ticks = ticks;
        self.last_at = now;
        let cpu_permille = if elapsed > 0.0 {
            (used / elapsed * 1000.0).round() as u32
        } else {
            0
        };
        Sample {
            cpu_permille,
            rss_bytes: rss_pages().unwrap_or(0) * self.page_size,
        }
    }
}

/// utime + stime of this process, in clock ticks (fields 14 and 15 of /proc/self/stat,
/// counted after the parenthesised command name, which may contain spaces).
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn rss_pages() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    statm.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_plausible() {
        let mut sampler = ProcessSampler::new();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed().as_millis() < 200 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let s = sampler.sample();
        assert!(s.rss_bytes > 1 << 20, "rss {}", s.rss_bytes);
        assert!(
            s.cpu_permille > 300,
            "a busy loop uses most of a core: {}",
            s.cpu_permille
        );
    }
}
