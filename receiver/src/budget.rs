//! What connections on the replication port may make the receiver hold before they are
//! part of a session, and the receive buffers of all of them together.
//!
//! An authenticated connection that has not said Hello (or joined a session) yet is
//! given a buffer for control frames only (a Hello is small) and counts against its
//! agent's allowance of such connections; once in a session, its buffer grows to take
//! writes. Every buffer is charged to one receiver-wide byte budget: a connection that
//! would exceed it is refused with BUSY and a retry hint, never buffered anyway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use blockferry_proto::FrameBuffer;
use blockferry_proto::limits::{MAX_CONTROL_PAYLOAD, MAX_FRAME_PAYLOAD, MAX_STREAMS};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections of one agent that may wait to start or join a session at once: its
/// streams, and as many again for a reconnect that overlaps the end of the old session.
pub(crate) const MAX_PRE_SESSION_PER_AGENT: usize = 2 * MAX_STREAMS as usize;

/// The default of `--frame-buffer-mib`: receive buffers of all connections together.
pub const DEFAULT_FRAME_BUFFER_MIB: u32 = 1024;

/// The budget is counted in KiB, so that a permit count fits the semaphore's `u32`.
const UNIT: usize = 1024;

fn units(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX)
}

/// Bytes of receive buffer a connection needs before its session, and in it.
pub(crate) fn pre_session_bytes() -> usize {
    FrameBuffer::capacity_for(MAX_CONTROL_PAYLOAD)
}

pub(crate) fn session_bytes() -> usize {
    FrameBuffer::capacity_for(MAX_FRAME_PAYLOAD)
}

#[derive(Debug)]
pub(crate) struct ConnectionBudget {
    memory: Arc<Semaphore>,
    total_mib: u32,
    /// Agent id → connections of it not yet in a session.
    waiting: Mutex<HashMap<String, usize>>,
}

/// Why a connection is not served now.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    #[error(
        "agent {agent} already has {MAX_PRE_SESSION_PER_AGENT} connections that have not started or joined a session"
    )]
    TooManyWaiting { agent: String },
    #[error("the receiver's receive buffers are at their budget of {0} MiB (--frame-buffer-mib)")]
    Memory(u32),
}

/// A connection's share: its buffer memory, and (before its session) its place among its
/// agent's waiting connections. Both are given back when it is dropped.
#[derive(Debug)]
pub(crate) struct Share {
    budget: Arc<ConnectionBudget>,
    memory: OwnedSemaphorePermit,
    waiting_as: Option<String>,
}

impl ConnectionBudget {
    pub(crate) fn new(total_mib: u32) -> Arc<Self> {
        let permits = units(total_mib as usize * (1 << 20)).min(Semaphore::MAX_PERMITS as u32);
        Arc::new(Self {
            memory: Arc::new(Semaphore::new(permits as usize)),
            total_mib,
            waiting: Mutex::new(HashMap::new()),
        })
    }

    /// Admits a new authenticated connection of `agent`, with a pre-session buffer.
    pub(crate) fn admit(self: &Arc<Self>, agent: &str) -> Result<Share, Refusal> {
        {
            let mut waiting = crate::lock(&self.waiting);
            let count = waiting.entry(agent.to_owned()).or_default();
            if *count >= MAX_PRE_SESSION_PER_AGENT {
                return Err(Refusal::TooManyWaiting {
                    agent: agent.to_owned(),
                });
            }
            *count += 1;
        }
        let memory =
            match Arc::clone(&self.memory).try_acquire_many_owned(units(pre_session_bytes())) {
                Ok(memory) => memory,
                Err(_) => {
                    self.stop_waiting(agent);
                    return Err(Refusal::Memory(self.total_mib));
                }
            };
        Ok(Share {
            budget: Arc::clone(self),
            memory,
            waiting_as: Some(agent.to_owned()),
        })
    }

    fn stop_waiting(&self, agent: &str) {
        let mut waiting = crate::lock(&self.waiting);
        if let Some(count) = waiting.get_mut(agent) {
            *count -= 1;
            if *count == 0 {
                waiting.remove(agent);
            }
        }
    }

    /// Bytes of the budget not in use.
    #[cfg(test)]
    pub(crate) fn available_bytes(&self) -> usize {
        self.memory.available_permits() * UNIT
    }
}

impl Share {
    /// The connection is in a session now: it no longer counts as waiting, and its
    /// buffer may grow to take writes.
    pub(crate) fn enter_session(&mut self, buffer: &mut FrameBuffer) -> Result<(), Refusal> {
        let more = units(session_bytes()).saturating_sub(units(pre_session_bytes()));
        let grown = Arc::clone(&self.budget.memory)
            .try_acquire_many_owned(more)
            .map_err(|_| Refusal::Memory(self.budget.total_mib))?;
        self.memory.merge(grown);
        if let Some(agent) = self.waiting_as.take() {
            self.budget.stop_waiting(&agent);
        }
        buffer.raise_max_payload(MAX_FRAME_PAYLOAD);
        Ok(())
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if let Some(agent) = self.waiting_as.take() {
            self.budget.stop_waiting(&agent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_connections_and_buffer_memory_are_bounded_and_given_back() {
        let budget = ConnectionBudget::new(64);
        let shares: Vec<_> = (0..MAX_PRE_SESSION_PER_AGENT)
            .map(|_| budget.admit("a1").unwrap())
            .collect();
        assert!(matches!(
            budget.admit("a1"),
            Err(Refusal::TooManyWaiting { .. })
        ));
        // Another agent is not held up by the first one's connections.
        let mut other = budget.admit("a2").unwrap();
        let mut buffer = FrameBuffer::with_max_payload(MAX_CONTROL_PAYLOAD);
        other.enter_session(&mut buffer).unwrap();
        assert_eq!(buffer.max_payload(), MAX_FRAME_PAYLOAD);
        drop(shares);
        let again: Vec<_> = (0..MAX_PRE_SESSION_PER_AGENT)
            .map(|_| budget.admit("a1").unwrap())
            .collect();
        drop(again);
        drop(other);
        assert_eq!(budget.available_bytes(), 64 << 20);

        // Memory runs out before the per-agent count does: 64 MiB hold ~200 waiting
        // buffers, or ~60 in sessions.
        let mut held = Vec::new();
        let refused = (0..1000).find_map(|i| match budget.admit(&format!("agent-{i}")) {
            Ok(share) => {
                held.push(share);
                None
            }
            Err(err) => Some(err),
        });
        assert!(matches!(refused, Some(Refusal::Memory(64))), "{refused:?}");
        assert!(held.len() * pre_session_bytes() <= 64 << 20);
    }
}
