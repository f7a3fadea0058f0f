//! Unix sockets only their owner can reach, from the moment they exist.
//!
//! `bind(2)` creates the socket file with the process's umask, and a `chmod` after it
//! leaves a window in which anyone can connect. So the socket is bound inside a fresh
//! directory of mode 0700 beside its final place, restricted there, and only then renamed
//! into place: at its final path it has never had any mode but its final one.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::durable::{euid, parent_of};

/// Binds a Unix socket at `path` with mode `mode`, owned by `owner` (a uid) when given.
///
/// A socket already at `path` that nobody answers on (left by a process that crashed) and
/// that this process's user owns is replaced; anything else there — a live socket, a
/// file, a directory, a socket of another user — is an error, never silently removed.
pub fn bind_private(path: &Path, mode: u32, owner: Option<u32>) -> io::Result<UnixListener> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if meta.uid() != euid() {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} is a socket of uid {}, not ours; refusing to replace it",
                        path.display(),
                        meta.uid()
                    ),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running process", path.display()),
                ));
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; refusing to remove it (choose another path)",
                    path.display()
                ),
            ));
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "socket path has no name"))?;
    let staging = parent_of(path).join(format!(
        ".{}.{}",
        name.to_string_lossy(),
        crate::hex(&crate::random_bytes::<8>()?)
    ));
    fs::DirBuilder::new().mode(0o700).create(&staging)?;
    let result = (|| {
        let inner = staging.join("s");
        let listener = UnixListener::bind(&inner)?;
        fs::set_permissions(&inner, fs::Permissions::from_mode(mode & 0o777))?;
        if let Some(uid) = owner {
            std::os::unix::fs::chown(&inner, Some(uid), None)?;
        }
        fs::rename(&inner, path)?;
        Ok(listener)
    })();
    let _ = fs::remove_file(staging.join("s"));
    let _ = fs::remove_dir(&staging);
    result
}

/// The uid of the process at the other end of a Unix socket (`SO_PEERCRED`).
pub fn peer_uid(stream: &impl std::os::fd::AsRawFd) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes one `ucred` through the pointer, which points at `cred`,
    // alive and writable, with `len` holding its size; the descriptor is open.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Watches `dir` with inotify and returns every (event mask, name) seen until `done`.
    fn watch(dir: &Path) -> i32 {
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: plain syscalls on a path that outlives them.
        unsafe {
            let fd = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
            assert!(fd >= 0);
            let wd = libc::inotify_add_watch(
                fd,
                path.as_ptr(),
                libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ATTRIB,
            );
            assert!(wd >= 0);
            fd
        }
    }

    fn events(fd: i32) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        let mut buf = [0u8; 64 << 10];
        // SAFETY: reads into a buffer that outlives the call.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        let mut at = 0usize;
        while n > 0 && at < n as usize {
            let header = std::mem::size_of::<libc::inotify_event>();
            // SAFETY: the kernel wrote whole events; the header is read unaligned.
            let event: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
            let name = &buf[at + header..at + header + event.len as usize];
            let name = String::from_utf8_lossy(name)
                .trim_end_matches('\0')
                .to_owned();
            out.push((event.mask, name));
            at += header + event.len as usize;
        }
        out
    }

    /// The audit's L4: the socket appeared at its final path with the umask's mode and was
    /// restricted only afterwards. Now the final name only ever appears by a rename of a
    /// socket that is already restricted.
    #[test]
    fn the_socket_never_exists_at_its_path_before_it_is_restricted() {
        let dir = tempfile::tempdir().unwrap();
        let fd = watch(dir.path());
        let path = dir.path().join("admin.sock");
        let listener = bind_private(&path, 0o600, None).unwrap();
        let seen = events(fd);
        // SAFETY: closes the descriptor `watch` opened.
        unsafe { libc::close(fd) };
        assert!(
            !seen
                .iter()
                .any(|(mask, name)| name == "admin.sock" && mask & libc::IN_CREATE != 0),
            "the socket was created in place: {seen:?}"
        );
        assert!(
            seen.iter()
                .any(|(mask, name)| name == "admin.sock" && mask & libc::IN_MOVED_TO != 0),
            "{seen:?}"
        );
        let meta = fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no leftovers");
        assert_eq!(
            peer_uid(&UnixStream::connect(&path).unwrap()).unwrap(),
            euid()
        );

        // In use: refused. Stale (nobody listening): replaced.
        let err = bind_private(&path, 0o600, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        drop(listener);
        bind_private(&path, 0o600, None).unwrap();
    }

    #[test]
    fn something_else_at_the_path_is_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        fs::write(&path, b"precious").unwrap();
        let err = bind_private(&path, 0o600, None).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(fs::read(&path).unwrap(), b"precious");
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        assert!(bind_private(&path, 0o600, None).is_err());
        assert!(path.is_dir());
    }
}
