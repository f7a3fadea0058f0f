//! One session with the receiver: connect, Hello, Welcome, then the initial sync of every
//! disk from the watermark the receiver reported, with barriers, until every disk is
//! durable at the receiver.

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockferry_proto::limits::MAX_WRITE_DATA;
use blockferry_proto::{
    Barrier, ErrorCode, ErrorFrame, Frame, FrameBuffer, Goodbye, Heartbeat, Hello, SyncProgress,
    Welcome, WriteFlags, WriteHeader, encode_write,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::agent::{AgentConfig, AgentStats};
use crate::credentials::Credentials;
use crate::resources::ProcessSampler;
use crate::volume::{Volume, zero_runs};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// Barriers sent but not yet durable. Bounds what a broken connection makes us resend.
const MAX_UNACKED_BARRIERS: u64 = 2;
/// A receiver that neither answers nor accepts data for this long is treated as a broken
/// connection, and the agent reconnects.
const STALL_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed")]
    Handshake {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to the receiver failed")]
    Connection(#[from] std::io::Error),
    #[error("the receiver sent something unreadable: {0}")]
    Protocol(String),
    #[error("the receiver refused: {code}: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("cannot read volume {disk}")]
    Volume {
        disk: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The agent was asked to stop; the session ends at the next frame boundary.
    #[error("the agent is stopping")]
    Stopping,
}

impl SessionError {
    /// Whether reconnecting may help. Refusals that would repeat identically (a write out
    /// of range, a protocol violation, a certificate the receiver rejects) are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Refused { code, .. } => code.is_retryable(),
            Self::Protocol(_) => false,
            Self::Handshake { source, .. } => !is_certificate_problem(source),
            _ => true,
        }
    }
}

fn is_certificate_problem(err: &std::io::Error) -> bool {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::AlertReceived(
                        rustls::AlertDescription::BadCertificate
                            | rustls::AlertDescription::UnknownCA
                            | rustls::AlertDescription::CertificateExpired
                            | rustls::AlertDescription::CertificateRevoked
                            | rustls::AlertDescription::CertificateRequired
                    )
            )
        })
}

/// How a session that did not fail ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every disk's initial sync is durable at the receiver (and the agent was asked to
    /// exit then).
    Synced,
    /// The agent is shutting down.
    Shutdown,
    /// The receiver ended the session (shutdown, replaced); reconnect.
    Closed(String),
}

/// What the receiver's frames mean to the sender.
#[derive(Debug)]
enum Event {
    Welcome(Welcome),
    Durable(u64),
    Refused(ErrorFrame),
    Goodbye(String),
    Broken(String),
}

pub(crate) struct Session<'a> {
    config: &'a AgentConfig,
    volumes: &'a [Volume],
    stats: &'a Arc<AgentStats>,
    writer: WriteHalf<TlsStream<TcpStream>>,
    events: mpsc::Receiver<Event>,
    out: Vec<u8>,
    epoch: u64,
    durable_epoch: u64,
    bytes_since_barrier: u64,
    heartbeat_every: Duration,
    last_heartbeat: Instant,
    sampler: ProcessSampler,
    shutdown: CancellationToken,
}

/// Connects, says Hello, and runs the session to its end.
pub(crate) async fn run(
    config: &AgentConfig,
    volumes: &[Volume],
    stats: &Arc<AgentStats>,
    shutdown: &CancellationToken,
) -> Result<Outcome, SessionError> {
    let stream = connect(&config.receiver, &config.credentials).await?;
    let (reader, writer) = tokio::io::split(stream);
    let (events_tx, events) = mpsc::channel(256);
    let reader_task = tokio::spawn(read_frames(reader, events_tx));
    let mut session = Session {
        config,
        volumes,
        stats,
        writer,
        events,
        out: Vec::with_capacity(MAX_WRITE_DATA as usize + 64),
        epoch: 0,
        durable_epoch: 0,
        bytes_since_barrier: 0,
        heartbeat_every: Duration::from_secs(5),
        last_heartbeat: Instant::now(),
        sampler: ProcessSampler::new(),
        shutdown: shutdown.clone(),
    };
    // Stopping is noticed between frames, never inside one, so the Goodbye is the last
    // whole frame the receiver reads.
    let result = match session.drive().await {
        Err(SessionError::Stopping) => {
            let _ = session
                .send(&Frame::Goodbye(Goodbye {
                    message: "agent stopping".into(),
                }))
                .await;
            Ok(Outcome::Shutdown)
        }
        other => other,
    };
    let _ = session.writer.shutdown().await;
    reader_task.abort();
    result
}

