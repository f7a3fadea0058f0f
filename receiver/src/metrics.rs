//! Prometheus metrics on `--metrics` (default `0.0.0.0:9500`): `GET /metrics` in the
//! Prometheus text format 0.0.4.
//!
//! Two kinds: counters and histograms updated where things happen (bytes received and
//! written, apply and barrier latencies, sessions, refusals), and gauges read at scrape
//! time from the same [`StatusReport`] that `status` prints, so the two never disagree.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::registry::SessionRegistry;
use crate::status::{DISK_STATES, StatusReport};

/// The metrics port.
pub const DEFAULT_METRICS: &str = "0.0.0.0:9500";

type ServerLabel = [(&'static str, String); 1];
type DiskLabels = [(&'static str, String); 2];
type ReasonLabel = [(&'static str, &'static str); 1];
type ListenerReasonLabels = [(&'static str, &'static str); 2];

/// The counters and histograms updated as replication happens. Cloning a metric shares
/// it, so sessions keep their own handles.
#[derive(Debug)]
pub struct Metrics {
    received_bytes: Family<ServerLabel, Counter>,
    written_bytes: Family<DiskLabels, Counter>,
    pub(crate) apply_seconds: Histogram,
    pub(crate) barrier_seconds: Histogram,
    pub(crate) sessions_started: Counter,
    refused: Family<ListenerReasonLabels, Counter>,
    handshake_failures: Family<ReasonLabel, Counter>,
    session_errors: Family<ReasonLabel, Counter>,
    enrollment_refusals: Family<ReasonLabel, Counter>,
    rates: Mutex<HashMap<String, Arc<RateMeter>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            received_bytes: Family::default(),
            written_bytes: Family::default(),
            // 50 µs to ~3 min.
            apply_seconds: Histogram::new(exponential_buckets(50e-6, 2.0, 22)),
            barrier_seconds: Histogram::new(exponential_buckets(100e-6, 2.0, 20)),
            sessions_started: Counter::default(),
            refused: Family::default(),
            handshake_failures: Family::default(),
            session_errors: Family::default(),
            enrollment_refusals: Family::default(),
            rates: Mutex::new(HashMap::new()),
        }
    }
}

/// What the frame readers of one server's streams count.
#[derive(Debug, Clone)]
pub(crate) struct ServerMeter {
    pub(crate) received: Counter,
    pub(crate) rate: Arc<RateMeter>,
}

impl Metrics {
    /// The counters of source server `server_id`, shared by all its streams and sessions.
    pub(crate) fn server(&self, server_id: &str) -> ServerMeter {
        let rate = Arc::clone(
            crate::lock(&self.rates)
                .entry(server_id.to_owned())
                .or_default(),
        );
        ServerMeter {
            received: self
                .received_bytes
                .get_or_create_owned(&[("server", server_id.to_owned())]),
            rate,
        }
    }

    pub(crate) fn written(&self, server_id: &str, disk: &str) -> Counter {
        self.written_bytes
            .get_or_create_owned(&[("server", server_id.to_owned()), ("disk", disk.to_owned())])
    }

    /// A refused connection on `listener` (`replication`, `control`, `metrics`); TLS
    /// reasons count as handshake failures too.
    pub(crate) fn refused(
        &self,
        listener: &'static str,
        reason: &'static str,
        during_handshake: bool,
    ) {
        self.refused
            .get_or_create(&[("listener", listener), ("reason", reason)])
            .inc();
        if during_handshake {
            self.handshake_failures
                .get_or_create(&[("reason", reason)])
                .inc();
        }
    }

    pub(crate) fn refusals(&self, listener: &'static str, reason: &'static str) -> u64 {
        self.refused
            .get_or_create(&[("listener", listener), ("reason", reason)])
            .get()
    }

    /// A session that ended with an error sent to its agent.
    pub(crate) fn session_error(&self, code: &'static str) {
        self.session_errors.get_or_create(&[("code", code)]).inc();
    }

    /// An enrollment the control API refused.
    pub(crate) fn enrollment_refused(&self, reason: &'static str) {
        self.enrollment_refusals
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// The registry to scrape: these metrics, the state read from the catalog and live
    /// sessions, and the receiver process's own.
    pub(crate) fn registry(
        &self,
        catalog: Arc<Catalog>,
        sessions: Arc<SessionRegistry>,
        admission: Arc<crate::admission::Admission>,
    ) -> Registry {
        let mut r = Registry::default();
        r.register(
            "blockferry_received_bytes",
            "Bytes received from a source server's agent (frames, after TLS)",
            self.received_bytes.clone(),
        );
        r.register(
            "blockferry_written_bytes",
            "Bytes written to a staging disk (zero-fills count their length)",
            self.written_bytes.clone(),
        );
        r.register(
            "blockferry_write_apply_seconds",
            "Time from a write's submission to the staging store until it completed",
            self.apply_seconds.clone(),
        );
        r.register(
            "blockferry_barrier_seconds",
            "Time to make a sealed epoch durable: flush every staging disk, commit the consistent point",
            self.barrier_seconds.clone(),
        );
        r.register(
            "blockferry_sessions_started",
            "Agent sessions that got as far as Welcome",
            self.sessions_started.clone(),
        );
        r.register(
            "blockferry_refused_connections",
            "Connections refused, by listener (replication, control, metrics) and reason",
            self.refused.clone(),
        );
        r.register(
            "blockferry_tls_handshake_failures",
            "TLS handshakes on the replication port that failed, by reason",
            self.handshake_failures.clone(),
        );
        r.register(
            "blockferry_session_errors",
            "Sessions ended with an error sent to the agent, by error code",
            self.session_errors.clone(),
        );
        r.register(
            "blockferry_enrollment_refusals",
            "Enrollments the control API refused, by reason (unknown_token, expired, used_up, revoked, wrong_server, server_exists, nothing_to_reinstall, bad_request, catalog_error)",
            self.enrollment_refusals.clone(),
        );
        r.register_collector(Box::new(StateCollector { catalog, sessions }));
        r.register_collector(Box::new(ConnectionCollector(admission)));
        r.register_collector(Box::new(ProcessCollector));
        r
    }
}

/// Bytes per second over the last 10 whole seconds.
#[derive(Debug, Default)]
pub(crate) struct RateMeter {
    /// (unix second, bytes in it) for the current second and the 10 before.
    slots: Mutex<[(u64, u64); 11]>,
}

impl RateMeter {
    pub(crate) fn add(&self, bytes: u64) {
        let now = crate::catalog::now_ms() / 1000;
        let mut slots = crate::lock(&self.slots);
        let slot = &mut slots[(now % 11) as usize];
        if slot.0 != now {
            *slot = (now, 0);
        }
        slot.1 += bytes;
    }

    pub(crate) fn rate(&self) -> f64 {
        let now = crate::catalog::now_ms() / 1000;
        let slots = crate::lock(&self.slots);
        let total: u64 = slots
            .iter()
            .filter(|(second, _)| *second < now && now - second <= 10)
            .map(|(_, bytes)| bytes)
            .sum();
        total as f64 / 10.0
    }
}

/// Gauges of every server and disk, from the status report.
#[derive(Debug)]
struct StateCollector {
    catalog: Arc<Catalog>,
    sessions: Arc<SessionRegistry>,
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let report = match StatusReport::build(&self.catalog, Some(&self.sessions)) {
            Ok(report) => report,
            Err(err) => {
                tracing::warn!(error = %blockferry_util::error_chain(&err), "metrics: cannot read the catalog");
                return Ok(());
            }
        };
        let servers = &report.servers;
        let server = |s: &crate::status::ServerStatus| [("server", s.server_id.clone())];
        let disks = || {
            servers.iter().flat_map(|s| {
                s.disks.iter().map(move |d| {
                    (
                        s,
                        d,
                        [("server", s.server_id.clone()), ("disk", d.name.clone())],
                    )
                })
            })
        };

        gauge(
            &mut encoder,
            "blockferry_disk_size_bytes",
            "Size of a source disk",
            disks().map(|(_, d, l)| (l, d.size as f64)),
        )?;
        gauge(
            &mut encoder,
            "blockferry_disk_replicated_bytes",
            "Bytes of the initial sync durably in place at the receiver",
            disks().map(|(_, d, l)| (l, d.replicated_bytes as f64)),
        )?;
        gauge(
            &mut encoder,
            "blockferry_disk_sync_progress_ratio",
            "Initial sync progress: replicated bytes over disk size, 0 to 1",
            disks().map(|(_, d, l)| (l, d.progress_percent() / 100.0)),
        )?;
        gauge(
            &mut encoder,
            "blockferry_disk_backlog_bytes",
            "Bytes changed on the source and not yet durable here, per the agent's last heartbeat",
            disks().filter_map(|(_, d, l)| d.backlog_bytes.map(|b| (l, b as f64))),
        )?;
        gauge(
            &mut encoder,
            "blockferry_disk_rescanned_bytes",
            "Bytes the latest rescan compared by checksum",
            disks().map(|(_, d, l)| (l, d.rescanned_bytes as f64)),
        )?;
        gauge(
            &mut encoder,
            "blockferry_disk_resent_bytes",
            "Bytes written while the latest rescan ran: blocks found different plus changes meanwhile",
            disks().map(|(_, d, l)| (l, d.resent_bytes as f64)),
        )?;
        {
            let mut family = encoder.encode_descriptor(
                "blockferry_disk_state",
                "Replication state of a disk: 1 for its current state, 0 for the others",
                None,
                MetricType::Gauge,
            )?;
            for (_, d, [server, disk]) in disks() {
                for state in DISK_STATES {
                    let labels = [server.clone(), disk.clone(), ("state", state.to_owned())];
                    let value = i64::from(d.state == state);
                    ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        gauge(
            &mut encoder,
            "blockferry_server_connected",
            "1 while the server's agent has a live session",
            servers
                .iter()
                .map(|s| (server(s), f64::from(u8::from(s.connected)))),
        )?;
        gauge(
            &mut encoder,
            "blockferry_server_streams",
            "TLS streams of the server's live session",
            servers.iter().map(|s| (server(s), f64::from(s.streams))),
        )?;
        gauge(
            &mut encoder,
            "blockferry_server_lag_seconds",
            "Age of the newest durable consistent point while changes are pending (0 when none are)",
            servers
                .iter()
                .filter_map(|s| s.lag_seconds.map(|l| (server(s), l))),
        )?;
        gauge(
            &mut encoder,
            "blockferry_server_eta_seconds",
            "Estimated time until every disk of the server is CONTINUOUS, at the measured rate",
            servers
                .iter()
                .filter_map(|s| s.eta_seconds.map(|e| (server(s), e))),
        )?;
        gauge(
            &mut encoder,
            "blockferry_server_backlog_bytes",
            "Bytes changed on the source and not yet durable here, per the agent's last heartbeat",
            servers
                .iter()
                .filter_map(|s| s.backlog_bytes.map(|b| (server(s), b as f64))),
        )?;
        gauge(
            &mut encoder,
            "blockferry_server_receive_rate_bytes_per_second",
            "Bytes per second received from the server's agent, measured over the last 10 s",
            servers
                .iter()
                .filter_map(|s| s.receive_rate_bytes_per_second.map(|r| (server(s), r))),
        )?;
        gauge(
            &mut encoder,
            "blockferry_server_bandwidth_limit_bytes_per_second",
            "The bandwidth limit set for the server's agent (0: unlimited)",
            servers
                .iter()
                .map(|s| (server(s), (s.bandwidth_mbps * 125_000) as f64)),
        )?;
        gauge(
            &mut encoder,
            "blockferry_server_paused",
            "1 while an operator has paused the server's replication (`pause`), else 0",
            servers
                .iter()
                .map(|s| (server(s), if s.paused { 1.0 } else { 0.0 })),
        )?;
        gauge(
            &mut encoder,
            "blockferry_server_recovery_points",
            "Recovery points recorded for the server (EBS backend; 0 on the file backend)",
            servers
                .iter()
                .map(|s| (server(s), s.recovery_points.len() as f64)),
        )?;
        gauge(
            &mut encoder,
            "blockferry_server_recovery_point_timestamp_seconds",
            "When the server's latest recovery point was cut (Unix time; 0: none yet)",
            servers.iter().map(|s| {
                let cut_ms = s.recovery_points.last().map_or(0, |p| p.cut_at_ms);
                (server(s), (cut_ms / 1000) as f64)
            }),
        )?;
        gauge(
            &mut encoder,
            "blockferry_server_recovery_point_failing",
            "1 while the server's latest recovery point failed (its changes go into the next), else 0",
            servers.iter().map(|s| {
                (
                    server(s),
                    if s.recovery_point_error.is_some() {
                        1.0
                    } else {
                        0.0
                    },
                )
            }),
        )?;
        gauge(
            &mut encoder,
            "blockferry_server_last_seen_timestamp_seconds",
            "When the server's agent last connected or was last heard from (Unix time)",
            servers.iter().map(|s| (server(s), s.last_seen as f64)),
        )?;
        gauge(
            &mut encoder,
            "blockferry_server_consistent_point_timestamp_seconds",
            "When the newest crash-consistent point of the server became durable (Unix time; 0: never)",
            servers.iter().map(|s| (server(s), s.consistent_at as f64)),
        )?;
        gauge(
            &mut encoder,
            "blockferry_agent_cpu_ratio",
            "CPU used by the agent process, in cores, as it last reported",
            servers
                .iter()
                .filter_map(|s| s.agent_cpu_percent.map(|c| (server(s), c / 100.0))),
        )?;
        gauge(
            &mut encoder,
            "blockferry_agent_resident_memory_bytes",
            "Resident memory of the agent process, as it last reported",
            servers
                .iter()
                .filter_map(|s| s.agent_rss_bytes.map(|r| (server(s), r as f64))),
        )?;
        let tracking = || {
            servers
                .iter()
                .filter_map(|s| s.tracking.as_ref().map(|t| (server(s), t)))
        };
        gauge(
            &mut encoder,
            "blockferry_agent_tracked_writes",
            "Completed writes, discards and write-zeroes the agent's block tracking has seen since the agent started",
            tracking().map(|(l, t)| (l, t.writes as f64)),
        )?;
        gauge(
            &mut encoder,
            "blockferry_agent_tracking_lost_events",
            "Losses of block-layer events since the agent started (samples the kernel dropped, and drains whose samples fell short of the disks' I/O statistics); each makes every disk rescan (tracking_lost)",
            tracking().map(|(l, t)| (l, t.lost_events as f64)),
        )?;
        gauge(
            &mut encoder,
            "blockferry_agent_frozen_points",
            "Crash-consistent points cut under a file-system freeze since the agent started",
            tracking().map(|(l, t)| (l, t.frozen_points as f64)),
        )?;
        gauge(
            &mut encoder,
            "blockferry_agent_freeze_failures",
            "Frozen points given up since the agent started (see the agent's log for why)",
            tracking().map(|(l, t)| (l, t.freeze_failures as f64)),
        )?;
        gauge(
            &mut encoder,
            "blockferry_agent_last_freeze_seconds",
            "How long the file systems stayed frozen for the agent's last point",
            tracking().map(|(l, t)| (l, t.last_freeze_ms / 1e3)),
        )?;
        gauge(
            &mut encoder,
            "blockferry_agent_max_freeze_seconds",
            "The longest the agent has kept the file systems frozen since it started",
            tracking().map(|(l, t)| (l, t.max_freeze_ms / 1e3)),
        )?;
        gauge(
            &mut encoder,
            "blockferry_disk_block_tracking",
            "1 when the agent tracks the disk's writes at the block layer, 0 when it does not (tap only, or periodic rescans)",
            disks().filter_map(|(_, d, l)| {
                d.capture
                    .as_ref()
                    .map(|c| (l, if c == "block" { 1.0 } else { 0.0 }))
            }),
        )?;
        let live = ConstGauge::new(servers.iter().filter(|s| s.connected).count() as i64);
        live.encode(encoder.encode_descriptor(
            "blockferry_sessions",
            "Live agent sessions",
            None,
            live.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Encodes one gauge family.
fn gauge<L: prometheus_client::encoding::EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (L, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in values {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Open connections per listener, and the slots each may fill (from the descriptor
/// budget), read at scrape time.
#[derive(Debug)]
struct ConnectionCollector(Arc<crate::admission::Admission>);

impl Collector for ConnectionCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let admission = &self.0;
        let fds = admission.fds;
        let listeners = [
            (
                "replication_handshakes",
                &admission.replication,
                fds.replication_handshakes,
            ),
            (
                "replication_streams",
                &admission.streams,
                fds.replication_streams,
            ),
            ("control", &admission.control, fds.control),
            ("metrics", &admission.metrics, fds.metrics),
        ];
        gauge(
            &mut encoder,
            "blockferry_connections",
            "Connections open now, by listener (replication handshakes and streams, control, metrics)",
            listeners
                .iter()
                .map(|(name, gate, _)| ([("listener", *name)], gate.open() as f64)),
        )?;
        gauge(
            &mut encoder,
            "blockferry_connection_slots",
            "Connections each listener may hold, from the file descriptor budget",
            listeners
                .iter()
                .map(|(name, _, slots)| ([("listener", *name)], *slots as f64)),
        )?;
        let max = ConstGauge::new(fds.limit as f64);
        max.encode(encoder.encode_descriptor(
            "process_max_fds",
            "Maximum number of open file descriptors",
            None,
            max.metric_type(),
        )?)
    }
}

/// The standard `process_*` metrics of the receiver, from /proc.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(process) = ProcessStats::read() else {
            return Ok(());
        };
        let counter = ConstCounter::new(process.cpu_seconds);
        counter.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            counter.metric_type(),
        )?)?;
        for (name, help, value) in [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                process.rss_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                process.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                process.open_fds,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                process.start_time,
            ),
        ] {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct ProcessStats {
    cpu_seconds: f64,
    rss_bytes: f64,
    virtual_bytes: f64,
    open_fds: f64,
    start_time: f64,
}

impl ProcessStats {
    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which may hold spaces, in its parentheses.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
        Some(Self {
            cpu_seconds: (field(14)? + field(15)?) / ticks,
            virtual_bytes: field(23)?,
            rss_bytes: field(24)? * page,
            start_time: boot_time + field(22)? / ticks,
            open_fds: std::fs::read_dir("/proc/self/fd").ok()?.count() as f64,
        })
    }
}

/// Renders the registry in the Prometheus text format.
pub(crate) fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(err) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::warn!(error = %err, "metrics: encoding failed");
    }
    out
}

/// Serves `GET /metrics` (plain HTTP: the figures are not secret, and Prometheus scrapes
/// plain HTTP by default; keep the port on the management network).
pub(crate) async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    counters: Arc<Metrics>,
    admission: Arc<crate::admission::Admission>,
    shutdown: CancellationToken,
) {
    let log = crate::admission::RefusalLog::new("metrics");
    loop {
        let Some((tcp, peer, permit)) = crate::admission::next_admitted(
            &listener,
            &shutdown,
            &admission.metrics,
            None,
            "metrics",
            |peer, refusal| {
                counters.refused("metrics", refusal.code(), false);
                log.refused(peer, refusal.code());
            },
        )
        .await
        else {
            return;
        };
        let registry = Arc::clone(&registry);
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let registry = Arc::clone(&registry);
                async move { Ok::<_, Infallible>(answer(request, registry).await) }
            });
            let served = tokio::time::timeout(
                Duration::from_secs(30),
                hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(crate::control::HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(tcp), service),
            )
            .await;
            if !matches!(served, Ok(Ok(()))) {
                tracing::debug!(%peer, "metrics connection ended early");
            }
        });
    }
}

async fn answer(request: Request<Incoming>, registry: Arc<Registry>) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header(
                "content-type",
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if request.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "only /metrics is served here\n".into(),
        );
    }
    if request.method() != Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
    }
    // The state gauges read the catalog: off the async threads.
    match tokio::task::spawn_blocking(move || render(&registry)).await {
        Ok(body) => plain(StatusCode::OK, body),
        Err(err) => plain(StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")),
    }
}

/// Binds the metrics listener.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}
