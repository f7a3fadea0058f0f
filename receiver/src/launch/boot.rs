//! `launch --boot`: the launched disks booted here under qemu (direct kernel boot from
//! the kernel the image holds, serial console to `OUT/console.log`, user-mode networking)
//! and checked for health, then stopped. This is the operator's proof that a point is
//! usable; the copy is run for real elsewhere.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::prepare::BootFiles;
use crate::catalog::{BootRecord, ImageFormat};

/// How long a KVM guest may take to reach its init before the host is taken for one
/// where KVM stalls after the kernel's early setup (seen on nested hosts); TCG reaches
/// it in about 8 s on the development machine.
const KVM_INIT_WITHIN: Duration = Duration::from_secs(20);
/// Kernel lines that show the guest got past early setup into its init.
const INIT_MARKERS: [&str; 3] = [
    "Run /init as init process",
    "Freeing unused kernel",
    "systemd[1]",
];
/// How long the guest has to send its first bytes on the health port, before and after
/// an empty line is sent to it.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);
const GUEST_MEMORY_MIB: u32 = 1024;

#[derive(Debug, Clone)]
pub struct BootOptions {
    /// A TCP port in the guest that must answer; when absent, the serial console's login
    /// prompt is the health check.
    pub health_port: Option<u16>,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{0}: {1} (the appliance installs qemu-system-x86)")]
    Spawn(String, std::io::Error),
    #[error("{0}")]
    Io(String),
}

/// Boots `disks` with `files` and waits for the health check or `options.timeout`. The
/// verdict is the answer either way; only a boot that could not be tried is an error.
pub(crate) fn boot(
    files: &BootFiles,
    disks: &[(PathBuf, ImageFormat)],
    out: &Path,
    options: &BootOptions,
) -> Result<BootRecord, BootError> {
    let started = Instant::now();
    let console = out.join("console.log");
    if Path::new("/dev/kvm").exists() {
        match run(
            files,
            disks,
            &console,
            options,
            "kvm",
            Some(KVM_INIT_WITHIN),
        )? {
            Some(verdict) => return Ok(verdict.record("kvm", started)),
            None => tracing::warn!(
                "the launched guest did not reach its init under KVM within {KVM_INIT_WITHIN:?}; booting it under TCG (emulated, much slower)"
            ),
        }
    } else {
        tracing::warn!("no /dev/kvm: booting the launched guest under TCG (emulated, much slower)");
    }
    let verdict = run(files, disks, &console, options, "tcg", None)?
        .unwrap_or_else(|| Verdict::unhealthy("the guest did not start".into()));
    Ok(verdict.record("tcg", started))
}

struct Verdict {
    healthy: bool,
    detail: String,
}

impl Verdict {
    fn unhealthy(detail: String) -> Self {
        Self {
            healthy: false,
            detail,
        }
    }

    fn record(self, accelerator: &str, started: Instant) -> BootRecord {
        BootRecord {
            accelerator: accelerator.to_owned(),
            healthy: self.healthy,
            detail: self.detail,
            seconds: started.elapsed().as_secs(),
        }
    }
}

/// Kills qemu however the check ends.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One boot under `accelerator`. `None`: the guest did not reach its init within
/// `init_within` (try another accelerator).
fn run(
    files: &BootFiles,
    disks: &[(PathBuf, ImageFormat)],
    console: &Path,
    options: &BootOptions,
    accelerator: &str,
    init_within: Option<Duration>,
) -> Result<Option<Verdict>, BootError> {
    let _ = std::fs::remove_file(console);
    let host_port = match options.health_port {
        Some(_) => Some(free_port()?),
        None => None,
    };
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", accelerator, "-smp", "2"])
        .args(["-m", &GUEST_MEMORY_MIB.to_string()])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&files.kernel)
        .arg("-append")
        .arg(format!(
            "root=UUID={} rw console=ttyS0 net.ifnames=0 panic=-1",
            files.root_uuid
        ));
    if let Some(initrd) = &files.initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    for (disk, format) in disks {
        // cache=none: what the guest writes reaches the image, as on a real disk.
        cmd.arg("-drive").arg(format!(
            "file={},if=virtio,format={},cache=none",
            disk.display(),
            format.name()
        ));
    }
    let mut netdev = "user,id=net0".to_owned();
    if let (Some(host), Some(guest)) = (host_port, options.health_port) {
        netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
    }
    cmd.args(["-netdev", &netdev, "-device", "virtio-net-pci,netdev=net0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .map_err(|e| BootError::Spawn("qemu-system-x86_64".into(), e))?;
    let mut qemu = Qemu(child);
    tracing::info!(accelerator, console = %console.display(), "booting the launched disks");
    let started = Instant::now();
    let read = || std::fs::read_to_string(console).unwrap_or_default();
    loop {
        let text = read();
        let reached_init = INIT_MARKERS.iter().any(|m| text.contains(m));
        if let Some(status) = qemu
            .0
            .try_wait()
            .map_err(|e| BootError::Io(e.to_string()))?
        {
            let mut stderr = String::new();
            if let Some(mut e) = qemu.0.stderr.take() {
                let _ = e.read_to_string(&mut stderr);
            }
            if !reached_init && init_within.is_some() {
                return Ok(None);
            }
            return Ok(Some(Verdict::unhealthy(format!(
                "qemu ({accelerator}) exited with {status} before the health check passed: {}; console tail: {}",
                stderr.trim(),
                tail(&text)
            ))));
        }
        if let Some(within) = init_within
            && !reached_init
            && started.elapsed() > within
        {
            return Ok(None);
        }
        if reached_init {
            let verdict = match (host_port, options.health_port) {
                (Some(host), Some(guest)) => answers(host).map(|first| Verdict {
                    healthy: true,
                    detail: format!("guest port {guest} answered ({first})"),
                }),
                _ => text.contains("login:").then(|| Verdict {
                    healthy: true,
                    detail: "the serial console shows a login prompt".into(),
                }),
            };
            if let Some(verdict) = verdict {
                return Ok(Some(verdict));
            }
        }
        if started.elapsed() > options.timeout {
            let waited_for = match options.health_port {
                Some(port) => format!("guest port {port} to answer"),
                None => "a login prompt on the serial console".into(),
            };
            return Ok(Some(Verdict::unhealthy(format!(
                "no health within {:?} under {accelerator} (waited for {waited_for}); console tail: {}",
                options.timeout,
                tail(&text)
            ))));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A free loopback port for the forward (picked by the kernel; qemu binds it next).
fn free_port() -> Result<u16, BootError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| BootError::Io(format!("finding a free loopback port: {e}")))
}

/// Whether the guest answers on the forwarded port: it sends something, a banner or a
/// reply to an empty line. A connection merely held open proves nothing: qemu's user-mode
/// network accepts it on the host side before the guest has a listener.
fn answers(host_port: u16) -> Option<String> {
    use std::io::Write;
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, host_port));
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(ANSWER_WITHIN)).ok()?;
    let mut first = [0u8; 64];
    let read = match stream.read(&mut first) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            // A server that waits for the client to speak.
            stream.write_all(b"\r\n").ok()?;
            stream.read(&mut first)
        }
        read => read,
    };
    match read {
        Ok(n) if n > 0 => Some(format!(
            "sent {:?}",
            String::from_utf8_lossy(&first[..n]).trim()
        )),
        _ => None,
    }
}

fn tail(console: &str) -> String {
    let lines: Vec<&str> = console.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}
