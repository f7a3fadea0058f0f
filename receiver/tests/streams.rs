//! Multi-stream sessions: at most five streams, each joining a live session of its own
//! server once; a consistent epoch needs its barrier on every stream, and epochs continue
//! across sessions.

mod common;

use blockferry_proto::{Barrier, Durable, ErrorCode, Frame, JoinStream, Welcome};
use common::*;

fn refused_with(frame: Option<Frame>, code: ErrorCode, text: &str) {
    match frame {
        Some(Frame::Error(e)) => {
            assert_eq!(e.code, code, "{}", e.message);
            assert!(e.message.contains(text), "{:?} lacks {text:?}", e.message);
        }
        other => panic!("expected an Error {code}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_join_their_own_session_up_to_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let receiver = start_receiver(&data).await;
    let addr = receiver.local_addr();
    let creds = credentials(&data, "s1", &dir.path().join("s1"));
    let other = credentials(&data, "s2", &dir.path().join("s2"));

    // Asking for more than five streams gets five.
    let mut primary = RawStream::connect(addr, &creds).await;
    primary.send(&raw_hello(1 << 20, 9)).await;
    let Some(Frame::Welcome(Welcome {
        session_id,
        next_epoch,
        settings,
        ..
    })) = primary.next().await
    else {
        panic!("no Welcome");
    };
    assert_eq!(settings.max_streams, 5);
    assert_eq!(next_epoch, 1, "a new server's epochs start at 1");

    let mut joined = Vec::new();
    for index in 1..5 {
        let mut s = RawStream::connect(addr, &creds).await;
        s.send(&Frame::JoinStream(JoinStream {
            session_id,
            stream_index: index,
        }))
        .await;
        joined.push(s);
    }
    // A sixth stream, and a stream joining twice, are refused.
    let mut sixth = RawStream::connect(addr, &creds).await;
    sixth
        .send(&Frame::JoinStream(JoinStream {
            session_id,
            stream_index: 5,
        }))
        .await;
    refused_with(sixth.next().await, ErrorCode::LIMIT, "at most 5");
    let mut again = RawStream::connect(addr, &creds).await;
    again
        .send(&Frame::JoinStream(JoinStream {
            session_id,
            stream_index: 2,
        }))
        .await;
    refused_with(again.next().await, ErrorCode::LIMIT, "each joining once");
    // An unknown session, and another server's session, are refused.
    let mut stranger = RawStream::connect(addr, &creds).await;
    stranger
        .send(&Frame::JoinStream(JoinStream {
            session_id: [0xAB; 16],
            stream_index: 1,
        }))
        .await;
    refused_with(stranger.next().await, ErrorCode::PROTOCOL, "does not exist");
    let mut intruder = RawStream::connect(addr, &other).await;
    intruder
        .send(&Frame::JoinStream(JoinStream {
            session_id,
            stream_index: 1,
        }))
        .await;
    refused_with(
        intruder.next().await,
        ErrorCode::NOT_AUTHORIZED,
        "of server s1",
    );

    // Epoch 1 is durable only once its barrier has come on all five streams.
    primary
        .send(&Frame::Barrier(Barrier {
            epoch: 1,
            sync_progress: vec![],
            rescan_done: vec![],
            consistent: true,
        }))
        .await;
    for s in &mut joined[..3] {
        s.send(&Frame::Barrier(Barrier {
            epoch: 1,
            sync_progress: vec![],
            rescan_done: vec![],
            consistent: true,
        }))
        .await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let status = receiver.status().unwrap();
    assert_eq!(
        status.servers[0].durable_epoch, 0,
        "four of five barriers are not a consistent point"
    );
    assert_eq!(status.servers[0].streams, 5);
    joined[3]
        .send(&Frame::Barrier(Barrier {
            epoch: 1,
            sync_progress: vec![],
            rescan_done: vec![],
            consistent: true,
        }))
        .await;
    assert_eq!(
        primary.next().await,
        Some(Frame::Durable(Durable { epoch: 1 }))
    );
    for s in &mut joined {
        assert_eq!(
            s.next().await,
            Some(Frame::Durable(Durable { epoch: 1 })),
            "every stream hears of it"
        );
    }
    let status = receiver.status().unwrap();
    assert_eq!(status.servers[0].durable_epoch, 1);
    assert!(status.servers[0].consistent_at > 0);

    // A barrier for the wrong epoch is a protocol error, which ends the whole session.
    joined[0]
        .send(&Frame::Barrier(Barrier {
            epoch: 7,
            sync_progress: vec![],
            rescan_done: vec![],
            consistent: true,
        }))
        .await;
    refused_with(
        joined[0].next().await,
        ErrorCode::PROTOCOL,
        "the next epoch is 2",
    );
    let mut ended = false;
    for _ in 0..5 {
        if primary.next().await.is_none() {
            ended = true;
            break;
        }
    }
    assert!(ended, "the other streams of the session end too");

    // The next session of the server continues the epochs.
    let mut next = RawStream::connect(addr, &creds).await;
    next.send(&raw_hello(1 << 20, 1)).await;
    let Some(Frame::Welcome(welcome)) = next.next().await else {
        panic!("no Welcome");
    };
    assert_eq!(welcome.next_epoch, 2);
    assert_eq!(welcome.settings.max_streams, 1);
    receiver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_keeps_every_stream_alive() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("receiver");
    let mut config = receiver_config(&data);
    config.heartbeat_interval = std::time::Duration::from_millis(200);
    config.idle_timeout = std::time::Duration::from_millis(1500);
    let receiver = blockferry_receiver::Receiver::start(config).await.unwrap();
    let creds = credentials(&data, SERVER, &dir.path().join("creds"));
    let (source, _) = image(dir.path(), "src.img", 4 << 20, 0.5, 1 << 20, 41);
    let volumes = vec![volume("disk0", &source)];
    let mut agent_config = agent_config(receiver.local_addr(), creds);
    agent_config.exit_when_synced = false;
    let agent = blockferry_agent::Agent::new(&volumes);
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn({
        let (agent, stop) = (agent.clone(), stop.clone());
        async move { agent.run(&agent_config, &volumes, stop).await.unwrap() }
    });
    // Synced, then idle for four idle timeouts: no stream may be dropped as dead.
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    assert!(
        agent
            .stats()
            .synced
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    assert_eq!(
        agent
            .stats()
            .sessions
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the session was dropped"
    );
    let status = receiver.status().unwrap();
    assert_eq!(status.servers[0].streams, 4);
    assert_eq!(status.servers[0].backlog_bytes, Some(0));
    assert!(status.servers[0].agent_rss_bytes.is_some_and(|r| r > 0));
    stop.cancel();
    run.await.unwrap();
    receiver.shutdown().await;
}
