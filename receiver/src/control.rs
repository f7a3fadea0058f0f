//! The control API: HTTPS (TLS 1.3 only) on `--control` (default `0.0.0.0:8443`).
//!
//! - `POST /v1/enroll` — a token and a CSR in, a certificate for a fresh agent id out;
//! - `POST /v1/renew` — authenticated by the agent's current certificate, a CSR in, a new
//!   certificate for the same identity out;
//! - `GET /v1/status` — the status report, for operators: with an admin client
//!   certificate (`blockferry-receiver admin issue`), or the admin token
//!   (`<data-dir>/admin.token`) as `Authorization: Bearer …`;
//! - `GET /v1/events?after=N&server=ID` — server events (`started`, `stalled`,
//!   `resumed`) after event number N, oldest first, for operators likewise.
//!
//! Bodies are JSON ([`blockferry_proto::control`]), at most 64 KiB; errors are
//! `{"error": "…"}` with a 4xx/5xx status.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blockferry_proto::control::{EnrollRequest, ErrorBody, Issued, MAX_CONTROL_BODY, RenewRequest};
use blockferry_proto::token::{EnrollmentToken, hex};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::catalog::{TokenRecord, TokenRefusal, constant_time_eq, now, token_id};
use crate::context::SessionContext;
use crate::pki::{AdminIdentity, AgentIdentity, CertificateAuthority, sha256, validate_name};
use crate::status::StatusReport;
use blockferry_util::error_chain;

/// A TLS handshake and one request must fit in this.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// The TLS handshake alone.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's headers must arrive this soon (after the handshake, or the last response).
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct ControlContext {
    pub(crate) sessions: Arc<SessionContext>,
    pub(crate) ca: CertificateAuthority,
    pub(crate) admin_token: String,
    pub(crate) agent_cert_lifetime: time::Duration,
    pub(crate) replication_port: u16,
}

/// Length of a generated admin token: 32 random bytes in hex. A shorter one (an empty
/// file a template left, a truncated restore) is refused rather than trusted.
pub const ADMIN_TOKEN_LEN: usize = 64;

/// The admin token in `data_dir`, created (0600) on first start. One that is shorter
/// than a generated token, or readable by others, is an error: it would open the
/// operator endpoints to whoever guesses or reads it.
pub(crate) fn admin_token(data_dir: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let path = data_dir.join("admin.token");
    match std::fs::read_to_string(&path) {
        Ok(token) => {
            let token = token.trim().to_owned();
            if token.len() < ADMIN_TOKEN_LEN {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "it holds {} characters, fewer than the {ADMIN_TOKEN_LEN} of a generated token; delete it and the receiver makes a new one at its next start",
                        token.len()
                    ),
                ));
            }
            let mode = std::fs::metadata(&path)?.mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "it is readable or writable by others (mode {mode:o}); run: chmod 600 {}",
                        path.display()
                    ),
                ));
            }
            Ok(token)
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            let token = hex(&random::<32>());
            blockferry_util::durable::write_atomic(&path, token.as_bytes(), 0o600)?;
            Ok(token)
        }
        Err(err) => Err(err),
    }
}

/// This machine's host name, for the address a token tells agents to dial.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// `N` random bytes from the system's generator.
pub(crate) fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random generator works");
    bytes
}

/// Which servers a token may enroll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenBinding {
    /// Any server id the catalog does not know yet.
    AnyNewServer,
    /// This one server id, which must not be known yet.
    NewServer(String),
    /// This existing server again: a reinstall, which revokes its agent.
    Reinstall(String),
}

/// A new token for `address`, valid `ttl` for `uses` enrollments of the servers `binding`
/// allows: its text (the only place the secret ever appears) and what the catalog keeps.
pub fn new_token(
    ca_fingerprint: [u8; 32],
    address: &str,
    ttl: Duration,
    uses: u32,
    binding: TokenBinding,
) -> (EnrollmentToken, TokenRecord) {
    let token = EnrollmentToken {
        address: address.to_owned(),
        secret: random(),
        ca_fingerprint,
    };
    let hash = hex(&sha256(&token.secret));
    let created = now();
    let record = TokenRecord {
        id: token_id(&hash),
        secret_sha256: hash,
        created,
        expires: created.saturating_add(ttl.as_secs()),
        uses: uses.max(1),
        used: 0,
        revoked: false,
        reinstall: matches!(binding, TokenBinding::Reinstall(_)),
        server: match binding {
            TokenBinding::AnyNewServer => None,
            TokenBinding::NewServer(id) | TokenBinding::Reinstall(id) => Some(id),
        },
    };
    (token, record)
}

