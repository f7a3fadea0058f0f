//! Live sessions by source server: at most one per server. A new session of a server
//! cancels the old one and waits until it has finished — its in-flight writes completed —
//! before it starts writing the same staging disks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use uuid::Uuid;

use crate::lock;
use crate::pki::AgentIdentity;
use crate::session::{Session, SessionHandle};

#[derive(Debug, Default)]
pub(crate) struct SessionRegistry {
    live: Mutex<HashMap<String, LiveSession>>,
    /// Sessions that streams may join, by session id.
    joinable: Mutex<HashMap<Uuid, Weak<Session>>>,
    /// Initial-sync and rescan slots.
    pub(crate) slots: crate::slots::SyncSlots,
}

#[derive(Debug, Clone)]
struct LiveSession {
    id: Uuid,
    agent_id: String,
    cancel: CancellationToken,
    done: watch::Receiver<bool>,
}

impl SessionRegistry {
    /// A registry whose receiver runs at most `max_syncs` initial syncs and rescans at
    /// once (0: no limit).
    pub(crate) fn new(max_syncs: usize) -> Self {
        Self {
            slots: crate::slots::SyncSlots::new(max_syncs),
            ..Self::default()
        }
    }

    /// Restarts the sessions of the servers whose disks just got a slot, so that their
    /// agents hear it in a new Welcome.
    pub(crate) fn grant(&self, granted: Vec<crate::slots::DiskKey>) {
        for (server, disk) in granted {
            tracing::info!(server = %server, disk = %disk, "initial sync or rescan slot granted");
            if let Some(session) = self.session_of(&server) {
                // The server keeps its slots across the reconnect.
                session.keep_slots();
                tokio::spawn(async move {
                    session
                        .restart("a sync slot is free; reconnect to start the queued disk")
                        .await;
                });
            }
        }
    }

    /// Registers a session of `identity`'s server, first ending any older one.
    pub(crate) async fn claim(self: &Arc<Self>, identity: &AgentIdentity) -> SessionGuard {
        let (done_tx, done_rx) = watch::channel(false);
        let session = LiveSession {
            id: Uuid::new_v4(),
            agent_id: identity.agent_id.clone(),
            cancel: CancellationToken::new(),
            done: done_rx,
        };
        loop {
            let previous = {
                let mut live = lock(&self.live);
                match live.get(&identity.server_id) {
                    Some(old) => old.clone(),
                    None => {
                        live.insert(identity.server_id.clone(), session.clone());
                        break;
                    }
                }
            };
            tracing::info!(
                previous_agent = %previous.agent_id,
                "ending the previous session of this server"
            );
            previous.cancel.cancel();
            let mut done = previous.done;
            // An error means the old guard is gone, which is as good as done.
            let _ = done.wait_for(|finished| *finished).await;
            // The old guard removed its entry; loop to insert ours (or to replace a
            // session that raced in meanwhile).
            let mut live = lock(&self.live);
            if live
                .get(&identity.server_id)
                .is_some_and(|s| s.id == previous.id)
            {
                live.remove(&identity.server_id);
            }
        }
        SessionGuard {
            registry: Arc::clone(self),
            server_id: identity.server_id.clone(),
            id: session.id,
            cancel: session.cancel,
            done: done_tx,
        }
    }

    /// Whether a session of `server_id` is live.
    pub(crate) fn is_connected(&self, server_id: &str) -> bool {
        lock(&self.live).contains_key(server_id)
    }

    /// Lets streams join `session` by its id.
    pub(crate) fn publish(&self, session: &Arc<Session>) {
        lock(&self.joinable).insert(session.id, Arc::downgrade(session));
    }

    pub(crate) fn unpublish(&self, id: Uuid) {
        lock(&self.joinable).remove(&id);
    }

    /// The session a stream joins: the session itself, for the session's own tasks.
    pub(crate) fn joinable(&self, id: Uuid) -> Option<Arc<Session>> {
        lock(&self.joinable).get(&id).and_then(Weak::upgrade)
    }

    /// The published sessions of agent `agent_id` (one at most, unless a successor is
    /// taking over).
    pub(crate) fn sessions_of_agent(&self, agent_id: &str) -> Vec<SessionHandle> {
        lock(&self.joinable)
            .values()
            .filter_map(Weak::upgrade)
            .map(SessionHandle::new)
            .filter(|s| s.agent_id() == agent_id)
            .collect()
    }

    /// The live session of `server_id`, once it has been published.
    pub(crate) fn session_of(&self, server_id: &str) -> Option<SessionHandle> {
        let id = lock(&self.live).get(server_id)?.id;
        self.joinable(id).map(SessionHandle::new)
    }
}

/// Held by a running session; dropping it deregisters the session and tells a waiting
/// successor that it may start.
#[derive(Debug)]
pub(crate) struct SessionGuard {
    registry: Arc<SessionRegistry>,
    server_id: String,
    id: Uuid,
    cancel: CancellationToken,
    done: watch::Sender<bool>,
}

impl SessionGuard {
    pub(crate) fn id(&self) -> Uuid {
        self.id
    }

    /// Completes when a newer session of the same server asks this one to end.
    pub(crate) fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut live = lock(&self.registry.live);
        if live.get(&self.server_id).is_some_and(|s| s.id == self.id) {
            live.remove(&self.server_id);
        }
        drop(live);
        let _ = self.done.send(true);
    }
}
