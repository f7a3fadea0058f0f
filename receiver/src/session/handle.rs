//! What the rest of the receiver may do with a live session: look at it, change its
//! settings, and end it (to reconnect, revoked, or cut over). The registry hands out this
//! handle, not the session: the session's streams, epoch ledger and staging stores stay
//! with the tasks that run it.

use std::sync::Arc;

use blockferry_proto::{ErrorCode, ErrorFrame, Frame, Goodbye};

use super::{LiveView, Session};
use crate::catalog::now_ms;
use crate::lock;

#[derive(Debug, Clone)]
pub(crate) struct SessionHandle(Arc<Session>);

impl SessionHandle {
    pub(crate) fn new(session: Arc<Session>) -> Self {
        Self(session)
    }

    /// What status and the control API show of the session, now.
    pub(crate) fn live_view(&self) -> LiveView {
        lock(&self.0.core).live_view(
            now_ms(),
            self.0.pipeline.last_submitted(),
            self.0.meter.rate.rate(),
            self.0.recovery.as_ref().and_then(|r| r.last_error()),
        )
    }

    /// Keeps the server's sync slots and queue places when this session ends (it ends to
    /// let the agent hear of a granted slot); they are released if no session of the
    /// server follows within [`super::SLOT_GRACE`].
    pub(crate) fn keep_slots(&self) {
        lock(&self.0.core).keep_slots();
    }

    /// Tells the agent its server's settings as an operator just changed them.
    pub(crate) async fn apply_settings(&self, settings: &crate::catalog::ServerSettings) {
        tracing::info!(
            server = %self.0.identity.server_id,
            bytes_per_second = settings.bandwidth_limit(),
            paused = settings.paused,
            "settings changed"
        );
        lock(&self.0.core).set_paused(settings.paused, now_ms());
        self.0
            .broadcast(Frame::SettingsUpdate(blockferry_proto::SettingsUpdate {
                bandwidth_limit: settings.bandwidth_limit(),
                paused: settings.paused,
                unknown_flags: 0,
            }))
            .await;
    }

    /// Ends the session for good: the agent was revoked. It hears why, and gives up.
    pub(crate) async fn revoke(&self) {
        tracing::warn!(agent = %self.0.identity.agent_id, "agent revoked: closing its session");
        self.0
            .broadcast(Frame::Error(ErrorFrame::new(
                ErrorCode::NOT_AUTHORIZED,
                format!(
                    "agent {} has been revoked by an operator; enroll again to replicate",
                    self.0.identity.agent_id
                ),
            )))
            .await;
        self.0.close();
    }

    /// Ends the session for good: the server was cut over to its launched copy. The agent
    /// hears why, and stops.
    pub(crate) async fn finish(&self) {
        tracing::warn!(server = %self.0.identity.server_id, "server cut over: ending its replication");
        self.0.broadcast(Frame::Error(ErrorFrame::new(
            ErrorCode::FINISHED,
            format!(
                "source server {} was cut over to its launched copy: its replication is over; stop and remove its agent",
                self.0.identity.server_id
            ),
        )))
        .await;
        self.0.close();
    }

    /// The agent this session speaks for.
    pub(crate) fn agent_id(&self) -> &str {
        &self.0.identity.agent_id
    }

    /// Ends the session so that the agent reconnects (and learns what changed, such as a
    /// requested rescan, from the next Welcome).
    pub(crate) async fn restart(&self, why: &str) {
        tracing::info!(
            reason = why,
            "ending the session for the agent to reconnect"
        );
        self.0
            .broadcast(Frame::Goodbye(Goodbye {
                message: why.to_owned(),
            }))
            .await;
        self.0.close();
    }
}
