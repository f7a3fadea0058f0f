//! Staging storage for the receiver: the [`BlockStore`] abstraction and its backends.
//!
//! A `BlockStore` is one staging disk: a fixed size, writes, zero-fills and reads at byte
//! offsets, and `flush`, which makes every *completed* write durable and returns a
//! [`Flushed`] proof. The receiver can only record a watermark with such a proof in hand.
//!
//! # Batch contract
//! Operations submitted concurrently may complete in any order (io_uring does not keep
//! submission order). Callers that need ordering — two writes overlapping the same bytes —
//! must wait for the first to complete before submitting the second. `flush` covers the
//! writes that had completed when it was called, nothing submitted later.
//!
//! Backends form a closed set ([`BlockStore`] is an enum): a sparse file or raw block
//! device driven by an [`Engine`] (io_uring or portable synchronous I/O), and memory for
//! tests. An EBS disk ([`BlockStore::Ebs`]) is staged into a local base copy like a file
//! disk, and [`ebs`] turns the base copy into a chain of EBS snapshots through the EBS
//! direct APIs: the client interface, a strict fake of the service, the uploader, the
//! chain (dirty blocks, copy-on-write during uploads, digest index) and the restore.

pub mod ebs;
mod engine;
mod error;
mod file;
mod memory;
mod point;
mod store;
mod uring;
mod volatile;
mod zero;

pub use blockferry_util::{DeviceKind, device_size};
pub use engine::{Engine, EngineKind, IoEngine};
pub use error::StoreError;
pub use file::{FileIdentity, FileStore};
pub use memory::MemoryStore;
pub use point::{CopyKind, CopyPolicy, PointCopy};
pub use store::{BlockStore, Flushed};
pub use volatile::PowerSwitch;

// Offsets and lengths move between u64 (the wire, the disk) and usize (buffers) freely:
// blockferry runs on 64-bit Linux only, and says so here rather than at every cast.
const _: () = assert!(usize::BITS == 64, "blockferry requires a 64-bit target");
