//! Helpers that both the agent and the receiver need and that belong to neither side's
//! domain: files that are wholly old or wholly new after a crash, private directories and
//! sockets, error chains, device sizes, and text from untrusted peers made safe to print.
//!
//! Nothing here knows about replication; the crates above it do.

pub mod device;
pub mod durable;
mod error;
pub mod logging;
pub mod socket;
mod sync;
pub mod text;

pub use device::{DeviceKind, device_size};
pub use error::error_chain;
pub use sync::lock;

/// `n` bytes from the kernel's random generator, for names nobody can predict.
pub(crate) fn random_bytes<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    let mut filled = 0;
    while filled < N {
        // SAFETY: the pointer and length describe the unfilled tail of `bytes`, which is
        // alive and writable for the whole call.
        let n = unsafe { libc::getrandom(bytes[filled..].as_mut_ptr().cast(), N - filled, 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += n as usize;
    }
    Ok(bytes)
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
