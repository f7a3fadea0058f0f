//! Outbound connections through an HTTP proxy: `https_proxy` (or `HTTPS_PROXY`) names
//! it, `no_proxy` (or `NO_PROXY`) lists hosts reached directly. Every connection the
//! agent opens — enrollment, renewal, each replication stream — is tunnelled with HTTP
//! CONNECT; TLS then runs end to end through the tunnel, so the proxy sees no data.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest CONNECT answer header read from a proxy.
const MAX_PROXY_ANSWER: usize = 8 << 10;

/// A proxy as `https_proxy` names it: `[http://][user:password@]host:port[/]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    /// HOST:PORT of the proxy.
    pub address: String,
    /// `user:password`, sent as Basic proxy authorization.
    credentials: Option<String>,
}

/// Why a CONNECT through the proxy failed. `Refused` says which port to allow.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot reach the proxy {proxy}")]
    Connect {
        proxy: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "the proxy {proxy} refused CONNECT to {target} ({status}): allow CONNECT to port {port} in the proxy (e.g. tinyproxy's ConnectPort, squid's SSL_ports)"
    )]
    Refused {
        proxy: String,
        target: String,
        port: String,
        status: String,
    },
    #[error("the proxy {proxy} answered CONNECT with something that is not HTTP: {why}")]
    BadAnswer { proxy: String, why: String },
    #[error("https_proxy {0:?} is not usable: expected [http://][user:password@]host:port")]
    BadSetting(String),
}

impl ProxyError {
    /// Whether trying again may help: a proxy that refuses by policy (403, 405) will
    /// refuse again; one that is down or overloaded may not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Refused { status, .. } => !(status.contains(" 403") || status.contains(" 405")),
            Self::BadSetting(_) => false,
            _ => true,
        }
    }
}

impl Proxy {
    /// Parses an `https_proxy` value.
    pub fn parse(value: &str) -> Result<Self, ProxyError> {
        let bad = || ProxyError::BadSetting(value.to_owned());
        let rest = value.trim();
        let rest = match rest.split_once("://") {
            Some(("http" | "HTTP", rest)) => rest,
            Some(_) => return Err(bad()),
            None => rest,
        };
        let rest = rest.trim_end_matches('/');
        let (credentials, address) = match rest.rsplit_once('@') {
            Some((credentials, address)) => (Some(credentials.to_owned()), address),
            None => (None, rest),
        };
        let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() || address.contains('/') {
            return Err(bad());
        }
        Ok(Self {
            address: address.to_owned(),
            credentials,
        })
    }

    /// The proxy to use for `target` (HOST:PORT) under the process's environment, if any.
    pub fn for_target(target: &str) -> Result<Option<Self>, ProxyError> {
        let setting = std::env::var("https_proxy")
            .or_else(|_| std::env::var("HTTPS_PROXY"))
            .ok()
            .filter(|v| !v.trim().is_empty());
        let Some(setting) = setting else {
            return Ok(None);
        };
        let no_proxy = std::env::var("no_proxy")
            .or_else(|_| std::env::var("NO_PROXY"))
            .unwrap_or_default();
        if bypasses(&no_proxy, host_of(target)) {
            return Ok(None);
        }
        Self::parse(&setting).map(Some)
    }

