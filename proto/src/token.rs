//! The enrollment token an operator hands to a new agent: where the receiver's control
//! API is, a one-time secret, and the SHA-256 fingerprint of the receiver's CA, so the
//! agent can verify the receiver before it sends anything (no trust on first use).
//!
//! Text form: `bft1_<hex of the address>_<64 hex: secret>_<64 hex: CA fingerprint>`;
//! hex keeps it one word that survives shells, URLs and copy-paste.

use std::fmt;

const PREFIX: &str = "bft1";
/// Longest address hint (host:port) a token may carry.
pub const MAX_TOKEN_ADDRESS: usize = 255;

#[derive(Clone, PartialEq, Eq)]
pub struct EnrollmentToken {
    /// The control API's address as the operator gave it, HOST:PORT.
    pub address: String,
    pub secret: [u8; 32],
    /// SHA-256 of the receiver CA certificate (DER).
    pub ca_fingerprint: [u8; 32],
}

/// Why a token's text is not a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a blockferry enrollment token: {0} (expected bft1_<address>_<secret>_<fingerprint>, as printed by `blockferry-receiver token create`)"
)]
pub struct TokenFormatError(&'static str);

impl EnrollmentToken {
    pub fn parse(text: &str) -> Result<Self, TokenFormatError> {
        let mut parts = text.trim().split('_');
        if parts.next() != Some(PREFIX) {
            return Err(TokenFormatError("wrong prefix"));
        }
        let address = parts.next().ok_or(TokenFormatError("no address"))?;
        let secret = parts.next().ok_or(TokenFormatError("no secret"))?;
        let fingerprint = parts.next().ok_or(TokenFormatError("no CA fingerprint"))?;
        if parts.next().is_some() {
            return Err(TokenFormatError("trailing fields"));
        }
        if address.len() > 2 * MAX_TOKEN_ADDRESS {
            return Err(TokenFormatError("address too long"));
        }
        let address = String::from_utf8(unhex(address).ok_or(TokenFormatError("bad address"))?)
            .map_err(|_| TokenFormatError("bad address"))?;
        if address.is_empty() || address.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(TokenFormatError("bad address"));
        }
        Ok(Self {
            address,
            secret: unhex32(secret).ok_or(TokenFormatError("bad secret"))?,
            ca_fingerprint: unhex32(fingerprint).ok_or(TokenFormatError("bad CA fingerprint"))?,
        })
    }
}

impl fmt::Display for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}_{}_{}_{}",
            hex(self.address.as_bytes()),
            hex(&self.secret),
            hex(&self.ca_fingerprint)
        )
    }
}

/// The secret stays out of logs and debug output.
impl fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollmentToken")
            .field("address", &self.address)
            .field("ca_fingerprint", &hex(&self.ca_fingerprint))
            .finish_non_exhaustive()
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn unhex32(text: &str) -> Option<[u8; 32]> {
    unhex(text)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_hides_its_secret() {
        let token = EnrollmentToken {
            address: "receiver.example:8443".into(),
            secret: [7; 32],
            ca_fingerprint: [9; 32],
        };
        let text = token.to_string();
        assert_eq!(EnrollmentToken::parse(&text).unwrap(), token);
        assert_eq!(
            EnrollmentToken::parse(&format!(" {text}\n")).unwrap(),
            token
        );
        assert!(!format!("{token:?}").contains(&hex(&[7; 32])));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = EnrollmentToken {
            address: "r:8443".into(),
            secret: [1; 32],
            ca_fingerprint: [2; 32],
        }
        .to_string();
        let cut = &good[..good.len() - 2];
        let extra = format!("{good}_00");
        let odd = good.replacen("bft1_", "bft1_0", 1);
        for bad in [
            "",
            "bft1",
            "bft2_00_00_00",
            cut,
            &extra,
            &odd,
            &good.replace('1', "g"),
        ] {
            assert!(EnrollmentToken::parse(bad).is_err(), "{bad:?}");
        }
    }
}
