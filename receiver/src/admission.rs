//! How many connections each listener holds open, and for whom, before the peer has
//! proven anything.
//!
//! Anyone who reaches a port can open connections and say nothing; every one of them is
//! a file descriptor, and a process has a fixed number. So the descriptors the process
//! may open ([`FdBudget`], from `RLIMIT_NOFILE`, whose soft limit is raised to the hard
//! one at start) are divided among the listeners, each listener caps the connections of
//! any one source address, and a peer that does not start its TLS handshake within a few
//! seconds is dropped. Connections beyond a cap are closed as soon as they are accepted:
//! the accept queue stays short, so an agent's connection is never stuck behind a flood.
//!
//! Enrolled agents come first: an address that completed an agent handshake recently is
//! *known*, and known addresses have a reserve of the replication and control listeners'
//! slots that unauthenticated peers cannot take, and a higher cap per address (several
//! agents may share one behind a NAT).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A peer must start its TLS handshake (send its ClientHello) this soon.
pub(crate) const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(3);
/// Unauthenticated connections one address may hold on the replication port (an agent
/// needs at most 5, and a reconnect overlaps its old session briefly).
const REPLICATION_PER_ADDRESS: usize = 16;
/// …on the control API (enrollment and renewal are one request each).
const CONTROL_PER_ADDRESS: usize = 8;
/// …on the metrics port (Prometheus scrapes over one connection).
const METRICS_PER_ADDRESS: usize = 8;
/// Refusals are logged at most this often per listener, with their count.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How long an address stays known after its last agent handshake.
const KNOWN_FOR: Duration = Duration::from_secs(3600);
/// Addresses remembered at most (the oldest are forgotten first).
const MAX_KNOWN: usize = 65_536;
/// A known address may hold this many times the per-address cap.
const KNOWN_FACTOR: usize = 4;

/// File descriptors this process may use, and their division among the listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// `RLIMIT_NOFILE` (soft) after raising it.
    pub limit: u64,
    /// Replication connections before their TLS handshake completes…
    pub replication_handshakes: usize,
    /// …of which this many only known addresses may use.
    pub replication_reserved: usize,
    /// Authenticated replication streams (in a session or about to join one).
    pub replication_streams: usize,
    /// Control API connections (of which a quarter are reserved for known addresses).
    pub control: usize,
    /// Metrics connections.
    pub metrics: usize,
}

impl FdBudget {
    /// Half of the descriptors stay for everything else (staging images: up to 50 per
    /// server, the catalog, the event file, io_uring, the runtime); the other half go to
    /// connections: half of them to replication streams, a quarter to replication
    /// handshakes, an eighth each to the control API and metrics.
    pub fn for_limit(limit: u64) -> Self {
        let connections = usize::try_from(limit / 2).unwrap_or(usize::MAX).max(64);
        let handshakes = connections / 4;
        Self {
            limit,
            replication_handshakes: handshakes,
            replication_reserved: handshakes / 4,
            replication_streams: connections / 2,
            control: connections / 8,
            metrics: connections / 8,
        }
    }

    /// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (the systemd unit
    /// sets both with `LimitNOFILE`) and divides what there is.
    pub fn raise() -> Self {
        let mut rlim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one `rlimit` through the pointer, which points at
        // `rlim`, alive and writable for the call.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rlim) } != 0 {
            return Self::for_limit(1024);
        }
        if rlim.rlim_cur < rlim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: rlim.rlim_max,
                rlim_max: rlim.rlim_max,
            };
            // SAFETY: setrlimit reads one `rlimit` through the pointer, alive for the call.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                rlim.rlim_cur = rlim.rlim_max;
            }
        }
        Self::for_limit(rlim.rlim_cur)
    }
}

/// The gates of every listener, and the addresses known to be agents'.
#[derive(Debug)]
pub(crate) struct Admission {
    pub(crate) fds: FdBudget,
    pub(crate) replication: Arc<Gate>,
    pub(crate) streams: Arc<Gate>,
    pub(crate) control: Arc<Gate>,
    pub(crate) metrics: Arc<Gate>,
    pub(crate) known: KnownAddresses,
}

