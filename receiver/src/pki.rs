//! The receiver's certificate authority, the certificates it issues, and the identity an
//! agent certificate carries.
//!
//! Files under `<data-dir>/pki/`: `ca.key` (0600), `ca.crt`, `receiver.key` (0600),
//! `receiver.crt`. Agents verify the receiver against the CA and the fixed name
//! [`RECEIVER_NAME`], whatever address they dial; the receiver accepts only client
//! certificates issued by the CA, and reads the agent and server ids from them.

use std::path::{Path, PathBuf};

use blockferry_util::durable::{DirError, ensure_private_dir, write_atomic};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

/// The DNS name in every receiver certificate, and the name agents verify. Receivers are
/// reached by whatever address the network gives them; the trust anchor is the CA, not
/// the address.
pub const RECEIVER_NAME: &str = "blockferry-receiver";

/// URI prefix of the SAN naming an agent.
const AGENT_URI: &str = "urn:blockferry:agent:";
/// URI prefix of the SAN naming the source server an agent replicates.
const SERVER_URI: &str = "urn:blockferry:server:";
/// URI prefix of the SAN naming an operator's admin certificate (read-only control API
/// access; never accepted on the replication port, which needs an agent identity).
const ADMIN_URI: &str = "urn:blockferry:admin:";

const CA_VALIDITY: Duration = Duration::days(3650);
const RECEIVER_VALIDITY: Duration = Duration::days(825);
/// A receiver certificate this close to expiry is replaced at start.
const RECEIVER_RENEW_BEFORE: Duration = Duration::days(30);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a usable key or certificate")]
    Parse {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error("cannot generate a key or certificate")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate signing request is not valid (unreadable, or not signed by its key)")]
    Csr(#[source] rcgen::Error),
    #[error("agent certificate: {0}")]
    Identity(String),
    #[error("invalid {what} {value:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ -")]
    InvalidName { what: &'static str, value: String },
}

/// Who an agent certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    /// Unique per installation (a reinstall gets a new one).
    pub agent_id: String,
    /// The source server; outlives reinstalls, names the staging disks.
    pub server_id: String,
}

impl AgentIdentity {
    /// Reads the identity from a DER client certificate that rustls has already verified
    /// against the CA.
    pub fn from_certificate(der: &[u8]) -> Result<Self, PkiError> {
        let (mut agent_id, mut server_id) = (None, None);
        for uri in san_uris(der)? {
            if let Some(id) = uri.strip_prefix(AGENT_URI) {
                agent_id = Some(id.to_owned());
            } else if let Some(id) = uri.strip_prefix(SERVER_URI) {
                server_id = Some(id.to_owned());
            }
        }
        let identity = Self {
            agent_id: agent_id.ok_or_else(|| PkiError::Identity("no agent id".into()))?,
            server_id: server_id.ok_or_else(|| PkiError::Identity("no server id".into()))?,
        };
        validate_name("agent id", &identity.agent_id)?;
        validate_name("server id", &identity.server_id)?;
        Ok(identity)
    }
}

/// Who an admin certificate speaks for: an operator (or a monitoring system) allowed to
/// read the control API's operator endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminIdentity {
    /// Unique per certificate; what `admin revoke` takes.
    pub admin_id: String,
    /// The operator's name, for the logs.
    pub name: String,
}

impl AdminIdentity {
    /// Reads the identity from a DER client certificate that rustls has already verified
    /// against the CA. An agent certificate is not an admin certificate.
    pub fn from_certificate(der: &[u8]) -> Result<Self, PkiError> {
        let uris = san_uris(der)?;
        if uris
            .iter()
            .any(|uri| uri.starts_with(AGENT_URI) || uri.starts_with(SERVER_URI))
        {
            return Err(PkiError::Identity("an agent certificate".into()));
        }
        let (mut admin_id, mut name) = (None, None);
        for uri in uris {
            if let Some(rest) = uri.strip_prefix(ADMIN_URI) {
                let (id, who) = rest.split_once(':').unwrap_or((rest, rest));
                admin_id = Some(id.to_owned());
                name = Some(who.to_owned());
            }
        }
        let identity = Self {
            admin_id: admin_id.ok_or_else(|| PkiError::Identity("no admin id".into()))?,
            name: name.unwrap_or_default(),
        };
        validate_name("admin id", &identity.admin_id)?;
        validate_name("admin name", &identity.name)?;
        Ok(identity)
    }
}