    /// Opens a tunnel to `target` through this proxy.
    pub async fn connect(&self, target: &str) -> Result<TcpStream, ProxyError> {
        let mut tcp =
            TcpStream::connect(&self.address)
                .await
                .map_err(|source| ProxyError::Connect {
                    proxy: self.address.clone(),
                    source,
                })?;
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(credentials) = &self.credentials {
            request.push_str(&format!(
                "Proxy-Authorization: Basic {}\r\n",
                base64(credentials.as_bytes())
            ));
        }
        request.push_str("\r\n");
        let io = |source| ProxyError::Connect {
            proxy: self.address.clone(),
            source,
        };
        tcp.write_all(request.as_bytes()).await.map_err(io)?;
        // Read the answer header byte by byte: nothing after it may be consumed, it
        // belongs to the TLS handshake.
        let mut answer = Vec::with_capacity(256);
        while !answer.ends_with(b"\r\n\r\n") {
            if answer.len() >= MAX_PROXY_ANSWER {
                return Err(ProxyError::BadAnswer {
                    proxy: self.address.clone(),
                    why: "header too long".into(),
                });
            }
            let byte = tcp.read_u8().await.map_err(io)?;
            answer.push(byte);
        }
        let text = String::from_utf8_lossy(&answer);
        let status = text.lines().next().unwrap_or_default().trim().to_owned();
        let code = status.split_whitespace().nth(1).unwrap_or_default();
        if !status.starts_with("HTTP/1.") || code.len() != 3 {
            return Err(ProxyError::BadAnswer {
                proxy: self.address.clone(),
                why: status,
            });
        }
        if !code.starts_with('2') {
            return Err(ProxyError::Refused {
                proxy: self.address.clone(),
                target: target.to_owned(),
                port: target.rsplit_once(':').map_or("?", |(_, p)| p).to_owned(),
                status,
            });
        }
        Ok(tcp)
    }
}

/// A TCP connection to `target`, through the proxy the environment names when it does.
pub async fn connect(target: &str) -> Result<TcpStream, ConnectError> {
    match Proxy::for_target(target)? {
        Some(proxy) => {
            tracing::debug!(proxy = %proxy.address, %target, "connecting through the proxy");
            Ok(proxy.connect(target).await?)
        }
        None => TcpStream::connect(target)
            .await
            .map_err(ConnectError::Direct),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Direct(io::Error),
    #[error(transparent)]
    Proxy(#[from] ProxyError),
}

fn host_of(target: &str) -> &str {
    let host = target.rsplit_once(':').map_or(target, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Whether `no_proxy` exempts `host`: `*`, the host itself, or a domain it is in
/// (`example.com` and `.example.com` both cover `a.example.com`). Ports are ignored.
fn bypasses(no_proxy: &str, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    no_proxy.split(',').map(str::trim).any(|entry| {
        let entry = entry
            .split(':')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let domain = entry.trim_start_matches('.');
        !entry.is_empty()
            && (entry == "*" || host == domain || host.ends_with(&format!(".{domain}")))
    })
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_settings_parse_with_or_without_scheme_slash_and_credentials() {
        for value in [
            "http://proxy.lan:3128",
            "http://proxy.lan:3128/",
            "proxy.lan:3128",
            "HTTP://proxy.lan:3128/",
        ] {
            let proxy = Proxy::parse(value).unwrap();
            assert_eq!(proxy.address, "proxy.lan:3128", "{value}");
            assert_eq!(proxy.credentials, None);
        }
        let proxy = Proxy::parse("http://bob:s3cr:t@proxy.lan:3128/").unwrap();
        assert_eq!(proxy.address, "proxy.lan:3128");
        assert_eq!(proxy.credentials.as_deref(), Some("bob:s3cr:t"));
        for bad in [
            "https://proxy:3128",
            "proxy",
            "proxy:",
            "proxy:http",
            ":3128",
            "socks5://p:1",
        ] {
            assert!(Proxy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_proxy_matches_hosts_and_domains() {
        let list = "localhost, .internal.example, corp.example:8443,10.0.0.5";
        assert!(bypasses(list, "localhost"));
        assert!(bypasses(list, "rx.internal.example"));
        assert!(bypasses(list, "a.corp.example"));
        assert!(bypasses(list, "corp.example"));
        assert!(bypasses(list, "10.0.0.5"));
        assert!(!bypasses(list, "example.com"));
        assert!(!bypasses(list, "notcorp.example"));
        assert!(bypasses("*", "anything"));
        assert!(!bypasses("", "anything"));
        assert_eq!(host_of("[::1]:1500"), "::1");
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
    }
}
