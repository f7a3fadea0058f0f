//! Making launched images safe to boot: inside each image's file systems the blockferry
//! agent is switched off for good (unit masked, credentials and state removed), so that
//! a launched copy never replicates back over its source; and what a local boot needs
//! (kernel, initrd, the root file system's UUID) is taken out of the image.
//!
//! The images are file systems on loop devices, mounted read-write: mounting replays a
//! journal the crash-consistent point left dirty, which is what the launched copy's own
//! first boot would do. Needs root (losetup, mount).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

/// The unit name the agent is installed under (deploy/systemd).
const AGENT_UNIT: &str = "blockferry-agent.service";
/// Inside the root file system: the agent's credentials and its state.
const AGENT_DIRS: [&str; 2] = ["etc/blockferry-agent", "var/lib/blockferry-agent"];
/// File system types this preparation mounts; others (swap, LVM, encrypted) are left as
/// they are, and said so.
const MOUNTABLE: [&str; 6] = ["ext2", "ext3", "ext4", "xfs", "btrfs", "vfat"];

/// What preparing the images did, and what a local boot needs.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    /// One line per change made inside an image, or per thing left alone and why.
    pub changes: Vec<String>,
    pub boot: Option<BootFiles>,
    /// The disk holding the root file system (the first found).
    pub root_disk: Option<String>,
}

/// Taken from the launched root file system, copied to `OUT/boot/`.
#[derive(Debug, Clone)]
pub(crate) struct BootFiles {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The root file system's UUID, for `root=UUID=`.
    pub root_uuid: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(
        "preparing launched images needs root (losetup and mount of the images, to switch the agent off inside them); run launch as root"
    )]
    NotRoot,
    #[error("{command}: {why}")]
    Tool { command: String, why: String },
    #[error("{path}: {why}")]
    Io { path: PathBuf, why: String },
    #[error(
        "no root file system (one with etc/os-release) in the launched disks {disks}: the agent cannot be switched off inside them, so nothing is launched; the images stay in the output directory for inspection"
    )]
    NoRoot { disks: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PrepareError + '_ {
    move |e| PrepareError::Io {
        path: path.to_owned(),
        why: e.to_string(),
    }
}

