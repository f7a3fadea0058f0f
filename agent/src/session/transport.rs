//! The agent's end of the connections: TCP (through a proxy if one is set) and TLS, a
//! writer task per stream, and a reader per stream that turns the receiver's frames into
//! [`Event`]s for the session.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use blockferry_proto::{
    DecodeError, ErrorFrame, Frame, FrameBuffer, FrameKind, SettingsUpdate, SumReply, Welcome,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use super::error::{SessionError, is_certificate_problem};
use crate::agent::AgentStats;
use crate::credentials::Credentials;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A receiver that neither answers nor accepts data for this long is treated as a broken
/// connection, and the agent reconnects.
pub(super) const STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// What the receiver's frames mean to the sender.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Event {
    Welcome(Welcome),
    Durable(u64),
    CheckpointSaved(u64),
    Refused(ErrorFrame),
    CertificateRefused(String),
    Goodbye(String),
    Broken(String),
}

/// One stream's sending side: encoded frames go to a task that owns the TLS writer, so
/// that each stream encrypts on its own core.
pub(super) struct StreamSender {
    pub(super) frames: mpsc::Sender<Vec<u8>>,
    pub(super) task: tokio::task::JoinHandle<()>,
}

/// Encoded frames queued per stream: with 1 MiB chunks, at most this many MiB per stream.
pub(super) const STREAM_QUEUE: usize = 4;

impl StreamSender {
    pub(super) fn start(
        mut writer: WriteHalf<TlsStream<TcpStream>>,
        index: u8,
        events: mpsc::Sender<Event>,
        stats: Arc<AgentStats>,
    ) -> Self {
        let (frames, mut queue) = mpsc::channel::<Vec<u8>>(STREAM_QUEUE);
        let task = tokio::spawn(async move {
            while let Some(bytes) = queue.recv().await {
                stats.throttle.acquire(bytes.len()).await;
                let written = tokio::time::timeout(STALL_TIMEOUT, writer.write_all(&bytes)).await;
                match written {
                    Ok(Ok(())) => {
                        stats
                            .wire_bytes
                            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    }
                    Ok(Err(err)) => {
                        let _ = events
                            .send(Event::Broken(format!(
                                "stream {index}: write failed: {err}"
                            )))
                            .await;
                        return;
                    }
                    Err(_) => {
                        let _ = events
                            .send(Event::Broken(format!(
                                "stream {index}: the receiver accepted no data for {STALL_TIMEOUT:?}"
                            )))
                            .await;
                        return;
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), writer.shutdown()).await;
        });
        Self { frames, task }
    }
}

pub(super) async fn connect(
    addr: &str,
    credentials: &Credentials,
) -> Result<TlsStream<TcpStream>, SessionError> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, crate::proxy::connect(addr))
        .await
        .map_err(|_| SessionError::Timeout("the TCP connection"))?
        .map_err(|err| match err {
            crate::proxy::ConnectError::Direct(source) => SessionError::Connect {
                addr: addr.to_owned(),
                source,
            },
            crate::proxy::ConnectError::Proxy(err) => SessionError::Proxy(err),
        })?;
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(credentials.client_config());
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        connector.connect(Credentials::server_name(), tcp),
    )
    .await
    .map_err(|_| SessionError::Timeout("the TLS handshake"))?
    .map_err(|source| SessionError::Handshake {
        addr: addr.to_owned(),
        source,
    })
}

/// A token cancelled after `after`.
pub(super) fn deadline_token(after: Duration) -> CancellationToken {
    let token = CancellationToken::new();
    let guard = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        guard.cancel();
    });
    token
}

/// What a frame from the receiver is for.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Incoming {
    /// For the session; a frame that ends it is the last one read.
    Event(Event),
    /// A checksum reply, for the rescan.
    SumReply(SumReply),
    /// The operator changed the server's settings.
    Settings(SettingsUpdate),
    /// A frame of a kind this agent does not know.
    Ignore(FrameKind),
}

impl Incoming {
    /// Whether the session goes on reading after this.
    fn ends_reading(&self) -> bool {
        matches!(
            self,
            Self::Event(
                Event::Refused(_)
                    | Event::Goodbye(_)
                    | Event::Broken(_)
                    | Event::CertificateRefused(_)
            )
        )
    }
}

