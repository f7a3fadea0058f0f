//! The NBD tap with real clients: qemu-io writes (patterns, overwrites, zeroes, discards)
//! through it while a disk is still in its initial sync and afterwards, and `qemu-img
//! compare` finds the source and the staging image identical. In sync mode a FLUSH
//! returns only once the receiver holds everything. Bad NBD input gets NBD error replies.

mod common;

use std::process::Command;
use std::time::Duration;

use blockferry_agent::Agent;
use blockferry_agent::nbd::{self, NbdListen, SyncMode};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

fn qemu_io(url: &str, commands: &[String]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd.arg(url).output().expect(
        "qemu-io is needed for this test: apt-get install qemu-utils (.ci/run installs it)",
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-io failed:\n{text}");
    assert!(
        !text.contains("failed"),
        "qemu-io reported a failure:\n{text}"
    );
    text
}

/// A few hundred qemu-io commands: pattern writes of mixed sizes, overwrites of a hot
/// area, write-zeroes and discards, all 512-byte aligned as a block device would see.
fn workload(rng: &mut Rng, size: u64, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            let len = [512u64, 4096, 12288, 65536, 1 << 20][(rng.next() % 5) as usize];
            let offset = if i % 4 == 0 {
                (rng.next() % 64) * 4096 // the hot area, overwritten again and again
            } else {
                (rng.next() % ((size - len) / 512)) * 512
            };
            match rng.next() % 10 {
                0 => format!("write -z {offset} {len}"),
                1 => format!("discard {offset} {len}"),
                _ => format!("write -P {} {offset} {len}", rng.next() % 255 + 1),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_through_the_tap_during_and_after_the_initial_sync() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let mut rconfig = receiver_config(&data);
    rconfig.barrier_interval = 4 << 20;
    let receiver = blockferry_receiver::Receiver::start(rconfig).await.unwrap();
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let size = 384 << 20;
    let (source, _) = image(dir.path(), "src.img", size, 0.5, 1 << 20, 21);
    let volumes = vec![volume("disk0", &source)];
    let agent = Agent::new(&volumes);
    let stop = CancellationToken::new();
    let (addr, _tap) = nbd::serve(
        &NbdListen::Tcp("127.0.0.1:0".into()),
        &nbd::NbdAccess {
            insecure_tcp: true,
            ..Default::default()
        },
        agent.capture().clone(),
        SyncMode::Sync,
        stop.clone(),
    )
    .await
    .unwrap();
    let url = format!("nbd://{addr}/disk0");
    let mut config = agent_config(receiver.local_addr(), creds);
    config.exit_when_synced = false;
    let run = tokio::spawn({
        let (agent, stop, volumes) = (agent.clone(), stop.clone(), volumes.clone());
        async move { agent.run(&config, &volumes, stop).await.unwrap() }
    });

    let mut rng = Rng(0xdead_beef);
    // During the initial sync (qemu-io runs as a blocking child process).
    let stats = agent.stats().clone();
    while stats.sent_bytes() == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let commands = workload(&mut rng, size, 300);
    let url_c = url.clone();
    let sync_running = !stats.synced.load(std::sync::atomic::Ordering::Relaxed);
    let sent_before = stats.sent_bytes();
    tokio::task::spawn_blocking(move || qemu_io(&url_c, &commands))
        .await
        .unwrap();
    assert!(
        sync_running && sent_before < size / 2,
        "the first writes were meant to land during the initial sync ({sent_before} of {size} sent)"
    );
    wait_synced(&stats).await;

    // After it, ending with a FLUSH: in sync mode it returns once the receiver has all.
    let mut commands = workload(&mut rng, size, 200);
    commands.push("flush".into());
    commands.push("read 1048576 512".into()); // reads go through the tap too
    let url_c = url.clone();
    let out = tokio::task::spawn_blocking(move || qemu_io(&url_c, &commands))
        .await
        .unwrap();
    assert!(out.contains("read 512/512 bytes"), "{out}");

    // No capture.flush() here: qemu-io's FLUSH already waited for the receiver.
    let staging = staging_image(&data, SERVER, "disk0");
    let compare = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&source)
        .arg(&staging)
        .output()
        .unwrap();
    assert!(
        compare.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&compare.stdout),
        String::from_utf8_lossy(&compare.stderr)
    );
    assert!(String::from_utf8_lossy(&compare.stdout).contains("Images are identical"));

    stop.cancel();
    run.await.unwrap();
    receiver.shutdown().await;
}

