//! Enrollment: a token from the operator in, a key pair, a certificate and the receiver's
//! address in the state dir out.
//!
//! The agent trusts nothing it has not checked: the control API's TLS certificate must
//! chain to a CA whose SHA-256 fingerprint is the token's, before a byte of the request
//! is sent. The private key is generated here and never leaves the state dir (mode 0600);
//! only a certificate signing request travels.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blockferry_proto::control::{EnrollRequest, ErrorBody, Issued, RenewRequest};
use blockferry_proto::token::{EnrollmentToken, TokenFormatError, hex};
use blockferry_util::durable::{DirError, ensure_private_dir, write_atomic};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};

use crate::credentials::Credentials;

const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read from the control API (a certificate and the CA).
const MAX_ANSWER: usize = 1 << 20;
const ENROLLMENT_FILE: &str = "enrollment.json";

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Token(#[from] TokenFormatError),
    #[error("cannot reach the receiver's control API at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Proxy(crate::proxy::ProxyError),
    #[error("TLS with the receiver's control API at {addr} failed")]
    Tls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP with the receiver's control API failed")]
    Http(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the receiver refused ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the receiver's answer is unusable: {0}")]
    Answer(String),
    #[error("cannot generate the agent's key or request")]
    Key(#[from] rcgen::Error),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    StateDir(#[from] DirError),
    #[error("timed out talking to the receiver's control API")]
    Timeout,
}

/// What `enroll` leaves in the state dir besides the key and certificates.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Enrollment {
    pub agent_id: String,
    pub server_id: String,
    /// Replication address, HOST:PORT.
    pub receiver: String,
    /// Control API address, HOST:PORT (renewal).
    pub control: String,
    /// When the current certificate was issued and when it expires (Unix seconds).
    #[serde(default)]
    pub issued_at: u64,
    #[serde(default)]
    pub not_after: u64,
}

impl Enrollment {
    /// Reads `<state-dir>/enrollment.json`, if the agent was enrolled.
    pub fn load(state_dir: &Path) -> Result<Option<Self>, std::io::Error> {
        match std::fs::read(state_dir.join(ENROLLMENT_FILE)) {
            Ok(raw) => serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }
}

/// Enrolls with `token`, dialling `control` if given (else the token's address), and
/// writes `agent.key` (0600), `agent.crt`, `ca.crt` and `enrollment.json` to `state_dir`.
pub async fn enroll(
    token: &str,
    control: Option<&str>,
    server_id: &str,
    state_dir: &Path,
) -> Result<Enrollment, EnrollError> {
    let key = rcgen::KeyPair::generate()?;
    let (issued, address) = request_certificate(token, control, server_id, &csr(&key)?).await?;
    let enrollment = Enrollment {
        agent_id: issued.agent_id.clone(),
        server_id: issued.server_id.clone(),
        receiver: with_port(&address, issued.replication_port),
        control: address,
        issued_at: unix_now(),
        not_after: issued.not_after,
    };
    save(state_dir, &key, &issued, &enrollment)?;
    Ok(enrollment)
}

/// Renews the certificate in `state_dir` (a new key, the same identity), authenticating
/// with the current one, and returns the updated enrollment. The files are replaced
/// atomically; [`Credentials::reload`] then makes new connections use them.
pub async fn renew(state_dir: &Path, enrollment: &Enrollment) -> Result<Enrollment, EnrollError> {
    let current = Credentials::load(state_dir).map_err(|e| EnrollError::Answer(e.to_string()))?;
    let client_auth = current
        .client_auth()
        .map_err(|e| EnrollError::Answer(e.to_string()))?;
    let ca_path = state_dir.join("ca.crt");
    let ca_pem = std::fs::read_to_string(&ca_path).map_err(|source| EnrollError::Write {
        path: ca_path,
        source,
    })?;
    let fingerprint = sha256_of_pem(&ca_pem)
        .ok_or_else(|| EnrollError::Answer("ca.crt holds no certificate".into()))?;
    let key = rcgen::KeyPair::generate()?;
    let request = RenewRequest {
        csr_pem: csr(&key)?,
    };
    let config = pinned_config(fingerprint, Some(client_auth))?;
    let issued: Issued = post(&config, &enrollment.control, "/v1/renew", &request).await?;
    if issued.agent_id != enrollment.agent_id || sha256_of_pem(&issued.ca_pem) != Some(fingerprint)
    {
        return Err(EnrollError::Answer(
            "the renewed certificate names another agent or CA".into(),
        ));
    }
    let renewed = Enrollment {
        issued_at: unix_now(),
        not_after: issued.not_after,
        ..enrollment.clone()
    };
    save(state_dir, &key, &issued, &renewed)?;
    Ok(renewed)
}

/// When to renew: once half of the certificate's life has passed.
pub fn renewal_due(enrollment: &Enrollment) -> u64 {
    let lifetime = enrollment.not_after.saturating_sub(enrollment.issued_at);
    enrollment.issued_at + lifetime / 2
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Keeps the certificate in `state_dir` renewed until `stop` fires: renews at half its
/// life, retries failures (a receiver that is down, a network cut) every few seconds up
/// to a minute apart, and reloads `credentials` after each renewal.
pub async fn keep_renewed(
    state_dir: PathBuf,
    credentials: Credentials,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut retry = Duration::from_secs(1);
    loop {
        let enrollment = match Enrollment::load(&state_dir) {
            Ok(Some(e)) if e.not_after > 0 => e,
            Ok(_) => return,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the enrollment; certificate renewal stops");
                return;
            }
        };
        let wait = renewal_due(&enrollment).saturating_sub(unix_now());
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(wait)) => {}
        }
        match renew(&state_dir, &enrollment).await {
            Ok(renewed) => {
                retry = Duration::from_secs(1);
                match credentials.reload() {
                    Ok(()) => tracing::info!(
                        not_after = renewed.not_after,
                        "renewed the agent certificate"
                    ),
                    Err(err) => {
                        tracing::error!(error = %err, "renewed, but cannot load the new certificate")
                    }
                }
            }
            Err(err) => {
                let left = enrollment.not_after.saturating_sub(unix_now());
                tracing::warn!(
                    error = %blockferry_util::error_chain(&err),
                    expires_in_s = left,
                    "certificate renewal failed; retrying"
                );
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// The enrollment exchange alone: sends `csr_pem` with the token to the receiver it
/// names (verified by the token's CA fingerprint) and returns what it issued, with the
/// control address used.
pub async fn request_certificate(
    token: &str,
    control: Option<&str>,
    server_id: &str,
    csr_pem: &str,
) -> Result<(Issued, String), EnrollError> {
    let token = EnrollmentToken::parse(token)?;
    let address = control.unwrap_or(&token.address).to_owned();
    let request = EnrollRequest {
        token: token.to_string(),
        csr_pem: csr_pem.to_owned(),
        server_id: server_id.to_owned(),
        host_name: crate::inventory::collect().host_name,
    };
    let config = pinned_config(token.ca_fingerprint, None)?;
    let issued: Issued = post(&config, &address, "/v1/enroll", &request).await?;
    if sha256_of_pem(&issued.ca_pem) != Some(token.ca_fingerprint) {
        return Err(EnrollError::Answer(
            "the CA in the answer is not the one the token names".into(),
        ));
    }
    Ok((issued, address))
}

fn csr(key: &rcgen::KeyPair) -> Result<String, EnrollError> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        crate::inventory::collect().host_name,
    );
    Ok(params.serialize_request(key)?.pem()?)
}

/// Writes the new key and certificate as a new generation, then switches `current` to
/// it with one atomic rename: at every instant the state dir holds a key and the
/// certificate that goes with it, whatever crash comes (C5 of the 2026-12 audit: a kill
/// between replacing the key and the certificate left a pair that never worked again).
fn save(
    state_dir: &Path,
    key: &rcgen::KeyPair,
    issued: &Issued,
    enrollment: &Enrollment,
) -> Result<(), EnrollError> {
    use crate::credentials::{CURRENT, GENERATIONS, generations};
    let write = |path: PathBuf, contents: &[u8], mode: u32| {
        write_atomic(&path, contents, mode).map_err(|source| EnrollError::Write { path, source })
    };
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| EnrollError::Write { path, source }
    };
    ensure_private_dir(state_dir, "agent state")?;
    let ca = state_dir.join("ca.crt");
    // The CA never changes on renewal (its fingerprint was checked); enrollment writes it.
    if std::fs::read(&ca).ok().as_deref() != Some(issued.ca_pem.as_bytes()) {
        write(ca, issued.ca_pem.as_bytes(), 0o644)?;
    }
    let existing = generations(state_dir);
    let next = existing.first().map_or(1, |(n, _)| n + 1);
    let generation = state_dir.join(GENERATIONS).join(next.to_string());
    ensure_private_dir(&generation, "agent credentials")?;
    write(
        generation.join("agent.key"),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write(
        generation.join("agent.crt"),
        issued.certificate_pem.as_bytes(),
        0o644,
    )?;
    // The switch: a new symlink beside `current`, renamed over it.
    let link = state_dir.join(CURRENT);
    let temp = state_dir.join(format!(".{CURRENT}.{next}.tmp"));
    let _ = std::fs::remove_file(&temp);
    std::os::unix::fs::symlink(Path::new(GENERATIONS).join(next.to_string()), &temp)
        .map_err(io(&temp))?;
    std::fs::rename(&temp, &link).map_err(io(&link))?;
    std::fs::File::open(state_dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io(state_dir))?;
    let json = serde_json::to_vec_pretty(enrollment)
        .map_err(|e| EnrollError::Answer(format!("cannot record the enrollment: {e}")))?;
    write(state_dir.join(ENROLLMENT_FILE), &json, 0o644)?;
    // Keep the previous pair for a fall-back; older keys go. So does a pair directly in
    // the dir (from before generations): `current` supersedes it.
    for (n, path) in existing.iter().skip(1) {
        if *n < next {
            let _ = std::fs::remove_dir_all(path);
        }
    }
    if existing.is_empty() {
        for name in ["agent.key", "agent.crt"] {
            let _ = std::fs::remove_file(state_dir.join(name));
        }
    }
    Ok(())
}

/// `host:port` of `address` with another port (IPv6 literals keep their brackets).
fn with_port(address: &str, port: u16) -> String {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    format!("{host}:{port}")
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn sha256_of_pem(pem: &str) -> Option<[u8; 32]> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()
        .map(|der| sha256(&der))
}

/// TLS 1.3 to the control API, trusting only a CA with `fingerprint`; with `client`, the
/// agent authenticates with its certificate (renewal).
fn pinned_config(
    fingerprint: [u8; 32],
    client: Option<(
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<Arc<rustls::ClientConfig>, EnrollError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| EnrollError::Answer(format!("cannot set up TLS 1.3: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa {
            fingerprint,
            provider,
        }));
    let config = match client {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
            EnrollError::Answer(format!(
                "the agent's key and certificate in the state dir do not go together: {e}"
            ))
        })?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Accepts the server only if its chain includes the pinned CA and verifies against it,
/// for the receiver's fixed name.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| sha256(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the receiver's CA is not the one in the token (fingerprint {}): a different receiver, or someone in between",
                    hex(&self.fingerprint)
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], &Credentials::server_name(), ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// One JSON request to the control API; a non-200 answer becomes
/// [`EnrollError::Refused`] with the receiver's message.
async fn post<Req: Serialize, Ans: serde::de::DeserializeOwned>(
    config: &Arc<rustls::ClientConfig>,
    address: &str,
    path: &str,
    body: &Req,
) -> Result<Ans, EnrollError> {
    tokio::time::timeout(TIMEOUT, async {
        let tcp = crate::proxy::connect(address)
            .await
            .map_err(|err| match err {
                crate::proxy::ConnectError::Direct(source) => EnrollError::Connect {
                    addr: address.to_owned(),
                    source,
                },
                crate::proxy::ConnectError::Proxy(err) => EnrollError::Proxy(err),
            })?;
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(config))
            .connect(Credentials::server_name(), tcp)
            .await
            .map_err(|source| EnrollError::Tls {
                addr: address.to_owned(),
                source,
            })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| EnrollError::Http(e.into()))?;
        tokio::spawn(connection);
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, address)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(
                serde_json::to_vec(body).map_err(|e| EnrollError::Http(e.into()))?,
            )))
            .map_err(|e| EnrollError::Http(e.into()))?;
        let answer = sender
            .send_request(request)
            .await
            .map_err(|e| EnrollError::Http(e.into()))?;
        let status = answer.status();
        let bytes = Limited::new(answer.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(EnrollError::Http)?
            .to_bytes();
        if status != hyper::StatusCode::OK {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(EnrollError::Refused {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| EnrollError::Answer(e.to_string()))
    })
    .await
    .map_err(|_| EnrollError::Timeout)?
}
