//! Why a session with the receiver ends badly, and whether reconnecting may help.

use std::time::Duration;

use blockferry_proto::ErrorCode;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Proxy(crate::proxy::ProxyError),
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
    Refused {
        code: ErrorCode,
        message: String,
        /// The receiver's hint: do not come back sooner.
        retry_after: Duration,
    },
    #[error("cannot read volume {disk}")]
    Volume {
        disk: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The receiver refused this agent's certificate after the handshake (TLS 1.3
    /// reports a refused client certificate on the first read).
    #[error(
        "the receiver refused this agent's certificate ({0}): it is revoked, expired or not issued by the receiver's CA; enroll again"
    )]
    CertificateRefused(String),
    /// The agent was asked to stop; the session ends at the next frame boundary.
    #[error("the agent is stopping")]
    Stopping,
    /// The agent cannot vouch for its changes any more (block-layer events were lost,
    /// or a periodic rescan is due): the session ends for one that rescans.
    #[error("changes were lost to tracking; reconnecting to rescan")]
    Restart,
}

impl SessionError {
    /// Whether reconnecting may help. Refusals that would repeat identically (a write out
    /// of range, a protocol violation, a certificate the receiver rejects) are not.
    /// How long the receiver asked the agent to stay away, if it did.
    pub fn retry_after(&self) -> Duration {
        match self {
            Self::Refused { retry_after, .. } => *retry_after,
            _ => Duration::ZERO,
        }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Refused { code, .. } => code.is_retryable(),
            Self::Protocol(_) | Self::CertificateRefused(_) => false,
            Self::Proxy(err) => err.is_retryable(),
            Self::Handshake { source, .. } => !is_certificate_problem(source),
            _ => true,
        }
    }
}

pub(super) fn is_certificate_problem(err: &std::io::Error) -> bool {
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

pub(super) fn broken(why: &str) -> SessionError {
    SessionError::Connection(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        why.to_owned(),
    ))
}