impl Admission {
    pub(crate) fn new(fds: FdBudget) -> Self {
        Self {
            fds,
            replication: Gate::new(
                fds.replication_handshakes,
                fds.replication_reserved,
                REPLICATION_PER_ADDRESS,
            ),
            streams: Gate::new(fds.replication_streams, 0, usize::MAX),
            control: Gate::new(fds.control, fds.control / 4, CONTROL_PER_ADDRESS),
            metrics: Gate::new(fds.metrics, 0, METRICS_PER_ADDRESS),
            known: KnownAddresses::default(),
        }
    }
}

/// Logs refusals of one listener, at most once per [`REFUSAL_LOG_INTERVAL`], so that a
/// flood does not flood the log too.
#[derive(Debug)]
pub(crate) struct RefusalLog {
    listener: &'static str,
    since_last: AtomicU64,
    last: Mutex<Option<Instant>>,
}

impl RefusalLog {
    pub(crate) fn new(listener: &'static str) -> Self {
        Self {
            listener,
            since_last: AtomicU64::new(0),
            last: Mutex::new(None),
        }
    }

    pub(crate) fn refused(&self, peer: SocketAddr, reason: &str) {
        let count = self.since_last.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = crate::lock(&self.last);
        if last.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL) {
            *last = Some(Instant::now());
            self.since_last.store(0, Ordering::Relaxed);
            tracing::warn!(listener = self.listener, %peer, reason, refused = count, "refusing connections (counted in blockferry_refused_connections_total)");
        }
    }
}

/// The next connection on `listener` that `gate` admits, or None once `shutdown` fires.
/// Connections the gate refuses are closed at once and passed to `refused`. An accept
/// error (EMFILE and friends) is logged and retried after a pause instead of spinning.
pub(crate) async fn next_admitted(
    listener: &TcpListener,
    shutdown: &CancellationToken,
    gate: &Arc<Gate>,
    known: Option<&KnownAddresses>,
    what: &'static str,
    mut refused: impl FnMut(SocketAddr, Refusal),
) -> Option<(TcpStream, SocketAddr, Permit)> {
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    tracing::warn!(error = %err, listener = what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let is_known = known.is_some_and(|k| k.is_known(peer.ip()));
        match gate.admit(peer.ip(), is_known) {
            Ok(permit) => return Some((tcp, peer, permit)),
            Err(refusal) => {
                drop(tcp);
                refused(peer, refusal);
            }
        }
    }
}

/// Waits for the peer's first bytes (its ClientHello); false if none came in time.
pub(crate) async fn client_hello_arrives(tcp: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout(CLIENT_HELLO_TIMEOUT, tcp.peek(&mut first)).await,
        Ok(Ok(n)) if n > 0
    )
}

/// Why a connection was closed as soon as it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The listener holds as many connections as it may.
    Full,
    /// This source address holds as many as one address may.
    Address,
}

impl Refusal {
    pub(crate) fn code(self) -> &'static str {
        match self {
            Self::Full => "too_many_connections",
            Self::Address => "too_many_from_address",
        }
    }
}

/// The open connections of one listener.
#[derive(Debug)]
pub(crate) struct Gate {
    /// Slots in all, and how many of them only known addresses may take.
    total: usize,
    reserved: usize,
    per_address: usize,
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    open: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// A connection's slot, given back when dropped.
#[derive(Debug)]
pub(crate) struct Permit {
    gate: Arc<Gate>,
    address: IpAddr,
}

impl Gate {
    pub(crate) fn new(total: usize, reserved: usize, per_address: usize) -> Arc<Self> {
        Arc::new(Self {
            total: total.max(1),
            reserved: reserved.min(total.saturating_sub(1)),
            per_address: per_address.max(1),
            state: Mutex::default(),
        })
    }

