//! The receiver: replication listener (mTLS on port 1500), sessions, admin socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use blockferry_storage::{Engine, IoEngine, StoreError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::catalog::{Catalog, CatalogError};
use crate::context::{SessionContext, SessionSettings};
use crate::control::{self, ControlContext};
use crate::events::EventLog;
use crate::metrics::Metrics;
use crate::pki::{AgentIdentity, CertificateAuthority, PkiError};
use crate::registry::SessionRegistry;
use crate::revocation::Revocations;
use crate::session;
use crate::status::StatusReport;
use crate::tls::{self, RefusalReason, TlsSetupError};

/// The replication port.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:1500";

/// A TLS handshake must finish this soon after the TCP connection is accepted.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The default largest disk: 64 TiB, the largest EBS volume.
pub const DEFAULT_MAX_DISK_SIZE: u64 = 64 << 40;

/// Everything a receiver needs to start. Built by the CLI from flags, or by tests.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Holds the CA, the catalog, the staging images and the admin socket.
    pub data_dir: PathBuf,
    /// Replication listener address.
    pub listen: SocketAddr,
    pub io_engine: IoEngine,
    /// io_uring writer threads (each with its own ring).
    pub writer_threads: usize,
    /// Agents send a barrier after at most this many bytes; smaller means less to resend
    /// after a broken connection, larger means fewer flushes.
    pub barrier_interval: u64,
    /// Streams (TCP connections) granted to one agent session, 1 to 5.
    pub max_streams: u8,
    /// How often agents send heartbeats.
    pub heartbeat_interval: Duration,
    /// A stream with no frame at all for this long is dead and its session is closed;
    /// several heartbeat intervals.
    pub idle_timeout: Duration,
    /// Bytes of writes in flight per session.
    pub session_in_flight: u32,
    /// Bytes of writes in flight across all sessions; must be at least
    /// `session_in_flight`.
    pub global_in_flight: u32,
    /// The control API's address (enrollment, renewal, status over HTTPS); `None` runs
    /// without it. The `run` command defaults to `0.0.0.0:8443`.
    pub control: Option<SocketAddr>,
    /// Lifetime of the certificates the control API issues to agents.
    pub agent_cert_lifetime: Duration,
    /// The Prometheus endpoint's address (plain HTTP, `GET /metrics`); `None` runs
    /// without it. The `run` command defaults to `0.0.0.0:9500`.
    pub metrics: Option<SocketAddr>,
    /// A disk with changes waiting and no durable progress for this long is STALLED.
    pub stall_after: Duration,
    /// Initial syncs and rescans running at once across all servers; more wait in a
    /// queue. 0 is unlimited.
    pub max_concurrent_syncs: usize,
    /// Stage into EBS snapshot chains (each disk through a local base copy); `None`
    /// stages into image files only.
    pub ebs: Option<crate::snapshots::EbsBackendConfig>,
    /// File backend: which recovery points are cut (EBS: every point is a snapshot).
    pub recovery_points: crate::points::FilePointMode,
    /// File backend: a point is cut at the first consistent point this long after the
    /// previous one (EBS: `ebs.recovery_interval`).
    pub recovery_interval: Duration,
    /// How often the retention policies are enforced (recovery points deleted).
    pub retention_check: Duration,
    /// The largest disk an agent may replicate; larger ones are refused (LIMIT). The
    /// default, 64 TiB, is the largest EBS volume.
    pub max_disk_size: u64,
    /// Receive buffers of all replication connections together, MiB: about 1 MiB per
    /// stream in a session, 320 KiB per connection before it.
    pub frame_buffer_mib: u32,
    /// An engine already running, used instead of starting `io_engine`: the crash tests
    /// pass one with a volatile cache ([`Engine::with_volatile_cache`]) to cut its power.
    pub engine: Option<Engine>,
}

