//! Revoked certificate holders: an operator's `agent revoke ID` (or `admin revoke ID`) is
//! recorded in the catalog, refuses every later handshake of that agent or admin (the TLS
//! verifier checks the revoked set after the CA chain, so the client gets a
//! `certificate_revoked` alert), and ends an agent's live session. Agent and admin ids are
//! both random 128-bit ids, so one set holds both.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::pki::{AdminIdentity, AgentIdentity};

/// The agent and admin ids refused at the handshake, shared by the verifier and the
/// admin commands.
#[derive(Debug, Default)]
pub struct Revocations {
    agents: RwLock<HashSet<String>>,
}

impl Revocations {
    pub fn new(agents: impl IntoIterator<Item = String>) -> Self {
        Self {
            agents: RwLock::new(agents.into_iter().collect()),
        }
    }

    pub fn is_revoked(&self, agent_id: &str) -> bool {
        self.agents
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .contains(agent_id)
    }

    pub fn insert(&self, agent_id: &str) {
        self.agents
            .write()
            .unwrap_or_else(|poison| poison.into_inner())
            .insert(agent_id.to_owned());
    }
}

/// The CA's verdict first (chain, validity, usage), then the revoked set.
#[derive(Debug)]
pub(crate) struct RevocationCheckingVerifier {
    pub(crate) inner: Arc<dyn ClientCertVerifier>,
    pub(crate) revoked: Arc<Revocations>,
}

impl ClientCertVerifier for RevocationCheckingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    // Optional on the control port (enrollment has no certificate yet), required on 1500.
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        // A certificate without an identity is refused later, with its own reason.
        let id = AgentIdentity::from_certificate(end_entity)
            .map(|agent| agent.agent_id)
            .or_else(|_| AdminIdentity::from_certificate(end_entity).map(|admin| admin.admin_id));
        if let Ok(id) = id
            && self.revoked.is_revoked(&id)
        {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
