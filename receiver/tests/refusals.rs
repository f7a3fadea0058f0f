//! Port 1500 refuses everything but TLS 1.3 with a client certificate from the
//! receiver's CA, and a session refuses frames that break the rules — each with a clear
//! log line, and without disturbing an agent replicating at the same time.

mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use blockferry_proto::{
    DiskSpec, ErrorCode, Frame, FrameBuffer, Hello, Inventory, WriteFlags, WriteHeader,
    encode_write,
};
use blockferry_receiver::tls::RefusalReason;
use common::*;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Log lines of this test binary, captured from a global subscriber.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buf);
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || LogSink(Arc::clone(&sink)))
            .init();
        buf
    })
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn wait_for_log(needle: &str) -> String {
    for _ in 0..200 {
        let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
        if text.contains(needle) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    panic!("no log line containing {needle:?}; logs:\n{text}");
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(ca_pem: &std::path::Path) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        blockferry_receiver::pki::pem_certificates(&std::fs::read_to_string(ca_pem).unwrap())
    {
        roots.add(cert).unwrap();
    }
    roots
}

/// A TLS client with the given versions and, optionally, the credentials in `creds`.
fn client(
    ca: &std::path::Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
    creds: Option<&std::path::Path>,
) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots(ca));
    let config = match creds {
        Some(dir) => {
            let chain = blockferry_receiver::pki::pem_certificates(
                &std::fs::read_to_string(dir.join("agent.crt")).unwrap(),
            );
            let key =
                rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("agent.key")).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

fn name() -> ServerName<'static> {
    ServerName::try_from("blockferry-receiver").unwrap()
}

/// Reads (an alert, say) until the receiver closes; true if it closed or failed the
/// connection within the time limit, as a refused client sees it.
async fn is_closed_by_receiver(mut stream: impl tokio::io::AsyncRead + Unpin) -> bool {
    let mut buf = [0u8; 1024];
    let closed = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .is_ok()
}

/// Frames the receiver sends until it closes the connection.
async fn frames_until_close(mut stream: impl tokio::io::AsyncRead + Unpin) -> Vec<Frame> {
    let mut fb = FrameBuffer::new();
    let mut frames = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(fb.spare())).await {
            Ok(Ok(0) | Err(_)) | Err(_) => return frames,
            Ok(Ok(n)) => fb.filled(n),
        }
        while let Ok(Some(f)) = fb.next_frame() {
            frames.push(f);
        }
    }
}

