//! `io_engine = auto` falls back to the sync engine, with one warning, when the kernel
//! refuses io_uring; `io_engine = uring` is then an error, not a panic. The refusal is
//! forced for real: the test re-runs itself under strace, which makes io_uring_setup fail
//! with EPERM exactly as a seccomp filter would.

use std::process::Command;

use blockferry_storage::*;

const CHILD_ENV: &str = "BLOCKFERRY_FALLBACK_CHILD";

#[test]
fn auto_falls_back_when_io_uring_is_refused() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return child();
    }
    let exe = std::env::current_exe().unwrap();
    let output = Command::new("strace")
        .args([
            "-f",
            "-o",
            "/dev/null",
            "-e",
            "inject=io_uring_setup:error=EPERM",
        ])
        .arg(exe)
        .args([
            "--exact",
            "auto_falls_back_when_io_uring_is_refused",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .expect("strace is needed for this test: apt-get install strace (.ci/run installs it)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("CHILD-OK"),
        "the child did not run its checks:\n{stdout}"
    );
    let warnings = stderr.matches("io_uring refused").count();
    assert_eq!(
        warnings, 1,
        "expected exactly one fallback warning:\n{stderr}"
    );
}

fn child() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let err = Engine::start(IoEngine::Uring, 1).expect_err("io_uring_setup was refused");
    assert!(matches!(err, StoreError::UringUnavailable(_)), "{err}");

    let engine = Engine::start(IoEngine::Auto, 1).expect("auto never fails");
    assert_eq!(engine.kind(), EngineKind::Sync);

    // The fallback engine really works.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::File(
            FileStore::open_or_create(&dir.path().join("f.img"), 4096, engine).unwrap(),
        );
        store.write_at(10, b"fallback".to_vec()).await.unwrap();
        let _ = store.flush().await.unwrap();
        assert_eq!(store.read_at(10, 8).await.unwrap(), b"fallback");
    });
    println!("CHILD-OK");
}