    /// A slot for a connection from `address`, which is `known` or not.
    pub(crate) fn admit(self: &Arc<Self>, address: IpAddr, known: bool) -> Result<Permit, Refusal> {
        let mut state = crate::lock(&self.state);
        let open_here = state.by_address.get(&address).copied().unwrap_or(0);
        let per_address = if known {
            self.per_address.saturating_mul(KNOWN_FACTOR)
        } else {
            self.per_address
        };
        if open_here >= per_address {
            return Err(Refusal::Address);
        }
        let usable = if known {
            self.total
        } else {
            self.total - self.reserved
        };
        if state.open >= usable {
            return Err(Refusal::Full);
        }
        state.open += 1;
        *state.by_address.entry(address).or_default() += 1;
        Ok(Permit {
            gate: Arc::clone(self),
            address,
        })
    }

    /// Connections open now.
    pub(crate) fn open(&self) -> usize {
        crate::lock(&self.state).open
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = crate::lock(&self.gate.state);
        state.open -= 1;
        if let Some(count) = state.by_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                state.by_address.remove(&self.address);
            }
        }
    }
}

/// Addresses that completed an agent handshake recently.
#[derive(Debug, Default)]
pub(crate) struct KnownAddresses {
    seen: Mutex<HashMap<IpAddr, Instant>>,
}

impl KnownAddresses {
    pub(crate) fn remember(&self, address: IpAddr) {
        let now = Instant::now();
        let mut seen = crate::lock(&self.seen);
        if seen.len() >= MAX_KNOWN && !seen.contains_key(&address) {
            seen.retain(|_, at| now.duration_since(*at) < KNOWN_FOR);
            if seen.len() >= MAX_KNOWN
                && let Some(oldest) = seen.iter().min_by_key(|(_, at)| **at).map(|(a, _)| *a)
            {
                seen.remove(&oldest);
            }
        }
        seen.insert(address, now);
    }

    pub(crate) fn is_known(&self, address: IpAddr) -> bool {
        crate::lock(&self.seen)
            .get(&address)
            .is_some_and(|at| at.elapsed() < KNOWN_FOR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_flood_from_strangers_cannot_take_the_slots_kept_for_known_agents() {
        let gate = Gate::new(10, 3, 4);
        // One address: four slots, then no more.
        let mine: Vec<_> = (0..4).map(|_| gate.admit(ip(1), false).unwrap()).collect();
        assert_eq!(gate.admit(ip(1), false).unwrap_err(), Refusal::Address);
        // Many addresses: the unreserved seven fill, the reserve stays.
        let theirs: Vec<_> = (2..5).map(|i| gate.admit(ip(i), false).unwrap()).collect();
        assert_eq!(gate.admit(ip(9), false).unwrap_err(), Refusal::Full);
        assert_eq!(gate.open(), 7);
        // A known agent still gets in, up to the reserve.
        let known: Vec<_> = (0..3).map(|_| gate.admit(ip(200), true).unwrap()).collect();
        assert_eq!(gate.admit(ip(200), true).unwrap_err(), Refusal::Full);
        drop((mine, theirs, known));
        assert_eq!(gate.open(), 0, "slots are given back");
        // A known address behind a NAT may hold more than a stranger.
        let nat: Vec<_> = (0..10).map(|_| gate.admit(ip(7), true)).collect();
        assert_eq!(nat.iter().filter(|p| p.is_ok()).count(), 10);
    }

    #[test]
    fn the_descriptor_budget_leaves_room_for_images_and_divides_the_rest() {
        let small = FdBudget::for_limit(1024);
        let connections = small.replication_handshakes
            + small.replication_streams
            + small.control
            + small.metrics;
        assert!(connections <= 512, "{small:?}");
        assert!(small.replication_reserved > 0 && small.replication_streams >= 128);
        let big = FdBudget::for_limit(65_536);
        assert!(big.replication_streams >= 16_000, "{big:?}");
    }

    #[test]
    fn known_addresses_are_remembered() {
        let known = KnownAddresses::default();
        assert!(!known.is_known(ip(1)));
        known.remember(ip(1));
        assert!(known.is_known(ip(1)) && !known.is_known(ip(2)));
    }
}
