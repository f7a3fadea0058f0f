//! Helpers shared by the receiver's end-to-end tests: a receiver in a temp dir, agent
//! credentials, generated images, an in-process agent, and a TCP proxy that cuts.
#![allow(dead_code)]

pub mod ebs;
pub mod guest;
pub mod mount;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use blockferry_agent::{Agent, AgentConfig, AgentReport, Credentials, Volume};
use blockferry_receiver::demo::{ImageLayout, first_difference, generate_image};
use blockferry_receiver::{Receiver, ReceiverConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
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

/// A loopback TCP proxy to `target`: for every accepted connection, `on_connection` is
/// called (at accept time) with the client's and the server's halves, and the future it
/// returns runs for that connection. Tests use it to cut, throttle or delay traffic.
pub async fn loopback_proxy<F, Fut>(target: SocketAddr, on_connection: F) -> SocketAddr
where
    F: Fn(OwnedReadHalf, OwnedWriteHalf, OwnedReadHalf, OwnedWriteHalf) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(server) = TcpStream::connect(target).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(on_connection(cr, cw, sr, sw));
        }
    });
    addr
}

/// Forwards agent→receiver bytes at about `rate` bytes/s while `throttled` is set.
pub async fn throttling_proxy(
    target: SocketAddr,
    rate: u64,
    throttled: Arc<AtomicBool>,
) -> SocketAddr {
    loopback_proxy(target, move |mut cr, mut cw, mut sr, mut sw| {
        let throttled = Arc::clone(&throttled);
        async move {
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
            let mut buf = vec![0u8; 16 << 10];
            while let Ok(n) = cr.read(&mut buf).await {
                if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                if throttled.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
                }
            }
        }
    })
    .await
}

/// A proxy that, once, drops every connection it carries as soon as `cut_after` bytes in
/// all have gone from clients to the server (an agent's streams break together, as when a
/// network link goes down). Later connections pass.
pub struct CutProxy {
    pub addr: SocketAddr,
    pub cuts: Arc<AtomicU64>,
}

impl CutProxy {
    pub async fn start(target: SocketAddr, cut_after: u64) -> Self {
        let cuts = Arc::new(AtomicU64::new(0));
        let forwarded = Arc::new(AtomicU64::new(0));
        let cut = CancellationToken::new();
        let cuts_task = Arc::clone(&cuts);
        let addr = loopback_proxy(target, move |mut cr, mut cw, mut sr, mut sw| {
            let armed = !cut.is_cancelled();
            let (cut, cuts, forwarded) =
                (cut.clone(), Arc::clone(&cuts_task), Arc::clone(&forwarded));
            async move {
                let down = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = tokio::select! {
                        () = cut.cancelled(), if armed => break,
                        read = cr.read(&mut buf) => match read {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        },
                    };
                    if armed {
                        let total = forwarded.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                        if total >= cut_after {
                            if !cut.is_cancelled() {
                                cuts.fetch_add(1, Ordering::SeqCst);
                                cut.cancel();
                            }
                            break;
                        }
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                down.abort();
            }
        })
        .await;
        Self { addr, cuts }
    }
}

/// A raw protocol client: one TLS stream speaking frames, for tests that play a
/// misbehaving or hand-driven agent.
pub struct RawStream {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    buf: blockferry_proto::FrameBuffer,
}

impl RawStream {
    pub async fn connect(addr: SocketAddr, credentials: &Credentials) -> Self {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(credentials.client_config());
        let stream = connector
            .connect(Credentials::server_name(), tcp)
            .await
            .unwrap();
        Self {
            stream,
            buf: blockferry_proto::FrameBuffer::new(),
        }
    }

    pub async fn send(&mut self, frame: &blockferry_proto::Frame) {
        self.send_bytes(&frame.to_bytes()).await;
    }

    /// Sends bytes as they are: for frames no encoder would produce.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// The next frame, or None if the receiver closed the stream (or said nothing for 10 s).
    pub async fn next(&mut self) -> Option<blockferry_proto::Frame> {
        loop {
            if let Ok(Some(frame)) = self.buf.next_frame() {
                return Some(frame);
            }
            let read =
                tokio::time::timeout(Duration::from_secs(10), self.stream.read(self.buf.spare()))
                    .await;
            match read {
                Ok(Ok(n)) if n > 0 => self.buf.filled(n),
                _ => return None,
            }
        }
    }
}

/// A Hello for one disk named `d` of `size` bytes.
pub fn raw_hello(size: u64, streams: u8) -> blockferry_proto::Frame {
    blockferry_proto::Frame::Hello(blockferry_proto::Hello {
        agent_version: "raw".into(),
        inventory: blockferry_proto::Inventory::default(),
        disks: vec![blockferry_proto::DiskSpec {
            name: "d".into(),
            size,
        }],
        streams,
        series: [0x5a; 16],
        resume: blockferry_proto::ResumeClaim::Live,
    })
}

/// A small deterministic generator for test workloads (xorshift64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Polls `probe` until it returns a value, failing the test after `limit`: tests wait
/// on conditions, never on fixed sleeps.
pub async fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the agent reports every disk's initial sync durable, failing after 120 s.
pub async fn wait_synced(stats: &blockferry_agent::AgentStats) {
    tokio::time::timeout(Duration::from_secs(120), async {
        while !stats.synced.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the initial sync completes");
}

/// Starts the receiver binary on `127.0.0.1:port` (so that it can be SIGKILLed and
/// restarted at the same address) and waits until it listens.
/// A receiver process, killed when dropped: a test that fails leaves none behind.
pub struct ReceiverProcess(pub std::process::Child);

impl std::ops::Deref for ReceiverProcess {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for ReceiverProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for ReceiverProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn_receiver(data: &Path, port: u16, extra_args: &[&str]) -> ReceiverProcess {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_blockferry-receiver"))
        .args(["run", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(data)
        .args(extra_args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("receiver binary starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "receiver did not start listening"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    ReceiverProcess(child)
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
