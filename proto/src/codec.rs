//! Frame layout, the checked cursor every payload is decoded through, and [`decode`].
//!
//! A frame is an 8-byte header followed by its payload:
//!
//! ```text
//! 0      2        3     4              8
//! | "BF" | version | kind | payload_len (u32, big endian) | payload ... |
//! ```

use crate::limits::{MAX_CONTROL_PAYLOAD, MAX_FRAME_PAYLOAD, MAX_STRING_LEN};
use crate::message::{Frame, FrameKind};

/// The two bytes every frame starts with; a stream that does not is not ours.
pub const MAGIC: [u8; 2] = *b"BF";

/// Version of the frame layout and message encodings defined by this crate.
pub const PROTOCOL_VERSION: u8 = 1;

/// Size of the fixed frame header.
pub const FRAME_HEADER_LEN: usize = 8;

/// Why a byte sequence can never become a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad magic {found:02x?}: the peer does not speak the blockferry protocol")]
    BadMagic { found: [u8; 2] },
    #[error("unsupported frame version {found} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion { found: u8 },
    #[error("{kind} frame announces {len} payload bytes, more than the limit of {max}")]
    FrameTooLarge { kind: FrameKind, len: u32, max: u32 },
    #[error("{kind} frame ends inside {field}")]
    Truncated {
        kind: FrameKind,
        field: &'static str,
    },
    #[error("{kind} frame: {field} has length {len}, more than the limit of {max}")]
    FieldTooLong {
        kind: FrameKind,
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind} frame: {field} is not valid UTF-8")]
    InvalidUtf8 {
        kind: FrameKind,
        field: &'static str,
    },
    #[error("{kind} frame: {field}: {reason}")]
    Invalid {
        kind: FrameKind,
        field: &'static str,
        reason: &'static str,
    },
    #[error("{kind} frame has {count} unexpected bytes after its last field")]
    TrailingBytes { kind: FrameKind, count: usize },
}

/// Decodes one frame from the front of `buf`.
///
/// Returns `Ok(None)` while `buf` holds less than one whole frame, and
/// `Ok(Some((frame, consumed)))` once it does. Never panics, and never allocates more than
/// the announced payload, which is checked against its kind's limit first.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
    let Some((header, rest)) = buf.split_first_chunk::<FRAME_HEADER_LEN>() else {
        return check_partial_header(buf).map(|()| None);
    };
    let [m0, m1, version, kind, l0, l1, l2, l3] = *header;
    check_magic_and_version([m0, m1], version)?;
    let kind = FrameKind(kind);
    let len = u32::from_be_bytes([l0, l1, l2, l3]);
    let max = max_payload(kind);
    if len > max {
        return Err(DecodeError::FrameTooLarge { kind, len, max });
    }
    let Some(payload) = rest.get(..len as usize) else {
        return Ok(None);
    };
    let frame = Frame::decode_payload(kind, payload)?;
    Ok(Some((frame, FRAME_HEADER_LEN + len as usize)))
}

/// Rejects a stream as early as its first bytes allow, so a plaintext or TLS client that
/// sends a handful of bytes is not kept waiting for a header that will never parse.
fn check_partial_header(buf: &[u8]) -> Result<(), DecodeError> {
    for (i, (&got, &want)) in buf.iter().zip(MAGIC.iter()).enumerate() {
        if got != want {
            let mut found = [0u8; 2];
            found[..=i].copy_from_slice(&buf[..=i]);
            return Err(DecodeError::BadMagic { found });
        }
    }
    if let Some(&version) = buf.get(2) {
        check_magic_and_version(MAGIC, version)?;
    }
    Ok(())
}

fn check_magic_and_version(magic: [u8; 2], version: u8) -> Result<(), DecodeError> {
    if magic != MAGIC {
        return Err(DecodeError::BadMagic { found: magic });
    }
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion { found: version });
    }
    Ok(())
}

/// The payload limit for a frame kind: only writes carry bulk data.
fn max_payload(kind: FrameKind) -> u32 {
    if kind == FrameKind::WRITE {
        MAX_FRAME_PAYLOAD
    } else {
        MAX_CONTROL_PAYLOAD
    }
}