impl ReceiverConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            io_engine: IoEngine::Auto,
            writer_threads: 1,
            barrier_interval: 16 << 20,
            max_streams: blockferry_proto::limits::MAX_STREAMS,
            heartbeat_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            session_in_flight: 64 << 20,
            global_in_flight: 1 << 30,
            control: None,
            agent_cert_lifetime: Duration::from_secs(24 * 3600),
            metrics: None,
            stall_after: Duration::from_secs(60),
            max_concurrent_syncs: 0,
            ebs: None,
            recovery_points: crate::points::FilePointMode::Off,
            recovery_interval: Duration::from_secs(600),
            retention_check: Duration::from_secs(60),
            max_disk_size: DEFAULT_MAX_DISK_SIZE,
            frame_buffer_mib: crate::budget::DEFAULT_FRAME_BUFFER_MIB,
            engine: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    #[error("the control API's admin token {path} cannot be used")]
    AdminToken {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the data dir cannot hold the receiver's keys and images")]
    DataDir(#[from] blockferry_util::durable::DirError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("cannot start the I/O engine")]
    Engine(#[from] StoreError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the admin socket")]
    Admin(#[source] std::io::Error),
    #[error("cannot open the event file in {path}")]
    Events {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Counts of refused connections by reason, for logs, tests and metrics.
#[derive(Debug)]
pub struct RefusalCounters {
    metrics: Arc<Metrics>,
}

impl RefusalCounters {
    fn record(&self, reason: RefusalReason) {
        // TLS failures count as handshake failures too; refusals before or after the
        // handshake do not.
        let during_handshake = !matches!(
            reason,
            RefusalReason::NoIdentity
                | RefusalReason::ClientHelloTimeout
                | RefusalReason::TooManyConnections
                | RefusalReason::TooManyFromAddress
                | RefusalReason::Busy
        );
        self.metrics
            .refused("replication", reason.code(), during_handshake);
    }

    /// Refusals on the replication port for `reason`.
    pub fn get(&self, reason: RefusalReason) -> u64 {
        self.metrics.refusals("replication", reason.code())
    }
}

/// A running receiver. Dropping it without [`Receiver::shutdown`] stops accepting but does
/// not wait for sessions.
#[derive(Debug)]
pub struct Receiver {
    local_addr: SocketAddr,
    control_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    refusals: Arc<RefusalCounters>,
    ctx: Arc<SessionContext>,
    data_dir: PathBuf,
}

impl Receiver {
    /// Creates the data dir, CA and catalog as needed, binds the listener and the admin
    /// socket, and starts serving.
    pub async fn start(config: ReceiverConfig) -> Result<Self, ReceiverError> {
        let data_dir = config.data_dir.clone();
        blockferry_util::durable::ensure_private_dir(&data_dir, "receiver data")?;
        let fds = crate::admission::FdBudget::raise();
        tracing::info!(
            fd_limit = fds.limit,
            replication_streams = fds.replication_streams,
            replication_handshakes = fds.replication_handshakes,
            control = fds.control,
            metrics = fds.metrics,
            "file descriptors divided among the listeners"
        );
        let ca = CertificateAuthority::load_or_create(&data_dir)?;
        let catalog = Arc::new(Catalog::open(&data_dir)?);
        let revocations = Arc::new(Revocations::new(catalog.revoked_agents()?));
        let tls_config = tls::server_config(&ca, Arc::clone(&revocations))?;
        let engine = match &config.engine {
            Some(engine) => engine.clone(),
            None => Engine::start(config.io_engine, config.writer_threads)?,
        };
        tracing::info!(engine = %engine.kind(), "staging I/O engine ready");

        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ReceiverError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ReceiverError::Listen {
                addr: config.listen,
                source,
            })?;

        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let metrics = Arc::new(Metrics::default());
        let refusals = Arc::new(RefusalCounters {
            metrics: Arc::clone(&metrics),
        });
        let events =
            Arc::new(
                EventLog::open(&data_dir).map_err(|source| ReceiverError::Events {
                    path: data_dir.clone(),
                    source,
                })?,
            );
        let ebs = match &config.ebs {
            Some(ebs) => Some(Arc::new(crate::snapshots::EbsStaging::connect(ebs).await)),
            None => None,
        };
        let images_dir = data_dir.join("images");
        let points = {
            use crate::points::{FilePointMode, PointTarget, RecoveryPoints};
            let target = match (&ebs, &config.ebs, config.recovery_points) {
                (Some(staging), Some(ebs), _) => {
                    Some((PointTarget::Ebs(Arc::clone(staging)), ebs.recovery_interval))
                }
                (_, _, FilePointMode::Off) => None,
                (_, _, mode) => Some((
                    PointTarget::Files {
                        images_dir: images_dir.clone(),
                        policy: if mode == FilePointMode::Copy {
                            blockferry_storage::CopyPolicy::ReflinkOrFull
                        } else {
                            blockferry_storage::CopyPolicy::ReflinkOnly
                        },
                    },
                    config.recovery_interval,
                )),
            };
            target.map(|(target, interval)| {
                Arc::new(RecoveryPoints::new(target, Arc::clone(&catalog), interval))
            })
        };
        let ctx = Arc::new(SessionContext {
            catalog,
            engine,
            images_dir,
            settings: SessionSettings {
                max_streams: config.max_streams,
                barrier_interval: config.barrier_interval,
                in_flight_budget: config.session_in_flight,
                heartbeat_interval: config.heartbeat_interval,
                idle_timeout: config.idle_timeout,
                stall_after: config.stall_after,
                max_disk_size: config.max_disk_size,
            },
            registry: Arc::new(SessionRegistry::new(config.max_concurrent_syncs)),
            revocations,
            metrics: Arc::clone(&metrics),
            events: Arc::clone(&events),
            ebs,
            points,
            shutdown: shutdown.clone(),
            budget: crate::budget::ConnectionBudget::new(config.frame_buffer_mib),
            admission: Arc::new(crate::admission::Admission::new(fds)),
            global_budget: Arc::new(Semaphore::new(
                config.global_in_flight.max(config.session_in_flight) as usize,
            )),
        });

        let control_addr = match config.control {
            None => None,
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| ReceiverError::Listen { addr, source })?;
                let bound = listener
                    .local_addr()
                    .map_err(|source| ReceiverError::Listen { addr, source })?;
                let control = Arc::new(ControlContext {
                    sessions: Arc::clone(&ctx),
                    ca: CertificateAuthority::load_or_create(&data_dir)?,
                    admin_token: control::admin_token(&data_dir).map_err(|source| {
                        ReceiverError::AdminToken {
                            path: data_dir.join("admin.token"),
                            source,
                        }
                    })?,
                    agent_cert_lifetime: time::Duration::try_from(config.agent_cert_lifetime)
                        .unwrap_or(time::Duration::DAY),
                    replication_port: local_addr.port(),
                });
                let acceptor =
                    TlsAcceptor::from(tls::control_config(&ca, Arc::clone(&ctx.revocations))?);
                tasks.spawn(control::serve(
                    listener,
                    acceptor,
                    control,
                    shutdown.clone(),
                ));
                tracing::info!(control = %bound, "control API listening (HTTPS)");
                Some(bound)
            }
        };
        let metrics_addr = match config.metrics {
            None => None,
            Some(addr) => {
                let (listener, bound) = crate::metrics::bind(addr)
                    .await
                    .map_err(|source| ReceiverError::Listen { addr, source })?;
                let registry = metrics.registry(
                    Arc::clone(&ctx.catalog),
                    Arc::clone(&ctx.registry),
                    Arc::clone(&ctx.admission),
                );
                tasks.spawn(crate::metrics::serve(
                    listener,
                    Arc::new(registry),
                    Arc::clone(&metrics),
                    Arc::clone(&ctx.admission),
                    shutdown.clone(),
                ));
                tracing::info!(metrics = %bound, "Prometheus metrics at /metrics (HTTP)");
                Some(bound)
            }
        };
        tasks.spawn(crate::events::watch(
            Arc::clone(&ctx.catalog),
            Arc::clone(&ctx.registry),
            events,
            shutdown.clone(),
        ));
        if let Some(points) = &ctx.points {
            tasks
                .spawn(Arc::clone(points).retention_loop(config.retention_check, shutdown.clone()));
        }
        let admin_listener = admin::bind(&data_dir).map_err(ReceiverError::Admin)?;
        tasks.spawn(admin::serve(
            admin_listener,
            Arc::clone(&ctx),
            shutdown.clone(),
        ));
        tasks.spawn(accept_loop(
            listener,
            TlsAcceptor::from(tls_config),
            Arc::clone(&ctx),
            Arc::clone(&refusals),
            tasks.clone(),
        ));
        tracing::info!(listen = %local_addr, data_dir = %data_dir.display(), "receiver listening");
        Ok(Self {
            local_addr,
            control_addr,
            metrics_addr,
            shutdown,
            tasks,
            refusals,
            ctx,
            data_dir,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the control API listens, if it runs.
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control_addr
    }

    /// Where `/metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The metrics page, as a scrape would get it (also without `--metrics`).
    pub fn render_metrics(&self) -> String {
        let registry = self.ctx.metrics.registry(
            Arc::clone(&self.ctx.catalog),
            Arc::clone(&self.ctx.registry),
            Arc::clone(&self.ctx.admission),
        );
        crate::metrics::render(&registry)
    }

    /// Bytes received from `server_id`'s agent so far.
    pub fn received_bytes(&self, server_id: &str) -> u64 {
        self.ctx.metrics.server(server_id).received.get()
    }

    /// The server events recorded so far.
    pub fn events(&self) -> std::io::Result<Vec<crate::events::Event>> {
        self.ctx.events.read(0, None)
    }

    pub fn refusals(&self) -> &RefusalCounters {
        &self.refusals
    }

    pub fn status(&self) -> Result<StatusReport, CatalogError> {
        StatusReport::build(&self.ctx.catalog, Some(&self.ctx.registry))
    }

    /// A token that stops the receiver when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, ends every session (pending barriers are made durable first),
    /// and waits for them.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        admin::remove_socket(&self.data_dir);
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ctx: Arc<SessionContext>,
    refusals: Arc<RefusalCounters>,
    tasks: TaskTracker,
) {
    let log = crate::admission::RefusalLog::new("replication");
    loop {
        let admission = &ctx.admission;
        let Some((tcp, peer, permit)) = crate::admission::next_admitted(
            &listener,
            &ctx.shutdown,
            &admission.replication,
            Some(&admission.known),
            "replication",
            |peer, refusal| {
                refusals.record(match refusal {
                    crate::admission::Refusal::Full => RefusalReason::TooManyConnections,
                    crate::admission::Refusal::Address => RefusalReason::TooManyFromAddress,
                });
                log.refused(peer, refusal.code());
            },
        )
        .await
        else {
            return;
        };
        let (acceptor, ctx, refusals) = (acceptor.clone(), Arc::clone(&ctx), Arc::clone(&refusals));
        tasks.spawn(async move {
            handle_connection(tcp, peer, permit, acceptor, ctx, &refusals).await;
        });
    }
}

async fn handle_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    permit: crate::admission::Permit,
    acceptor: TlsAcceptor,
    ctx: Arc<SessionContext>,
    refusals: &RefusalCounters,
) {
    let _ = tcp.set_nodelay(true);
    let refuse = |reason: RefusalReason, detail: &str| {
        refusals.record(reason);
        tracing::warn!(%peer, reason = reason.code(), detail, "refused connection");
    };
    if !crate::admission::client_hello_arrives(&tcp).await {
        return refuse(
            RefusalReason::ClientHelloTimeout,
            "no TLS ClientHello within 3 s",
        );
    }
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Err(_) => {
            return refuse(
                RefusalReason::HandshakeTimeout,
                "no TLS handshake within 10 s",
            );
        }
        Ok(Err(err)) => {
            return refuse(RefusalReason::of_handshake_error(&err), &err.to_string());
        }
        Ok(Ok(stream)) => stream,
    };
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or_else(|| "no client certificate".to_owned())
        .and_then(|cert| AgentIdentity::from_certificate(cert).map_err(|e| e.to_string()));
    let identity = match identity {
        Ok(identity) => identity,
        Err(detail) => return refuse(RefusalReason::NoIdentity, &detail),
    };
    // An agent: its address goes to the front of the line from now on, and the
    // connection moves from the handshake slots to the stream slots.
    ctx.admission.known.remember(peer.ip());
    drop(permit);
    let Ok(_stream_slot) = ctx.admission.streams.admit(peer.ip(), true) else {
        refuse(
            RefusalReason::Busy,
            "every replication stream slot is taken",
        );
        session::refuse_busy(
            stream,
            "the receiver serves as many replication streams as its file descriptors allow",
        )
        .await;
        return;
    };
    session::serve(ctx, stream, identity, peer).await;
}
