//! The staging image of each disk, and the check that it is the one the catalog vouches
//! for.
//!
//! A watermark says "these bytes are durable in *this* image". If the images volume is
//! not mounted at boot, or an image was deleted, restored from an old backup or copied
//! over, the file at the image's path is not that image, and trusting the watermark would
//! report a replica that is not there. So each image gets an identity when it is created
//! (a random id in `DISK.img.id` beside it, and its device and inode, kept in the
//! catalog), and a session opens an image only if the file is still that one, at least
//! as long as the disk. Otherwise the disk is `STALLED` with reason `staging_missing`
//! until the image is back, or an operator adopts the file that is there (`disk adopt`:
//! it is rescanned by checksum) or starts the disk over (`disk reset`).
//!
//! A disk with nothing durable yet (watermark 0) has nothing to lose: whatever is in the
//! way is moved aside and a new image made.

use std::path::{Path, PathBuf};

use blockferry_storage::{Engine, FileIdentity, FileStore, StoreError};
use serde::{Deserialize, Serialize};

use crate::catalog::{DiskRecord, ImageId};

/// What a session's opening of an image found.
#[derive(Debug)]
pub(crate) enum Opened {
    /// The image, and its identity if the catalog must record it (a new image, or one a
    /// receiver from before identities made).
    Ready {
        store: FileStore,
        stamp: Option<ImageId>,
    },
    /// The file at the image's path is not an image the catalog can vouch for.
    Missing { why: String },
}

/// What `DISK.img.id` holds.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct IdFile {
    server: String,
    disk: String,
    uuid: String,
}

fn id_path(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_owned();
    name.push(".id");
    PathBuf::from(name)
}

/// Opens the staging image of `record` (a disk of `server`), creating it if the disk has
/// nothing durable yet, and checking it against its recorded identity otherwise.
pub(crate) fn open(
    server: &str,
    record: &DiskRecord,
    engine: Engine,
) -> Result<Opened, StoreError> {
    let path = &record.image;
    let trusted = record.sync_watermark > 0;
    let found = match FileStore::open_file(path) {
        Ok(file) => Some(file),
        Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) if trusted => {
            return Ok(Opened::Missing {
                why: format!("cannot be opened ({})", blockferry_util::error_chain(&err)),
            });
        }
        Err(err) => return Err(err),
    };
    let Some(file) = found else {
        if trusted {
            return Ok(Opened::Missing {
                why: format!(
                    "does not exist, although {} bytes of the disk were recorded durable in it (is the staging volume mounted?)",
                    record.sync_watermark
                ),
            });
        }
        return fresh(server, record, engine);
    };
    let identity = FileIdentity::of(&file).map_err(|source| StoreError::Io {
        op: "stat",
        path: path.clone(),
        source,
    })?;
    let mismatch = match &record.image_id {
        Some(id) => mismatch(server, record, id, &identity),
        // An image from before identities: the one thing there is to go by is the name.
        None => None,
    };
    if let Some(why) = mismatch {
        if trusted {
            return Ok(Opened::Missing { why });
        }
        tracing::warn!(image = %path.display(), why, "a staging image with nothing durable in it is not the recorded one; moving it aside");
        drop(file);
        move_aside(path, "replaced").map_err(|source| StoreError::Io {
            op: "rename",
            path: path.clone(),
            source,
        })?;
        return fresh(server, record, engine);
    }
    if trusted
        && identity.kind == blockferry_storage::DeviceKind::File
        && identity.len < record.size
    {
        return Ok(Opened::Missing {
            why: format!(
                "is shorter than the disk: {} of {} bytes",
                identity.len, record.size
            ),
        });
    }
    let store = FileStore::from_file(file, path, record.size, engine)?;
    let stamp = match &record.image_id {
        Some(_) => None,
        None => Some(stamp(server, &record.name, path, &identity)?),
    };
    Ok(Opened::Ready { store, stamp })
}

/// Why the file found is not the image `id` names, if it is not.
fn mismatch(
    server: &str,
    record: &DiskRecord,
    id: &ImageId,
    found: &FileIdentity,
) -> Option<String> {
    if (found.device, found.inode, found.born_ns) != (id.device, id.inode, id.born_ns) {
        return Some(format!(
            "is not the file the catalog recorded (device/inode/birth {}/{}/{} instead of {}/{}/{}: replaced, restored from a backup, or another volume mounted in its place?)",
            found.device, found.inode, found.born_ns, id.device, id.inode, id.born_ns
        ));
    }
    let expected = IdFile {
        server: server.to_owned(),
        disk: record.name.clone(),
        uuid: id.uuid.clone(),
    };
    let id_file = id_path(&record.image);
    match std::fs::read(&id_file) {
        Ok(raw) if serde_json::from_slice::<IdFile>(&raw).ok().as_ref() == Some(&expected) => None,
        Ok(_) => Some(format!(
            "has an identity file {} that names another image",
            id_file.display()
        )),
        Err(err) => Some(format!(
            "has no readable identity file {} ({err})",
            id_file.display()
        )),
    }
}