/// A minimal NBD client for feeding the tap bad input.
struct NbdClient(tokio::net::TcpStream);

impl NbdClient {
    async fn connect(addr: &str) -> Self {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert_eq!(s.read_u64().await.unwrap(), 0x4e42_444d_4147_4943);
        assert_eq!(s.read_u64().await.unwrap(), 0x4948_4156_454f_5054);
        let flags = s.read_u16().await.unwrap();
        assert_eq!(flags & 1, 1, "fixed newstyle");
        s.write_u32(1 | 2).await.unwrap();
        Self(s)
    }

    async fn option(&mut self, option: u32, data: &[u8]) {
        self.0.write_u64(0x4948_4156_454f_5054).await.unwrap();
        self.0.write_u32(option).await.unwrap();
        self.0.write_u32(data.len() as u32).await.unwrap();
        self.0.write_all(data).await.unwrap();
    }

    /// (reply type, data)
    async fn option_reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.0.read_u64().await.unwrap(), 0x0003_e889_0455_65a9);
        assert_eq!(self.0.read_u32().await.unwrap(), option);
        let kind = self.0.read_u32().await.unwrap();
        let len = self.0.read_u32().await.unwrap();
        let mut data = vec![0; len as usize];
        self.0.read_exact(&mut data).await.unwrap();
        (kind, data)
    }

    async fn request(&mut self, command: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        self.0.write_u32(0x2560_9513).await.unwrap();
        self.0.write_u16(0).await.unwrap();
        self.0.write_u16(command).await.unwrap();
        self.0.write_u64(handle).await.unwrap();
        self.0.write_u64(offset).await.unwrap();
        self.0.write_u32(len).await.unwrap();
        self.0.write_all(payload).await.unwrap();
    }

    /// (error, handle)
    async fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.0.read_u32().await.unwrap(), 0x6744_6698);
        (
            self.0.read_u32().await.unwrap(),
            self.0.read_u64().await.unwrap(),
        )
    }
}