pub(crate) async fn serve(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ctx: Arc<ControlContext>,
    shutdown: CancellationToken,
) {
    let log = crate::admission::RefusalLog::new("control");
    loop {
        let admission = &ctx.sessions.admission;
        let metrics = &ctx.sessions.metrics;
        let Some((tcp, peer, permit)) = crate::admission::next_admitted(
            &listener,
            &shutdown,
            &admission.control,
            Some(&admission.known),
            "control API",
            |peer, refusal| {
                metrics.refused("control", refusal.code(), false);
                log.refused(peer, refusal.code());
            },
        )
        .await
        else {
            return;
        };
        let (acceptor, ctx) = (acceptor.clone(), Arc::clone(&ctx));
        tokio::spawn(async move {
            let _permit = permit;
            let served =
                tokio::time::timeout(CONTROL_TIMEOUT, connection(tcp, peer, acceptor, ctx)).await;
            if served.is_err() {
                tracing::debug!(%peer, "control connection timed out");
            }
        });
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    ctx: Arc<ControlContext>,
) {
    if !crate::admission::client_hello_arrives(&tcp).await {
        ctx.sessions
            .metrics
            .refused("control", "client_hello_timeout", false);
        tracing::debug!(%peer, "control API: no ClientHello in time");
        return;
    }
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Err(_) => {
            ctx.sessions
                .metrics
                .refused("control", "handshake_timeout", false);
            tracing::debug!(%peer, "control API: no TLS handshake in time");
            return;
        }
        Ok(Err(err)) => {
            tracing::warn!(%peer, reason = crate::tls::RefusalReason::of_handshake_error(&err).code(), error = %err, "control API: refused connection");
            return;
        }
    };
    // A client certificate is optional here; when given, it is verified and names an agent
    // or an admin.
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|cert| Principal::of_certificate(cert));
    let service = hyper::service::service_fn(move |request| {
        let (ctx, identity) = (Arc::clone(&ctx), identity.clone());
        async move { Ok::<_, Infallible>(route(request, &ctx, identity, peer).await) }
    });
    if let Err(err) = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(tls), service)
        .await
    {
        tracing::debug!(%peer, error = %err, "control connection ended");
    }
}

/// Who the client certificate of a control connection speaks for.
#[derive(Debug, Clone)]
enum Principal {
    Agent(AgentIdentity),
    Admin(AdminIdentity),
}

impl Principal {
    fn of_certificate(der: &[u8]) -> Option<Self> {
        AgentIdentity::from_certificate(der)
            .map(Self::Agent)
            .or_else(|_| AdminIdentity::from_certificate(der).map(Self::Admin))
            .ok()
    }
}

type Answer = Response<Full<Bytes>>;

fn json(status: StatusCode, body: &impl Serialize) -> Answer {
    let bytes = serde_json::to_vec(body).expect("answers always serialize");
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("a valid response")
}

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    json(
        status,
        &ErrorBody {
            error: message.into(),
        },
    )
}

