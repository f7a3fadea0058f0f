//! Debian guests for tests that need a kernel of their own (device-mapper, LVM: modules
//! this host does not have): a root file system built with mmdebstrap from Debian's
//! packages, booted by qemu with direct kernel boot and a serial console.
//!
//! The image is built once per recipe and kept under `/var/cache/blockferry-tests`
//! (the directory's name is a hash of the recipe). The guest's PID 1 is a shell script
//! baked into the image: it mounts the basics, runs `run.sh` from the test's transfer
//! disk (the second virtio disk, ext4 made with `mkfs.ext4 -d`), prints its exit status
//! and powers off. The root disk is opened with `snapshot=on`, so a run never changes
//! the cached image. qemu runs under KVM where it boots, else under TCG (said on stderr).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
const PACKAGES: &str = "linux-image-amd64,lvm2,iproute2,kmod,e2fsprogs,procps";
const INIT: &str = r#"#!/bin/sh
# PID 1 of blockferry's test guests.
# The initramfs has mounted some of these already.
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sys /sys 2>/dev/null
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
echo 1 > /proc/sys/kernel/sysrq
echo "blockferry-guest: init"
mkdir -p /t
if mount /dev/vdb /t; then
  cd /t && sh ./run.sh
  echo "blockferry-guest: exit $?"
  cd / && umount /t
else
  echo "blockferry-guest: exit no-transfer-disk"
fi
sync
echo o > /proc/sysrq-trigger
sleep 60
"#;

/// A built guest: kernel, initrd and root file system image.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
}

fn recipe() -> String {
    format!("{SUITE} {MIRROR} minbase {PACKAGES}\n{INIT}")
}

/// FNV-1a: stable across Rust releases, unlike the std hasher.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{cmd:?}: {e} (scripts/test installs it)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The guest image, built first if this recipe has none in the cache yet.
pub fn image() -> Result<GuestImage, String> {
    let cache = PathBuf::from("/var/cache/blockferry-tests");
    let dir = cache.join(format!("guest-{:016x}", fnv(&recipe())));
    let image = GuestImage {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        rootfs: dir.join("rootfs.img"),
    };
    if image.rootfs.exists() {
        return Ok(image);
    }
    std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let started = Instant::now();
    eprintln!(
        "building the test guest image into {} (once per recipe)",
        dir.display()
    );
    let work = tempfile::tempdir_in(&cache).map_err(|e| e.to_string())?;
    let root = work.path().join("root");
    run(Command::new("mmdebstrap")
        .args(["--variant=minbase", &format!("--include={PACKAGES}"), SUITE])
        .arg(&root)
        .arg(MIRROR))?;
    std::fs::write(root.join("blockferry-init"), INIT).map_err(|e| e.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        root.join("blockferry-init"),
        std::fs::Permissions::from_mode(0o755),
    )
    .map_err(|e| e.to_string())?;
    let built = work.path().join("built");
    std::fs::create_dir(&built).map_err(|e| e.to_string())?;
    let boot = std::fs::read_dir(root.join("boot")).map_err(|e| e.to_string())?;
    for entry in boot.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let target = if name.starts_with("vmlinuz-") {
            "vmlinuz"
        } else if name.starts_with("initrd.img-")
            && !name.contains(".dpkg")
            && !name.ends_with(".new")
        {
            "initrd.img"
        } else {
            continue;
        };
        std::fs::copy(entry.path(), built.join(target)).map_err(|e| e.to_string())?;
    }
    // The root file system as an ext4 image with room to spare for the guest's writes.
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "guestroot", "-d"])
        .arg(&root)
        .arg(built.join("rootfs.img"))
        .arg("2G"))?;
    for file in ["vmlinuz", "initrd.img", "rootfs.img"] {
        if !built.join(file).exists() {
            return Err(format!("the guest build produced no {file}"));
        }
    }
    match std::fs::rename(&built, &dir) {
        Ok(()) => {}
        // Built meanwhile by another test: use that one.
        Err(_) if image.rootfs.exists() => {}
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    }
    eprintln!("built the guest image in {:.0?}", started.elapsed());
    Ok(image)
}

