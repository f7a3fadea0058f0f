//! Moving frames between a session and its connection: a reader that decodes what arrives
//! within the connection's receive-buffer share, and a writer task that sends what the
//! session queues, coalescing frames already waiting into one write.

use std::time::Duration;

use blockferry_proto::limits::MAX_CONTROL_PAYLOAD;
use blockferry_proto::{Frame, FrameBuffer, FrameKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

use super::error::SessionError;

/// How long a frame may wait to be written to an agent that has stopped reading.
pub(crate) const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Tells an agent whose connection cannot be served now to come back later, and closes.
pub(crate) async fn refuse_busy(mut stream: TlsStream<TcpStream>, why: &str) {
    let error = SessionError::Busy(why.to_owned());
    if let Some(frame) = error.frame() {
        let _ = tokio::time::timeout(SEND_TIMEOUT, async {
            stream.write_all(&Frame::Error(frame).to_bytes()).await?;
            stream.shutdown().await
        })
        .await;
    }
}

pub(crate) struct FrameReader {
    half: ReadHalf<TlsStream<TcpStream>>,
    buf: FrameBuffer,
    meter: crate::metrics::ServerMeter,
    /// This connection's share of the receive-buffer budget.
    share: crate::budget::Share,
}

impl FrameReader {
    /// A reader that takes control frames only until [`FrameReader::enter_session`].
    pub(crate) fn new(
        half: ReadHalf<TlsStream<TcpStream>>,
        meter: crate::metrics::ServerMeter,
        share: crate::budget::Share,
    ) -> Self {
        Self {
            half,
            buf: FrameBuffer::with_max_payload(MAX_CONTROL_PAYLOAD),
            meter,
            share,
        }
    }

    /// The first frame: Hello or JoinStream. Any other kind is refused as soon as its
    /// header has arrived, without waiting for (or holding) its payload.
    pub(crate) async fn first(&mut self) -> Result<Option<Frame>, SessionError> {
        loop {
            match self.buf.pending_kind() {
                Some(FrameKind::HELLO | FrameKind::JOIN_STREAM) | None => {}
                Some(kind) => {
                    return Err(SessionError::Protocol(format!(
                        "expected Hello or JoinStream, got {kind}"
                    )));
                }
            }
            if let Some(frame) = self.decoded()? {
                return Ok(Some(frame));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// The connection is part of a session now: it may send writes.
    pub(crate) fn enter_session(&mut self) -> Result<(), SessionError> {
        self.share
            .enter_session(&mut self.buf)
            .map_err(|refusal| SessionError::Busy(refusal.to_string()))
    }

    /// The next frame, or `None` at a clean end of stream.
    pub(crate) async fn next(&mut self) -> Result<Option<Frame>, SessionError> {
        loop {
            if let Some(frame) = self.decoded()? {
                return Ok(Some(frame));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    /// A whole frame already received, if there is one.
    fn decoded(&mut self) -> Result<Option<Frame>, SessionError> {
        self.buf.next_frame().map_err(|e| match e {
            blockferry_proto::DecodeError::FieldTooLong {
                kind: FrameKind::HELLO,
                field: "disks",
                len,
                max,
            } => SessionError::Limit(format!(
                "a source server replicates at most {max} disks; this agent offered {len}: name at most {max} with --disk"
            )),
            e => SessionError::Protocol(e.to_string()),
        })
    }

    /// Reads more; false at a clean end of stream.
    async fn fill(&mut self) -> Result<bool, SessionError> {
        let n = self.half.read(self.buf.spare()).await?;
        self.meter.received.inc_by(n as u64);
        self.meter.rate.add(n as u64);
        if n == 0 {
            if self.buf.buffered() > 0 {
                return Err(SessionError::Protocol(format!(
                    "connection closed inside a frame ({} bytes pending)",
                    self.buf.buffered()
                )));
            }
            return Ok(false);
        }
        self.buf.filled(n);
        Ok(true)
    }
}

pub(crate) async fn write_frames(
    mut half: WriteHalf<TlsStream<TcpStream>>,
    mut queue: mpsc::Receiver<Frame>,
) {
    let mut out = Vec::with_capacity(64 << 10);
    while let Some(frame) = queue.recv().await {
        out.clear();
        frame.encode(&mut out);
        // Send everything already queued in the same write.
        while let Ok(more) = queue.try_recv() {
            more.encode(&mut out);
        }
        let written = tokio::time::timeout(SEND_TIMEOUT, async {
            half.write_all(&out).await?;
            half.flush().await
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            return;
        }
    }
    let _ = half.shutdown().await;
}

pub(crate) async fn send(outgoing: &mpsc::Sender<Frame>, frame: Frame) -> Result<(), SessionError> {
    outgoing.send(frame).await.map_err(|_| {
        SessionError::Connection(std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "the connection's writer has stopped",
        ))
    })
}
