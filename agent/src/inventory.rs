//! What the agent reports about its source server: host name and id, CPUs, RAM, OS,
//! disks (block device names on Linux) and private IP addresses. Read from /proc, /sys
//! and /etc; anything unreadable is reported empty rather than failing the agent.

use std::collections::BTreeMap;
use std::fs;
use std::net::IpAddr;

use blockferry_proto::limits::{MAX_CPUS, MAX_INVENTORY_DISKS, MAX_IPS};
use blockferry_proto::{Cpu, DiskSpec, Inventory};

pub fn collect() -> Inventory {
    Inventory {
        host_name: read_trimmed("/proc/sys/kernel/hostname"),
        host_id: host_id(),
        cpus: cpus(),
        ram_bytes: ram_bytes(),
        os: os(),
        disks: block_devices(),
        private_ips: private_ips(),
    }
}

fn read_trimmed(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The machine-id survives reboots and is unique per installation; the DMI product UUID
/// is the fallback on systems without one.
pub fn host_id() -> String {
    [
        "/etc/machine-id",
        "/var/lib/dbus/machine-id",
        "/sys/class/dmi/id/product_uuid",
    ]
    .iter()
    .map(|p| read_trimmed(p))
    .find(|id| !id.is_empty())
    .unwrap_or_default()
}

/// One entry per CPU model, with its core count (distinct (physical id, core id) pairs,
/// or logical processors where the kernel reports no topology).
fn cpus() -> Vec<Cpu> {
    let text = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut models: BTreeMap<String, (std::collections::BTreeSet<(String, String)>, u32)> =
        BTreeMap::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let field = |name: &str| {
            block
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.trim() == name).then(|| v.trim().to_owned())
                })
                .unwrap_or_default()
        };
        let model = field("model name");
        let entry = models.entry(model).or_default();
        entry.0.insert((field("physical id"), field("core id")));
        entry.1 += 1;
    }
    models
        .into_iter()
        .take(MAX_CPUS)
        .map(|(model, (cores, logical))| Cpu {
            model: if model.is_empty() {
                "unknown".into()
            } else {
                model
            },
            cores: if cores.len() > 1 {
                cores.len() as u32
            } else {
                logical
            },
        })
        .collect()
}

fn ram_bytes() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

fn os() -> String {
    let release = fs::read_to_string("/etc/os-release").unwrap_or_default();
    let pretty = release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| "Linux".into());
    let kernel = read_trimmed("/proc/sys/kernel/osrelease");
    format!("{pretty}, Linux {kernel}")
}

/// Whole block devices from /sys/block (partitions are part of their disk), with sizes.
fn block_devices() -> Vec<DiskSpec> {
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut disks: Vec<DiskSpec> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let sectors: u64 = read_trimmed(&format!("/sys/block/{name}/size"))
                .parse()
                .ok()?;
            (sectors > 0).then(|| DiskSpec {
                name,
                size: sectors * 512,
            })
        })
        .filter(|d| d.name.len() <= blockferry_proto::limits::MAX_DISK_NAME_LEN)
        .collect();
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    disks.truncate(MAX_INVENTORY_DISKS);
    disks
}

/// Addresses of the machine's interfaces that are private (RFC 1918, CGNAT, ULA,
/// link-local excluded), as the replication network sees them.
fn private_ips() -> Vec<String> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cursor };
        if let Some(ip) = sockaddr_ip(ifa.ifa_addr)
            && is_private(&ip)
            && !out.contains(&ip.to_string())
        {
            out.push(ip.to_string());
        }
        cursor = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    out.truncate(MAX_IPS);
    out
}

fn sockaddr_ip(addr: *const libc::sockaddr) -> Option<IpAddr> {
    if addr.is_null() {
        return None;
    }
    // SAFETY: non-null sockaddr from getifaddrs; the family says which struct it is.
    unsafe {
        match i32::from((*addr).sa_family) {
            libc::AF_INET => {
                let sin = &*(addr.cast::<libc::sockaddr_in>());
                Some(IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ))
            }
            libc::AF_INET6 => {
                let sin6 = &*(addr.cast::<libc::sockaddr_in6>());
                Some(IpAddr::from(sin6.sin6_addr.s6_addr))
            }
            _ => None,
        }
    }
}

fn is_private(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private() || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inventory_describes_this_machine() {
        let inv = collect();
        assert!(!inv.host_name.is_empty());
        assert!(inv.ram_bytes > 0);
        assert!(!inv.cpus.is_empty() && inv.cpus.iter().all(|c| c.cores > 0));
        assert!(inv.os.contains("Linux"));
    }

    #[test]
    fn private_ranges() {
        for ip in [
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "fd00::1",
        ] {
            assert!(is_private(&ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "127.0.0.1", "fe80::1", "2001:db8::1"] {
            assert!(!is_private(&ip.parse().unwrap()), "{ip}");
        }
    }
}