/// What a guest run printed on its console, and how it ran.
#[derive(Debug)]
pub struct GuestRun {
    pub console: String,
    pub accelerator: &'static str,
}

impl GuestRun {
    /// The exit status `run.sh` reported, if the guest got that far.
    pub fn exit(&self) -> Option<&str> {
        self.console
            .lines()
            .find_map(|l| l.trim().strip_prefix("blockferry-guest: exit "))
    }
}

/// Boots `image` with `transfer` as its second disk and `disks` after it (raw files,
/// opened `cache=none`), user-mode networking (the host's loopback is 10.0.2.2 in the
/// guest), until it powers off or `limit` passes.
pub fn boot(
    image: &GuestImage,
    transfer: &Path,
    disks: &[&Path],
    limit: Duration,
) -> Result<GuestRun, String> {
    let kvm = Path::new("/dev/kvm").exists();
    if kvm {
        // KVM stalls on some hosts after the kernel's early setup (seen on the 2-core
        // development VM): the guest reaches its init in about 8 s under TCG there, so
        // 20 s without it under KVM means the stall; fall back.
        match boot_with(
            image,
            transfer,
            disks,
            limit,
            "kvm",
            Some(Duration::from_secs(20)),
        )? {
            Some(run) => return Ok(run),
            None => eprintln!("the guest did not reach its init under KVM; booting it under TCG"),
        }
    } else {
        eprintln!("no /dev/kvm: booting the guest under TCG (slower)");
    }
    boot_with(image, transfer, disks, limit, "tcg", None)?
        .ok_or_else(|| "the guest did not reach its init under TCG".to_owned())
}