fn tool(cmd: &mut Command) -> Result<String, PrepareError> {
    let command = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|e| PrepareError::Tool {
        command: command.clone(),
        why: format!("{e} (the appliance image installs util-linux and mount)"),
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(PrepareError::Tool {
            command,
            why: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[derive(Deserialize)]
struct SfdiskDump {
    partitiontable: SfdiskTable,
}

#[derive(Deserialize)]
struct SfdiskTable {
    #[serde(default)]
    sectorsize: Option<u64>,
    partitions: Vec<SfdiskPartition>,
}

#[derive(Deserialize)]
struct SfdiskPartition {
    start: u64,
    size: u64,
}

/// A region of an image that may hold a file system: a partition, or the whole image.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Region {
    /// `vda`, `vda1`, …: how it is named in the notes.
    name: String,
    offset: u64,
    size: Option<u64>,
}

/// The image's partitions, or the whole image when it has no partition table.
fn regions(disk: &str, image: &Path) -> Vec<Region> {
    let table = Command::new("sfdisk")
        .arg("--json")
        .arg(image)
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| serde_json::from_slice::<SfdiskDump>(&out.stdout).ok());
    match table {
        Some(dump) if !dump.partitiontable.partitions.is_empty() => {
            let sector = dump.partitiontable.sectorsize.unwrap_or(512);
            dump.partitiontable
                .partitions
                .iter()
                .enumerate()
                .map(|(i, p)| Region {
                    name: format!("{disk} partition {}", i + 1),
                    offset: p.start * sector,
                    size: Some(p.size * sector),
                })
                .collect()
        }
        _ => vec![Region {
            name: disk.to_owned(),
            offset: 0,
            size: None,
        }],
    }
}

/// A loop device and, once mounted, its mount point; both undone on drop.
struct Attached {
    device: String,
    mount: Option<PathBuf>,
}

impl Attached {
    fn attach(image: &Path, region: &Region) -> Result<Self, PrepareError> {
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show", "--offset", &region.offset.to_string()]);
        if let Some(size) = region.size {
            cmd.args(["--sizelimit", &size.to_string()]);
        }
        let device = tool(cmd.arg(image))?.trim().to_owned();
        Ok(Self {
            device,
            mount: None,
        })
    }

    /// `(TYPE, UUID)` as blkid probes them; none for a region without a file system.
    fn probe(&self) -> Option<(String, String)> {
        let out = tool(Command::new("blkid").args(["-p", "-o", "export", &self.device])).ok()?;
        let field = |key: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(str::to_owned)
        };
        Some((field("TYPE")?, field("UUID").unwrap_or_default()))
    }

    fn mount(&mut self, fs_type: &str, at: &Path) -> Result<&Path, PrepareError> {
        std::fs::create_dir_all(at).map_err(io(at))?;
        let mut cmd = Command::new("mount");
        cmd.args(["-t", fs_type]);
        // The copy has the source's UUID, which may be mounted here already (XFS refuses
        // a second mount of one UUID).
        if fs_type == "xfs" {
            cmd.args(["-o", "nouuid"]);
        }
        tool(cmd.arg(&self.device).arg(at))?;
        Ok(self.mount.insert(at.to_owned()))
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(at) = self.mount.take() {
            if let Err(err) = tool(Command::new("umount").arg(&at)) {
                tracing::error!(error = %err, "unmounting a launched image failed; unmount it by hand");
            }
            let _ = std::fs::remove_dir(&at);
        }
        if let Err(err) = tool(Command::new("losetup").args(["-d", &self.device])) {
            tracing::error!(error = %err, "detaching a launched image's loop device failed; detach it by hand");
        }
    }
}

/// Switches the agent off inside every file system of `images` (`(disk, image)`) and
/// copies what a local boot needs into `out/boot/`. A launch without a root file system
/// in it is refused: nothing would prove the agent off.
pub(crate) fn prepare(images: &[(String, PathBuf)], out: &Path) -> Result<Prepared, PrepareError> {
    if blockferry_util::durable::euid() != 0 {
        return Err(PrepareError::NotRoot);
    }
    let mut prepared = Prepared::default();
    let mut root_uuid = None;
    let mut mount_number = 0;
    for (disk, image) in images {
        for region in regions(disk, image) {
            let mut attached = Attached::attach(image, &region)?;
            let Some((fs_type, uuid)) = attached.probe() else {
                prepared
                    .changes
                    .push(format!("{}: no file system, left as it is", region.name));
                continue;
            };
            if !MOUNTABLE.contains(&fs_type.as_str()) {
                prepared.changes.push(format!(
                    "{}: {fs_type}, not mounted, left as it is",
                    region.name
                ));
                continue;
            }
            mount_number += 1;
            let at = out.join(format!(".mount-{mount_number}"));
            let root = attached.mount(&fs_type, &at)?.to_owned();
            if root.join("etc/os-release").exists() || root.join("usr/lib/os-release").exists() {
                root_uuid.get_or_insert_with(|| uuid.clone());
                prepared.root_disk.get_or_insert_with(|| disk.clone());
                switch_agent_off(&root, &region.name, &mut prepared.changes)?;
                if prepared.boot.is_none() {
                    prepared.boot =
                        boot_files(&root.join("boot"), out)?.map(|(kernel, initrd)| BootFiles {
                            kernel,
                            initrd,
                            root_uuid: String::new(),
                        });
                }
            } else {
                // A separate /var holds the agent's state as lib/blockferry-agent.
                remove_tree(
                    &root.join("lib/blockferry-agent"),
                    &region.name,
                    &mut prepared.changes,
                )?;
                // A separate /boot: the kernel is at its top.
                if prepared.boot.is_none()
                    && let Some((kernel, initrd)) = boot_files(&root, out)?
                {
                    prepared.changes.push(format!(
                        "{}: kernel {} taken for a local boot",
                        region.name,
                        kernel.display()
                    ));
                    prepared.boot = Some(BootFiles {
                        kernel,
                        initrd,
                        root_uuid: String::new(),
                    });
                }
            }
        }
    }
    let Some(root_uuid) = root_uuid else {
        return Err(PrepareError::NoRoot {
            disks: images
                .iter()
                .map(|(d, _)| d.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    // A kernel found on a separate /boot boots the root found elsewhere.
    if let Some(boot) = &mut prepared.boot {
        boot.root_uuid = root_uuid;
    }
    Ok(prepared)
}

/// Masks the agent's unit, drops it from every target that wants it, and removes its
/// credentials and state.
fn switch_agent_off(
    root: &Path,
    name: &str,
    changes: &mut Vec<String>,
) -> Result<(), PrepareError> {
    let units = root.join("etc/systemd/system");
    if let Ok(entries) = std::fs::read_dir(&units) {
        for entry in entries.flatten() {
            let wants = entry.path();
            let link = wants.join(AGENT_UNIT);
            if entry.file_name().to_string_lossy().ends_with(".wants")
                && link.symlink_metadata().is_ok()
            {
                std::fs::remove_file(&link).map_err(io(&link))?;
                changes.push(format!(
                    "{name}: disabled {AGENT_UNIT} (removed from {})",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    let unit = units.join(AGENT_UNIT);
    let masked = std::fs::read_link(&unit).is_ok_and(|target| target == Path::new("/dev/null"));
    if !masked {
        std::fs::create_dir_all(&units).map_err(io(&units))?;
        match std::fs::remove_file(&unit) {
            Ok(()) => changes.push(format!("{name}: removed /etc/systemd/system/{AGENT_UNIT}")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&unit)(e)),
        }
        std::os::unix::fs::symlink("/dev/null", &unit).map_err(io(&unit))?;
        changes.push(format!("{name}: masked {AGENT_UNIT}"));
    }
    for dir in AGENT_DIRS {
        remove_tree(&root.join(dir), name, changes)?;
    }
    Ok(())
}

fn remove_tree(path: &Path, name: &str, changes: &mut Vec<String>) -> Result<(), PrepareError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(path)(e)),
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path).map_err(io(path))?,
        Ok(_) => std::fs::remove_file(path).map_err(io(path))?,
    }
    let shown = path
        .components()
        .rev()
        .take(3)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<PathBuf>();
    changes.push(format!("{name}: removed …/{}", shown.display()));
    Ok(())
}

/// The newest kernel in `boot` (and its initrd), copied to `out/boot/`.
fn boot_files(boot: &Path, out: &Path) -> Result<Option<(PathBuf, Option<PathBuf>)>, PrepareError> {
    let Ok(entries) = std::fs::read_dir(boot) else {
        return Ok(None);
    };
    let newest = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max();
    let Some((_, kernel)) = newest else {
        return Ok(None);
    };
    let version = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_owned();
    let target = out.join("boot");
    std::fs::create_dir_all(&target).map_err(io(&target))?;
    let kernel_out = target.join(format!("vmlinuz-{version}"));
    std::fs::copy(&kernel, &kernel_out).map_err(io(&kernel))?;
    let initrd = boot.join(format!("initrd.img-{version}"));
    let initrd_out = if initrd.exists() {
        let to = target.join(format!("initrd.img-{version}"));
        std::fs::copy(&initrd, &to).map_err(io(&initrd))?;
        Some(to)
    } else {
        None
    };
    Ok(Some((kernel_out, initrd_out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_without_a_partition_table_is_one_region() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("d.img");
        std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
        assert_eq!(
            regions("vda", &image),
            vec![Region {
                name: "vda".into(),
                offset: 0,
                size: None
            }]
        );
    }

    #[test]
    fn the_agent_is_switched_off_in_a_root_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in [
            "etc/systemd/system/multi-user.target.wants",
            "etc/blockferry-agent",
            "var/lib/blockferry-agent",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("etc/systemd/system").join(AGENT_UNIT), "[Unit]\n").unwrap();
        std::os::unix::fs::symlink(
            "/etc/systemd/system/blockferry-agent.service",
            root.join("etc/systemd/system/multi-user.target.wants")
                .join(AGENT_UNIT),
        )
        .unwrap();
        std::fs::write(root.join("etc/blockferry-agent/agent.key"), "secret").unwrap();
        std::fs::write(root.join("var/lib/blockferry-agent/state"), "s").unwrap();
        let mut changes = Vec::new();
        switch_agent_off(root, "vda", &mut changes).unwrap();
        let unit = root.join("etc/systemd/system").join(AGENT_UNIT);
        assert_eq!(std::fs::read_link(&unit).unwrap(), Path::new("/dev/null"));
        assert!(
            root.join("etc/systemd/system/multi-user.target.wants")
                .join(AGENT_UNIT)
                .symlink_metadata()
                .is_err()
        );
        assert!(!root.join("etc/blockferry-agent").exists());
        assert!(!root.join("var/lib/blockferry-agent").exists());
        assert!(changes.iter().any(|c| c.contains("masked")), "{changes:?}");
        // A second pass finds nothing left to do.
        let mut again = Vec::new();
        switch_agent_off(root, "vda", &mut again).unwrap();
        assert!(again.is_empty(), "{again:?}");
    }
}
