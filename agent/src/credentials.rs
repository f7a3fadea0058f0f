//! The agent's TLS identity: its own key and certificate, and the receiver's CA.
//!
//! Files in the credentials dir: `agent.key` (0600), `agent.crt`, `ca.crt`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The name every receiver certificate carries; see the receiver's `pki` module. The
/// agent trusts the receiver's CA, not the address it dials.
pub const RECEIVER_NAME: &str = "blockferry-receiver";

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no {what} in PEM form")]
    Missing { path: PathBuf, what: &'static str },
    #[error(
        "{path} must not be readable by group or others (mode {mode:o}); run: chmod 600 {path}"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("the credentials do not form a usable TLS client configuration")]
    Tls(#[source] rustls::Error),
}

/// Clones share the configuration: a renewal ([`Credentials::reload`]) reaches every
/// holder, and the next connection uses the new certificate while live ones go on.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub dir: PathBuf,
    current: Arc<std::sync::RwLock<Arc<rustls::ClientConfig>>>,
}

impl Credentials {
    /// Loads `agent.key`, `agent.crt` and `ca.crt` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, CredentialsError> {
        Ok(Self {
            dir: dir.to_owned(),
            current: Arc::new(std::sync::RwLock::new(Arc::new(Self::read_config(dir)?))),
        })
    }

    /// The TLS configuration for the next connection.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reads the files again (after a renewal replaced them).
    pub fn reload(&self) -> Result<(), CredentialsError> {
        let config = Arc::new(Self::read_config(&self.dir)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = config;
        Ok(())
    }

    fn read_config(dir: &Path) -> Result<rustls::ClientConfig, CredentialsError> {
        let key_path = dir.join("agent.key");
        let cert_path = dir.join("agent.crt");
        let ca_path = dir.join("ca.crt");
        check_key_mode(&key_path)?;
        let key_pem = read(&key_path)?;
        let key =
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| CredentialsError::Missing {
                path: key_path.clone(),
                what: "private key",
            })?;
        let chain = certificates(&cert_path)?;
        let roots_pem = certificates(&ca_path)?;
        let mut roots = RootCertStore::empty();
        for ca in roots_pem {
            roots.add(ca).map_err(CredentialsError::Tls)?;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(CredentialsError::Tls)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(CredentialsError::Tls)?;
        Ok(config)
    }

    /// The certificate chain and key, for a client that authenticates elsewhere with them
    /// (renewal at the control API).
    pub(crate) fn client_auth(
        &self,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CredentialsError> {
        let key_path = self.dir.join("agent.key");
        let key = PrivateKeyDer::from_pem_slice(&read(&key_path)?).map_err(|_| {
            CredentialsError::Missing {
                path: key_path.clone(),
                what: "private key",
            }
        })?;
        Ok((certificates(&self.dir.join("agent.crt"))?, key))
    }

    pub fn server_name() -> ServerName<'static> {
        ServerName::try_from(RECEIVER_NAME).expect("a valid DNS name")
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CredentialsError> {
    std::fs::read(path).map_err(|source| CredentialsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, CredentialsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(CredentialsError::Missing {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn check_key_mode(path: &Path) -> Result<(), CredentialsError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| CredentialsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CredentialsError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}