fn boot_with(
    image: &GuestImage,
    transfer: &Path,
    disks: &[&Path],
    limit: Duration,
    accelerator: &'static str,
    init_within: Option<Duration>,
) -> Result<Option<GuestRun>, String> {
    let console = tempfile::NamedTempFile::new().map_err(|e| e.to_string())?;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", accelerator, "-m", "1024", "-smp", "2"])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.path().display()))
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args([
            "-append",
            "root=/dev/vda rw console=ttyS0 init=/blockferry-init net.ifnames=0 panic=-1 quiet",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},if=virtio,format=raw,snapshot=on",
            image.rootfs.display()
        ))
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=raw", transfer.display()));
    for disk in disks {
        cmd.arg("-drive").arg(format!(
            "file={},if=virtio,format=raw,cache=none,discard=unmap",
            disk.display()
        ));
    }
    cmd.args([
        "-netdev",
        "user,id=net0",
        "-device",
        "virtio-net-pci,netdev=net0",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut qemu = cmd
        .spawn()
        .map_err(|e| format!("qemu-system-x86_64: {e} (scripts/test installs qemu-system-x86)"))?;
    let started = Instant::now();
    let read = || std::fs::read_to_string(console.path()).unwrap_or_default();
    loop {
        if let Some(status) = qemu.try_wait().map_err(|e| e.to_string())? {
            let console = read();
            if !console.contains("blockferry-guest: init") {
                if init_within.is_some() {
                    return Ok(None);
                }
                let mut stderr = String::new();
                use std::io::Read;
                if let Some(mut e) = qemu.stderr.take() {
                    let _ = e.read_to_string(&mut stderr);
                }
                return Err(format!(
                    "qemu ({accelerator}) exited with {status} before the guest's init:\n{stderr}\n{console}"
                ));
            }
            return Ok(Some(GuestRun {
                console,
                accelerator,
            }));
        }
        let elapsed = started.elapsed();
        if let Some(within) = init_within
            && elapsed > within
            && !read().contains("blockferry-guest: init")
        {
            let _ = qemu.kill();
            let _ = qemu.wait();
            return Ok(None);
        }
        if elapsed > limit {
            let _ = qemu.kill();
            let _ = qemu.wait();
            return Err(format!(
                "the guest ({accelerator}) did not power off within {limit:?}; its console:\n{}",
                read()
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A transfer disk holding `files` (path inside, contents or a host file to copy).
pub fn transfer_disk(dir: &Path, files: &[(String, TransferFile)]) -> Result<PathBuf, String> {
    let root = dir.join("transfer-root");
    let mut bytes = 0u64;
    for (name, file) in files {
        let target = root.join(name);
        std::fs::create_dir_all(target.parent().unwrap()).map_err(|e| e.to_string())?;
        match file {
            TransferFile::Text(text) => std::fs::write(&target, text).map_err(|e| e.to_string())?,
            TransferFile::Copy(source) => {
                std::fs::copy(source, &target).map_err(|e| format!("{}: {e}", source.display()))?;
            }
        }
        bytes += std::fs::metadata(&target).map_err(|e| e.to_string())?.len();
    }
    let image = dir.join("transfer.img");
    let size_mib = bytes / (1 << 20) * 2 + 64;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&image)
        .arg(format!("{size_mib}M")))?;
    Ok(image)
}

pub enum TransferFile {
    Text(String),
    Copy(PathBuf),
}

/// Reads a file from a transfer disk after the guest wrote it (debugfs: no mount).
pub fn read_back(transfer: &Path, name: &str) -> Option<String> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat /{name}")])
        .arg(transfer)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The bootable guest: a Debian system with systemd (not the test init above) and a
/// blockferry agent installed the way deploy/systemd says, with credentials and state,
/// as on a replicated source server. It answers on TCP port [`HEALTH_PORT`] once it is
/// up (a socket unit sending a line), and shows a login prompt on its serial console.
pub const HEALTH_PORT: u16 = 8080;
const BOOTABLE_PACKAGES: &str = "linux-image-amd64,systemd-sysv,udev,initramfs-tools,e2fsprogs";
const AGENT_UNIT: &str = include_str!("../../../deploy/systemd/blockferry-agent.service");
/// Files written into the bootable guest's root, and symlinks made there.
const BOOTABLE_FILES: [(&str, &str); 8] = [
    ("etc/hostname", "blockferry-source\n"),
    (
        "etc/systemd/network/10-eth0.network",
        "[Match]\nName=eth0\n\n[Network]\nDHCP=yes\n",
    ),
    (
        "etc/systemd/system/blockferry-health.socket",
        "[Unit]\nDescription=blockferry test health port\n\n[Socket]\nListenStream=8080\nAccept=yes\n\n[Install]\nWantedBy=sockets.target\n",
    ),
    (
        "etc/systemd/system/blockferry-health@.service",
        "[Unit]\nDescription=blockferry test health answer\n\n[Service]\nExecStart=/bin/echo blockferry-health-ok\nStandardOutput=socket\n",
    ),
    (
        "etc/default/blockferry-agent",
        "RECEIVER=10.0.2.2:1500\nDISKS=--disk /dev/vda\n",
    ),
    (
        "etc/blockferry-agent/agent.key",
        "not a real key: the test checks it is gone\n",
    ),
    ("etc/blockferry-agent/agent.crt", "not a real certificate\n"),
    (
        "var/lib/blockferry-agent/state",
        "a dirty-map state record\n",
    ),
];
const BOOTABLE_LINKS: [(&str, &str); 4] = [
    (
        "etc/systemd/system/multi-user.target.wants/blockferry-agent.service",
        "/etc/systemd/system/blockferry-agent.service",
    ),
    (
        "etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
        "/lib/systemd/system/systemd-networkd.service",
    ),
    (
        "etc/systemd/system/sockets.target.wants/systemd-networkd.socket",
        "/lib/systemd/system/systemd-networkd.socket",
    ),
    (
        "etc/systemd/system/sockets.target.wants/blockferry-health.socket",
        "/etc/systemd/system/blockferry-health.socket",
    ),
];

fn bootable_recipe() -> String {
    format!(
        "{SUITE} {MIRROR} minbase {BOOTABLE_PACKAGES}\n{AGENT_UNIT}\n{BOOTABLE_FILES:?}\n{BOOTABLE_LINKS:?}"
    )
}

/// The bootable guest's disk (ext4, no partition table, 1.5 GiB), built first if this
/// recipe has none in the cache yet. Treat it as read-only: it is shared between runs.
pub fn bootable_disk() -> Result<PathBuf, String> {
    let cache = PathBuf::from("/var/cache/blockferry-tests");
    let dir = cache.join(format!("bootable-{:016x}", fnv(&bootable_recipe())));
    let disk = dir.join("disk.img");
    if disk.exists() {
        return Ok(disk);
    }
    std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let started = Instant::now();
    eprintln!(
        "building the bootable test guest into {} (once per recipe)",
        dir.display()
    );
    let work = tempfile::tempdir_in(&cache).map_err(|e| e.to_string())?;
    let root = work.path().join("root");
    run(Command::new("mmdebstrap")
        .args([
            "--variant=minbase",
            &format!("--include={BOOTABLE_PACKAGES}"),
            SUITE,
        ])
        .arg(&root)
        .arg(MIRROR))?;
    let unit = root.join("etc/systemd/system/blockferry-agent.service");
    let mut files: Vec<(PathBuf, &str)> = vec![(unit, AGENT_UNIT)];
    files.extend(BOOTABLE_FILES.iter().map(|(p, c)| (root.join(p), *c)));
    for (path, contents) in files {
        std::fs::create_dir_all(path.parent().unwrap()).map_err(|e| e.to_string())?;
        std::fs::write(&path, contents).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    for (link, target) in BOOTABLE_LINKS {
        let link = root.join(link);
        std::fs::create_dir_all(link.parent().unwrap()).map_err(|e| e.to_string())?;
        std::os::unix::fs::symlink(target, &link)
            .map_err(|e| format!("{}: {e}", link.display()))?;
    }
    // Root may log in on the console without a password (a test machine).
    run(Command::new("chroot")
        .arg(&root)
        .args(["passwd", "-d", "root"]))?;
    let built = work.path().join("built");
    std::fs::create_dir(&built).map_err(|e| e.to_string())?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "bfsource", "-d"])
        .arg(&root)
        .arg(built.join("disk.img"))
        .arg("1536M"))?;
    match std::fs::rename(&built, &dir) {
        Ok(()) => {}
        Err(_) if disk.exists() => {}
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    }
    eprintln!("built the bootable guest in {:.0?}", started.elapsed());
    Ok(disk)
}

/// What debugfs says of `path` inside the ext4 `image` (no mount needed); `None` when
/// the path is not there.
pub fn stat_in(image: &Path, path: &str) -> Option<String> {
    let out = Command::new("debugfs")
        .args(["-R", &format!("stat {path}")])
        .arg(image)
        .output()
        .expect("debugfs runs (scripts/test installs e2fsprogs)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    (!err.contains("File not found") && text.contains("Inode:")).then_some(text)
}

/// A small ext4 source disk with a root file system's markers and an installed agent,
/// but no kernel: enough for a launch without `--boot`.
pub fn small_root_disk(dir: &Path) -> PathBuf {
    let tree = dir.join("small-root");
    for (path, contents) in [
        ("etc/os-release", "ID=debian\n"),
        ("etc/systemd/system/blockferry-agent.service", "[Unit]\n"),
        ("etc/blockferry-agent/agent.key", "key\n"),
        ("var/lib/blockferry-agent/state", "state\n"),
    ] {
        let path = tree.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }
    let wants = tree.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    std::os::unix::fs::symlink(
        "/etc/systemd/system/blockferry-agent.service",
        wants.join("blockferry-agent.service"),
    )
    .unwrap();
    let image = dir.join("small-root.img");
    let made = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("16M")
        .status()
        .unwrap();
    assert!(made.success(), "mkfs.ext4 -d");
    image
}
