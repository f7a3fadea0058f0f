//! Operations: the metrics page (checked by promtool, every metric updated), the states a
//! disk goes through, server events, a full staging file system, the bandwidth limit
//! (template and per server, changed live), and the product's limits.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blockferry_agent::{Agent, AgentStats};
use blockferry_proto::{DiskSpec, Frame, Hello};
use blockferry_receiver::events::{Event, EventKind};
use blockferry_receiver::{Receiver, ReceiverConfig};
use common::mount::Mount;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

fn cli(data: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_blockferry-receiver"))
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn agent_bin() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_blockferry-receiver"))
        .with_file_name("blockferry-agent")
}

/// The agent binary replicating `image` as disk `d0`, until killed.
fn spawn_agent(receiver: &Receiver, creds: &Path, image: &Path) -> Child {
    Command::new(agent_bin())
        .args(["run", "--progress", "quiet", "--receiver"])
        .arg(receiver.local_addr().to_string())
        .arg("--credentials")
        .arg(creds)
        .arg("--disk")
        .arg(format!("d0={}", image.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the agent binary is built with the workspace (cargo test --workspace)")
}

async fn scrape(receiver: &Receiver) -> String {
    use tokio::io::AsyncReadExt;
    let addr = receiver.metrics_addr().expect("metrics enabled");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

/// The value of the sample of `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let rest = series.strip_prefix(name)?;
        if !(rest.is_empty() || rest.starts_with('{')) {
            return None;
        }
        labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            .then(|| value.parse().ok())?
    })
}

/// The state whose `blockferry_disk_state` series is 1.
fn state_of(text: &str, server: &str, disk: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix("blockferry_disk_state{")?;
        if !line.ends_with(" 1")
            || !rest.contains(&format!("server=\"{server}\""))
            || !rest.contains(&format!("disk=\"{disk}\""))
        {
            return None;
        }
        let state = rest.split("state=\"").nth(1)?.split('"').next()?;
        Some(state.to_owned())
    })
}

/// Every family the page declares has samples, and every counter and histogram has
/// counted something: a metric nothing updates is a metric that lies.
fn assert_every_metric_updated(text: &str) {
    let mut families = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            families.push((name.to_owned(), kind.to_owned()));
        }
    }
    assert!(families.len() > 25, "only {} families", families.len());
    for (name, kind) in &families {
        let values: Vec<f64> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let metric = series.split('{').next()?;
                let belongs = match kind.as_str() {
                    "histogram" => metric == format!("{name}_count"),
                    _ => metric == name,
                };
                belongs.then(|| value.parse::<f64>().ok()).flatten()
            })
            .collect();
        assert!(!values.is_empty(), "{name} ({kind}) has no samples");
        if kind == "counter" || kind == "histogram" {
            assert!(
                values.iter().any(|&v| v > 0.0),
                "{name} ({kind}) was never updated"
            );
        }
    }
}

