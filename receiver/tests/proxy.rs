//! Agents behind an HTTP proxy: with tinyproxy (a real proxy, on loopback) as
//! `https_proxy`, enrollment and every replication stream go through CONNECT tunnels (its
//! log shows them); a proxy that refuses CONNECT to the replication port makes the agent
//! stop with an error naming the port to allow.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockferry_receiver::{Receiver, ReceiverConfig};
use common::*;

struct Tinyproxy {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts tinyproxy on a free loopback port; CONNECT is allowed to `ports` only (to any
/// port when empty).
fn tinyproxy(dir: &Path, name: &str, ports: &[u16]) -> Tinyproxy {
    let port = free_port();
    let log = dir.join(format!("{name}.log"));
    let mut conf = format!(
        "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{}\"\nLogLevel Info\nMaxClients 50\nAllow 127.0.0.1\n",
        log.display()
    );
    for p in ports {
        conf.push_str(&format!("ConnectPort {p}\n"));
    }
    let conf_path = dir.join(format!("{name}.conf"));
    std::fs::write(&conf_path, conf).unwrap();
    let child = Command::new("tinyproxy")
        .arg("-d")
        .arg("-c")
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "tinyproxy is needed for this test: apt-get install tinyproxy (.ci/run installs it)",
        );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "tinyproxy did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Tinyproxy { child, port, log }
}

fn agent(args: &[&str], proxy: &Tinyproxy) -> std::process::Output {
    Command::new(
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_blockferry-receiver"))
            .with_file_name("blockferry-agent"),
    )
    .args(args)
    // The trailing slash is how many tools write it; it must not matter.
    .env("https_proxy", format!("http://127.0.0.1:{}/", proxy.port))
    .env_remove("HTTPS_PROXY")
    .env("no_proxy", "example.invalid")
    .env_remove("NO_PROXY")
    .output()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_and_replication_go_through_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let mut config: ReceiverConfig = receiver_config(&data);
    config.control = Some("127.0.0.1:0".parse().unwrap());
    let receiver = Receiver::start(config).await.unwrap();
    let control = receiver.control_addr().unwrap();
    let replication = receiver.local_addr();
    let out = Command::new(env!("CARGO_BIN_EXE_blockferry-receiver"))
        .args([
            "token",
            "create",
            "--uses",
            "2",
            "--address",
            &control.to_string(),
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (source, _) = image(dir.path(), "src.img", 8 << 20, 0.5, 1 << 20, 51);
    let disk = format!("disk0={}", source.display());

    let open = tinyproxy(dir.path(), "open", &[]);
    let state = dir.path().join("state");
    let state_arg = state.to_str().unwrap();
    let out = agent(
        &[
            "enroll",
            "--token",
            &token,
            "--server-id",
            "behind-proxy",
            "--state-dir",
            state_arg,
        ],
        &open,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = agent(
        &[
            "run",
            "--state-dir",
            state_arg,
            "--disk",
            &disk,
            "--exit-when-synced",
            "--progress",
            "quiet",
        ],
        &open,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_identical(&source, &staging_image(&data, "behind-proxy", "disk0"));
    let log = std::fs::read_to_string(&open.log).unwrap();
    for port in [control.port(), replication.port()] {
        assert!(
            log.contains(&format!("CONNECT 127.0.0.1:{port}")),
            "no CONNECT to port {port} in the proxy's log:\n{log}"
        );
    }

    // A proxy that allows the control port but not the replication port.
    let strict = tinyproxy(dir.path(), "strict", &[control.port()]);
    let out = agent(
        &[
            "run",
            "--state-dir",
            state_arg,
            "--disk",
            &disk,
            "--exit-when-synced",
            "--progress",
            "quiet",
        ],
        &strict,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the agent got through a proxy that refuses its port"
    );
    assert!(
        stderr.contains("refused CONNECT")
            && stderr.contains(&format!("port {}", replication.port())),
        "{stderr}"
    );
    receiver.shutdown().await;
}
