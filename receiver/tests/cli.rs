//! The two binaries as an operator uses them: `agent issue`, `run`, the agent's
//! `--exit-when-synced`, and `status` (table and JSON, through the admin socket of a
//! running receiver and straight from the store of a stopped one).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn receiver_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blockferry-receiver"))
}

/// The agent binary sits beside the receiver's; build it if this test runs alone.
fn agent_bin() -> PathBuf {
    let path = receiver_bin().with_file_name("blockferry-agent");
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "-p",
                "blockferry-agent",
                "--bin",
                "blockferry-agent",
            ])
            .status()
            .unwrap();
        assert!(status.success(), "building blockferry-agent failed");
    }
    path
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("command runs")
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn status_json(data: &Path) -> serde_json::Value {
    let out = run(Command::new(receiver_bin())
        .args(["status", "--json", "--data-dir"])
        .arg(data));
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

#[test]
fn operator_workflow_with_both_binaries() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let creds = dir.path().join("creds");

    // Offline provisioning writes a private key only the owner can read.
    let out = run(Command::new(receiver_bin())
        .args(["agent", "issue", "--name", "app-01", "--data-dir"])
        .arg(&data)
        .arg("--out")
        .arg(&creds));
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("source server app-01"));
    let mode = std::fs::metadata(creds.join("agent.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let ca_mode = std::fs::metadata(data.join("pki/ca.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(ca_mode, 0o600);
    assert!(creds.join("agent.crt").exists() && creds.join("ca.crt").exists());

    // A name that could escape the images directory is refused.
    let out = run(Command::new(receiver_bin())
        .args(["agent", "issue", "--name", "../etc", "--data-dir"])
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("bad")));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid server name"),
        "{}",
        text(&out)
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut receiver = Command::new(receiver_bin())
        .args(["run", "--io-engine", "sync", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "receiver did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    let (source, _) = image(dir.path(), "root.img", 16 << 20, 0.5, 1 << 20, 9);
    let out = run(Command::new(agent_bin())
        .args([
            "run",
            "--exit-when-synced",
            "--progress",
            "log",
            "--receiver",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--credentials")
        .arg(&creds)
        .arg("--disk")
        .arg(format!("root={}", source.display())));
    assert!(out.status.success(), "{}", text(&out));
    assert_identical(&source, &staging_image(&data, "app-01", "root"));

    // While the receiver runs, status goes through its admin socket.
    let mode = std::fs::metadata(data.join("admin.sock"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let json = status_json(&data);
    let server = &json["servers"][0];
    assert_eq!(server["server_id"], "app-01");
    for key in [
        "agent_id",
        "agent_version",
        "connected",
        "first_seen",
        "last_seen",
        "durable_epoch",
        "inventory",
    ] {
        assert!(
            server.get(key).is_some(),
            "status JSON lacks {key}: {server}"
        );
    }
    let disk = &server["disks"][0];
    assert_eq!(disk["name"], "root");
    assert_eq!(disk["size"], 16 << 20);
    assert_eq!(disk["replicated_bytes"], 16 << 20);
    assert_eq!(disk["sync_watermark"], 16 << 20);
    assert!(
        disk["image"]
            .as_str()
            .unwrap()
            .ends_with("images/app-01/root.img")
    );
    for key in ["state", "reason"] {
        assert!(disk[key].is_string(), "status JSON lacks {key}: {disk}");
    }
    let out = run(Command::new(receiver_bin())
        .args(["status", "--data-dir"])
        .arg(&data));
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("server app-01") && table.contains("100.0%"),
        "{table}"
    );

    // SIGTERM stops it cleanly; status then reads the store itself.
    let _ = Command::new("kill").arg(receiver.id().to_string()).status();
    let exit = receiver.wait().unwrap();
    assert!(exit.success(), "receiver exit after SIGTERM: {exit:?}");
    assert!(
        !data.join("admin.sock").exists(),
        "the admin socket is removed on exit"
    );
    let json = status_json(&data);
    assert_eq!(json["servers"][0]["connected"], false);
    assert_eq!(json["servers"][0]["disks"][0]["state"], "DISCONNECTED");
    assert_eq!(json["servers"][0]["disks"][0]["sync_watermark"], 16 << 20);

    // A directory that is not a data dir gets a clear error.
    let out = run(Command::new(receiver_bin())
        .args(["status", "--data-dir"])
        .arg(dir.path()));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a receiver data dir"),
        "{}",
        text(&out)
    );
}

#[test]
fn agent_refuses_unusable_credentials_and_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _) = image(dir.path(), "v.img", 1 << 20, 0.5, 1 << 20, 1);
    // No credentials at all.
    let out = run(Command::new(agent_bin())
        .args(["run", "--receiver", "127.0.0.1:1", "--credentials"])
        .arg(dir.path().join("nothing"))
        .arg("--disk")
        .arg(&source));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("loading credentials"),
        "{}",
        text(&out)
    );

    // A private key readable by others.
    let data = dir.path().join("receiver");
    let creds = dir.path().join("creds");
    credentials(&data, "s", &creds);
    std::fs::set_permissions(
        creds.join("agent.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = run(Command::new(agent_bin())
        .args(["run", "--receiver", "127.0.0.1:1", "--credentials"])
        .arg(&creds)
        .arg("--disk")
        .arg(&source));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod 600"),
        "{}",
        text(&out)
    );
    std::fs::set_permissions(
        creds.join("agent.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();

    // A volume that does not exist.
    let out = run(Command::new(agent_bin())
        .args(["run", "--receiver", "127.0.0.1:1", "--credentials"])
        .arg(&creds)
        .arg("--disk")
        .arg(dir.path().join("missing.img")));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot open volume"),
        "{}",
        text(&out)
    );
}

/// The README's front door, small: the demo replicates and verifies, and with
/// `--backend ebs` also restores its recovery point from the in-memory EBS and verifies
/// that.
#[test]
fn the_demo_verifies_its_copy_and_with_ebs_its_snapshot() {
    for backend in ["file", "ebs"] {
        let dir = tempfile::tempdir().unwrap();
        let out = run(Command::new(receiver_bin())
            .args(["demo", "--size", "24M", "--backend", backend])
            .arg("--data-dir")
            .arg(dir.path()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "demo --backend {backend}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("is byte-identical to the source"),
            "{stdout}"
        );
        assert_eq!(
            stdout.contains("the snapshot restores byte-identical"),
            backend == "ebs",
            "{stdout}"
        );
    }
}

/// The audit's C9 and L3: a key written into a directory others can write to (here with
/// the temp file the old scheme would use planted, world-readable) ended up readable by
/// them; and data, state and output directories were used whatever their mode. Now such
/// a directory is refused, with the fix named, and nothing is written into it.
#[test]
fn directories_others_can_write_to_are_refused_for_keys_and_state() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("rx");
    let shared = dir.path().join("shared-out");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let mut issue = Command::new("bash");
    issue.arg("-c").arg(format!(
        "touch {out}/agent.key.tmp$$; chmod 666 {out}/agent.key.tmp$$; exec {bin} agent issue --data-dir {data} --name srvD --out {out}",
        out = shared.display(),
        bin = receiver_bin().display(),
        data = data.display()
    ));
    let out = run(&mut issue);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "issued into a world-writable dir");
    assert!(stderr.contains("chmod go-w"), "{stderr}");
    assert!(
        !shared.join("agent.key").exists(),
        "a key was written there"
    );

    // The receiver's data dir and the agent's state dir alike.
    let open = dir.path().join("open-data");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = run(Command::new(receiver_bin())
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--control",
            "off",
            "--metrics",
            "off",
            "--data-dir",
        ])
        .arg(&open));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("chmod go-w"),
        "{stderr}"
    );
    assert!(!open.join("pki").exists() && !open.join("catalog.redb").exists());
    let (disk, _) = image(dir.path(), "d.img", 1 << 20, 1.0, 1 << 20, 3);
    let out = run(Command::new(agent_bin())
        .args(["run", "--receiver", "127.0.0.1:1", "--disk"])
        .arg(format!("d={}", disk.display()))
        .arg("--state-dir")
        .arg(&open));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("chmod go-w"),
        "{stderr}"
    );

    // A private dir of our own is fine, and the key in it is 0600.
    let private = dir.path().join("creds");
    let out = run(Command::new(receiver_bin())
        .args(["agent", "issue", "--name", "srvD", "--data-dir"])
        .arg(&data)
        .arg("--out")
        .arg(&private));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(private.join("agent.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}