async fn connect(
    addr: &str,
    credentials: &Credentials,
) -> Result<TlsStream<TcpStream>, SessionError> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| SessionError::Timeout("the TCP connection"))?
        .map_err(|source| SessionError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&credentials.client_config));
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

impl Session<'_> {
    async fn drive(&mut self) -> Result<Outcome, SessionError> {
        let hello = Hello {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            inventory: crate::inventory::collect(),
            disks: self
                .volumes
                .iter()
                .map(|v| blockferry_proto::DiskSpec {
                    name: v.name.clone(),
                    size: v.size,
                })
                .collect(),
        };
        self.send(&Frame::Hello(hello)).await?;
        let welcome = tokio::select! {
            () = self.shutdown.cancelled() => return Err(SessionError::Stopping),
            welcome = tokio::time::timeout(WELCOME_TIMEOUT, self.events.recv()) => welcome,
        };
        let welcome = match welcome {
            Err(_) => return Err(SessionError::Timeout("Welcome")),
            Ok(Some(Event::Welcome(w))) => w,
            Ok(Some(other)) => return self.ended(other),
            Ok(None) => return Err(broken("the connection closed before Welcome")),
        };
        self.check_welcome(&welcome)?;
        self.heartbeat_every =
            Duration::from_millis(u64::from(welcome.settings.heartbeat_interval_ms.max(500)));
        let barrier_interval = welcome.settings.barrier_interval.max(1 << 20);
        self.stats
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);

        for (index, (volume, resume)) in self.volumes.iter().zip(&welcome.disks).enumerate() {
            let disk = u16::try_from(index).expect("at most MAX_DISKS volumes");
            self.stats.set_durable(index, resume.sync_watermark);
            self.stats.set_position(index, resume.sync_watermark);
            if resume.sync_watermark >= volume.size {
                continue;
            }
            tracing::info!(
                disk = %volume.name,
                from = resume.sync_watermark,
                size = volume.size,
                "initial sync"
            );
            self.sync_disk(disk, volume, resume.sync_watermark, barrier_interval)
                .await?;
        }
        // Every byte is sent; the sync is complete once the last barrier is durable.
        if self.bytes_since_barrier > 0 || self.epoch == 0 {
            self.barrier(Vec::new()).await?;
        }
        while self.durable_epoch < self.epoch {
            let event = self.next_event().await?;
            self.on_event(event)?;
        }
        self.stats
            .synced
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("every disk's initial sync is durable at the receiver");
        if self.config.exit_when_synced {
            self.send(&Frame::Goodbye(Goodbye {
                message: "initial sync complete".into(),
            }))
            .await?;
            return Ok(Outcome::Synced);
        }
        // Continuous capture arrives with the write-capture sources; until then the
        // session stays up, heartbeating, so the receiver shows the server connected.
        loop {
            let event = tokio::select! {
                () = self.shutdown.cancelled() => return Err(SessionError::Stopping),
                event = tokio::time::timeout(self.heartbeat_every, self.events.recv()) => event,
            };
            match event {
                Err(_) => self.heartbeat().await?,
                Ok(Some(event)) => self.on_event(event)?,
                Ok(None) => return Err(broken("the connection closed")),
            }
        }
    }

    fn check_welcome(&self, welcome: &Welcome) -> Result<(), SessionError> {
        if welcome.disks.len() != self.volumes.len() {
            return Err(SessionError::Protocol(format!(
                "Welcome lists {} disks, the agent sent {}",
                welcome.disks.len(),
                self.volumes.len()
            )));
        }
        for (v, d) in self.volumes.iter().zip(&welcome.disks) {
            if v.name != d.name || v.size != d.size || d.sync_watermark > d.size {
                return Err(SessionError::Protocol(format!(
                    "Welcome describes disk {} ({} bytes, watermark {}) but the agent has {} ({} bytes)",
                    d.name, d.size, d.sync_watermark, v.name, v.size
                )));
            }
        }
        Ok(())
    }

    async fn sync_disk(
        &mut self,
        disk: u16,
        volume: &Volume,
        start: u64,
        barrier_interval: u64,
    ) -> Result<(), SessionError> {
        let mut chunks = volume.read_from(start);
        loop {
            let chunk = tokio::select! {
                () = self.shutdown.cancelled() => return Err(SessionError::Stopping),
                chunk = chunks.recv() => match chunk {
                    Some(chunk) => chunk,
                    None => break,
                },
            };
            let (offset, data) = chunk.map_err(|source| SessionError::Volume {
                disk: volume.name.clone(),
                source,
            })?;
            for (at, len, zero) in zero_runs(&data) {
                let header = WriteHeader {
                    disk,
                    flags: if zero {
                        WriteFlags::INITIAL_SYNC | WriteFlags::ZERO_FILL
                    } else {
                        WriteFlags::INITIAL_SYNC
                    },
                    offset: offset + at as u64,
                    len: u32::try_from(len).expect("chunks are at most MAX_WRITE_DATA"),
                    epoch: self.epoch + 1,
                };
                self.out.clear();
                encode_write(
                    &mut self.out,
                    &header,
                    if zero { &[] } else { &data[at..at + len] },
                );
                self.write_out().await?;
                let counter = if zero {
                    &self.stats.zero_fill_bytes
                } else {
                    &self.stats.payload_bytes
                };
                counter.fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
            }
            let end = offset + data.len() as u64;
            self.stats.set_position(usize::from(disk), end);
            self.bytes_since_barrier += data.len() as u64;
            if self.bytes_since_barrier >= barrier_interval || end == volume.size {
                self.barrier(vec![SyncProgress {
                    disk,
                    watermark: end,
                }])
                .await?;
            }
            self.poll_events()?;
            if self.last_heartbeat.elapsed() >= self.heartbeat_every {
                self.heartbeat().await?;
            }
        }
        Ok(())
    }

    /// Closes the current epoch. Waits first if too many barriers are unacknowledged, so
    /// that a broken connection never loses more than a few intervals of work.
    async fn barrier(&mut self, sync_progress: Vec<SyncProgress>) -> Result<(), SessionError> {
        while self.epoch - self.durable_epoch >= MAX_UNACKED_BARRIERS {
            let event = self.next_event().await?;
            self.on_event(event)?;
        }
        self.epoch += 1;
        self.bytes_since_barrier = 0;
        for p in &sync_progress {
            self.stats
                .pending_watermark(self.epoch, usize::from(p.disk), p.watermark);
        }
        self.send(&Frame::Barrier(Barrier {
            epoch: self.epoch,
            sync_progress,
        }))
        .await
    }

    async fn heartbeat(&mut self) -> Result<(), SessionError> {
        self.last_heartbeat = Instant::now();
        let sample = self.sampler.sample();
        self.send(&Frame::Heartbeat(Heartbeat {
            cpu_permille: sample.cpu_permille,
            rss_bytes: sample.rss_bytes,
            backlog_bytes: self.stats.backlog_bytes(),
        }))
        .await
    }

    fn poll_events(&mut self) -> Result<(), SessionError> {
        while let Ok(event) = self.events.try_recv() {
            self.on_event(event)?;
        }
        Ok(())
    }

    async fn next_event(&mut self) -> Result<Event, SessionError> {
        tokio::select! {
            () = self.shutdown.cancelled() => Err(SessionError::Stopping),
            event = tokio::time::timeout(STALL_TIMEOUT, self.events.recv()) => match event {
                Ok(Some(event)) => Ok(event),
                Ok(None) => Err(broken("the connection closed")),
                Err(_) => Err(SessionError::Timeout("the receiver to acknowledge a barrier")),
            },
        }
    }

    fn on_event(&mut self, event: Event) -> Result<(), SessionError> {
        match event {
            Event::Durable(epoch) => {
                if epoch > self.epoch {
                    return Err(SessionError::Protocol(format!(
                        "Durable for epoch {epoch}, but only {} were sent",
                        self.epoch
                    )));
                }
                self.durable_epoch = self.durable_epoch.max(epoch);
                self.stats.durable_through(epoch);
                Ok(())
            }
            other => self.ended(other).map(drop),
        }
    }

    /// Turns an event that ends the session into its result.
    fn ended(&self, event: Event) -> Result<Outcome, SessionError> {
        match event {
            Event::Refused(err) => Err(SessionError::Refused {
                code: err.code,
                message: err.message,
            }),
            Event::Goodbye(message) => Err(SessionError::Connection(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                format!("the receiver ended the session: {message}"),
            ))),
            Event::Broken(why) => Err(broken(&why)),
            Event::Welcome(_) | Event::Durable(_) => Err(SessionError::Protocol(
                "unexpected frame from the receiver".into(),
            )),
        }
    }

    async fn send(&mut self, frame: &Frame) -> Result<(), SessionError> {
        self.out.clear();
        frame.encode(&mut self.out);
        self.write_out().await
    }

    async fn write_out(&mut self) -> Result<(), SessionError> {
        let written = tokio::time::timeout(STALL_TIMEOUT, self.writer.write_all(&self.out))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the receiver accepted no data for 120 s",
                ))
            });
        if let Err(err) = written {
            // The receiver may have said why before closing; prefer its reason.
            let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
            while let Ok(Some(event)) = tokio::time::timeout_at(deadline, self.events.recv()).await
            {
                if !matches!(event, Event::Durable(_)) {
                    return self.ended(event).map(drop);
                }
            }
            return Err(SessionError::Connection(err));
        }
        self.stats
            .wire_bytes
            .fetch_add(self.out.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

fn broken(why: &str) -> SessionError {
    SessionError::Connection(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        why.to_owned(),
    ))
}

