//! [`FrameBuffer`]: the receive buffer both sides read frames through. Still sans-I/O:
//! the caller reads from its socket into [`FrameBuffer::spare`] and reports how much it
//! read; the buffer hands out whole frames.

use crate::codec::{DecodeError, FRAME_HEADER_LEN, decode};
use crate::limits::MAX_FRAME_PAYLOAD;
use crate::message::Frame;

/// Room for two of the largest frames, so that after compaction a partial frame always
/// has space to complete; the buffer never grows beyond this.
const CAPACITY: usize = 2 * (FRAME_HEADER_LEN + MAX_FRAME_PAYLOAD as usize);

/// Compact when less than this is free at the end, so reads stay large.
const MIN_READ: usize = 64 << 10;

#[derive(Debug)]
pub struct FrameBuffer {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Default for FrameBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameBuffer {
    pub fn new() -> Self {
        Self {
            buf: vec![0; CAPACITY],
            start: 0,
            end: 0,
        }
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

    /// The next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        match decode(&self.buf[self.start..self.end])? {
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
}