fn deploy_file(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// Every metric the Grafana dashboard and the alert rules name is on the page (a renamed
/// metric would leave a panel empty and an alert silent).
fn assert_deploy_uses_only_real_metrics(page: &str) {
    let declared: Vec<String> = page
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|rest| rest.split(' ').next().unwrap().to_owned())
        .collect();
    for file in [
        "grafana/blockferry-dashboard.json",
        "prometheus/blockferry-alerts.yml",
    ] {
        let text = std::fs::read_to_string(deploy_file(file)).unwrap();
        let mut used = 0;
        for (start, _) in text.match_indices("blockferry_") {
            let name: String = text[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let known = declared.iter().any(|d| {
                name == *d
                    || ["_total", "_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| name == format!("{d}{suffix}"))
            });
            // The dashboard's uid and tag are names, not metrics.
            if name == "blockferry_" || name.starts_with("blockferry_replication") {
                continue;
            }
            assert!(
                known,
                "{file} uses {name}, which the receiver does not export"
            );
            used += 1;
        }
        assert!(used >= 5, "{file} names only {used} metrics");
    }
}

#[test]
fn the_alert_rules_pass_promtool() {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(deploy_file("prometheus/blockferry-alerts.yml"))
        .output()
        .expect("promtool is needed: apt-get install prometheus (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy_file("grafana/blockferry-dashboard.json")).unwrap(),
    )
    .unwrap();
    assert!(dashboard["panels"].as_array().unwrap().len() >= 10);
}

fn promtool_check_metrics(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is needed: apt-get install prometheus (.ci/run installs it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn event_index(events: &[Event], server: &str, kind: EventKind, reason: &str) -> Option<usize> {
    events
        .iter()
        .position(|e| e.server_id == server && e.event == kind && e.reason == reason)
}

fn ops_config(data: &Path) -> ReceiverConfig {
    let mut config = receiver_config(data);
    config.metrics = Some("127.0.0.1:0".parse().unwrap());
    config.control = Some("127.0.0.1:0".parse().unwrap());
    config.heartbeat_interval = Duration::from_millis(500);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_rises_to_100_states_follow_and_a_killed_agent_stalls_then_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = Receiver::start(ops_config(&data)).await.unwrap();

    // The template limit makes a 64 MiB sync take seconds: long enough to watch.
    let out = cli(
        &data,
        &["settings", "set", "--default", "--bandwidth-mbps", "160"],
    );
    assert!(out.contains("template"), "{out}");

    // A refused connection and a session error, so that those counters count.
    let mut plain = tokio::net::TcpStream::connect(receiver.local_addr())
        .await
        .unwrap();
    plain.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    wait_for("the plaintext refusal", Duration::from_secs(10), || {
        (receiver
            .refusals()
            .get(blockferry_receiver::tls::RefusalReason::NotTls)
            > 0)
        .then_some(())
    })
    .await;
    let intruder = credentials(&data, "intruder", &dir.path().join("intruder"));
    let mut raw = RawStream::connect(receiver.local_addr(), &intruder).await;
    raw.send(&raw_hello(1 << 20, 1)).await;
    assert!(matches!(raw.next().await, Some(Frame::Welcome(_))));
    raw.send(&Frame::Write(blockferry_proto::Write {
        header: blockferry_proto::WriteHeader {
            disk: 0,
            offset: 1 << 20,
            len: 4096,
            epoch: 1,
            flags: blockferry_proto::WriteFlags::default(),
        },
        data: vec![1; 4096],
    }))
    .await;
    assert!(matches!(raw.next().await, Some(Frame::Error(_))));

    let creds = dir.path().join("creds");
    credentials(&data, "srv", &creds);
    let (source, _) = image(dir.path(), "src.img", 64 << 20, 1.0, 1 << 20, 7);
    let mut agent = spawn_agent(&receiver, &creds, &source);

    let mut ratios = Vec::new();
    let mut states: Vec<String> = Vec::new();
    let mut checked_mid_sync = false;
    let deadline = Instant::now() + Duration::from_secs(90);
    let last_page = loop {
        let text = scrape(&receiver).await;
        if let Some(ratio) = sample(
            &text,
            "blockferry_disk_sync_progress_ratio",
            &[("server", "srv"), ("disk", "d0")],
        ) {
            ratios.push(ratio);
            if ratio > 0.0 && ratio < 1.0 && !checked_mid_sync {
                promtool_check_metrics(&text);
                checked_mid_sync = true;
            }
        }
        if let Some(state) = state_of(&text, "srv", "d0")
            && states.last() != Some(&state)
        {
            states.push(state);
        }
        if states.last().map(String::as_str) == Some("CONTINUOUS") && ratios.last() == Some(&1.0) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "no CONTINUOUS: states {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        checked_mid_sync,
        "never saw the sync in progress: {ratios:?}"
    );
    assert!(
        ratios.windows(2).all(|w| w[0] <= w[1]),
        "progress went back: {ratios:?}"
    );
    let order = ["INITIATING", "INITIAL_SYNC", "CONTINUOUS"];
    let positions: Vec<usize> = states
        .iter()
        .map(|s| {
            order
                .iter()
                .position(|o| o == s)
                .unwrap_or_else(|| panic!("unexpected state {s} in {states:?}"))
        })
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]) && states.contains(&"INITIAL_SYNC".to_owned()),
        "{states:?}"
    );
    // Heartbeats have come (agent figures), the template's limit applies, and every
    // declared metric has been updated.
    let text = loop {
        let text = scrape(&receiver).await;
        if sample(
            &text,
            "blockferry_agent_resident_memory_bytes",
            &[("server", "srv")],
        )
        .is_some()
            && sample(&text, "blockferry_disk_backlog_bytes", &[("server", "srv")]).is_some()
        {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(last_page);
    assert_eq!(
        sample(
            &text,
            "blockferry_server_bandwidth_limit_bytes_per_second",
            &[("server", "srv")]
        ),
        Some(20e6)
    );
    assert!(
        sample(&text, "blockferry_written_bytes_total", &[("disk", "d0")]).unwrap()
            >= (64 << 20) as f64
    );
    assert_every_metric_updated(&text);
    assert_deploy_uses_only_real_metrics(&text);
    promtool_check_metrics(&text);
    assert_identical(&source, &staging_image(&data, "srv", "d0"));

    // Killed: the disk is DISCONNECTED and the server stalled; back: resumed.
    agent.kill().unwrap();
    agent.wait().unwrap();
    wait_for(
        "DISCONNECTED and a stalled event",
        Duration::from_secs(15),
        || {
            let status = receiver.status().unwrap();
            let srv = status.servers.iter().find(|s| s.server_id == "srv")?;
            let events = receiver.events().unwrap();
            (srv.disks[0].state == "DISCONNECTED"
                && event_index(&events, "srv", EventKind::Stalled, "disconnected").is_some())
            .then_some(())
        },
    )
    .await;
    let mut agent = spawn_agent(&receiver, &creds, &source);
    let events = wait_for("a resumed event", Duration::from_secs(30), || {
        let events = receiver.events().unwrap();
        event_index(&events, "srv", EventKind::Resumed, "reconnected").map(|_| events)
    })
    .await;
    let started = event_index(&events, "srv", EventKind::Started, "first_contact").unwrap();
    let stalled = event_index(&events, "srv", EventKind::Stalled, "disconnected").unwrap();
    let resumed = event_index(&events, "srv", EventKind::Resumed, "reconnected").unwrap();
    assert!(started < stalled && stalled < resumed, "{events:?}");

    // The same events through the control API, and in the data dir's file.
    let control = receiver.control_addr().unwrap();
    let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let out = Command::new("curl")
        .args(["-s", "--cacert"])
        .arg(data.join("pki/ca.crt"))
        .arg("--resolve")
        .arg(format!("blockferry-receiver:{}:127.0.0.1", control.port()))
        .arg("-H")
        .arg(format!("Authorization: Bearer {}", token.trim()))
        .arg(format!(
            "https://blockferry-receiver:{}/v1/events?server=srv",
            control.port()
        ))
        .output()
        .expect("curl is needed (.ci/run installs it)");
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&str> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(&kinds[..3], ["started", "stalled", "resumed"], "{body}");
    let file = std::fs::read_to_string(data.join("events.jsonl")).unwrap();
    assert!(file.lines().count() >= 3);

    // The table shows the same server.
    let table = receiver.status().unwrap().render_table();
    assert!(table.contains("srv") && table.contains("d0"), "{table}");
    agent.kill().unwrap();
    agent.wait().unwrap();
    receiver.shutdown().await;
}

/// Samples the bytes received from `srv` every 100 ms until `until` after `started`.
async fn sample_for(
    receiver: &Receiver,
    samples: &mut Vec<(Instant, u64)>,
    started: Instant,
    until: Duration,
) {
    while started.elapsed() < until {
        samples.push((Instant::now(), receiver.received_bytes("srv")));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rate over the window `[from, to]` of `(instant, bytes so far)` samples.
fn rate(samples: &[(Instant, u64)], from: Instant, to: Instant) -> f64 {
    let at = |t: Instant| {
        samples
            .iter()
            .min_by_key(|(i, _)| if *i > t { *i - t } else { t - *i })
            .unwrap()
    };
    let (a, b) = (at(from), at(to));
    (b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bandwidth_limit_holds_over_10_s_windows_and_changes_live() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = Receiver::start(ops_config(&data)).await.unwrap();
    // Set before the server ever connects: its own setting wins over the template.
    cli(
        &data,
        &["settings", "set", "--default", "--bandwidth-mbps", "8"],
    );
    let out = cli(
        &data,
        &[
            "settings",
            "set",
            "--server",
            "srv",
            "--bandwidth-mbps",
            "40",
        ],
    );
    assert!(out.contains("when its agent connects"), "{out}");

    let creds = credentials(&data, "srv", &dir.path().join("creds"));
    let (source, _) = image(dir.path(), "src.img", 320 << 20, 1.0, 1 << 20, 9);
    let volumes = vec![volume("d0", &source)];
    let config = agent_config(receiver.local_addr(), creds);
    let agent = Agent::new(&volumes);
    let stats: std::sync::Arc<AgentStats> = std::sync::Arc::clone(agent.stats());
    let stop = CancellationToken::new();
    let run = {
        let (config, volumes, stop) = (config.clone(), volumes.clone(), stop.clone());
        tokio::spawn(async move { agent.run(&config, &volumes, stop).await })
    };

    let mut samples = Vec::new();
    let started = Instant::now();
    sample_for(&receiver, &mut samples, started, Duration::from_secs(14)).await;
    // 40 Mbit/s is 5 MB/s; from 2 s on (connected, past the first burst), every 10 s
    // window stays within 10%.
    let limit = 5e6;
    let mut t = started + Duration::from_secs(2);
    let mut windows = Vec::new();
    while t + Duration::from_secs(10) <= started + Duration::from_secs(14) {
        let measured = rate(&samples, t, t + Duration::from_secs(10));
        windows.push(measured);
        assert!(
            (measured - limit).abs() <= 0.1 * limit,
            "{measured:.0} B/s over a 10 s window at a limit of {limit} B/s"
        );
        t += Duration::from_millis(500);
    }
    eprintln!(
        "10 s windows at 5 MB/s: {:.0} to {:.0} B/s",
        windows.iter().copied().fold(f64::MAX, f64::min),
        windows.iter().copied().fold(0.0, f64::max)
    );
    let status = receiver.status().unwrap();
    let measured = status.servers[0].receive_rate_bytes_per_second.unwrap();
    assert!(
        (measured - limit).abs() <= 0.1 * limit,
        "the receiver measures {measured} B/s"
    );

    // Live: no reconnect, and the new rate at once. The clock starts when the command
    // returns (it has reached the agent by then): on a loaded machine the CLI process
    // alone can take a second to start.
    let out = cli(
        &data,
        &[
            "settings",
            "set",
            "--server",
            "srv",
            "--bandwidth-mbps",
            "80",
        ],
    );
    assert!(out.contains("applied to its agent now"), "{out}");
    let changed_at = Instant::now();
    sample_for(
        &receiver,
        &mut samples,
        started,
        changed_at.duration_since(started) + Duration::from_secs(13),
    )
    .await;
    let limit = 10e6;
    let after = rate(
        &samples,
        changed_at + Duration::from_secs(2),
        changed_at + Duration::from_secs(12),
    );
    assert!(
        (after - limit).abs() <= 0.1 * limit,
        "{after:.0} B/s in the 10 s from 2 s after the change to 80 Mbit/s"
    );
    eprintln!("10 s from 2 s after the change to 10 MB/s: {after:.0} B/s");
    let first_seconds = rate(&samples, changed_at, changed_at + Duration::from_secs(2));
    eprintln!("the first 2 s after the change: {first_seconds:.0} B/s");
    assert!(
        first_seconds > 0.8 * limit,
        "{first_seconds:.0} B/s in the first 2 s after the change"
    );
    assert_eq!(
        stats.sessions.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the change must not need a reconnect"
    );
    let shown = cli(&data, &["settings", "show"]);
    assert!(
        shown.contains("(template)") && shown.contains("8 Mbit/s") && shown.contains("80 Mbit/s"),
        "{shown}"
    );
    stop.cancel();
    let _ = run.await;
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_51st_disk_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let creds = credentials(&data, "many", &dir.path().join("creds"));
    let disks: Vec<DiskSpec> = (0..50)
        .map(|i| DiskSpec {
            name: format!("d{i:02}"),
            size: 1 << 20,
        })
        .collect();
    let hello = Frame::Hello(Hello {
        agent_version: "raw".into(),
        inventory: blockferry_proto::Inventory::default(),
        disks,
        streams: 1,
        series: [1; 16],
        resume: blockferry_proto::ResumeClaim::Live,
    });
    // No encoder writes 51 disks: patch the count and append one more.
    let mut bytes = hello.to_bytes();
    let first = [&[0u8, 3][..], b"d00"].concat();
    let at = bytes
        .windows(first.len())
        .position(|w| w == first.as_slice())
        .unwrap();
    assert_eq!(&bytes[at - 2..at], &[0, 50]);
    bytes[at - 1] = 51;
    let last = [&[0u8, 3][..], b"d49"].concat();
    let end = bytes
        .windows(last.len())
        .position(|w| w == last.as_slice())
        .unwrap()
        + last.len()
        + 8;
    let extra = [&[0u8, 3][..], b"d50", &(1u64 << 20).to_be_bytes()].concat();
    bytes.splice(end..end, extra.iter().copied());
    let len = u32::try_from(bytes.len() - blockferry_proto::FRAME_HEADER_LEN).unwrap();
    bytes[4..8].copy_from_slice(&len.to_be_bytes());

    let mut raw = RawStream::connect(receiver.local_addr(), &creds).await;
    raw.send_bytes(&bytes).await;
    match raw.next().await {
        Some(Frame::Error(err)) => {
            assert_eq!(err.code, blockferry_proto::ErrorCode::LIMIT);
            assert!(
                err.message.contains("at most 50 disks") && err.message.contains("51"),
                "{}",
                err.message
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(receiver.status().unwrap().servers.is_empty());
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_staging_file_system_stalls_the_disk_loses_nothing_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    // Only the staging images live on the small file system; the catalog does not.
    let Some(_mount) = Mount::tmpfs(&data.join("images"), "40m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root and mount rights)");
        return;
    };
    let filler = data.join("images/filler");
    std::fs::write(&filler, vec![0x55u8; 32 << 20]).unwrap();
    let receiver = Receiver::start(ops_config(&data)).await.unwrap();
    let creds = credentials(&data, "srv", &dir.path().join("creds"));
    let (source, _) = image(dir.path(), "src.img", 24 << 20, 1.0, 1 << 20, 11);
    let volumes = vec![volume("d0", &source)];
    let mut config = agent_config(receiver.local_addr(), creds);
    config.exit_when_synced = false;
    let agent = Agent::new(&volumes);
    let stats = std::sync::Arc::clone(agent.stats());
    let stop = CancellationToken::new();
    let run = {
        let (config, volumes, stop) = (config.clone(), volumes.clone(), stop.clone());
        tokio::spawn(async move { agent.run(&config, &volumes, stop).await })
    };

    let stalled = wait_for("STALLED staging_full", Duration::from_secs(60), || {
        let status = receiver.status().unwrap();
        let server = status.servers.iter().find(|s| s.server_id == "srv")?;
        let events = receiver.events().unwrap();
        (server.disks[0].state == "STALLED"
            && server.disks[0].reason == "staging_full"
            && server.stalled.as_deref() == Some("staging_full")
            && event_index(&events, "srv", EventKind::Stalled, "staging_full").is_some())
        .then(|| server.disks[0].clone())
    })
    .await;
    assert!(
        !run.is_finished(),
        "the agent gave up on a full staging disk"
    );
    // What was acknowledged is in place, however full the disk.
    let watermark = stalled.sync_watermark;
    assert!(watermark < 24 << 20);
    let staged = std::fs::read(staging_image(&data, "srv", "d0")).unwrap();
    let original = std::fs::read(&source).unwrap();
    assert!(
        staged[..watermark as usize] == original[..watermark as usize],
        "acknowledged data below the watermark {watermark} differs"
    );

    std::fs::remove_file(&filler).unwrap();
    wait_synced(&stats).await;
    assert!(stats.sessions.load(std::sync::atomic::Ordering::Relaxed) > 1);
    assert_identical(&source, &staging_image(&data, "srv", "d0"));
    wait_for("a resumed event", Duration::from_secs(10), || {
        let events = receiver.events().unwrap();
        let stalled = event_index(&events, "srv", EventKind::Stalled, "staging_full")?;
        let resumed = events
            .iter()
            .position(|e| e.server_id == "srv" && e.event == EventKind::Resumed)?;
        (stalled < resumed).then_some(())
    })
    .await;
    let status = receiver.status().unwrap();
    assert_ne!(status.servers[0].disks[0].state, "STALLED");
    assert_eq!(status.servers[0].stalled, None);
    stop.cancel();
    let _ = run.await;
    receiver.shutdown().await;
}

/// A staging disk that fails: XFS on a loop device holds the images, and `xfs_io -x -c
/// shutdown` makes every later write and flush on it fail with EIO, as XFS does itself
/// when its disk fails. The disk stalls (`staging_error`, in the status and as an event),
/// the agent keeps running, and everything acknowledged before is on the image, as a
/// fresh mount of the same file system shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staging_disk_failing_with_eio_stalls_the_disk_and_keeps_what_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let images = data.join("images");
    std::fs::create_dir_all(&images).unwrap();
    // XFS needs 300 MiB at least; the file is sparse.
    let backing = dir.path().join("xfs.img");
    let Some(mount) = Mount::xfs(&backing, 512 << 20, &images) else {
        eprintln!(
            "SKIPPED: cannot make and loop-mount XFS here (needs xfsprogs, root, loop devices)"
        );
        return;
    };
    let receiver = Receiver::start(ops_config(&data)).await.unwrap();
    // Slow enough that the sync is under way when the disk fails: 40 Mbit/s.
    cli(
        &data,
        &[
            "settings",
            "set",
            "--server",
            "srv",
            "--bandwidth-mbps",
            "40",
        ],
    );
    let creds = credentials(&data, "srv", &dir.path().join("creds"));
    let (source, _) = image(dir.path(), "src.img", 48 << 20, 1.0, 1 << 20, 13);
    let volumes = vec![volume("d0", &source)];
    let mut config = agent_config(receiver.local_addr(), creds);
    config.exit_when_synced = false;
    let agent = Agent::new(&volumes);
    let stop = CancellationToken::new();
    let run = {
        let (config, volumes, stop) = (config.clone(), volumes.clone(), stop.clone());
        tokio::spawn(async move { agent.run(&config, &volumes, stop).await })
    };
    wait_for("8 MiB durable", Duration::from_secs(60), || {
        let status = receiver.status().unwrap();
        let server = status.servers.iter().find(|s| s.server_id == "srv")?;
        (server.disks[0].sync_watermark >= 8 << 20).then_some(())
    })
    .await;
    let shutdown = Command::new("xfs_io")
        .args(["-x", "-c", "shutdown"])
        .arg(&images)
        .status()
        .expect("xfs_io (xfsprogs) is needed");
    assert!(shutdown.success());

    let stalled = wait_for("STALLED staging_error", Duration::from_secs(60), || {
        let status = receiver.status().unwrap();
        let server = status.servers.iter().find(|s| s.server_id == "srv")?;
        let events = receiver.events().unwrap();
        (server.disks[0].state == "STALLED"
            && server.disks[0].reason == "staging_error"
            && server.stalled.as_deref() == Some("staging_error")
            && event_index(&events, "srv", EventKind::Stalled, "staging_error").is_some())
        .then(|| server.disks[0].clone())
    })
    .await;
    assert!(
        !run.is_finished(),
        "the agent gave up on a failing staging disk"
    );
    let watermark = stalled.sync_watermark;
    assert!(
        (8 << 20..48 << 20).contains(&watermark),
        "watermark {watermark}"
    );
    stop.cancel();
    let _ = run.await;
    receiver.shutdown().await;

    // The file system as the disk holds it, after log recovery: what was acknowledged
    // is there.
    drop(mount);
    let again = data.join("remounted");
    let _again =
        Mount::xfs_again(&backing, &again).expect("the shut-down XFS does not mount again");
    let staged = std::fs::read(again.join("srv/d0.img")).unwrap();
    let original = std::fs::read(&source).unwrap();
    assert!(
        staged[..watermark as usize] == original[..watermark as usize],
        "acknowledged data below the watermark {watermark} is not on the staging disk"
    );
}

/// The audit's C11: with staging full, every session was let in (Welcome), failed its
/// first write, and the agent, whose backoff started over after every Welcome,
/// reconnected twice a second, resending everything unacknowledged: 45 sessions and 755
/// MB on the wire in 25 s for a 16 MiB disk. Now the receiver says when to come back, and
/// only progress (a durable ack) starts the agent's backoff over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_staging_disk_does_not_draw_a_reconnect_storm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let Some(_mount) = Mount::tmpfs(&data.join("images"), "6m") else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root and mount rights)");
        return;
    };
    let receiver = Receiver::start(ops_config(&data)).await.unwrap();
    let creds = credentials(&data, "srvH", &dir.path().join("creds"));
    let size = 16u64 << 20;
    let (source, _) = image(dir.path(), "src.img", size, 1.0, 1 << 20, 12);
    let volumes = vec![volume("h0", &source)];
    let mut config = agent_config(receiver.local_addr(), creds);
    // The binary's defaults, not the tests' quick ones.
    config.initial_backoff = Duration::from_millis(500);
    config.max_backoff = Duration::from_secs(30);
    let agent = Agent::new(&volumes);
    let stats = std::sync::Arc::clone(agent.stats());
    let run = {
        let (config, volumes) = (config.clone(), volumes.clone());
        tokio::spawn(async move { agent.run(&config, &volumes, CancellationToken::new()).await })
    };
    tokio::time::sleep(Duration::from_secs(20)).await;
    let sessions = stats.sessions.load(std::sync::atomic::Ordering::Relaxed);
    let sent = stats.wire_bytes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        sessions <= 4,
        "{sessions} sessions in 20 s against a full staging disk"
    );
    assert!(sent <= 4 * size, "{sent} bytes sent for a {size}-byte disk");
    let status = receiver.status().unwrap();
    assert_eq!(status.servers[0].disks[0].reason, "staging_full");

    // Space returns: the disk syncs soon, without an operator.
    let status = Command::new("mount")
        .args(["-o", "remount,size=40m"])
        .arg(data.join("images"))
        .status()
        .unwrap();
    assert!(status.success());
    let report = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("the agent synced once space returned")
        .unwrap()
        .unwrap();
    assert!(report.sessions <= sessions + 2, "{report:?}");
    assert_identical(&source, &staging_image(&data, "srvH", "h0"));
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_sync_slot_a_second_disk_waits_queued_then_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let mut config = ops_config(&data);
    config.max_concurrent_syncs = 1;
    let receiver = Receiver::start(config).await.unwrap();
    // Slow enough to look at the queue while the first disk syncs.
    cli(
        &data,
        &["settings", "set", "--default", "--bandwidth-mbps", "80"],
    );
    let creds = credentials(&data, "srv", &dir.path().join("creds"));
    let (first, _) = image(dir.path(), "a.img", 32 << 20, 1.0, 1 << 20, 21);
    let (second, _) = image(dir.path(), "b.img", 16 << 20, 1.0, 1 << 20, 22);
    let volumes = vec![volume("a", &first), volume("b", &second)];
    let config = agent_config(receiver.local_addr(), creds);
    let run = {
        let volumes = volumes.clone();
        tokio::spawn(async move { sync(&config, &volumes, Duration::from_secs(120)).await })
    };
    let queued = wait_for("one disk QUEUED", Duration::from_secs(30), || {
        let status = receiver.status().unwrap();
        let disks = &status.servers.first()?.disks;
        let queued: Vec<_> = disks.iter().filter(|d| d.state == "QUEUED").collect();
        let syncing = disks
            .iter()
            .filter(|d| d.state == "INITIAL_SYNC" || d.state == "INITIATING")
            .count();
        (queued.len() == 1 && syncing == 1).then(|| queued[0].clone())
    })
    .await;
    assert_eq!(queued.queue_position, Some(1));
    assert_eq!(queued.reason, "waiting_for_slot");
    assert_eq!(queued.replicated_bytes, 0, "a queued disk must not sync");
    let table = receiver.status().unwrap().render_table();
    assert!(table.contains("QUEUED") && table.contains("#1"), "{table}");

    let report = run.await.unwrap();
    assert!(
        report.sessions >= 2,
        "the grant reaches the agent by a new session"
    );
    assert_identical(&first, &staging_image(&data, "srv", "a"));
    assert_identical(&second, &staging_image(&data, "srv", "b"));
    let status = receiver.status().unwrap();
    assert!(
        status.servers[0]
            .disks
            .iter()
            .all(|d| d.replicated_bytes == d.size && d.queue_position.is_none()),
        "{status:?}"
    );
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_carries_almost_nothing_stalls_the_disk_then_it_resumes() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let mut config = ops_config(&data);
    config.stall_after = Duration::from_secs(3);
    config.barrier_interval = 1 << 20;
    let receiver = Receiver::start(config).await.unwrap();
    // 5 MB/s until the link is throttled: the sync must still be running when it is,
    // however late a loaded machine lets this test look (unlimited, 96 MiB can be
    // synced before the first look). Durable progress comes every MiB meanwhile.
    cli(
        &data,
        &["settings", "set", "--default", "--bandwidth-mbps", "40"],
    );
    let throttled = Arc::new(AtomicBool::new(false));
    // When throttled: 20 kB/s, enough for heartbeats, far too little for a barrier's
    // worth of data.
    let proxy = throttling_proxy(receiver.local_addr(), 20_000, Arc::clone(&throttled)).await;
    let creds = credentials(&data, "srv", &dir.path().join("creds"));
    let (source, _) = image(dir.path(), "src.img", 96 << 20, 1.0, 1 << 20, 31);
    let volumes = vec![volume("d0", &source)];
    let mut config = agent_config(proxy, creds);
    config.exit_when_synced = false;
    let agent = Agent::new(&volumes);
    let stats = std::sync::Arc::clone(agent.stats());
    let stop = CancellationToken::new();
    let run = {
        let (config, volumes, stop) = (config.clone(), volumes.clone(), stop.clone());
        tokio::spawn(async move { agent.run(&config, &volumes, stop).await })
    };
    wait_for("the sync to start", Duration::from_secs(30), || {
        let status = receiver.status().unwrap();
        (status.servers.first()?.disks[0].replicated_bytes > 0).then_some(())
    })
    .await;
    throttled.store(true, Ordering::Relaxed);
    wait_for("STALLED no_progress", Duration::from_secs(30), || {
        let status = receiver.status().unwrap();
        let server = status.servers.first()?;
        let events = receiver.events().unwrap();
        (server.connected
            && server.disks[0].state == "STALLED"
            && server.disks[0].reason == "no_progress"
            && event_index(&events, "srv", EventKind::Stalled, "no_progress").is_some())
        .then_some(())
    })
    .await;
    throttled.store(false, Ordering::Relaxed);
    wait_synced(&stats).await;
    wait_for("resumed", Duration::from_secs(10), || {
        event_index(
            &receiver.events().unwrap(),
            "srv",
            EventKind::Resumed,
            "progress",
        )
    })
    .await;
    assert_identical(&source, &staging_image(&data, "srv", "d0"));
    stop.cancel();
    let _ = run.await;
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_sends_nothing_keeps_tracking_and_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let mut config = ops_config(&data);
    // A pause is no stall, however long it lasts. (Barriers every MiB: at the test's
    // 5 MB/s, durable progress comes far more often than the stall time.)
    config.stall_after = Duration::from_secs(2);
    config.barrier_interval = 1 << 20;
    let receiver = Receiver::start(config).await.unwrap();
    // Slow enough to pause in the middle of the initial sync.
    cli(
        &data,
        &["settings", "set", "--default", "--bandwidth-mbps", "40"],
    );
    let creds = credentials(&data, "srv", &dir.path().join("creds"));
    let size = 48u64 << 20;
    let (source, _) = image(dir.path(), "src.img", size, 1.0, 1 << 20, 41);
    let volumes = vec![volume("d0", &source)];
    let mut config = agent_config(receiver.local_addr(), creds);
    config.exit_when_synced = false;
    let first = std::sync::Arc::new(Agent::new(&volumes));
    let stop = CancellationToken::new();
    let run = {
        let (config, volumes, stop) = (config.clone(), volumes.clone(), stop.clone());
        let agent = std::sync::Arc::clone(&first);
        tokio::spawn(async move { agent.run(&config, &volumes, stop).await })
    };
    wait_for("4 MiB synced", Duration::from_secs(30), || {
        let status = receiver.status().unwrap();
        (status.servers.first()?.disks[0].replicated_bytes >= 4 << 20).then_some(())
    })
    .await;

    let out = cli(&data, &["pause", "--server", "srv"]);
    assert!(out.contains("stopped sending now"), "{out}");
    wait_for(
        "the agent to hear of the pause",
        Duration::from_secs(5),
        || first.stats().pause.is_paused().then_some(()),
    )
    .await;
    // Writes go on at the source, below and above the sync's position: tracked, not sent.
    let mut rng = Rng(41);
    for offset in [0u64, 40 << 20] {
        let block: Vec<u8> = (0..1 << 20).map(|_| rng.next() as u8).collect();
        first.capture().write(0, offset, block).await.unwrap();
    }
    // What the streams had queued before the pause drains first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = receiver.received_bytes("srv");
    let watermark = receiver.status().unwrap().servers[0].disks[0].sync_watermark;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = receiver.received_bytes("srv") - before;
    assert!(
        during < 64 << 10,
        "{during} bytes arrived in 3 s of pause: only heartbeats may"
    );
    let status = receiver.status().unwrap();
    let server = &status.servers[0];
    assert!(server.paused && server.connected && server.stalled.is_none());
    assert_eq!(server.disks[0].state, "PAUSED", "{:?}", server.disks[0]);
    assert_eq!(server.disks[0].reason, "operator_request");
    assert_eq!(server.disks[0].sync_watermark, watermark);
    assert_eq!(server.eta_seconds, None);
    assert!(
        server.disks[0].backlog_bytes >= Some(1 << 20),
        "the write below the sync position is tracked and reported: {:?}",
        server.disks[0].backlog_bytes
    );
    assert!(status.render_table().contains("paused by an operator"));
    let page = scrape(&receiver).await;
    assert_eq!(
        sample(&page, "blockferry_server_paused", &[("server", "srv")]),
        Some(1.0)
    );
    assert_eq!(state_of(&page, "srv", "d0").as_deref(), Some("PAUSED"));
    // Another setting changed meanwhile leaves the pause as it is.
    cli(
        &data,
        &[
            "settings",
            "set",
            "--server",
            "srv",
            "--bandwidth-mbps",
            "80",
        ],
    );
    let shown = cli(&data, &["settings", "show"]);
    let line = shown.lines().find(|l| l.starts_with("srv ")).unwrap();
    assert!(
        line.split_whitespace().collect::<Vec<_>>() == ["srv", "80", "Mbit/s", "yes", "(template)"],
        "{shown}"
    );
    assert!(first.stats().pause.is_paused());

    // The agent restarts without a state record while paused: the receiver asks for a
    // rescan, and the pause holds that too — not one checksum query goes out.
    stop.cancel();
    run.await.unwrap().unwrap();
    let second = Agent::new(&volumes);
    let stats = std::sync::Arc::clone(second.stats());
    let stop = CancellationToken::new();
    let run = {
        let (config, volumes, stop) = (config.clone(), volumes.clone(), stop.clone());
        tokio::spawn(async move { second.run(&config, &volumes, stop).await })
    };
    wait_for(
        "the restarted agent, paused",
        Duration::from_secs(10),
        || {
            let status = receiver.status().unwrap();
            let disk = &status.servers[0].disks[0];
            (stats.pause.is_paused() && status.servers[0].connected && disk.state == "PAUSED")
                .then_some(())
        },
    )
    .await;
    let before = receiver.received_bytes("srv");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = receiver.received_bytes("srv") - before;
    assert!(during < 64 << 10, "{during} bytes arrived while paused");
    let disk = receiver.status().unwrap().servers[0].disks[0].clone();
    assert_eq!(disk.rescan_reason.as_deref(), Some("unclean_shutdown"));
    assert_eq!(
        stats
            .rescanned_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a paused agent must not rescan"
    );
    assert_eq!(disk.sync_watermark, watermark);

    let out = cli(&data, &["resume", "--server", "srv"]);
    assert!(out.contains("resumed; its agent is sending"), "{out}");
    wait_synced(&stats).await;
    assert_identical(&source, &staging_image(&data, "srv", "d0"));
    assert_eq!(
        stats.sessions.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "a resume needs no reconnect"
    );
    let events: Vec<Event> = receiver
        .events()
        .unwrap()
        .into_iter()
        .filter(|e| e.server_id == "srv")
        .collect();
    let paused = event_index(&events, "srv", EventKind::Paused, "operator_request").unwrap();
    let resumed = event_index(&events, "srv", EventKind::Resumed, "operator_request").unwrap();
    assert!(paused < resumed, "{events:?}");
    assert!(
        events
            .iter()
            .all(|e| !(e.event == EventKind::Stalled && e.reason == "no_progress")),
        "a pause is no stall: {events:?}"
    );
    let status = receiver.status().unwrap();
    assert!(!status.servers[0].paused);
    assert_ne!(status.servers[0].disks[0].state, "PAUSED");
    stop.cancel();
    let _ = run.await;
    receiver.shutdown().await;
}

#[test]
fn pausing_an_unknown_server_or_the_template_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    // A data dir with a catalog and no receiver running: the commands work offline.
    std::fs::create_dir_all(&data).unwrap();
    drop(blockferry_receiver::catalog::Catalog::open(&data).unwrap());
    let out = Command::new(env!("CARGO_BIN_EXE_blockferry-receiver"))
        .args(["pause", "--server", "no-such-server", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no source server no-such-server") && stderr.contains("status"),
        "{stderr}"
    );
    // Nothing was written for it.
    assert!(!cli(&data, &["settings", "show"]).contains("no-such-server"));
    let catalog = blockferry_receiver::catalog::Catalog::open(&data).unwrap();
    let err = catalog
        .update_settings(
            None,
            blockferry_receiver::catalog::SettingsChange {
                bandwidth_mbps: None,
                paused: Some(true),
                retention: None,
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("--server"), "{err}");
}
