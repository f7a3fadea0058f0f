//! The control API's JSON bodies (HTTPS, on the receiver's control port). Field names are
//! an interface between agents and receivers of different versions: documented in the
//! README and kept stable; unknown fields are ignored.

use serde::{Deserialize, Serialize};

/// Largest request body the control API reads.
pub const MAX_CONTROL_BODY: usize = 64 << 10;

/// `POST /v1/enroll`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnrollRequest {
    /// The whole token as `token create` printed it.
    pub token: String,
    /// A PKCS#10 request for the agent's own key (the key stays on the agent).
    pub csr_pem: String,
    /// The source server's stable id (machine-id or DMI product UUID).
    pub server_id: String,
    pub host_name: String,
}

/// `POST /v1/renew`, authenticated by the agent's current certificate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RenewRequest {
    pub csr_pem: String,
}

/// The answer to enroll and renew.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Issued {
    pub agent_id: String,
    pub server_id: String,
    pub certificate_pem: String,
    pub ca_pem: String,
    /// Unix seconds.
    pub not_after: u64,
    /// The replication port (the host is the one the agent reached).
    pub replication_port: u16,
}

/// Every error answer: a sentence for people.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
}
