//! The TLS policy of the replication port: TLS 1.3 only, a client certificate from the
//! receiver's CA required, aws-lc-rs as the crypto provider.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;

use crate::pki::{CertificateAuthority, PkiError};
use crate::revocation::{RevocationCheckingVerifier, Revocations};

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("the CA certificate is not a usable trust anchor")]
    Anchor(#[source] rustls::Error),
    #[error("cannot build the client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("cannot build the TLS configuration")]
    Config(#[source] rustls::Error),
}

/// The replication port's configuration: a client certificate is required, and agents
/// in `revoked` fail the handshake.
pub fn server_config(
    ca: &CertificateAuthority,
    revoked: Arc<Revocations>,
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    config(ca, revoked, ClientAuth::Required)
}

/// The control port's configuration: the same server certificate (with the CA in its
/// chain, which enrolling agents pin by fingerprint), and an optional client certificate
/// (renewal), checked against the CA and the revoked set when presented.
pub fn control_config(
    ca: &CertificateAuthority,
    revoked: Arc<Revocations>,
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    config(ca, revoked, ClientAuth::Optional)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientAuth {
    Required,
    Optional,
}

/// TLS 1.3 only, the receiver's certificate, client certificates from the CA (not revoked).
fn config(
    ca: &CertificateAuthority,
    revoked: Arc<Revocations>,
    client_auth: ClientAuth,
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    roots
        .add(ca.cert_der().clone())
        .map_err(TlsSetupError::Anchor)?;
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if client_auth == ClientAuth::Optional {
        builder = builder.allow_unauthenticated();
    }
    let verifier = Arc::new(RevocationCheckingVerifier {
        inner: builder.build()?,
        revoked,
    });
    let (chain, key) = ca.receiver_certificate()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsSetupError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(TlsSetupError::Config)?;
    // No session resumption: a resumed session skips the client certificate check, so a
    // revoked or expired agent could come back on an old ticket. Every connection does a
    // full handshake (a few per agent per session: the cost is nothing).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Why a connection was refused, as a short stable code for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// The bytes were not TLS at all (plaintext, HTTP, garbage).
    NotTls,
    /// TLS below 1.3, or no common cipher suite or signature scheme.
    ProtocolVersion,
    /// TLS without a client certificate.
    NoClientCertificate,
    /// A client certificate not issued by this receiver's CA.
    UnknownIssuer,
    /// Expired or not yet valid.
    CertificateExpired,
    /// The agent was revoked by an operator.
    CertificateRevoked,
    /// Any other certificate problem (bad usage, bad encoding).
    BadCertificate,
    /// Verified, but the certificate does not name an agent and a server.
    NoIdentity,
    /// The handshake did not finish in time.
    HandshakeTimeout,
    /// The client went away or the handshake failed otherwise.
    HandshakeFailed,
    /// The client did not start its handshake (no ClientHello) in time.
    ClientHelloTimeout,
    /// The listener held as many unauthenticated connections as it may.
    TooManyConnections,
    /// The client's address held as many connections as one address may.
    TooManyFromAddress,
    /// Authenticated, but the receiver serves as many streams as it may right now.
    Busy,
}

impl RefusalReason {
    pub const ALL: [Self; 14] = [
        Self::NotTls,
        Self::ProtocolVersion,
        Self::NoClientCertificate,
        Self::UnknownIssuer,
        Self::CertificateExpired,
        Self::CertificateRevoked,
        Self::BadCertificate,
        Self::NoIdentity,
        Self::HandshakeTimeout,
        Self::HandshakeFailed,
        Self::ClientHelloTimeout,
        Self::TooManyConnections,
        Self::TooManyFromAddress,
        Self::Busy,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Self::NotTls => "not_tls",
            Self::ProtocolVersion => "protocol_version",
            Self::NoClientCertificate => "no_client_certificate",
            Self::UnknownIssuer => "unknown_issuer",
            Self::CertificateExpired => "certificate_expired",
            Self::CertificateRevoked => "certificate_revoked",
            Self::BadCertificate => "bad_certificate",
            Self::NoIdentity => "no_identity",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::HandshakeFailed => "handshake_failed",
            Self::ClientHelloTimeout => "client_hello_timeout",
            Self::TooManyConnections => "too_many_connections",
            Self::TooManyFromAddress => "too_many_from_address",
            Self::Busy => "busy",
        }
    }

    /// Classifies the error tokio-rustls returned from `accept`.
    pub fn of_handshake_error(err: &std::io::Error) -> Self {
        use rustls::{CertificateError, Error, PeerIncompatible};
        let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
            return Self::HandshakeFailed;
        };
        match tls {
            Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => Self::NotTls,
            Error::NoCertificatesPresented => Self::NoClientCertificate,
            Error::PeerIncompatible(
                PeerIncompatible::SupportedVersionsExtensionRequired
                | PeerIncompatible::Tls13RequiredForQuic
                | PeerIncompatible::NoCipherSuitesInCommon
                | PeerIncompatible::NoSignatureSchemesInCommon
                | PeerIncompatible::NoKxGroupsInCommon,
            ) => Self::ProtocolVersion,
            Error::PeerIncompatible(_) => Self::ProtocolVersion,
            Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => Self::UnknownIssuer,
            Error::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            ) => Self::CertificateExpired,
            Error::InvalidCertificate(CertificateError::Revoked) => Self::CertificateRevoked,
            Error::InvalidCertificate(_) => Self::BadCertificate,
            _ => Self::HandshakeFailed,
        }
    }
}

impl std::fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}
