//! [`FrameBuffer`]: the receive buffer both sides read frames through. Still sans-I/O:
//! the caller reads from its socket into [`FrameBuffer::spare`] and reports how much it
//! read; the buffer hands out whole frames.

use crate::codec::{DecodeError, FRAME_HEADER_LEN, MAGIC, PROTOCOL_VERSION, decode};
use crate::limits::MAX_FRAME_PAYLOAD;
use crate::message::{Frame, FrameKind};

/// Compact when less than this is free at the end, so reads stay large.
const MIN_READ: usize = 64 << 10;

/// A receive buffer that never holds more than one frame of its payload limit and a read. A peer
/// that is not yet trusted with large frames (before its session exists) gets a small
/// limit, so that it cannot make the other side hold a megabyte per connection; the
/// limit is raised once it may send writes.
#[derive(Debug)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_payload: u32,
}

impl Default for FrameBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameBuffer {
    /// A buffer for frames of any size this protocol allows.
    pub fn new() -> Self {
        Self::with_max_payload(MAX_FRAME_PAYLOAD)
    }

    /// A buffer that refuses frames announcing more than `max_payload` bytes (before
    /// waiting for them); it is never larger than [`Self::capacity_for`] that limit.
    pub fn with_max_payload(max_payload: u32) -> Self {
        let max_payload = max_payload.min(MAX_FRAME_PAYLOAD);
        Self {
            buf: vec![0; Self::capacity_for(max_payload)],
            start: 0,
            end: 0,
            max_payload,
        }
    }

    /// The bytes a buffer for frames of up to `max_payload` bytes holds: room for the
    /// largest frame and one more read, so that after compaction a partial frame always
    /// has space to complete (callers take every whole frame before reading again).
    pub const fn capacity_for(max_payload: u32) -> usize {
        FRAME_HEADER_LEN + max_payload as usize + MIN_READ
    }

    /// The largest payload accepted now.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// Accepts frames of up to `max_payload` bytes from now on (never less than before),
    /// keeping what was received.
    pub fn raise_max_payload(&mut self, max_payload: u32) {
        let max_payload = max_payload.min(MAX_FRAME_PAYLOAD);
        if max_payload <= self.max_payload {
            return;
        }
        let mut bigger = vec![0; Self::capacity_for(max_payload)];
        let pending = self.end - self.start;
        bigger[..pending].copy_from_slice(&self.buf[self.start..self.end]);
        self.buf = bigger;
        self.start = 0;
        self.end = pending;
        self.max_payload = max_payload;
    }

    /// Space to read into; never empty while the caller follows the protocol of calling
    /// [`Self::next_frame`] until it returns `None` before reading again.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.buf.len() - self.end < MIN_READ && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into [`Self::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end = (self.end + n).min(self.buf.len());
    }

    /// The kind of the frame at the front, as soon as a well-formed header has arrived
    /// (before its payload): a receiver can refuse a kind it does not expect without
    /// waiting for it. A header that is not ours is for [`Self::next_frame`] to refuse.
    pub fn pending_kind(&self) -> Option<FrameKind> {
        let header = self
            .buf
            .get(self.start..self.end)?
            .get(..FRAME_HEADER_LEN)?;
        (header[..2] == MAGIC && header[2] == PROTOCOL_VERSION).then_some(FrameKind(header[3]))
    }

    /// The next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        let pending = &self.buf[self.start..self.end];
        if let Some(header) = pending.get(..FRAME_HEADER_LEN) {
            let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
            if len > self.max_payload {
                // Checked by `decode` against the kind's own limit too; this one is the
                // buffer's, which may be lower.
                decode(header)?;
                return Err(DecodeError::FrameTooLarge {
                    kind: FrameKind(header[3]),
                    len,
                    max: self.max_payload,
                });
            }
        }
        match decode(pending)? {
            Some((frame, used)) => {
                self.start += used;
                if self.start == self.end {
                    self.start = 0;
                    self.end = 0;
                }
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Durable, Write, WriteFlags, WriteHeader};

    #[test]
    fn frames_split_across_reads_come_out_whole() {
        let big = Frame::Write(Write {
            header: WriteHeader {
                disk: 0,
                flags: WriteFlags::default(),
                offset: 0,
                len: crate::limits::MAX_WRITE_DATA,
                epoch: 1,
            },
            data: vec![5; crate::limits::MAX_WRITE_DATA as usize],
        });
        let mut stream = Vec::new();
        for i in 0..5 {
            big.encode(&mut stream);
            Frame::Durable(Durable { epoch: i }).encode(&mut stream);
        }
        let mut fb = FrameBuffer::new();
        let mut out = Vec::new();
        for chunk in stream.chunks(100_003) {
            let mut rest = chunk;
            while !rest.is_empty() {
                let spare = fb.spare();
                assert!(!spare.is_empty());
                let n = spare.len().min(rest.len());
                spare[..n].copy_from_slice(&rest[..n]);
                fb.filled(n);
                rest = &rest[n..];
                while let Some(frame) = fb.next_frame().unwrap() {
                    out.push(frame);
                }
            }
        }
        assert_eq!(out.len(), 10);
        assert_eq!(out[0], big);
        assert_eq!(out[9], Frame::Durable(Durable { epoch: 4 }));
        assert_eq!(fb.buffered(), 0);
    }

    #[test]
    fn a_small_buffer_refuses_a_large_frame_at_its_header_and_can_grow() {
        let big = Frame::Write(Write {
            header: WriteHeader {
                disk: 0,
                flags: WriteFlags::default(),
                offset: 0,
                len: crate::limits::MAX_WRITE_DATA,
                epoch: 1,
            },
            data: vec![5; crate::limits::MAX_WRITE_DATA as usize],
        });
        let bytes = big.to_bytes();
        let mut fb = FrameBuffer::with_max_payload(crate::limits::MAX_CONTROL_PAYLOAD);
        assert!(fb.spare().len() <= FrameBuffer::capacity_for(crate::limits::MAX_CONTROL_PAYLOAD));
        fb.spare()[..FRAME_HEADER_LEN].copy_from_slice(&bytes[..FRAME_HEADER_LEN]);
        fb.filled(FRAME_HEADER_LEN);
        assert_eq!(fb.pending_kind(), Some(crate::message::FrameKind::WRITE));
        assert!(matches!(
            fb.next_frame(),
            Err(DecodeError::FrameTooLarge { max, .. }) if max == crate::limits::MAX_CONTROL_PAYLOAD
        ));
        // Raised, the same bytes (kept) complete the frame.
        fb.raise_max_payload(crate::limits::MAX_FRAME_PAYLOAD);
        let mut rest = &bytes[FRAME_HEADER_LEN..];
        let mut got = None;
        while got.is_none() {
            let spare = fb.spare();
            let n = spare.len().min(rest.len());
            spare[..n].copy_from_slice(&rest[..n]);
            fb.filled(n);
            rest = &rest[n..];
            got = fb.next_frame().unwrap();
        }
        assert_eq!(got, Some(big));
    }
}