fn go_request(name: &str) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_nbd_input_gets_error_replies_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _) = image(dir.path(), "src.img", 4 << 20, 1.0, 1 << 20, 22);
    let volumes = vec![volume("disk0", &source)];
    let agent = Agent::new(&volumes);
    let stop = CancellationToken::new();
    let (addr, _tap) = nbd::serve(
        &NbdListen::Tcp("127.0.0.1:0".into()),
        &nbd::NbdAccess {
            insecure_tcp: true,
            ..Default::default()
        },
        agent.capture().clone(),
        SyncMode::Async,
        stop.clone(),
    )
    .await
    .unwrap();

    let mut c = NbdClient::connect(&addr).await;
    c.option(99, b"whatever").await;
    assert_eq!(
        c.option_reply(99).await.0,
        (1 << 31) + 1,
        "unknown option: ERR_UNSUP"
    );
    c.option(6, &go_request("nope")).await;
    assert_eq!(
        c.option_reply(6).await.0,
        (1 << 31) + 6,
        "unknown export: ERR_UNKNOWN"
    );
    c.option(7, b"\x00\x00").await;
    assert_eq!(
        c.option_reply(7).await.0,
        (1 << 31) + 3,
        "malformed GO: ERR_INVALID"
    );
    c.option(3, &[]).await;
    let (kind, data) = c.option_reply(3).await;
    assert_eq!(
        (kind, &data[4..]),
        (2, &b"disk0"[..]),
        "LIST names the export"
    );
    assert_eq!(c.option_reply(3).await.0, 1, "LIST ends with ACK");
    c.option(7, &go_request("disk0")).await;
    let (kind, info) = c.option_reply(7).await;
    assert_eq!(kind, 3);
    assert_eq!(
        u64::from_be_bytes(info[2..10].try_into().unwrap()),
        4 << 20,
        "export size"
    );
    assert_eq!(c.option_reply(7).await.0, 3, "block size info");
    assert_eq!(c.option_reply(7).await.0, 1, "GO ends with ACK");

    // Out of range, oversized, unknown: error replies, and the connection goes on.
    c.request(0, 1, (4 << 20) - 100, 4096, &[]).await;
    assert_eq!(c.reply().await, (22, 1), "read past the end: EINVAL");
    c.request(0, 2, 0, 64 << 20, &[]).await;
    assert_eq!(c.reply().await, (75, 2), "oversized read: EOVERFLOW");
    c.request(1, 3, (4 << 20) - 10, 20, &[7u8; 20]).await;
    assert_eq!(c.reply().await, (28, 3), "write past the end: ENOSPC");
    c.request(1, 4, 0, (32 << 20) + 1, &vec![1u8; (32 << 20) + 1])
        .await;
    assert_eq!(
        c.reply().await,
        (75, 4),
        "oversized write: EOVERFLOW, payload skipped"
    );
    c.request(42, 5, 0, 0, &[]).await;
    assert_eq!(c.reply().await, (95, 5), "unknown command: ENOTSUP");
    // Nothing of the refused writes reached the volume.
    let volume = std::fs::read(&source).unwrap();
    assert!(volume[..16].iter().any(|&b| b != 1));
    // A good write and read still work.
    c.request(1, 6, 8192, 4096, &[0xAB; 4096]).await;
    assert_eq!(c.reply().await, (0, 6));
    c.request(0, 7, 8192, 4096, &[]).await;
    assert_eq!(c.reply().await, (0, 7));
    let mut back = vec![0u8; 4096];
    c.0.read_exact(&mut back).await.unwrap();
    assert_eq!(back, vec![0xAB; 4096]);
    assert!(
        agent.capture().backlog_bytes() >= 4096,
        "the write was captured"
    );
    c.request(2, 8, 0, 0, &[]).await; // DISC

    // A stream that is not NBD at all is dropped; the tap keeps serving.
    let mut junk = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut greeting = [0u8; 18];
    junk.read_exact(&mut greeting).await.unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), junk.read_to_end(&mut rest)).await;
    NbdClient::connect(&addr).await;
    stop.cancel();
}

/// A loopback proxy that delays everything the receiver sends (so its Durable
/// acknowledgements arrive `delay` late) and passes the agent's bytes straight through.
async fn slow_ack_proxy(target: std::net::SocketAddr, delay: Duration) -> std::net::SocketAddr {
    loopback_proxy(target, move |mut cr, mut cw, mut sr, mut sw| async move {
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut cr, &mut sw).await;
        });
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        tokio::spawn(async move {
            while let Some((due, bytes)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                if cw.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        });
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = sr.read(&mut buf).await {
            if n == 0
                || tx
                    .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
            {
                return;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_mode_flush_waits_for_the_receiver() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let size = 8 << 20;
    let (source, _) = image(dir.path(), "src.img", size, 0.5, 1 << 20, 23);
    let volumes = vec![volume("disk0", &source)];
    let agent = Agent::new(&volumes);
    let stop = CancellationToken::new();
    // One agent, two taps on its capture: one in each mode.
    let mut taps = Vec::new();
    for mode in [SyncMode::Sync, SyncMode::Async] {
        let (addr, _) = nbd::serve(
            &NbdListen::Tcp("127.0.0.1:0".into()),
            &nbd::NbdAccess {
                insecure_tcp: true,
                ..Default::default()
            },
            agent.capture().clone(),
            mode,
            stop.clone(),
        )
        .await
        .unwrap();
        taps.push(format!("nbd://{addr}/disk0"));
    }
    let delay = Duration::from_millis(1500);
    let proxy = slow_ack_proxy(receiver.local_addr(), delay).await;
    let mut config = agent_config(proxy, creds);
    config.exit_when_synced = false;
    let run = tokio::spawn({
        let (agent, stop, volumes) = (agent.clone(), stop.clone(), volumes.clone());
        async move { agent.run(&config, &volumes, stop).await.unwrap() }
    });
    wait_synced(agent.stats()).await;

    let timed_flush = |url: String, fill: u8| {
        tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            qemu_io(
                &url,
                &[format!("write -P {fill} 65536 4096"), "flush".into()],
            );
            started.elapsed()
        })
    };
    let sync_time = timed_flush(taps[0].clone(), 0x11).await.unwrap();
    assert!(
        sync_time >= delay,
        "a sync-mode FLUSH returned after {sync_time:?}, before the receiver's ack"
    );
    // Once the sync-mode flush returned, the receiver holds the write durably.
    let staging = std::fs::read(staging_image(&data, SERVER, "disk0")).unwrap();
    assert_eq!(&staging[65536..65536 + 4096], &[0x11; 4096][..]);

    let async_time = timed_flush(taps[1].clone(), 0x22).await.unwrap();
    assert!(
        async_time < delay,
        "an async-mode FLUSH waited {async_time:?} for the receiver"
    );
    stop.cancel();
    run.await.unwrap();
    receiver.shutdown().await;
}