async fn route(
    request: Request<Incoming>,
    ctx: &ControlContext,
    identity: Option<Principal>,
    peer: SocketAddr,
) -> Answer {
    match (request.method(), request.uri().path()) {
        (&Method::POST, "/v1/enroll") => match body::<EnrollRequest>(request).await {
            Ok(body) => enroll(ctx, body, peer).await,
            Err(answer) => answer,
        },
        (&Method::POST, "/v1/renew") => {
            let Some(Principal::Agent(identity)) = identity else {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "renewal needs the agent's current certificate as the TLS client certificate",
                );
            };
            match body::<RenewRequest>(request).await {
                Ok(body) => renew(ctx, &identity, &body.csr_pem),
                Err(answer) => answer,
            }
        }
        (&Method::GET, "/v1/status") => {
            if let Some(answer) = refusal_unless_operator(&request, ctx, identity.as_ref(), peer) {
                return answer;
            }
            let (catalog, registry) = (
                Arc::clone(&ctx.sessions.catalog),
                Arc::clone(&ctx.sessions.registry),
            );
            match tokio::task::spawn_blocking(move || {
                StatusReport::build(&catalog, Some(&registry))
            })
            .await
            {
                Ok(Ok(report)) => json(StatusCode::OK, &report),
                Ok(Err(err)) => error(StatusCode::INTERNAL_SERVER_ERROR, error_chain(&err)),
                Err(err) => error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
            }
        }
        (&Method::GET, "/v1/events") => {
            if let Some(answer) = refusal_unless_operator(&request, ctx, identity.as_ref(), peer) {
                return answer;
            }
            let (mut after, mut server) = (0u64, None::<String>);
            for pair in request.uri().query().unwrap_or_default().split('&') {
                match pair.split_once('=') {
                    Some(("after", n)) => match n.parse() {
                        Ok(n) => after = n,
                        Err(_) => {
                            return error(
                                StatusCode::BAD_REQUEST,
                                format!("after={n:?} is not an event number"),
                            );
                        }
                    },
                    Some(("server", id)) => {
                        if let Err(err) = validate_name("server id", id) {
                            return error(StatusCode::BAD_REQUEST, err.to_string());
                        }
                        server = Some(id.to_owned());
                    }
                    _ if pair.is_empty() => {}
                    _ => {
                        return error(
                            StatusCode::BAD_REQUEST,
                            format!("unknown query parameter {pair:?}: use after=N and server=ID"),
                        );
                    }
                }
            }
            let events = Arc::clone(&ctx.sessions.events);
            match tokio::task::spawn_blocking(move || events.read(after, server.as_deref())).await {
                Ok(Ok(events)) => json(StatusCode::OK, &serde_json::json!({ "events": events })),
                Ok(Err(err)) => error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
                Err(err) => error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
            }
        }
        (_, "/v1/enroll" | "/v1/renew" | "/v1/status" | "/v1/events") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "wrong method for this endpoint",
        ),
        (_, path) => error(StatusCode::NOT_FOUND, format!("no endpoint {path}")),
    }
}

/// The refusal for anyone but an operator: an operator's TLS client certificate is an
/// admin certificate, or they present the admin token. An agent certificate is not enough, even with the token
/// (an agent has no business reading the fleet's status).
fn refusal_unless_operator(
    request: &Request<Incoming>,
    ctx: &ControlContext,
    identity: Option<&Principal>,
    peer: SocketAddr,
) -> Option<Answer> {
    match identity {
        Some(Principal::Admin(admin)) => {
            tracing::debug!(%peer, admin = %admin.admin_id, name = %admin.name, path = %request.uri().path(), "control API: admin certificate");
            return None;
        }
        Some(Principal::Agent(agent)) => {
            tracing::warn!(%peer, agent = %agent.agent_id, server = %agent.server_id, path = %request.uri().path(), "control API: an agent asked for an operator endpoint; refused");
            return Some(error(
                StatusCode::FORBIDDEN,
                "agent certificates cannot read operator endpoints; use an admin certificate (blockferry-receiver admin issue) or the admin token",
            ));
        }
        None => {}
    }
    let presented = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Never a match on an empty secret, whatever the two sides hold.
    if !presented.is_empty()
        && ctx.admin_token.len() >= ADMIN_TOKEN_LEN
        && constant_time_eq(presented.as_bytes(), ctx.admin_token.as_bytes())
    {
        return None;
    }
    tracing::warn!(%peer, path = %request.uri().path(), "control API: refused (no admin certificate, no or wrong admin token)");
    Some(error(
        StatusCode::UNAUTHORIZED,
        "operator endpoints need an admin client certificate (blockferry-receiver admin issue) or the admin token from <data-dir>/admin.token as 'Authorization: Bearer TOKEN'",
    ))
}

