//! The agent binary's own checks, before it ever connects.

use std::process::{Command, Stdio};

fn agent() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_blockferry-agent"));
    cmd.stdin(Stdio::null());
    cmd
}

#[test]
fn help_lists_every_run_flag() {
    let out = agent().args(["run", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--receiver",
        "--credentials",
        "--disk",
        "--exit-when-synced",
        "--progress",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn bad_arguments_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = agent()
        .args([
            "run",
            "--receiver",
            "127.0.0.1:1",
            "--progress",
            "fancy",
            "--credentials",
        ])
        .arg(dir.path())
        .args(["--disk", "/dev/null"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected auto, log or quiet"));

    let out = agent()
        .args(["run", "--receiver", "127.0.0.1:1", "--credentials"])
        .arg(dir.path())
        .args(["--disk", "/dev/null"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("loading credentials") && stderr.contains("agent.key"),
        "{stderr}"
    );

    // At most five streams.
    let out = agent()
        .args([
            "run",
            "--receiver",
            "x:1",
            "--credentials",
            "/tmp",
            "--disk",
            "/dev/null",
            "--streams",
            "6",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1..=5"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A sync mode and a tap address that do not parse.
    for (flag, value, reason) in [
        ("--sync-mode", "eventually", "expected async or sync"),
        ("--nbd-listen", "nowhere", "neither HOST:PORT nor unix:PATH"),
    ] {
        let out = agent()
            .args([
                "run",
                "--receiver",
                "x:1",
                "--credentials",
                "/tmp",
                "--disk",
                "/dev/null",
                flag,
                value,
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(reason),
            "{flag} {value}"
        );
    }

    // --disk is required.
    let out = agent()
        .args(["run", "--receiver", "x:1", "--credentials", "/tmp"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
