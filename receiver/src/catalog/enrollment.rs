//! Enrollment in the catalog: tokens (only a hash of each secret), the agent each server
//! enrolled last, and revoked agents.

use super::*;

/// An enrollment token as stored: the SHA-256 of its secret (hex), never the secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    /// The first 16 hex digits of the hash: what `token list` shows and `token revoke`
    /// takes.
    pub id: String,
    pub secret_sha256: String,
    /// Unix seconds.
    pub created: u64,
    pub expires: u64,
    /// Enrollments allowed, and made.
    pub uses: u32,
    pub used: u32,
    pub revoked: bool,
    /// The one server this token enrolls; `None`: any server id the catalog does not know
    /// yet. Tokens from before binding existed read as `None`.
    #[serde(default)]
    pub server: Option<String>,
    /// The token re-enrolls `server`, which must exist (a reinstall: its previous agent is
    /// revoked and its disks rescan). Without it a token only ever creates a new server.
    #[serde(default)]
    pub reinstall: bool,
}

/// The agent the control API enrolled last for a server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnrolledRecord {
    pub agent_id: String,
    /// Unix seconds.
    pub enrolled_at: u64,
    /// The id of the token used.
    pub token: String,
}

/// What an enrollment committed: the token as used, and the agents it revoked (a
/// reinstall's predecessors).
#[derive(Debug)]
pub struct Enrollment {
    pub token: TokenRecord,
    pub revoked: Vec<String>,
}

/// The id of the token whose secret hashes to `secret_sha256`.
pub fn token_id(secret_sha256: &str) -> String {
    secret_sha256.chars().take(16).collect()
}

/// Why a token was not accepted. The enrollment API tells the agent which.
#[derive(Debug, thiserror::Error)]
pub enum TokenRefusal {
    #[error(
        "the enrollment token is not known to this receiver (forged, mistyped, or from another receiver)"
    )]
    Unknown,
    #[error(
        "the enrollment token has expired; create a new one with `blockferry-receiver token create`"
    )]
    Expired,
    #[error("the enrollment token has already been used as many times as it allows")]
    UsedUp,
    #[error("the enrollment token was revoked by an operator")]
    Revoked,
    #[error(
        "the enrollment token is for server {token_server} only, not {requested}; enroll with --server-id {token_server}, or ask for a token for {requested}"
    )]
    WrongServer {
        token_server: String,
        requested: String,
    },
    #[error(
        "server {0} is already enrolled; re-enrolling it (a reinstall, which revokes its agent) needs a token made for it: blockferry-receiver token create --server {0} --reinstall"
    )]
    ServerExists(String),
    #[error(
        "the token re-enrolls server {0}, which this receiver does not know; a new server needs a token without --reinstall"
    )]
    NothingToReinstall(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

impl TokenRefusal {
    /// The reason label of `blockferry_enrollment_refusals_total`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unknown => "unknown_token",
            Self::Expired => "expired",
            Self::UsedUp => "used_up",
            Self::Revoked => "revoked",
            Self::WrongServer { .. } => "wrong_server",
            Self::ServerExists(_) => "server_exists",
            Self::NothingToReinstall(_) => "nothing_to_reinstall",
            Self::Catalog(_) => "catalog_error",
        }
    }
}

