//! The agent's TLS identity: its own key and certificate, and the receiver's CA.
//!
//! Files in the credentials dir: `ca.crt`, and the key and certificate as a pair that
//! only ever changes whole: `credentials/N/agent.key` (0600) and `credentials/N/agent.crt`
//! for generation N, with the symlink `current` naming the generation in use, switched
//! by one atomic rename. Credentials from `blockferry-receiver agent issue` (and state
//! dirs of agents from before generations) hold `agent.key` and `agent.crt` directly in
//! the dir; those are used when there is no generation.

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

/// The symlink naming the generation of key and certificate in use.
pub(crate) const CURRENT: &str = "current";
/// The directory holding the generations.
pub(crate) const GENERATIONS: &str = "credentials";

/// Where a key and its certificate are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyPair {
    pub(crate) key: PathBuf,
    pub(crate) cert: PathBuf,
}

impl KeyPair {
    fn in_dir(dir: &Path) -> Self {
        Self {
            key: dir.join("agent.key"),
            cert: dir.join("agent.crt"),
        }
    }
}

/// The generations in `dir`, newest first.
pub(crate) fn generations(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir.join(GENERATIONS))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let n = entry.file_name().to_str()?.parse::<u64>().ok()?;
            Some((n, entry.path()))
        })
        .collect();
    found.sort_by_key(|g| std::cmp::Reverse(g.0));
    found
}

/// The pairs to try, best first: the generation `current` names, then every generation
/// newest first (should `current` be damaged), then a pair directly in the dir.
fn candidates(dir: &Path) -> Vec<KeyPair> {
    let mut out = Vec::new();
    if dir.join(CURRENT).exists() {
        out.push(KeyPair::in_dir(&dir.join(CURRENT)));
    }
    out.extend(
        generations(dir)
            .iter()
            .map(|(_, path)| KeyPair::in_dir(path)),
    );
    out.push(KeyPair::in_dir(dir));
    out
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

    /// The configuration from the best pair that works (a key that goes with its
    /// certificate); if none does, the first one's error.
    fn read_config(dir: &Path) -> Result<rustls::ClientConfig, CredentialsError> {
        let mut first_error = None;
        for (index, pair) in candidates(dir).iter().enumerate() {
            match Self::read_pair(dir, pair) {
                Ok(config) => {
                    if index > 0 && first_error.is_some() {
                        tracing::warn!(
                            key = %pair.key.display(),
                            error = %first_error.as_ref().map(|e: &CredentialsError| blockferry_util::error_chain(e)).unwrap_or_default(),
                            "the current key and certificate cannot be used; using an earlier pair that goes together"
                        );
                    }
                    return Ok(config);
                }
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        Err(first_error.expect("there is always a candidate"))
    }

    fn read_pair(dir: &Path, pair: &KeyPair) -> Result<rustls::ClientConfig, CredentialsError> {
        let (key_path, cert_path) = (pair.key.clone(), pair.cert.clone());
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
        let mut first_error = None;
        for pair in candidates(&self.dir) {
            // Only a pair that makes a configuration goes together.
            if let Err(err) = Self::read_pair(&self.dir, &pair) {
                first_error.get_or_insert(err);
                continue;
            }
            let key = PrivateKeyDer::from_pem_slice(&read(&pair.key)?).map_err(|_| {
                CredentialsError::Missing {
                    path: pair.key.clone(),
                    what: "private key",
                }
            })?;
            return Ok((certificates(&pair.cert)?, key));
        }
        Err(first_error.expect("there is always a candidate"))
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
