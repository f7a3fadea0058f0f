//! Why a session ends badly, and what the agent is told about it.

use std::time::Duration;

use blockferry_proto::{ErrorCode, ErrorFrame};

/// Why a session ended badly. Each maps to the [`ErrorCode`] sent to the agent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("staging storage failed: {0}")]
    Storage(String),
    /// The staging store of a disk failed in a way that stalls it (e.g. a full file
    /// system); the agent keeps its changes and retries.
    #[error(
        "disk {disk} is stalled ({reason}): {message}; the agent keeps its changes and retries"
    )]
    Stalled {
        disk: String,
        reason: &'static str,
        message: String,
    },
    #[error("not authorized: {0}")]
    NotAuthorized(String),
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// The server was cut over: its replication is over for good.
    #[error("{0}")]
    Finished(String),
    /// One of the receiver's resource bounds is reached for now; the agent retries later.
    #[error("receiver busy: {0}")]
    Busy(String),
    #[error("connection failed")]
    Connection(#[from] std::io::Error),
    #[error("no Hello within {0:?}")]
    HelloTimeout(Duration),
    #[error("no frame for {0:?}: the agent or the network is gone")]
    Idle(Duration),
}

impl SessionError {
    /// The Error frame that tells the agent, if it is to be told.
    pub(crate) fn frame(&self) -> Option<ErrorFrame> {
        Some(ErrorFrame {
            code: self.code()?,
            message: self.to_string(),
            retry_after_ms: Some(self.retry_after())
                .filter(|wait| !wait.is_zero())
                .map(|wait| u32::try_from(wait.as_millis()).unwrap_or(u32::MAX)),
        })
    }

    /// How long the agent should wait before it tries again: long enough that a disk that
    /// cannot progress is not hammered by reconnects (each one resends what is not yet
    /// acknowledged), short enough that it resumes soon once the cause is gone.
    fn retry_after(&self) -> Duration {
        match self {
            Self::Stalled {
                reason: crate::catalog::STAGING_MISSING,
                ..
            } => Duration::from_secs(60),
            Self::Stalled { .. } => Duration::from_secs(10),
            Self::Storage(_) => Duration::from_secs(5),
            Self::Busy(_) => Duration::from_secs(10),
            _ => Duration::ZERO,
        }
    }

    fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Protocol(_) | Self::HelloTimeout(_) => Some(ErrorCode::PROTOCOL),
            Self::OutOfRange(_) => Some(ErrorCode::OUT_OF_RANGE),
            Self::Unsupported(_) => Some(ErrorCode::UNSUPPORTED),
            Self::Storage(_) | Self::Stalled { .. } => Some(ErrorCode::STORAGE),
            Self::NotAuthorized(_) => Some(ErrorCode::NOT_AUTHORIZED),
            Self::Limit(_) => Some(ErrorCode::LIMIT),
            Self::Finished(_) => Some(ErrorCode::FINISHED),
            Self::Busy(_) => Some(ErrorCode::BUSY),
            Self::Connection(_) | Self::Idle(_) => None,
        }
    }
}