/// The URI names in a certificate's subjectAltName.
fn san_uris(der: &[u8]) -> Result<Vec<String>, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::Identity(format!("unparseable: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Identity(format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| PkiError::Identity("no subjectAltName".into()))?;
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect())
}

/// Names that become file or directory names (server ids, disk names) are restricted to
/// a portable, traversal-free alphabet.
pub fn validate_name(what: &'static str, value: &str) -> Result<(), PkiError> {
    let ok = (1..=64).contains(&value.len())
        && value != "."
        && value != ".."
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::InvalidName {
            what,
            value: value.chars().take(80).collect(),
        })
    }
}

/// The CA in a receiver's data dir.
#[derive(Debug)]
pub struct CertificateAuthority {
    dir: PathBuf,
    key: KeyPair,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
}

/// A certificate with its private key, as PEM.
#[derive(Debug)]
pub struct IssuedCertificate {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertificateAuthority {
    /// Loads the CA from `<data_dir>/pki`, creating it on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, PkiError> {
        let dir = data_dir.join("pki");
        let (key_path, cert_path) = (dir.join("ca.key"), dir.join("ca.crt"));
        ensure_private_dir(&dir, "receiver CA")?;
        if !key_path.exists() {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(DnType::CommonName, "blockferry receiver CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let now = OffsetDateTime::now_utc();
            params.not_before = now - Duration::hours(1);
            params.not_after = now + CA_VALIDITY;
            let cert = params.self_signed(&key)?;
            // Certificate first: a key without its certificate is regenerated next time,
            // a certificate without its key would be unusable forever.
            write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)
                .map_err(io("write", &cert_path))?;
            write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)
                .map_err(io("write", &key_path))?;
            tracing::info!(path = %cert_path.display(), "created the receiver CA");
        }
        let key_pem = std::fs::read_to_string(&key_path).map_err(io("read", &key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(parse(&key_path))?;
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io("read", &cert_path))?;
        let cert_der = pem_certificates(&cert_pem)
            .into_iter()
            .next()
            .ok_or_else(|| {
                PkiError::Identity(format!("{} holds no certificate", cert_path.display()))
            })?;
        Ok(Self {
            dir,
            key,
            cert_pem,
            cert_der,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    fn issuer(&self) -> Result<Issuer<'_, &KeyPair>, PkiError> {
        Issuer::from_ca_cert_der(&self.cert_der, &self.key).map_err(PkiError::Generate)
    }

    /// The receiver's own TLS certificate, issued now if missing or close to expiry.
    pub fn receiver_certificate(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
        let (key_path, cert_path) = (self.dir.join("receiver.key"), self.dir.join("receiver.crt"));
        if !key_path.exists() || !cert_path.exists() || expires_soon(&cert_path) {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(vec![RECEIVER_NAME.to_owned()])?;
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(DnType::CommonName, RECEIVER_NAME);
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let now = OffsetDateTime::now_utc();
            params.not_before = now - Duration::hours(1);
            params.not_after = now + RECEIVER_VALIDITY;
            let cert = params.signed_by(&key, &self.issuer()?)?;
            write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)
                .map_err(io("write", &cert_path))?;
            write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)
                .map_err(io("write", &key_path))?;
        }
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io("read", &cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io("read", &key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(parse(&key_path))?;
        let mut chain = pem_certificates(&cert_pem);
        chain.push(self.cert_der.clone());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((chain, key))
    }

    /// Issues a client-auth-only, non-CA certificate naming `identity`, for a key pair
    /// generated here (offline provisioning: the operator carries key and certificate to
    /// the source server).
    pub fn issue_agent(
        &self,
        identity: &AgentIdentity,
        validity: Duration,
    ) -> Result<IssuedCertificate, PkiError> {
        let key = KeyPair::generate()?;
        let cert = agent_params(identity, validity)?.signed_by(&key, &self.issuer()?)?;
        Ok(IssuedCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues an agent certificate for the key of a certificate signing request (online
    /// enrollment: the key never leaves the agent). The CSR's signature is checked (the
    /// requester holds the key); everything else it asks for — names, CA status, key
    /// usages — is ignored: the certificate says what [`agent_params`] says.
    pub fn issue_for_csr(
        &self,
        identity: &AgentIdentity,
        csr_pem: &str,
        validity: Duration,
    ) -> Result<String, PkiError> {
        let csr =
            rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::Csr)?;
        let request = rcgen::CertificateSigningRequestParams {
            params: agent_params(identity, validity)?,
            public_key: csr.public_key,
        };
        Ok(request.signed_by(&self.issuer()?)?.pem())
    }

    /// Issues a client-auth-only, non-CA admin certificate for `name`, with a key pair
    /// generated here: the operator's credentials for the control API's status endpoints.
    pub fn issue_admin(
        &self,
        name: &str,
        validity: Duration,
    ) -> Result<(AdminIdentity, IssuedCertificate), PkiError> {
        validate_name("admin name", name)?;
        let identity = AdminIdentity {
            admin_id: uuid::Uuid::new_v4().simple().to_string(),
            name: name.to_owned(),
        };
        let params = client_params(
            format!("blockferry admin {name}"),
            vec![SanType::URI(
                format!("{ADMIN_URI}{}:{name}", identity.admin_id).try_into()?,
            )],
            validity,
        );
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok((
            identity,
            IssuedCertificate {
                cert_pem: cert.pem(),
                key_pem: key.serialize_pem(),
            },
        ))
    }

    /// SHA-256 of the CA certificate: what enrollment tokens carry.
    pub fn fingerprint(&self) -> [u8; 32] {
        sha256(&self.cert_der)
    }
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// What every agent certificate is: client authentication only, not a CA, naming the
/// agent and its source server, valid for `validity` from now.
fn agent_params(
    identity: &AgentIdentity,
    validity: Duration,
) -> Result<CertificateParams, PkiError> {
    validate_name("agent id", &identity.agent_id)?;
    validate_name("server id", &identity.server_id)?;
    Ok(client_params(
        format!("blockferry agent {}", identity.agent_id),
        vec![
            SanType::URI(format!("{AGENT_URI}{}", identity.agent_id).try_into()?),
            SanType::URI(format!("{SERVER_URI}{}", identity.server_id).try_into()?),
        ],
        validity,
    ))
}

/// A client-auth-only, non-CA certificate named `common_name` and `names`, valid for
/// `validity` from now (5 minutes back, for clocks a little behind).
fn client_params(
    common_name: String,
    names: Vec<SanType>,
    validity: Duration,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.subject_alt_names = names;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + validity;
    params
}

fn expires_soon(cert_path: &Path) -> bool {
    let Ok(pem) = std::fs::read_to_string(cert_path) else {
        return true;
    };
    let Some(der) = pem_certificates(&pem).into_iter().next() else {
        return true;
    };
    match x509_parser::parse_x509_certificate(&der) {
        Ok((_, cert)) => {
            let not_after = cert.validity().not_after.to_datetime();
            not_after - OffsetDateTime::now_utc() < RECEIVER_RENEW_BEFORE
        }
        Err(_) => true,
    }
}

/// Every certificate in a PEM text, in order; other blocks are skipped.
pub fn pem_certificates(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PkiError + 'a {
    move |source| PkiError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn parse(path: &Path) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Parse {
        path: path.to_owned(),
        source,
    }
}

/// Issues credentials for a new agent of source server `server_id` and writes them to
/// `out_dir`: `agent.key` (0600), `agent.crt`, `ca.crt` — what `blockferry-agent run
/// --credentials` reads.
pub fn write_agent_credentials(
    data_dir: &Path,
    server_id: &str,
    out_dir: &Path,
    validity: Duration,
) -> Result<AgentIdentity, PkiError> {
    validate_name("server name", server_id)?;
    let ca = CertificateAuthority::load_or_create(data_dir)?;
    let identity = AgentIdentity {
        agent_id: uuid::Uuid::new_v4().simple().to_string(),
        server_id: server_id.to_owned(),
    };
    let issued = ca.issue_agent(&identity, validity)?;
    write_credentials(out_dir, "agent", &issued, &ca)?;
    Ok(identity)
}

/// Issues an admin certificate for operator `name` and writes it to `out_dir`:
/// `admin.key` (0600), `admin.crt`, `ca.crt` — what a client of the control API's status
/// endpoints presents (e.g. `curl --cert admin.crt --key admin.key --cacert ca.crt`).
pub fn write_admin_credentials(
    data_dir: &Path,
    name: &str,
    out_dir: &Path,
    validity: Duration,
) -> Result<AdminIdentity, PkiError> {
    let ca = CertificateAuthority::load_or_create(data_dir)?;
    let (identity, issued) = ca.issue_admin(name, validity)?;
    write_credentials(out_dir, "admin", &issued, &ca)?;
    Ok(identity)
}

/// Writes `<stem>.key` (0600), `<stem>.crt` and `ca.crt` into `out_dir` (0700).
fn write_credentials(
    out_dir: &Path,
    stem: &str,
    issued: &IssuedCertificate,
    ca: &CertificateAuthority,
) -> Result<(), PkiError> {
    ensure_private_dir(out_dir, "credentials")?;
    let key_path = out_dir.join(format!("{stem}.key"));
    write_atomic(&key_path, issued.key_pem.as_bytes(), 0o600).map_err(io("write", &key_path))?;
    let cert_path = out_dir.join(format!("{stem}.crt"));
    write_atomic(&cert_path, issued.cert_pem.as_bytes(), 0o644).map_err(io("write", &cert_path))?;
    let ca_path = out_dir.join("ca.crt");
    write_atomic(&ca_path, ca.cert_pem().as_bytes(), 0o644).map_err(io("write", &ca_path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_certificates_carry_their_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let identity = AgentIdentity {
            agent_id: "a1b2".into(),
            server_id: "db-01".into(),
        };
        let issued = ca.issue_agent(&identity, Duration::days(1)).unwrap();
        let der = pem_certificates(&issued.cert_pem).remove(0);
        assert_eq!(AgentIdentity::from_certificate(&der).unwrap(), identity);
        // The receiver's own certificate names no agent, and no admin.
        let (chain, _) = ca.receiver_certificate().unwrap();
        assert!(AgentIdentity::from_certificate(&chain[0]).is_err());
        assert!(AdminIdentity::from_certificate(&chain[0]).is_err());
        // An agent is no admin, and an admin is no agent.
        assert!(AdminIdentity::from_certificate(&der).is_err());
        let (admin, issued) = ca.issue_admin("ops-alice", Duration::days(1)).unwrap();
        let der = pem_certificates(&issued.cert_pem).remove(0);
        assert_eq!(AdminIdentity::from_certificate(&der).unwrap(), admin);
        assert_eq!(admin.name, "ops-alice");
        assert!(AgentIdentity::from_certificate(&der).is_err());
        // A second load reuses the same CA.
        let again = CertificateAuthority::load_or_create(dir.path()).unwrap();
        assert_eq!(again.cert_der(), ca.cert_der());
    }

    #[test]
    fn names_that_could_escape_a_directory_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", &"x".repeat(65), "ü"] {
            assert!(validate_name("server id", bad).is_err(), "{bad:?}");
        }
        for good in ["db-01", "sda", "nvme0n1", "host.example_1"] {
            validate_name("server id", good).unwrap();
        }
    }
}
