//! The blockferry receiver: accepts agents over mutual TLS, applies their writes to
//! staging images through io_uring, keeps durable per-disk watermarks in a transactional
//! store, and answers operators.

pub mod admin;
mod apply;
pub mod catalog;
pub mod cli;
pub mod control;
pub mod demo;
pub mod events;
mod gate;
pub mod metrics;
pub mod pki;
mod registry;
pub mod revocation;
mod server;
mod session;
mod slots;
pub mod snapshots;
pub mod status;
pub mod tls;

pub use server::{DEFAULT_LISTEN, Receiver, ReceiverConfig, ReceiverError, RefusalCounters};

/// Locks a mutex whose holder may have panicked: every value guarded in this crate stays
/// consistent between statements, so the poison flag carries no information here.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}