/// What a frame from the receiver means to the session. Frames only an agent sends are
/// a broken peer.
pub(super) fn interpret(frame: Result<Frame, DecodeError>) -> Incoming {
    let event = match frame {
        Ok(Frame::Welcome(w)) => Event::Welcome(w),
        Ok(Frame::Durable(d)) => Event::Durable(d.epoch),
        Ok(Frame::CheckpointSaved(c)) => Event::CheckpointSaved(c.seq),
        Ok(Frame::SumReply(reply)) => return Incoming::SumReply(reply),
        Ok(Frame::Error(e)) => Event::Refused(e),
        Ok(Frame::Goodbye(g)) => Event::Goodbye(g.message),
        Ok(Frame::SettingsUpdate(update)) => return Incoming::Settings(update),
        Ok(Frame::Unknown { kind, .. }) => return Incoming::Ignore(kind),
        Ok(other) => Event::Broken(format!(
            "unexpected {} frame from the receiver",
            other.kind()
        )),
        Err(err) => Event::Broken(format!("undecodable frame from the receiver: {err}")),
    };
    Incoming::Event(event)
}

/// Reads one stream's frames from the receiver until it ends, and hands each where
/// [`interpret`] says.
pub(super) async fn read_frames(
    mut reader: ReadHalf<TlsStream<TcpStream>>,
    events: mpsc::Sender<Event>,
    sums: mpsc::Sender<SumReply>,
    stats: Arc<AgentStats>,
) {
    let mut buf = FrameBuffer::new();
    loop {
        loop {
            let incoming = match buf.next_frame() {
                Ok(None) => break,
                Ok(Some(frame)) => interpret(Ok(frame)),
                Err(err) => interpret(Err(err)),
            };
            let last = incoming.ends_reading();
            match incoming {
                Incoming::Event(event) => {
                    if events.send(event).await.is_err() || last {
                        return;
                    }
                }
                Incoming::SumReply(reply) => {
                    // No rescan task (any more): nobody is waiting for it.
                    let _ = sums.send(reply).await;
                }
                Incoming::Settings(update) => {
                    stats.throttle.set_rate(update.bandwidth_limit);
                    stats.pause.set(update.paused);
                }
                Incoming::Ignore(kind) => {
                    tracing::debug!(%kind, "ignoring a frame of unknown kind from the receiver");
                }
            }
        }
        match reader.read(buf.spare()).await {
            Ok(0) => {
                let _ = events
                    .send(Event::Broken("the receiver closed the connection".into()))
                    .await;
                return;
            }
            Ok(n) => {
                stats.received_bytes.fetch_add(n as u64, Ordering::Relaxed);
                buf.filled(n);
            }
            Err(err) => {
                let event = if is_certificate_problem(&err) {
                    Event::CertificateRefused(err.to_string())
                } else {
                    Event::Broken(format!("read failed: {err}"))
                };
                let _ = events.send(event).await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockferry_proto::{Checkpoint, Durable, ErrorCode, ErrorFrame, Goodbye, Hello};

    #[test]
    fn acknowledgements_go_to_the_session_and_reading_goes_on() {
        for (frame, event) in [
            (Frame::Durable(Durable { epoch: 7 }), Event::Durable(7)),
            (
                Frame::CheckpointSaved(Checkpoint { seq: 3 }),
                Event::CheckpointSaved(3),
            ),
        ] {
            let incoming = interpret(Ok(frame));
            assert!(!incoming.ends_reading());
            assert_eq!(incoming, Incoming::Event(event));
        }
    }

    #[test]
    fn a_refusal_a_goodbye_or_a_frame_only_agents_send_is_the_last_frame_read() {
        let refused = interpret(Ok(Frame::Error(ErrorFrame::new(ErrorCode::LIMIT, "no"))));
        assert!(refused.ends_reading());
        let bye = interpret(Ok(Frame::Goodbye(Goodbye {
            message: "replaced".into(),
        })));
        assert_eq!(bye, Incoming::Event(Event::Goodbye("replaced".into())));
        assert!(bye.ends_reading());
        let hello = Frame::Hello(Hello {
            agent_version: String::new(),
            inventory: Default::default(),
            disks: Vec::new(),
            streams: 1,
            series: [0; 16],
            resume: blockferry_proto::ResumeClaim::NoRecord,
        });
        let Incoming::Event(Event::Broken(why)) = interpret(Ok(hello)) else {
            panic!("a Hello from the receiver is a broken peer")
        };
        assert!(why.contains("unexpected"), "{why}");
        let undecodable = interpret(Err(DecodeError::BadMagic { found: [0, 0] }));
        assert!(undecodable.ends_reading());
    }

    #[test]
    fn settings_and_unknown_kinds_do_not_reach_the_session() {
        let update = SettingsUpdate {
            bandwidth_limit: 1000,
            paused: true,
            unknown_flags: 0,
        };
        assert_eq!(
            interpret(Ok(Frame::SettingsUpdate(update))),
            Incoming::Settings(update)
        );
        assert_eq!(
            interpret(Ok(Frame::Unknown {
                kind: FrameKind(0x7e),
                payload: Vec::new()
            })),
            Incoming::Ignore(FrameKind(0x7e))
        );
    }
}