/// Appends a frame header for `kind` with a payload length to be patched by
/// [`finish_frame`].
pub(crate) fn start_frame(out: &mut Vec<u8>, kind: FrameKind) -> usize {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(PROTOCOL_VERSION);
    out.push(kind.0);
    out.extend_from_slice(&[0; 4]);
    start
}

/// Patches the payload length of the frame that [`start_frame`] began at `start`.
///
/// # Panics
/// If the payload exceeds its kind's limit: that is a bug in the sender (every field is
/// bounded by the types that build it), and sending it would only get us disconnected.
pub(crate) fn finish_frame(out: &mut [u8], start: usize) {
    let payload_len = out.len() - start - FRAME_HEADER_LEN;
    let kind = FrameKind(out[start + 3]);
    let len = u32::try_from(payload_len)
        .ok()
        .filter(|&len| len <= max_payload(kind))
        .unwrap_or_else(|| {
            panic!("encoded {kind} payload of {payload_len} bytes exceeds its limit")
        });
    out[start + 4..start + 8].copy_from_slice(&len.to_be_bytes());
}

/// A checked cursor over one frame's payload. Every read either returns the field or an
/// error naming it; nothing indexes the buffer directly.
pub(crate) struct Reader<'a> {
    kind: FrameKind,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(kind: FrameKind, buf: &'a [u8]) -> Self {
        Self { kind, buf }
    }

    pub(crate) fn kind(&self) -> FrameKind {
        self.kind
    }

    pub(crate) fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let (head, tail) = self.buf.split_at_checked(n).ok_or(DecodeError::Truncated {
            kind: self.kind,
            field,
        })?;
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let (head, tail) = self
            .buf
            .split_first_chunk::<N>()
            .ok_or(DecodeError::Truncated {
                kind: self.kind,
                field,
            })?;
        self.buf = tail;
        Ok(*head)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.array(field).map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.array(field).map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.array(field).map(u64::from_be_bytes)
    }

    pub(crate) fn bytes16(&mut self, field: &'static str) -> Result<[u8; 16], DecodeError> {
        self.array(field)
    }

    /// A string with a u16 length prefix, at most `max` bytes of UTF-8.
    pub(crate) fn string(
        &mut self,
        field: &'static str,
        max: usize,
    ) -> Result<String, DecodeError> {
        debug_assert!(max <= MAX_STRING_LEN);
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(DecodeError::FieldTooLong {
                kind: self.kind,
                field,
                len,
                max,
            });
        }
        let raw = self.take(len, field)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8 {
                kind: self.kind,
                field,
            })
    }

    /// A list with a u16 count prefix, at most `max` items. The count is checked before
    /// the vector is reserved; each item must then actually be present.
    pub(crate) fn list<T>(
        &mut self,
        field: &'static str,
        max: usize,
        mut item: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let count = usize::from(self.u16(field)?);
        if count > max {
            return Err(DecodeError::FieldTooLong {
                kind: self.kind,
                field,
                len: count,
                max,
            });
        }
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(item(self)?);
        }
        Ok(items)
    }

    pub(crate) fn invalid(&self, field: &'static str, reason: &'static str) -> DecodeError {
        DecodeError::Invalid {
            kind: self.kind,
            field,
            reason,
        }
    }

    pub(crate) fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    /// Ends decoding: a valid frame has no bytes after its last field.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                kind: self.kind,
                count: self.buf.len(),
            })
        }
    }
}

/// Append-only helpers mirroring [`Reader`].
pub(crate) trait Put {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    fn put_str(&mut self, s: &str, max: usize);
    fn put_count(&mut self, count: usize, max: usize);
}

impl Put for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    /// Writes at most `max` bytes of `s`, cut at a character boundary: a sender never
    /// produces a frame its peer would reject for an over-long string.
    fn put_str(&mut self, s: &str, max: usize) {
        let mut end = s.len().min(max);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let len = u16::try_from(end).expect("string limits fit in u16");
        self.put_u16(len);
        self.extend_from_slice(&s.as_bytes()[..end]);
    }
    /// # Panics
    /// If a list exceeds its limit: the message types are built by our own code, which
    /// enforces the limits when it builds them.
    fn put_count(&mut self, count: usize, max: usize) {
        assert!(
            count <= max,
            "list of {count} items exceeds the wire limit of {max}"
        );
        self.put_u16(u16::try_from(count).expect("list limits fit in u16"));
    }
}