/// Compares secrets without leaking where they differ through timing.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Catalog {
    /// Revokes `agent_id` for good. Returns the server it last connected for, if any
    /// (an agent that never connected can be revoked too).
    pub fn revoke_agent(&self, agent_id: &str) -> Result<Option<String>, CatalogError> {
        let txn = self.db.begin_write()?;
        let mut server = None;
        {
            let servers = txn.open_table(SERVERS)?;
            for entry in servers.iter()? {
                let (key, value) = entry?;
                let record: ServerRecord = decode(key.value(), value.value())?;
                if record.agent_id == agent_id {
                    server = Some(record.server_id);
                }
            }
            let mut revoked = txn.open_table(REVOKED)?;
            if revoked.get(agent_id)?.is_none() {
                revoked.insert(agent_id, now())?;
            }
        }
        txn.commit()?;
        Ok(server)
    }

    /// Stores a new enrollment token (its secret's hash, never the secret). A token bound
    /// to a server must fit what the catalog knows now: a reinstall token needs the
    /// server, a new-server token needs its id free (both are checked again at
    /// enrollment).
    pub fn add_token(&self, record: &TokenRecord) -> Result<(), TokenRefusal> {
        let txn = self.db.begin_write().map_err(CatalogError::from)?;
        if let Some(server) = &record.server {
            let known = txn
                .open_table(SERVERS)
                .map_err(CatalogError::from)?
                .get(server.as_str())
                .map_err(CatalogError::from)?
                .is_some()
                || txn
                    .open_table(ENROLLED)
                    .map_err(CatalogError::from)?
                    .get(server.as_str())
                    .map_err(CatalogError::from)?
                    .is_some();
            match (known, record.reinstall) {
                (true, false) => return Err(TokenRefusal::ServerExists(server.clone())),
                (false, true) => return Err(TokenRefusal::NothingToReinstall(server.clone())),
                _ => {}
            }
        }
        txn.open_table(TOKENS)
            .map_err(CatalogError::from)?
            .insert(record.id.as_str(), encode(record).as_slice())
            .map_err(CatalogError::from)?;
        txn.commit().map_err(CatalogError::from)?;
        Ok(())
    }

    /// Enrolls `identity` with the token whose secret hashes to `secret_sha256`, in one
    /// transaction: checks that the token exists, is not revoked, expired or used up, and
    /// that it may enroll this server — a token bound to a server enrolls only that one; a
    /// server the catalog knows (it connected, or was enrolled) can only be re-enrolled by
    /// a reinstall token made for it, which revokes its previous agents — then counts the
    /// use and records the server's new agent. Nothing is written if anything is refused.
    pub fn enroll(
        &self,
        secret_sha256: &str,
        identity: &AgentIdentity,
    ) -> Result<Enrollment, TokenRefusal> {
        let txn = self.db.begin_write().map_err(CatalogError::from)?;
        let enrollment = {
            let mut tokens = txn.open_table(TOKENS).map_err(CatalogError::from)?;
            let id = token_id(secret_sha256);
            let record = match tokens.get(id.as_str()).map_err(CatalogError::from)? {
                Some(raw) => decode::<TokenRecord>(&id, raw.value())?,
                None => return Err(TokenRefusal::Unknown),
            };
            // The id is a prefix of the hash; the whole hash must match.
            if !constant_time_eq(record.secret_sha256.as_bytes(), secret_sha256.as_bytes()) {
                return Err(TokenRefusal::Unknown);
            }
            if record.revoked {
                return Err(TokenRefusal::Revoked);
            }
            if now() >= record.expires {
                return Err(TokenRefusal::Expired);
            }
            if record.used >= record.uses {
                return Err(TokenRefusal::UsedUp);
            }
            let server = identity.server_id.as_str();
            if let Some(bound) = record.server.as_deref().filter(|&b| b != server) {
                return Err(TokenRefusal::WrongServer {
                    token_server: bound.to_owned(),
                    requested: server.to_owned(),
                });
            }
            let servers = txn.open_table(SERVERS).map_err(CatalogError::from)?;
            let mut enrolled = txn.open_table(ENROLLED).map_err(CatalogError::from)?;
            let connected_agent = match servers.get(server).map_err(CatalogError::from)? {
                Some(raw) => Some(decode::<ServerRecord>(server, raw.value())?.agent_id),
                None => None,
            };
            let enrolled_agent = match enrolled.get(server).map_err(CatalogError::from)? {
                Some(raw) => Some(decode::<EnrolledRecord>(server, raw.value())?.agent_id),
                None => None,
            };
            let known = connected_agent.is_some() || enrolled_agent.is_some();
            match (known, record.reinstall) {
                (true, false) => return Err(TokenRefusal::ServerExists(server.to_owned())),
                (false, true) => {
                    return Err(TokenRefusal::NothingToReinstall(server.to_owned()));
                }
                _ => {}
            }
            let mut revoked: Vec<String> =
                connected_agent.into_iter().chain(enrolled_agent).collect();
            revoked.sort();
            revoked.dedup();
            let mut revoked_table = txn.open_table(REVOKED).map_err(CatalogError::from)?;
            for agent in &revoked {
                if revoked_table
                    .get(agent.as_str())
                    .map_err(CatalogError::from)?
                    .is_none()
                {
                    revoked_table
                        .insert(agent.as_str(), now())
                        .map_err(CatalogError::from)?;
                }
            }
            enrolled
                .insert(
                    server,
                    encode(&EnrolledRecord {
                        agent_id: identity.agent_id.clone(),
                        enrolled_at: now(),
                        token: record.id.clone(),
                    })
                    .as_slice(),
                )
                .map_err(CatalogError::from)?;
            let mut record = record;
            record.used += 1;
            tokens
                .insert(id.as_str(), encode(&record).as_slice())
                .map_err(CatalogError::from)?;
            Enrollment {
                token: record,
                revoked,
            }
        };
        txn.commit().map_err(CatalogError::from)?;
        Ok(enrollment)
    }

    /// Whether `server_id` is known: it connected, or the control API enrolled it.
    pub fn server_known(&self, server_id: &str) -> Result<bool, CatalogError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(SERVERS)?.get(server_id)?.is_some()
            || txn.open_table(ENROLLED)?.get(server_id)?.is_some())
    }

    pub fn tokens(&self) -> Result<Vec<TokenRecord>, CatalogError> {
        let txn = self.db.begin_read()?;
        let tokens = txn.open_table(TOKENS)?;
        let mut out = Vec::new();
        for entry in tokens.iter()? {
            let (key, value) = entry?;
            out.push(decode(key.value(), value.value())?);
        }
        out.sort_by_key(|t: &TokenRecord| t.created);
        Ok(out)
    }

    /// Revokes token `id`; returns whether it existed.
    pub fn revoke_token(&self, id: &str) -> Result<bool, CatalogError> {
        let txn = self.db.begin_write()?;
        let found = {
            let mut tokens = txn.open_table(TOKENS)?;
            let record = match tokens.get(id)? {
                Some(raw) => Some(decode::<TokenRecord>(id, raw.value())?),
                None => None,
            };
            match record {
                Some(mut record) => {
                    record.revoked = true;
                    tokens.insert(id, encode(&record).as_slice())?;
                    true
                }
                None => false,
            }
        };
        txn.commit()?;
        Ok(found)
    }

    /// Every revoked agent id.
    pub fn revoked_agents(&self) -> Result<Vec<String>, CatalogError> {
        let txn = self.db.begin_read()?;
        let revoked = txn.open_table(REVOKED)?;
        let mut out = Vec::new();
        for entry in revoked.iter()? {
            out.push(entry?.0.value().to_owned());
        }
        Ok(out)
    }
}
