//! Enrollment through the control API: a token is the agent's only knowledge of the
//! receiver's CA; bad tokens and bad requests are refused with clear errors; a CSR cannot
//! buy more than a client certificate; enrolling again from the same server revokes the
//! previous agent and makes the disks rescan; the control port speaks TLS 1.3 only and
//! its status endpoint needs the admin token or an admin certificate (which in turn opens
//! nothing on the replication port).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blockferry_agent::enroll::{EnrollError, enroll, request_certificate};
use blockferry_proto::token::EnrollmentToken;
use blockferry_receiver::{Receiver, ReceiverConfig};
use common::*;

async fn start(data: &Path) -> Receiver {
    let mut config: ReceiverConfig = receiver_config(data);
    config.control = Some("127.0.0.1:0".parse().unwrap());
    Receiver::start(config).await.unwrap()
}

fn cli(data: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_blockferry-receiver"))
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap()
}

/// A token from the `token create` command.
fn token(receiver: &Receiver, data: &Path, extra: &[&str]) -> String {
    let address = receiver.control_addr().unwrap().to_string();
    let mut args = vec!["token", "create", "--address", &address];
    args.extend_from_slice(extra);
    let out = cli(data, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn refused(result: Result<impl std::fmt::Debug, EnrollError>) -> String {
    match result {
        Err(err) => blockferry_util::error_chain(&err),
        Ok(ok) => panic!("expected a refusal, got {ok:?}"),
    }
}

fn agent_bin() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_blockferry-receiver"))
        .with_file_name("blockferry-agent")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_agent_replicates_knowing_the_ca_only_through_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start(&data).await;
    let token = token(&receiver, &data, &[]);
    let state = dir.path().join("agent-state");
    let out = Command::new(agent_bin())
        .args([
            "enroll",
            "--token",
            &token,
            "--server-id",
            "web-01",
            "--state-dir",
        ])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |name: &str| {
        std::fs::metadata(state.join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(
        mode("current/agent.key"),
        0o600,
        "the private key is private"
    );
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::metadata(data.join("admin.token"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // The CA key stayed where it was born.
    assert!(
        !std::fs::read_to_string(state.join("ca.crt"))
            .unwrap()
            .contains("PRIVATE KEY")
    );

    let (source, _) = image(dir.path(), "src.img", 8 << 20, 0.5, 1 << 20, 41);
    let disk = format!("disk0={}", source.display());
    let out = Command::new(agent_bin())
        .args([
            "run",
            "--exit-when-synced",
            "--progress",
            "quiet",
            "--disk",
            &disk,
            "--state-dir",
        ])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = receiver.status().unwrap();
    assert_eq!(status.servers[0].server_id, "web-01");
    assert_identical(&source, &staging_image(&data, "web-01", "disk0"));

    // The token was single-use.
    let again = refused(enroll(&token, None, "web-02", &dir.path().join("again")).await);
    assert!(again.contains("already been used"), "{again}");
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_bad_requests_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start(&data).await;
    let scratch = dir.path().join("scratch");

    // Expired.
    let expired = token(&receiver, &data, &["--ttl", "1s"]);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = refused(enroll(&expired, None, "srv-a", &scratch).await);
    assert!(err.contains("expired"), "{err}");

    // Forged: the right receiver and CA, a secret nobody issued.
    let good = token(&receiver, &data, &[]);
    let mut forged = EnrollmentToken::parse(&good).unwrap();
    forged.secret = [0x42; 32];
    let err = refused(enroll(&forged.to_string(), None, "srv-a", &scratch).await);
    assert!(err.contains("not known"), "{err}");

    // A CA fingerprint that is not the receiver's (someone in between): refused by the
    // agent before the token is sent, so the real token still works afterwards.
    let mut wrong_ca = EnrollmentToken::parse(&good).unwrap();
    wrong_ca.ca_fingerprint[0] ^= 0xff;
    let err = refused(enroll(&wrong_ca.to_string(), None, "srv-a", &scratch).await);
    assert!(err.contains("not the one in the token"), "{err}");

    // Revoked by an operator.
    let revoked = token(&receiver, &data, &[]);
    let id = blockferry_proto::token::hex(&blockferry_receiver::pki::sha256(
        &EnrollmentToken::parse(&revoked).unwrap().secret,
    ))[..16]
        .to_owned();
    let out = cli(&data, &["token", "revoke", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = refused(enroll(&revoked, None, "srv-a", &scratch).await);
    assert!(err.contains("revoked"), "{err}");
    let listed = String::from_utf8(cli(&data, &["token", "list"]).stdout).unwrap();
    assert!(
        listed.contains(&id) && listed.contains("revoked"),
        "{listed}"
    );
    assert!(!listed.contains(&blockferry_proto::token::hex(
        &EnrollmentToken::parse(&revoked).unwrap().secret
    )));

    // Malformed: not a token at all, a server id that could escape a directory, a CSR
    // that is not one. None of them spends the good token.
    let err = refused(enroll("bft1_zz", None, "srv-a", &scratch).await);
    assert!(err.contains("not a blockferry enrollment token"), "{err}");
    let err = refused(request_certificate(&good, None, "../etc", "x").await);
    assert!(err.contains("invalid server id"), "{err}");
    let err = refused(
        request_certificate(
            &good,
            None,
            "srv-a",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        )
        .await,
    );
    assert!(err.contains("certificate signing request"), "{err}");

    // A CSR that asks to be a CA and a TLS server gets a client certificate, nothing more.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["blockferry-receiver".to_owned()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let greedy = params.serialize_request(&key).unwrap().pem().unwrap();
    match request_certificate(&good, None, "srv-a", &greedy).await {
        Ok((issued, _)) => {
            let der = blockferry_receiver::pki::pem_certificates(&issued.certificate_pem).remove(0);
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            let ca = cert.basic_constraints().unwrap().map(|b| b.value.ca);
            assert_ne!(ca, Some(true), "the certificate must not be a CA");
            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            assert!(
                eku.client_auth && !eku.server_auth,
                "client auth only: {eku:?}"
            );
            let sans = format!(
                "{:?}",
                cert.subject_alternative_name().unwrap().unwrap().value
            );
            assert!(
                !sans.contains("blockferry-receiver\""),
                "the requested name was ignored: {sans}"
            );
        }
        Err(err) => {
            let err = blockferry_util::error_chain(&err);
            assert!(err.contains("certificate signing request"), "{err}");
        }
    }
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolling_again_revokes_the_previous_agent_and_the_disks_rescan() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start(&data).await;
    let first_token = token(&receiver, &data, &["--server", "db-07"]);
    let (source, _) = image(dir.path(), "src.img", 8 << 20, 0.5, 1 << 20, 42);
    let volumes = vec![volume("disk0", &source)];

    let first_dir = dir.path().join("first");
    let first = enroll(&first_token, None, "db-07", &first_dir)
        .await
        .unwrap();
    let creds = blockferry_agent::Credentials::load(&first_dir).unwrap();
    sync(
        &agent_config(&first.receiver, creds.clone()),
        &volumes,
        Duration::from_secs(60),
    )
    .await;

    // The reinstall, an operator's explicit choice: same server, new key and agent id.
    let reinstall = token(&receiver, &data, &["--server", "db-07", "--reinstall"]);
    let second_dir = dir.path().join("second");
    let second = enroll(&reinstall, None, "db-07", &second_dir)
        .await
        .unwrap();
    assert_ne!(second.agent_id, first.agent_id);
    assert_eq!(second.server_id, "db-07");

    // The old agent is refused now.
    let old = tokio::time::timeout(
        Duration::from_secs(30),
        blockferry_agent::Agent::new(&volumes).run(
            &agent_config(&first.receiver, creds),
            &volumes,
            tokio_util::sync::CancellationToken::new(),
        ),
    )
    .await
    .expect("the old agent gives up");
    assert!(old.is_err(), "the previous agent still got in");

    // The new one rescans instead of resyncing.
    let report = sync(
        &agent_config(
            &second.receiver,
            blockferry_agent::Credentials::load(&second_dir).unwrap(),
        ),
        &volumes,
        Duration::from_secs(60),
    )
    .await;
    let status = receiver.status().unwrap();
    let disk = &status.servers[0].disks[0];
    assert_eq!(
        disk.last_rescan_reason.as_deref(),
        Some("agent_reinstalled")
    );
    assert!(
        report.payload_bytes < 1 << 20,
        "resynced {} bytes",
        report.payload_bytes
    );
    assert_identical(&source, &staging_image(&data, "db-07", "disk0"));
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_port_is_tls13_only_and_status_needs_an_admin_token_or_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start(&data).await;
    let addr = receiver.control_addr().unwrap();
    let ca = data.join("pki/ca.crt");

    let s_client = |version: &str| {
        Command::new("openssl")
            .args([
                "s_client",
                version,
                "-connect",
                &addr.to_string(),
                "-CAfile",
            ])
            .arg(&ca)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl is needed: apt-get install openssl (.ci/run installs it)")
    };
    let tls12 = s_client("-tls1_2");
    assert!(
        !tls12.status.success(),
        "TLS 1.2 was accepted on the control port"
    );
    let tls13 = s_client("-tls1_3");
    assert!(
        String::from_utf8_lossy(&tls13.stdout).contains("TLSv1.3"),
        "{}",
        String::from_utf8_lossy(&tls13.stdout)
    );

    // `cert`: a directory and the file stem of a client certificate to present.
    let curl = |auth: Option<&str>, cert: Option<(&Path, &str)>| {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-s",
            "--tlsv1.3",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(&ca)
        .arg("--resolve")
        .arg(format!("blockferry-receiver:{}:127.0.0.1", addr.port()));
        if let Some(token) = auth {
            cmd.arg("-H").arg(format!("Authorization: Bearer {token}"));
        }
        if let Some((dir, stem)) = cert {
            cmd.arg("--cert")
                .arg(dir.join(format!("{stem}.crt")))
                .arg("--key")
                .arg(dir.join(format!("{stem}.key")));
        }
        let out = cmd
            .arg(format!(
                "https://blockferry-receiver:{}/v1/status",
                addr.port()
            ))
            .output()
            .expect("curl is needed: apt-get install curl (.ci/run installs it)");
        String::from_utf8(out.stdout).unwrap()
    };
    let denied = curl(None, None);
    assert!(
        denied.ends_with("401") && denied.contains("admin token"),
        "{denied}"
    );
    assert!(curl(Some("wrong"), None).ends_with("401"));
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let ok = curl(Some(admin.trim()), None);
    assert!(ok.ends_with("200") && ok.contains("\"servers\""), "{ok}");

    // An admin certificate is enough on its own.
    let admin_dir = dir.path().join("ops");
    let issued = cli(
        &data,
        &[
            "admin",
            "issue",
            "--name",
            "ops-alice",
            "--out",
            admin_dir.to_str().unwrap(),
        ],
    );
    assert!(issued.status.success(), "{issued:?}");
    let stdout = String::from_utf8(issued.stdout).unwrap();
    let admin_id = stdout
        .split_whitespace()
        .nth(3)
        .expect("admin issue names the certificate's id")
        .to_owned();
    let mode = std::fs::metadata(admin_dir.join("admin.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let ok = curl(None, Some((&admin_dir, "admin")));
    assert!(ok.ends_with("200") && ok.contains("\"servers\""), "{ok}");

    // An agent certificate is not an admin certificate, even with a wrong token beside it.
    let agent_dir = dir.path().join("agent");
    credentials(&data, "db-01", &agent_dir);
    let forbidden = curl(Some("wrong"), Some((&agent_dir, "agent")));
    assert!(
        forbidden.ends_with("403") && forbidden.contains("admin certificate"),
        "{forbidden}"
    );

    // An admin certificate opens nothing on the replication port: no Welcome, no session.
    let as_agent = dir.path().join("admin-as-agent");
    std::fs::create_dir(&as_agent).unwrap();
    std::fs::copy(admin_dir.join("ca.crt"), as_agent.join("ca.crt")).unwrap();
    std::fs::copy(admin_dir.join("admin.crt"), as_agent.join("agent.crt")).unwrap();
    std::fs::copy(admin_dir.join("admin.key"), as_agent.join("agent.key")).unwrap();
    let creds = blockferry_agent::Credentials::load(&as_agent).unwrap();
    let mut raw = RawStream::connect(receiver.local_addr(), &creds).await;
    raw.send(&raw_hello(1 << 20, 1)).await;
    let answer = raw.next().await;
    assert!(answer.is_none(), "an admin certificate got {answer:?}");
    assert!(receiver.status().unwrap().servers.is_empty());

    // Revoked, the admin certificate fails at the handshake.
    let revoked = cli(&data, &["admin", "revoke", &admin_id]);
    assert!(revoked.status.success(), "{revoked:?}");
    let refused = curl(None, Some((&admin_dir, "admin")));
    assert!(refused.ends_with("000"), "a revoked admin got {refused}");
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_continues_across_two_renewals_without_a_rescan() {
    use std::sync::Arc;
    use std::sync::atomic::Ordering;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let mut config: ReceiverConfig = receiver_config(&data);
    config.control = Some("127.0.0.1:0".parse().unwrap());
    config.agent_cert_lifetime = Duration::from_secs(6);
    let receiver = Receiver::start(config).await.unwrap();
    let token = token(&receiver, &data, &[]);
    let state = dir.path().join("agent-state");
    let enrolled = enroll(&token, None, "app-03", &state).await.unwrap();

    // A proxy that can drop every connection it carries, once asked.
    let cut = Arc::new(tokio::sync::watch::channel(0u64).0);
    let proxy = loopback_proxy(receiver.local_addr(), {
        let cut = Arc::clone(&cut);
        move |mut cr, mut cw, mut sr, mut sw| {
            let mut generation = cut.subscribe();
            let born = *generation.borrow();
            async move {
                tokio::select! {
                    _ = tokio::io::copy(&mut cr, &mut sw) => {}
                    _ = tokio::io::copy(&mut sr, &mut cw) => {}
                    _ = generation.wait_for(|g| *g > born) => {}
                }
            }
        }
    })
    .await;

    let (source, _) = image(dir.path(), "src.img", 8 << 20, 0.5, 1 << 20, 43);
    let volumes = vec![volume("disk0", &source)];
    let mut config = agent_config(proxy, blockferry_agent::Credentials::load(&state).unwrap());
    config.exit_when_synced = false;
    config.state_dir = Some(state.clone());
    let agent = blockferry_agent::Agent::new(&volumes);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let (agent, stop, volumes) = (agent.clone(), stop.clone(), volumes.clone());
        async move { agent.run(&config, &volumes, stop).await.unwrap() }
    });
    wait_synced(agent.stats()).await;

    // Writes go on while the certificate is renewed twice.
    let capture = agent.capture().clone();
    let mut seen = vec![enrolled.not_after];
    let mut rng = Rng(0x2e2e);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < 3 {
        let offset = (rng.next() % 2048) * 4096;
        capture
            .write(0, offset, vec![(rng.next() % 250) as u8 + 1; 4096])
            .await
            .unwrap();
        let now = blockferry_agent::enroll::Enrollment::load(&state)
            .unwrap()
            .unwrap();
        if now.not_after != *seen.last().unwrap() {
            seen.push(now.not_after);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "renewals so far: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        agent.stats().sessions.load(Ordering::Relaxed),
        1,
        "the session went on"
    );

    // Once the first certificate has expired, a new connection must use a renewed one.
    let unix_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    while unix_now() <= enrolled.not_after {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cut.send_modify(|g| *g += 1);
    let reconnect = std::time::Instant::now() + Duration::from_secs(30);
    while agent.stats().sessions.load(Ordering::Relaxed) < 2 {
        assert!(
            std::time::Instant::now() < reconnect,
            "the agent did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::timeout(Duration::from_secs(60), capture.flush())
        .await
        .unwrap()
        .unwrap();
    let status = receiver.status().unwrap();
    let disk = &status.servers[0].disks[0];
    assert_eq!(disk.last_rescan_reason, None, "no rescan across renewals");
    assert_eq!(disk.rescanned_bytes, 0);
    assert_identical(&source, &staging_image(&data, "app-03", "disk0"));
    stop.cancel();
    task.await.unwrap();
    receiver.shutdown().await;
}

/// The audit's C1: a token named no server, so its holder enrolled as an existing server
/// id, which revoked the real agent and gave write access to that server's staging
/// images. Now a token creates only a server id nobody holds, or re-enrolls the one
/// server an operator made it for; every refusal is logged and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_cannot_take_over_an_existing_server() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start(&data).await;
    let (source, _) = image(dir.path(), "src.img", 4 << 20, 1.0, 1 << 20, 44);
    let volumes = vec![volume("d0", &source)];
    let victim_dir = dir.path().join("victim");
    let victim = enroll(&token(&receiver, &data, &[]), None, "srvA", &victim_dir)
        .await
        .unwrap();
    let victim_creds = blockferry_agent::Credentials::load(&victim_dir).unwrap();
    sync(
        &agent_config(&victim.receiver, victim_creds.clone()),
        &volumes,
        Duration::from_secs(60),
    )
    .await;

    // Any token but a reinstall token made for srvA is refused for srvA.
    let attacker = dir.path().join("attacker");
    let err = refused(enroll(&token(&receiver, &data, &[]), None, "srvA", &attacker).await);
    assert!(
        err.contains("already enrolled") && err.contains("--reinstall"),
        "{err}"
    );
    let err = refused(
        enroll(
            &token(&receiver, &data, &["--server", "web-07"]),
            None,
            "srvA",
            &attacker,
        )
        .await,
    );
    assert!(err.contains("for server web-07 only"), "{err}");
    // The operator cannot make such a token by mistake either.
    let out = cli(
        &data,
        &[
            "token",
            "create",
            "--address",
            "127.0.0.1:1",
            "--server",
            "srvA",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("already enrolled"),
        "{stderr}"
    );
    let out = cli(
        &data,
        &[
            "token",
            "create",
            "--address",
            "127.0.0.1:1",
            "--server",
            "nosuch",
            "--reinstall",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("does not know"),
        "{stderr}"
    );

    // A server id is taken from its enrollment on, before it ever connects.
    enroll(
        &token(&receiver, &data, &[]),
        None,
        "fresh-1",
        &dir.path().join("fresh"),
    )
    .await
    .unwrap();
    let err = refused(enroll(&token(&receiver, &data, &[]), None, "fresh-1", &attacker).await);
    assert!(err.contains("already enrolled"), "{err}");

    // The victim was not revoked, and its image is as it left it.
    sync(
        &agent_config(&victim.receiver, victim_creds),
        &volumes,
        Duration::from_secs(60),
    )
    .await;
    assert_identical(&source, &staging_image(&data, "srvA", "d0"));
    let status = receiver.status().unwrap();
    let server = status
        .servers
        .iter()
        .find(|s| s.server_id == "srvA")
        .unwrap();
    assert_eq!(server.agent_id, victim.agent_id);

    let metrics = receiver.render_metrics();
    let count = |reason: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("blockferry_enrollment_refusals_total")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .and_then(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(count("server_exists"), 2.0, "{metrics}");
    assert_eq!(count("wrong_server"), 1.0, "{metrics}");
    receiver.shutdown().await;
}

/// The audit's C8: an empty (or whitespace-only) `admin.token` — a template that rendered
/// no secret, a truncated restore — made the operator endpoints answer anyone. Such a
/// token, or one readable by others, now stops the receiver at start, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_or_exposed_admin_token_stops_the_receiver() {
    use std::os::unix::fs::PermissionsExt;
    for (contents, mode, why) in [
        ("", 0o600, "fewer than the 64"),
        ("  \n", 0o600, "fewer than the 64"),
        ("short-secret", 0o600, "fewer than the 64"),
        (&"a".repeat(64)[..], 0o644, "chmod 600"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("receiver");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = data.join("admin.token");
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let mut config: ReceiverConfig = receiver_config(&data);
        config.control = Some("127.0.0.1:0".parse().unwrap());
        let err = match Receiver::start(config).await {
            Ok(receiver) => {
                receiver.shutdown().await;
                panic!("started with admin.token {contents:?} (mode {mode:o})");
            }
            Err(err) => blockferry_util::error_chain(&err),
        };
        assert!(err.contains("admin.token") && err.contains(why), "{err}");
    }
}

/// The audit's C5: renewal replaced `agent.key` before `agent.crt`, so a crash between the
/// two (shown with strace killing the agent at its third rename) left a key and a
/// certificate that do not go together, and the agent never started again without a new
/// token. Now the pair is written as a new generation and switched to by one rename:
/// killed at any of its renames, the agent finds a pair that goes together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_point_of_a_renewal_leaves_usable_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start(&data).await;
    let state = dir.path().join("st");
    enroll(&token(&receiver, &data, &[]), None, "srvE", &state)
        .await
        .unwrap();
    let (source, _) = image(dir.path(), "e0.img", 4 << 20, 1.0, 1 << 20, 45);
    let make_due = || {
        let path = state.join("enrollment.json");
        let mut enrollment: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        enrollment["issued_at"] = 1.into();
        std::fs::write(&path, serde_json::to_vec(&enrollment).unwrap()).unwrap();
    };
    let mut killed = 0;
    for when in 1..=4 {
        make_due();
        let out = Command::new("timeout")
            .args([
                "20",
                "strace",
                "-f",
                "-qq",
                "-o",
                "/dev/null",
                "-e",
                "trace=rename",
            ])
            .arg("-e")
            .arg(format!("inject=rename:signal=SIGKILL:when={when}"))
            .arg(agent_bin())
            .args(["run", "--progress", "log", "--disk"])
            .arg(format!("e0={}", source.display()))
            .arg("--state-dir")
            .arg(&state)
            .output()
            .expect("strace is needed: apt-get install strace (.ci/run installs it)");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !stderr.contains("invalid"),
            "strace refused the injection: {stderr}"
        );
        // Killed by the injection (the timeout passes the signal on), or exit 124: the
        // renewal made fewer renames than `when`.
        use std::os::unix::process::ExitStatusExt;
        if out.status.signal() == Some(libc::SIGKILL) || out.status.code() == Some(137) {
            killed += 1;
        }
        let loaded = blockferry_agent::Credentials::load(&state);
        assert!(
            loaded.is_ok(),
            "after a kill at rename {when}: {}\n{stderr}",
            blockferry_util::error_chain(&loaded.unwrap_err())
        );
    }
    assert_eq!(
        killed, 4,
        "the injection killed the agent {killed} times, not at each rename"
    );
    // And the agent renews and replicates with what is there.
    make_due();
    let report = sync(
        &agent_config(
            receiver.local_addr(),
            blockferry_agent::Credentials::load(&state).unwrap(),
        ),
        &[volume("e0", &source)],
        Duration::from_secs(60),
    )
    .await;
    assert!(report.sessions >= 1);
    assert_identical(&source, &staging_image(&data, "srvE", "e0"));
    receiver.shutdown().await;
}