/// The audit's C10: with the tap on loopback TCP, as the README once recommended, the
/// `nobody` user read a root-only volume through qemu-io and wrote blocks into it that
/// were then replicated. TCP now needs an explicit `--nbd-insecure-tcp`, and the Unix
/// socket admits only the agent's own user and root, by its mode and by `SO_PEERCRED`.
#[test]
fn other_local_users_cannot_read_or_write_the_volumes_through_the_tap() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to play another local user (setpriv)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Others may pass through the directory, as through /run; the volume is root's only.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let secret = dir.path().join("secret.img");
    let mut content = b"root-only secret: hunter2\n".to_vec();
    content.resize(1 << 20, 0);
    std::fs::write(&secret, &content).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let data = dir.path().join("receiver");
    let creds = dir.path().join("creds");
    credentials(&data, SERVER, &creds);
    let agent_bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_blockferry-receiver"))
        .with_file_name("blockferry-agent");
    let agent = |listen: &str, log: &std::path::Path| {
        Command::new(&agent_bin)
            .args(["run", "--progress", "log", "--receiver"])
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--credentials")
            .arg(&creds)
            .arg("--disk")
            .arg(format!("sec={}", secret.display()))
            .args(["--nbd-listen", listen])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    };

    // TCP without the explicit flag: the agent refuses to start, and says why.
    let log = dir.path().join("tcp.log");
    let mut tcp = agent(&format!("127.0.0.1:{}", free_port()), &log);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = tcp.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = tcp.kill();
            let _ = tcp.wait();
            panic!("the agent served the NBD tap on TCP without --nbd-insecure-tcp");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "{text}");
    assert!(text.contains("--nbd-insecure-tcp"), "{text}");

    // The Unix socket: 0600, owned by the agent's user.
    let socket = dir.path().join("nbd.sock");
    let log = dir.path().join("unix.log");
    let mut unix = agent(&format!("unix:{}", socket.display()), &log);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the tap did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mode = std::fs::symlink_metadata(&socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let url = format!("nbd+unix:///sec?socket={}", socket.display());
    let qemu_io_as = |user: Option<u32>, command: &str| {
        let mut cmd = match user {
            Some(uid) => {
                let mut cmd = Command::new("setpriv");
                cmd.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .args(["--clear-groups", "qemu-io"]);
                cmd
            }
            None => Command::new("qemu-io"),
        };
        let out = cmd
            .args(["-f", "raw", "-c", command, &url])
            .output()
            .expect("setpriv (util-linux) and qemu-io (qemu-utils) are needed");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let nobody = Some(65534);
    let read = qemu_io_as(nobody, "read -v 0 32");
    assert!(!read.contains("hunter2"), "nobody read the volume:\n{read}");
    // Even if someone loosens the socket's mode, the agent checks who connected.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let read = qemu_io_as(nobody, "read -v 0 32");
    assert!(!read.contains("hunter2"), "nobody read the volume:\n{read}");
    let write = qemu_io_as(nobody, "write -P 0x41 0 512");
    assert!(!write.contains("wrote 512/512"), "nobody wrote:\n{write}");
    assert_eq!(
        std::fs::read(&secret).unwrap(),
        content,
        "the volume changed"
    );
    // Root, the agent's own user, is served.
    let read = qemu_io_as(None, "read -v 0 32");
    assert!(read.contains("hunter2"), "root was refused:\n{read}");
    let _ = unix.kill();
    let _ = unix.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("refused a client"), "{text}");
}
