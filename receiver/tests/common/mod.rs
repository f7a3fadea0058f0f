//! Helpers shared by the receiver's end-to-end tests: a receiver in a temp dir, agent
//! credentials, generated images, an in-process agent, and a TCP proxy that cuts.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use blockferry_agent::{Agent, AgentConfig, AgentReport, Credentials, Volume};
use blockferry_receiver::demo::{ImageLayout, first_difference, generate_image};
use blockferry_receiver::{Receiver, ReceiverConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub const SERVER: &str = "test-server";

pub fn receiver_config(data_dir: &Path) -> ReceiverConfig {
    let mut config = ReceiverConfig::new(data_dir);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config
}

pub async fn start_receiver(data_dir: &Path) -> Receiver {
    Receiver::start(receiver_config(data_dir))
        .await
        .expect("receiver starts")
}

/// Issues credentials for `server` from the CA in `data_dir`, into a fresh directory.
pub fn credentials(data_dir: &Path, server: &str, out: &Path) -> Credentials {
    blockferry_receiver::pki::write_agent_credentials(
        data_dir,
        server,
        out,
        time::Duration::days(1),
    )
    .expect("credentials issued");
    Credentials::load(out).expect("credentials load")
}

/// An image of `size` bytes with `random_fraction` random data in regions of `region`.
pub fn image(
    dir: &Path,
    name: &str,
    size: u64,
    random_fraction: f64,
    region: u64,
    seed: u64,
) -> (PathBuf, u64) {
    let path = dir.join(name);
    let non_zero = generate_image(
        &path,
        size,
        ImageLayout {
            random_fraction,
            region,
            seed,
        },
    )
    .expect("image generated");
    (path, non_zero)
}

pub fn agent_config(addr: impl ToString, credentials: Credentials) -> AgentConfig {
    let mut config = AgentConfig::new(addr.to_string(), credentials);
    config.exit_when_synced = true;
    config.initial_backoff = Duration::from_millis(100);
    config.max_backoff = Duration::from_millis(800);
    config
}

/// Runs an agent to completion (synced), failing the test after `limit`.
pub async fn sync(config: &AgentConfig, volumes: &[Volume], limit: Duration) -> AgentReport {
    let agent = Agent::new(volumes);
    tokio::time::timeout(limit, agent.run(config, volumes, CancellationToken::new()))
        .await
        .expect("agent finished in time")
        .expect("agent succeeded")
}

pub fn volume(name: &str, path: &Path) -> Volume {
    Volume::open(&format!("{name}={}", path.display())).expect("volume opens")
}

pub fn staging_image(data_dir: &Path, server: &str, disk: &str) -> PathBuf {
    data_dir
        .join("images")
        .join(server)
        .join(format!("{disk}.img"))
}

pub fn assert_identical(source: &Path, staging: &Path) {
    let diff = first_difference(source, staging).expect("both images readable");
    assert_eq!(
        diff,
        None,
        "{} differs from {}",
        staging.display(),
        source.display()
    );
}

/// A loopback TCP proxy to `target` that, once, drops both sides of the first connection
/// after forwarding `cut_after` bytes from client to server. Later connections pass.
pub struct CutProxy {
    pub addr: SocketAddr,
    pub cuts: Arc<AtomicU64>,
}

impl CutProxy {
    pub async fn start(target: SocketAddr, cut_after: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cuts = Arc::new(AtomicU64::new(0));
        let armed = Arc::new(AtomicBool::new(true));
        let cuts_task = Arc::clone(&cuts);
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let limit = if armed.swap(false, Ordering::SeqCst) {
                    Some(cut_after)
                } else {
                    None
                };
                let cuts = Arc::clone(&cuts_task);
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let down = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    });
                    let mut buf = vec![0u8; 64 << 10];
                    let mut forwarded = 0u64;
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if limit.is_some_and(|limit| forwarded + n as u64 >= limit) {
                            cuts.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        forwarded += n as u64;
                    }
                    down.abort();
                });
            }
        });
        Self { addr, cuts }
    }
}