/// Reads and parses a JSON body of at most [`MAX_CONTROL_BODY`] bytes.
async fn body<T: serde::de::DeserializeOwned>(request: Request<Incoming>) -> Result<T, Answer> {
    let bytes = Limited::new(request.into_body(), MAX_CONTROL_BODY)
        .collect()
        .await
        .map_err(|_| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request bodies are limited to {MAX_CONTROL_BODY} bytes"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|err| error(StatusCode::BAD_REQUEST, format!("malformed request: {err}")))
}

async fn enroll(ctx: &ControlContext, request: EnrollRequest, peer: SocketAddr) -> Answer {
    let host = blockferry_util::text::printable(&request.host_name).into_owned();
    let refuse = |reason: &'static str, status: StatusCode, message: String| {
        ctx.sessions.metrics.enrollment_refused(reason);
        tracing::warn!(%peer, server = %blockferry_util::text::printable(&request.server_id), %host, reason, message = %message, "enrollment refused");
        error(status, message)
    };
    let token = match EnrollmentToken::parse(&request.token) {
        Ok(token) => token,
        Err(err) => return refuse("bad_request", StatusCode::BAD_REQUEST, err.to_string()),
    };
    if let Err(err) = validate_name("server id", &request.server_id) {
        return refuse("bad_request", StatusCode::BAD_REQUEST, err.to_string());
    }
    let identity = AgentIdentity {
        agent_id: uuid::Uuid::new_v4().simple().to_string(),
        server_id: request.server_id.clone(),
    };
    // The certificate is made before the token is spent, so a bad CSR costs no use; it
    // is handed out only once the enrollment is committed.
    let certificate_pem =
        match ctx
            .ca
            .issue_for_csr(&identity, &request.csr_pem, ctx.agent_cert_lifetime)
        {
            Ok(pem) => pem,
            Err(err) => {
                return refuse("bad_request", StatusCode::BAD_REQUEST, error_chain(&err));
            }
        };
    let hash = hex(&sha256(&token.secret));
    let catalog = Arc::clone(&ctx.sessions.catalog);
    let enrolling = identity.clone();
    let committed = tokio::task::spawn_blocking(move || catalog.enroll(&hash, &enrolling)).await;
    let enrollment = match committed {
        Ok(Ok(enrollment)) => enrollment,
        Ok(Err(TokenRefusal::Catalog(err))) => {
            return refuse(
                "catalog_error",
                StatusCode::INTERNAL_SERVER_ERROR,
                error_chain(&err),
            );
        }
        Ok(Err(refusal)) => {
            return refuse(refusal.code(), StatusCode::FORBIDDEN, refusal.to_string());
        }
        Err(err) => {
            return refuse(
                "catalog_error",
                StatusCode::INTERNAL_SERVER_ERROR,
                err.to_string(),
            );
        }
    };
    // A reinstall: the server's previous agents are revoked (in the same transaction),
    // refused at their next handshake, and their live sessions end now.
    for agent in &enrollment.revoked {
        ctx.sessions.revocations.insert(agent);
        for session in ctx.sessions.registry.sessions_of_agent(agent) {
            session.revoke().await;
        }
        tracing::info!(previous = %agent, server = %identity.server_id, "reinstall: the previous agent is revoked");
    }
    tracing::info!(
        agent = %identity.agent_id,
        server = %identity.server_id,
        %host,
        token = %enrollment.token.id,
        reinstall = !enrollment.revoked.is_empty(),
        %peer,
        "agent enrolled"
    );
    issued(ctx, &identity, certificate_pem)
}

/// The answer that hands an agent its certificate.
fn issued(ctx: &ControlContext, identity: &AgentIdentity, certificate_pem: String) -> Answer {
    json(
        StatusCode::OK,
        &Issued {
            agent_id: identity.agent_id.clone(),
            server_id: identity.server_id.clone(),
            certificate_pem,
            ca_pem: ctx.ca.cert_pem().to_owned(),
            not_after: now().saturating_add(ctx.agent_cert_lifetime.whole_seconds().max(0) as u64),
            replication_port: ctx.replication_port,
        },
    )
}

/// Renews the certificate of `identity` for the CSR's key.
fn renew(ctx: &ControlContext, identity: &AgentIdentity, csr_pem: &str) -> Answer {
    match ctx
        .ca
        .issue_for_csr(identity, csr_pem, ctx.agent_cert_lifetime)
    {
        Ok(certificate_pem) => {
            tracing::info!(agent = %identity.agent_id, server = %identity.server_id, "agent certificate renewed");
            issued(ctx, identity, certificate_pem)
        }
        Err(err) => error(StatusCode::BAD_REQUEST, error_chain(&err)),
    }
}
