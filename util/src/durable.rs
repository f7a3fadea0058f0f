//! Small files that must be either wholly old or wholly new after a crash (keys,
//! certificates, state records), and the private directories they live in.
//!
//! A file is written to a temp file of an unpredictable name, created exclusively
//! (`O_EXCL`, `O_NOFOLLOW`) and `fchmod`ed to its final mode before a byte is written,
//! then fsynced, renamed over the target, and the directory fsynced. Nobody else can
//! pre-create the temp file to choose its mode or owner, or plant a symlink for it to
//! follow. A directory is trusted only if this process's user owns it and nobody else can
//! write to it: anyone who can write to a directory can swap the files in it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Atomically replaces `path` with `contents`, with permission bits exactly `mode` (e.g.
/// 0o600 for private keys: set on the new file before it holds anything, so the secret is
/// never readable by others, whatever the umask or anyone else did).
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_of(path);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{}.tmp", crate::hex(&crate::random_bytes::<8>()?)));
    let temp = dir.join(temp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & 0o777)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&temp)?;
    let result = (|| {
        fchmod(&file, mode & 0o777)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

fn fchmod(file: &File, mode: u32) -> io::Result<()> {
    // SAFETY: fchmod takes an open descriptor, which `file` owns for the whole call.
    if unsafe { libc::fchmod(file.as_raw_fd(), mode) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The directory `path` is in (`.` for a bare file name).
pub fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Why a directory cannot be trusted with private files.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot inspect {path}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} exists and is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "{path} is owned by uid {owner}, not by this process's user (uid {euid}): its owner could swap the files in it; chown {euid} {path} or choose another directory"
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error(
        "{path} can be written by its group or by others (mode {mode:o}), who could swap the files in it; run: chmod go-w {path} (0700 is best)"
    )]
    Writable { path: PathBuf, mode: u32 },
}

/// The euid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes sure `dir` is fit for private files: creates it (and any missing parents) with
/// mode 0700, each new entry made durable in its parent; an existing directory must be
/// owned by this process's user and not writable by group or others. One readable by
/// them is accepted with a warning naming `what` it holds.
pub fn ensure_private_dir(dir: &Path, what: &str) -> Result<(), DirError> {
    match fs::metadata(dir) {
        Ok(meta) => check_private(dir, &meta, what),
        Err(err) if err.kind() == io::ErrorKind::NotFound => create_private(dir),
        Err(source) => Err(DirError::Inspect {
            path: dir.to_owned(),
            source,
        }),
    }
}

fn check_private(dir: &Path, meta: &fs::Metadata, what: &str) -> Result<(), DirError> {
    if !meta.is_dir() {
        return Err(DirError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    let euid = euid();
    if meta.uid() != euid {
        return Err(DirError::Owner {
            path: dir.to_owned(),
            owner: meta.uid(),
            euid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(DirError::Writable {
            path: dir.to_owned(),
            mode,
        });
    }
    if mode & 0o044 != 0 {
        tracing::warn!(
            path = %dir.display(),
            mode = format!("{mode:o}"),
            "the {what} directory can be read by its group or by others; run: chmod 700 {}",
            dir.display()
        );
    }
    Ok(())
}

/// Creates `dir` and its missing parents, each with mode 0700, fsyncing the parent of
/// every new entry so that none of them is lost in a crash.
fn create_private(dir: &Path) -> Result<(), DirError> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
        .collect();
    for path in missing.into_iter().rev() {
        let created = fs::DirBuilder::new().mode(0o700).create(path);
        match created {
            Ok(()) => {}
            // Someone else made it meanwhile: it must pass the same checks.
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                let meta = fs::metadata(path).map_err(|source| DirError::Inspect {
                    path: path.to_owned(),
                    source,
                })?;
                check_private(path, &meta, "new")?;
                continue;
            }
            Err(source) => {
                return Err(DirError::Create {
                    path: path.to_owned(),
                    source,
                });
            }
        }
        File::open(parent_of(path))
            .and_then(|parent| parent.sync_all())
            .map_err(|source| DirError::Create {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_contents_with_the_requested_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode, 0o644,
            "the mode is the requested one, whatever the umask"
        );
        // No temp files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// The attack of the security audit (C9): a temp file pre-created under the name the
    /// old scheme used (`NAME.tmp<PID>`), world-readable, or a symlink to a file of the
    /// attacker's, decided where the key went and who could read it.
    #[test]
    fn a_pre_created_temp_file_or_symlink_cannot_capture_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.key");
        let predictable = dir
            .path()
            .join(format!("agent.key.tmp{}", std::process::id()));
        fs::write(&predictable, b"").unwrap();
        fs::set_permissions(&predictable, fs::Permissions::from_mode(0o666)).unwrap();
        let bait = dir.path().join("attacker-owned");
        fs::write(&bait, b"").unwrap();
        for planted in [".agent.key.tmp", "agent.key.tmp"] {
            let _ = std::os::unix::fs::symlink(&bait, dir.path().join(planted));
        }

        write_atomic(&path, b"-----BEGIN PRIVATE KEY-----", 0o600).unwrap();
        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file(), "the key is a file of its own");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            fs::read(&bait).unwrap(),
            b"",
            "nothing went through the symlink"
        );
        assert_eq!(fs::read(&predictable).unwrap(), b"");
    }

    #[test]
    fn private_dirs_are_created_0700_and_unsafe_ones_refused() {
        let root = tempfile::tempdir().unwrap();
        let nested = root.path().join("a/b/c");
        ensure_private_dir(&nested, "test").unwrap();
        for p in [
            root.path().join("a"),
            root.path().join("a/b"),
            nested.clone(),
        ] {
            assert_eq!(
                fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o700
            );
        }
        // Existing and fine, or only readable by others: accepted.
        ensure_private_dir(&nested, "test").unwrap();
        fs::set_permissions(&nested, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&nested, "test").unwrap();
        // Writable by others, even with the sticky bit: refused, with the fix named.
        for mode in [0o777, 0o1777, 0o770] {
            fs::set_permissions(&nested, fs::Permissions::from_mode(mode)).unwrap();
            let err = ensure_private_dir(&nested, "test").unwrap_err().to_string();
            assert!(err.contains("chmod go-w"), "{err}");
        }
        let file = root.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(matches!(
            ensure_private_dir(&file, "test"),
            Err(DirError::NotADirectory { .. })
        ));
    }

    #[test]
    fn a_directory_owned_by_another_user_is_refused() {
        if euid() != 0 {
            eprintln!("skipped: needs root to give a directory to another user");
            return;
        }
        let root = tempfile::tempdir().unwrap();
        let theirs = root.path().join("theirs");
        fs::create_dir(&theirs).unwrap();
        fs::set_permissions(&theirs, fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let err = ensure_private_dir(&theirs, "test").unwrap_err();
        assert!(matches!(err, DirError::Owner { owner: 65534, .. }), "{err}");
    }
}
