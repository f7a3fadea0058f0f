//! The blockferry receiver: accepts agents over mutual TLS, applies their writes to
//! staging images through io_uring, keeps durable per-disk watermarks in a transactional
//! store, and answers operators.

pub mod admin;
pub mod admission;
mod apply;
pub mod budget;
pub mod catalog;
pub mod cli;
mod context;
pub mod control;
pub mod demo;
pub mod events;
mod gate;
pub mod launch;
pub mod metrics;
pub mod pki;
pub mod points;
mod registry;
pub mod retention;
pub mod revocation;
mod server;
mod session;
mod slots;
pub mod snapshots;
pub mod staging;
pub mod status;
pub mod tls;

pub use server::{DEFAULT_LISTEN, Receiver, ReceiverConfig, ReceiverError, RefusalCounters};

pub(crate) use blockferry_util::lock;
