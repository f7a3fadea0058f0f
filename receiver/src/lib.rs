//! The blockferry receiver: accepts agents over mutual TLS, applies their writes to
//! staging images through io_uring, keeps durable per-disk watermarks in a transactional
//! store, and answers operators.

pub mod admin;
mod apply;
pub mod catalog;
pub mod cli;
pub mod demo;
mod gate;
pub mod pki;
mod registry;
mod server;
mod session;
pub mod status;
pub mod tls;

pub use server::{DEFAULT_LISTEN, Receiver, ReceiverConfig, ReceiverError, RefusalCounters};
