//! Revocation and expiry: `agent revoke` closes the agent's live session at once (the
//! agent hears why and gives up), every later handshake of that agent fails with
//! `certificate_revoked`, the revocation survives a restart and can be made offline, an
//! expired certificate is refused, and an agent reaches only its own server's disks.

mod common;

use std::process::Command;
use std::time::Duration;

use blockferry_agent::{Agent, AgentError, SessionError};
use blockferry_proto::ErrorCode;
use blockferry_receiver::tls::RefusalReason;
use common::*;
use tokio_util::sync::CancellationToken;

fn revoke(data: &std::path::Path, agent_id: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_blockferry-receiver"))
        .args(["agent", "revoke", "--data-dir"])
        .arg(data)
        .arg(agent_id)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_cut_off_at_once_and_refused_afterwards() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let (source, _) = image(dir.path(), "src.img", 16 << 20, 0.5, 1 << 20, 31);
    let volumes = vec![volume("disk0", &source)];
    let mut config = agent_config(receiver.local_addr(), creds);
    config.exit_when_synced = false;
    let agent = Agent::new(&volumes);
    let running = tokio::spawn({
        let (agent, config, volumes) = (agent.clone(), config.clone(), volumes.clone());
        async move { agent.run(&config, &volumes, CancellationToken::new()).await }
    });
    wait_synced(agent.stats()).await;
    let agent_id = receiver.status().unwrap().servers[0].agent_id.clone();

    let out = revoke(&data, &agent_id);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("1 live session(s) closed"), "{said}");

    // The live session ends with the reason, and the agent does not retry.
    let result = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the revoked agent stops")
        .unwrap();
    match result {
        Err(AgentError::Fatal(SessionError::Refused { code, message, .. })) => {
            assert_eq!(code, ErrorCode::NOT_AUTHORIZED);
            assert!(message.contains("revoked"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }

    // A new handshake with the same certificate fails, and says why.
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        Agent::new(&volumes).run(&config, &volumes, CancellationToken::new()),
    )
    .await
    .expect("the agent gives up")
    .unwrap_err();
    let chain = blockferry_util::error_chain(&err);
    assert!(chain.to_lowercase().contains("revoked"), "{chain}");
    assert!(receiver.refusals().get(RefusalReason::CertificateRevoked) >= 1);
    receiver.shutdown().await;

    // Offline: another agent is revoked with no receiver running, and the revocations
    // hold after a restart.
    let other_creds = credentials(&data, "other-server", &dir.path().join("other"));
    let other_id = {
        let der = blockferry_receiver::pki::pem_certificates(
            &std::fs::read_to_string(dir.path().join("other/agent.crt")).unwrap(),
        )
        .remove(0);
        blockferry_receiver::pki::AgentIdentity::from_certificate(&der)
            .unwrap()
            .agent_id
    };
    let out = revoke(&data, &other_id);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("never connected"));
    let receiver = start_receiver(&data).await;
    for (creds, revoked) in [
        (other_creds, true),
        (
            credentials(&data, SERVER, &dir.path().join("creds-again")),
            false,
        ),
    ] {
        let mut config = agent_config(receiver.local_addr(), creds);
        config.exit_when_synced = true;
        let result = tokio::time::timeout(
            Duration::from_secs(30),
            Agent::new(&volumes).run(&config, &volumes, CancellationToken::new()),
        )
        .await
        .expect("the agent finishes");
        // The revoked one is refused; a freshly issued one for the same server works
        // (and, being a different agent, rescans rather than trusting anything).
        if revoked {
            assert!(
                result.is_err(),
                "a revoked agent was let in after a restart"
            );
        } else {
            result.expect("a new agent for the same server replicates");
            let status = receiver.status().unwrap();
            let server = status
                .servers
                .iter()
                .find(|s| s.server_id == SERVER)
                .unwrap();
            assert_eq!(
                server.disks[0].last_rescan_reason.as_deref(),
                Some("agent_reinstalled")
            );
        }
    }
    assert_identical(&source, &staging_image(&data, SERVER, "disk0"));

    // Bad input: a malformed agent id is refused before anything is recorded.
    let out = revoke(&data, "../etc");
    assert!(!out.status.success());
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let out = dir.path().join("expired");
    blockferry_receiver::pki::write_agent_credentials(
        &data,
        SERVER,
        &out,
        time::Duration::minutes(-1),
    )
    .unwrap();
    let creds = blockferry_agent::Credentials::load(&out).unwrap();
    let (source, _) = image(dir.path(), "src.img", 1 << 20, 0.5, 1 << 20, 32);
    let volumes = vec![volume("disk0", &source)];
    let config = agent_config(receiver.local_addr(), creds);
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        Agent::new(&volumes).run(&config, &volumes, CancellationToken::new()),
    )
    .await
    .expect("the agent gives up")
    .unwrap_err();
    let chain = blockferry_util::error_chain(&err);
    assert!(chain.to_lowercase().contains("expired"), "{chain}");
    assert_eq!(
        receiver.refusals().get(RefusalReason::CertificateExpired),
        1
    );
    assert!(
        receiver.status().unwrap().servers.is_empty(),
        "nothing was recorded"
    );
    receiver.shutdown().await;
}

/// Identity comes from the certificate alone: an agent of server A that names the same
/// disk as server B writes (and queries) A's staging image, never B's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reaches_only_its_own_servers_disks() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let (b_source, _) = image(dir.path(), "b.img", 4 << 20, 1.0, 1 << 20, 61);
    let (a_source, _) = image(dir.path(), "a.img", 4 << 20, 1.0, 1 << 20, 62);
    let b_creds = credentials(&data, "server-b", &dir.path().join("b"));
    sync(
        &agent_config(receiver.local_addr(), b_creds),
        &[volume("sda", &b_source)],
        Duration::from_secs(60),
    )
    .await;
    let a_creds = credentials(&data, "server-a", &dir.path().join("a"));
    sync(
        &agent_config(receiver.local_addr(), a_creds),
        &[volume("sda", &a_source)],
        Duration::from_secs(60),
    )
    .await;
    assert_identical(&b_source, &staging_image(&data, "server-b", "sda"));
    assert_identical(&a_source, &staging_image(&data, "server-a", "sda"));
    let status = receiver.status().unwrap();
    let servers: Vec<_> = status
        .servers
        .iter()
        .map(|s| s.server_id.as_str())
        .collect();
    assert_eq!(servers, ["server-a", "server-b"]);
    receiver.shutdown().await;
}