fn hello(disk_size: u64) -> Frame {
    Frame::Hello(Hello {
        agent_version: "attacker".into(),
        inventory: Inventory::default(),
        disks: vec![DiskSpec {
            name: "d".into(),
            size: disk_size,
        }],
        streams: 1,
        series: [1; 16],
        resume: blockferry_proto::ResumeClaim::Live,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_are_refused_without_disturbing_a_healthy_agent() {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let addr: SocketAddr = receiver.local_addr();
    let ca = data.join("pki").join("ca.crt");

    // The healthy agent replicates throughout.
    let healthy_creds = credentials(&data, SERVER, &dir.path().join("healthy"));
    let (source, _) = image(dir.path(), "src.img", 512 << 20, 0.7, 1 << 20, 3);
    let volumes = vec![volume("disk0", &source)];
    let config = agent_config(addr, healthy_creds);
    let agent = blockferry_agent::Agent::new(&volumes);
    let healthy_stats = agent.stats().clone();
    let healthy = tokio::spawn(async move {
        agent
            .run(
                &config,
                &volumes,
                tokio_util::sync::CancellationToken::new(),
            )
            .await
            .expect("the healthy agent succeeds")
    });
    while healthy_stats.durable_bytes() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // 1. Plaintext TCP.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(is_closed_by_receiver(tcp).await);
    wait_for_log("reason=\"not_tls\"").await;

    // 2. TLS 1.3 without a client certificate.
    let tls = client(&ca, &[&rustls::version::TLS13], None)
        .connect(name(), TcpStream::connect(addr).await.unwrap())
        .await;
    if let Ok(stream) = tls {
        assert!(is_closed_by_receiver(stream).await);
    }
    wait_for_log("reason=\"no_client_certificate\"").await;

    // 3. A certificate from another CA.
    let other = dir.path().join("other-receiver");
    let foreign = dir.path().join("foreign");
    blockferry_receiver::pki::write_agent_credentials(
        &other,
        "intruder",
        &foreign,
        time::Duration::days(1),
    )
    .unwrap();
    let tls = client(&ca, &[&rustls::version::TLS13], Some(&foreign))
        .connect(name(), TcpStream::connect(addr).await.unwrap())
        .await;
    if let Ok(stream) = tls {
        assert!(is_closed_by_receiver(stream).await);
    }
    wait_for_log("reason=\"unknown_issuer\"").await;

    // 4. TLS 1.2, even with valid credentials.
    let attacker = dir.path().join("attacker");
    credentials(&data, "attacker", &attacker);
    let tls12 = client(&ca, &[&rustls::version::TLS12], Some(&attacker))
        .connect(name(), TcpStream::connect(addr).await.unwrap())
        .await;
    assert!(tls12.is_err(), "a TLS 1.2 handshake must fail");
    wait_for_log("reason=\"protocol_version\"").await;
    // The same with a real OpenSSL client, where one is installed.
    if let Ok(out) = std::process::Command::new("openssl")
        .args(["s_client", "-tls1_2", "-connect", &addr.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
    {
        assert!(
            !out.status.success(),
            "openssl s_client -tls1_2 connected: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    let connector = client(&ca, &[&rustls::version::TLS13], Some(&attacker));

    // 5. Garbage after a valid handshake.
    let mut s = connector
        .connect(name(), TcpStream::connect(addr).await.unwrap())
        .await
        .unwrap();
    s.write_all(b"\x00\x01garbage that is not a frame")
        .await
        .unwrap();
    s.flush().await.unwrap();
    let frames = frames_until_close(s).await;
    assert!(
        matches!(frames.last(), Some(Frame::Error(e)) if e.code == ErrorCode::PROTOCOL),
        "{frames:?}"
    );
    wait_for_log("bad magic").await;

    // 6. A frame announcing more than the size limit.
    let mut s = connector
        .connect(name(), TcpStream::connect(addr).await.unwrap())
        .await
        .unwrap();
    let mut header = vec![b'B', b'F', 1, blockferry_proto::FrameKind::HELLO.0];
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&header).await.unwrap();
    s.flush().await.unwrap();
    let frames = frames_until_close(s).await;
    assert!(
        matches!(frames.last(), Some(Frame::Error(e)) if e.code == ErrorCode::PROTOCOL),
        "{frames:?}"
    );
    wait_for_log("more than the limit").await;

    // 6b. A first frame of another kind than Hello or JoinStream: refused at its header.
    let mut s = connector
        .connect(name(), TcpStream::connect(addr).await.unwrap())
        .await
        .unwrap();
    let mut header = vec![b'B', b'F', 1, blockferry_proto::FrameKind::WRITE.0];
    header.extend_from_slice(&(1u32 << 20).to_be_bytes());
    s.write_all(&header).await.unwrap();
    s.flush().await.unwrap();
    let frames = frames_until_close(s).await;
    assert!(
        matches!(frames.last(), Some(Frame::Error(e)) if e.code == ErrorCode::PROTOCOL),
        "{frames:?}"
    );
    wait_for_log("expected Hello or JoinStream").await;

    // 7. A write beyond the end of the disk, after a valid Hello.
    let mut s = connector
        .connect(name(), TcpStream::connect(addr).await.unwrap())
        .await
        .unwrap();
    let mut out = Vec::new();
    hello(1 << 20).encode(&mut out);
    let header = WriteHeader {
        disk: 0,
        flags: WriteFlags::default(),
        offset: (1 << 20) - 100,
        len: 4096,
        epoch: 1,
    };
    encode_write(&mut out, &header, &[7u8; 4096]);
    s.write_all(&out).await.unwrap();
    s.flush().await.unwrap();
    let frames = frames_until_close(s).await;
    assert!(
        matches!(frames.first(), Some(Frame::Welcome(_))),
        "{frames:?}"
    );
    assert!(
        matches!(frames.last(), Some(Frame::Error(e)) if e.code == ErrorCode::OUT_OF_RANGE),
        "{frames:?}"
    );
    let text = wait_for_log("beyond the end of disk d").await;
    // The log line names the agent that did it.
    let line = text
        .lines()
        .find(|l| l.contains("beyond the end of disk d"))
        .unwrap();
    assert!(line.contains("server=attacker"), "{line}");
    // Nothing was written past the end, or at all.
    let staging = staging_image(&data, "attacker", "d");
    assert_eq!(std::fs::metadata(&staging).unwrap().len(), 1 << 20);
    assert!(std::fs::read(&staging).unwrap().iter().all(|&b| b == 0));

    // Counters agree with the log.
    let r = receiver.refusals();
    for reason in [
        RefusalReason::NotTls,
        RefusalReason::NoClientCertificate,
        RefusalReason::UnknownIssuer,
        RefusalReason::ProtocolVersion,
    ] {
        assert!(r.get(reason) >= 1, "{reason} not counted");
    }

    // And the healthy agent, still syncing all along, never noticed.
    let attacks_done_before_sync = !healthy_stats
        .synced
        .load(std::sync::atomic::Ordering::Relaxed);
    let report = healthy.await.unwrap();
    assert!(
        attacks_done_before_sync,
        "the attacks did not overlap the healthy sync"
    );
    assert_eq!(report.sessions, 1, "the healthy agent had to reconnect");
    assert_identical(&source, &staging_image(&data, SERVER, "disk0"));
    receiver.shutdown().await;
    let _ = std::io::stderr().flush();
}
