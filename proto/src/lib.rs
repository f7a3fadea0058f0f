//! The blockferry wire protocol, sans-I/O.
//!
//! This crate knows bytes, not sockets. Both the agent and the receiver (and the fuzzer)
//! call the same two functions: [`Frame::encode`] and [`decode`]. `decode` follows the
//! `Result<Option<_>>` contract: `Ok(None)` means "need more bytes", `Err` means the peer
//! sent something that can never become a valid frame and the connection should be closed.
//!
//! Every length on the wire has a named maximum in [`limits`], checked before anything is
//! allocated. Unknown frame kinds and unknown enum values are kept, not mangled, so that a
//! newer agent can talk to an older receiver.
#![forbid(unsafe_code)]

mod buffer;
mod codec;
pub mod control;
pub mod limits;
mod message;
pub mod route;
pub mod token;

pub use buffer::FrameBuffer;
pub use codec::{DecodeError, FRAME_HEADER_LEN, MAGIC, PROTOCOL_VERSION, decode};
pub use message::*;