async fn read_frames(mut reader: ReadHalf<TlsStream<TcpStream>>, events: mpsc::Sender<Event>) {
    let mut buf = FrameBuffer::new();
    loop {
        loop {
            let event = match buf.next_frame() {
                Ok(None) => break,
                Ok(Some(Frame::Welcome(w))) => Event::Welcome(w),
                Ok(Some(Frame::Durable(d))) => Event::Durable(d.epoch),
                Ok(Some(Frame::Error(e))) => Event::Refused(e),
                Ok(Some(Frame::Goodbye(g))) => Event::Goodbye(g.message),
                Ok(Some(Frame::Unknown { kind, .. })) => {
                    tracing::debug!(%kind, "ignoring a frame of unknown kind from the receiver");
                    continue;
                }
                Ok(Some(other)) => Event::Broken(format!(
                    "unexpected {} frame from the receiver",
                    other.kind()
                )),
                Err(err) => Event::Broken(format!("undecodable frame from the receiver: {err}")),
            };
            let last = !matches!(event, Event::Welcome(_) | Event::Durable(_));
            if events.send(event).await.is_err() || last {
                return;
            }
        }
        match reader.read(buf.spare()).await {
            Ok(0) => {
                let _ = events
                    .send(Event::Broken("the receiver closed the connection".into()))
                    .await;
                return;
            }
            Ok(n) => buf.filled(n),
            Err(err) => {
                let _ = events
                    .send(Event::Broken(format!("read failed: {err}")))
                    .await;
                return;
            }
        }
    }
}