/// A new, empty image for a disk with nothing durable yet, and its identity.
fn fresh(server: &str, record: &DiskRecord, engine: Engine) -> Result<Opened, StoreError> {
    let store = FileStore::create_new(&record.image, record.size, engine)?;
    let identity = store.identity().map_err(|source| StoreError::Io {
        op: "stat",
        path: record.image.clone(),
        source,
    })?;
    let stamp = stamp(server, &record.name, &record.image, &identity)?;
    Ok(Opened::Ready {
        store,
        stamp: Some(stamp),
    })
}

/// Gives the image at `path` (which is `identity`) a new id, written beside it.
fn stamp(
    server: &str,
    disk: &str,
    path: &Path,
    identity: &FileIdentity,
) -> Result<ImageId, StoreError> {
    let uuid = uuid::Uuid::new_v4().simple().to_string();
    let file = IdFile {
        server: server.to_owned(),
        disk: disk.to_owned(),
        uuid: uuid.clone(),
    };
    let id_file = id_path(path);
    let json = serde_json::to_vec(&file).map_err(|e| StoreError::Io {
        op: "encode",
        path: id_file.clone(),
        source: std::io::Error::other(e),
    })?;
    blockferry_util::durable::write_atomic(&id_file, &json, 0o600).map_err(|source| {
        StoreError::Io {
            op: "write",
            path: id_file.clone(),
            source,
        }
    })?;
    Ok(ImageId {
        uuid,
        device: identity.device,
        inode: identity.inode,
        born_ns: identity.born_ns,
    })
}

/// Renames the image at `path` (and its id file) to `PATH.WHY-UNIXSECONDS`, so that
/// nothing in it is lost; returns the new name, or `None` if there was nothing there.
pub(crate) fn move_aside(path: &Path, why: &str) -> std::io::Result<Option<PathBuf>> {
    let suffix = format!(".{why}-{}", crate::catalog::now());
    let mut target = path.as_os_str().to_owned();
    target.push(&suffix);
    let target = PathBuf::from(target);
    let moved = match std::fs::rename(path, &target) {
        Ok(()) => Some(target),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(err),
    };
    let id_file = id_path(path);
    let mut id_target = id_file.as_os_str().to_owned();
    id_target.push(&suffix);
    match std::fs::rename(&id_file, PathBuf::from(id_target)) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    std::fs::File::open(blockferry_util::durable::parent_of(path))?.sync_all()?;
    Ok(moved)
}

/// `disk adopt`: the identity to record for the file now at the image's path, which
/// becomes this disk's image (and is rescanned by checksum). It must be a regular file
/// or block device holding at least the disk.
pub(crate) fn adopt(server: &str, record: &DiskRecord) -> Result<ImageId, String> {
    let path = &record.image;
    let file = FileStore::open_file(path).map_err(|e| {
        format!(
            "cannot adopt {}: {}; to start the disk over instead, use `disk reset`",
            path.display(),
            blockferry_util::error_chain(&e)
        )
    })?;
    let identity =
        FileIdentity::of(&file).map_err(|e| format!("cannot adopt {}: {e}", path.display()))?;
    if identity.len < record.size {
        return Err(format!(
            "cannot adopt {}: it holds {} bytes, less than the disk's {}; use `disk reset` to start over",
            path.display(),
            identity.len,
            record.size
        ));
    }
    stamp(server, &record.name, path, &identity).map_err(|e| blockferry_util::error_chain(&e))
}

/// What an operator does to a disk's image (`blockferry-receiver disk …`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskAction {
    /// Accept the file now at the image's path as the disk's image; it is rescanned by
    /// checksum at the agent's next session.
    Adopt,
    /// Start the disk over: the catalog forgets its watermark, the image is moved aside
    /// (or deleted), and the next session makes a new one and syncs it in full.
    Reset,
    /// Remove the disk from the catalog, its image moved aside (or deleted).
    Forget,
}

/// What a disk command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskActionDone {
    pub action: DiskAction,
    pub image: PathBuf,
    /// Where the old image went (reset, forget), unless it was deleted or absent.
    pub moved_to: Option<PathBuf>,
}

/// Carries out `action` on disk `disk` of `server` in `catalog`: the catalog first, then
/// the files, so that a crash in between never leaves the catalog trusting a file.
pub(crate) fn disk_command(
    catalog: &crate::catalog::Catalog,
    server: &str,
    disk: &str,
    action: DiskAction,
    delete_image: bool,
) -> Result<DiskActionDone, crate::catalog::DiskCommandError> {
    use crate::catalog::{DiskChange, DiskCommandError};
    let record = catalog
        .disk(server, disk)?
        .ok_or_else(|| DiskCommandError::NoSuchDisk {
            server: server.to_owned(),
            disk: disk.to_owned(),
        })?;
    let image = record.image.clone();
    let change = match action {
        DiskAction::Adopt => {
            DiskChange::Adopt(adopt(server, &record).map_err(DiskCommandError::Image)?)
        }
        DiskAction::Reset => DiskChange::Reset,
        DiskAction::Forget => DiskChange::Forget,
    };
    catalog.change_disk(server, disk, change)?;
    let moved_to = match action {
        DiskAction::Adopt => None,
        DiskAction::Reset | DiskAction::Forget if delete_image => {
            for path in [image.clone(), id_path(&image)] {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => {
                        return Err(DiskCommandError::Image(format!(
                            "the catalog is updated, but {} could not be deleted: {err}",
                            path.display()
                        )));
                    }
                }
            }
            None
        }
        DiskAction::Reset | DiskAction::Forget => {
            let why = if action == DiskAction::Reset {
                "reset"
            } else {
                "forgotten"
            };
            move_aside(&image, why).map_err(|err| {
                DiskCommandError::Image(format!(
                    "the catalog is updated, but {} could not be moved aside: {err}",
                    image.display()
                ))
            })?
        }
    };
    tracing::info!(server, disk, ?action, image = %image.display(), "disk command done");
    Ok(DiskActionDone {
        action,
        image,
        moved_to,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockferry_storage::IoEngine;

    fn record(dir: &Path, watermark: u64) -> DiskRecord {
        DiskRecord {
            sync_watermark: watermark,
            ..DiskRecord::new("d0", 1 << 20, dir.join("d0.img"))
        }
    }

    fn engine() -> Engine {
        Engine::start(IoEngine::Sync, 1).unwrap()
    }

    fn ready(opened: Opened) -> (FileStore, Option<ImageId>) {
        match opened {
            Opened::Ready { store, stamp } => (store, stamp),
            Opened::Missing { why } => panic!("missing: {why}"),
        }
    }

    fn missing(opened: Opened) -> String {
        match opened {
            Opened::Missing { why } => why,
            Opened::Ready { .. } => panic!("an image the catalog cannot vouch for was opened"),
        }
    }

    #[test]
    fn an_image_is_opened_only_while_it_is_the_recorded_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = record(dir.path(), 0);
        let (_, stamp) = ready(open("srv", &disk, engine()).unwrap());
        disk.image_id = stamp;
        assert!(disk.image_id.is_some(), "a new image gets an identity");
        disk.sync_watermark = disk.size;
        let (_, stamp) = ready(open("srv", &disk, engine()).unwrap());
        assert_eq!(stamp, None, "the same image needs no new identity");

        // Deleted (or on a volume that is not mounted).
        std::fs::rename(&disk.image, dir.path().join("elsewhere")).unwrap();
        let why = missing(open("srv", &disk, engine()).unwrap());
        assert!(why.contains("does not exist"), "{why}");
        assert!(!disk.image.exists(), "nothing was created in its place");

        // Another file under the same name, even one with the right id file.
        std::fs::write(&disk.image, vec![0u8; 1 << 20]).unwrap();
        let why = missing(open("srv", &disk, engine()).unwrap());
        assert!(why.contains("not the file the catalog recorded"), "{why}");

        // The original back, but its id file lost.
        std::fs::rename(dir.path().join("elsewhere"), &disk.image).unwrap();
        ready(open("srv", &disk, engine()).unwrap());
        std::fs::remove_file(id_path(&disk.image)).unwrap();
        let why = missing(open("srv", &disk, engine()).unwrap());
        assert!(why.contains("identity file"), "{why}");
    }

    #[test]
    fn a_shorter_image_is_not_trusted_and_an_untrusted_one_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = record(dir.path(), 0);
        disk.image_id = ready(open("srv", &disk, engine()).unwrap()).1;
        disk.sync_watermark = 4096;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&disk.image)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let why = missing(open("srv", &disk, engine()).unwrap());
        assert!(why.contains("shorter"), "{why}");

        // Nothing durable: a foreign file is moved aside, never overwritten.
        disk.sync_watermark = 0;
        std::fs::remove_file(&disk.image).unwrap();
        std::fs::write(&disk.image, b"someone else's").unwrap();
        let (store, stamp) = ready(open("srv", &disk, engine()).unwrap());
        assert_eq!(store.size(), 1 << 20);
        assert!(stamp.is_some());
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("d0.img.replaced-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(
            std::fs::read(dir.path().join(&aside[0])).unwrap(),
            b"someone else's"
        );
    }
}
