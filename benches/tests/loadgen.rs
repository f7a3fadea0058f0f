//! A quick loadgen run (a few agents, seconds): every byte written — initial sync and
//! continuous writes — arrives, the JSON report says so, and the plot is a PNG.

use std::path::PathBuf;
use std::process::Command;

fn bench() -> Command {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_blockferry-bench"));
    assert!(
        bin.with_file_name("blockferry-receiver").exists(),
        "loadgen starts the receiver binary beside it: build the workspace (cargo test --workspace)"
    );
    Command::new(bin)
}

#[test]
fn a_short_loadgen_run_delivers_every_byte_and_draws_its_plot() {
    let dir = tempfile::tempdir().unwrap();
    let (json, plot) = (dir.path().join("report.json"), dir.path().join("plot.png"));
    let out = bench()
        .args([
            "loadgen",
            "--agents",
            "3",
            "--disks",
            "2",
            "--streams",
            "2",
            "--size",
            "8M",
            "--zero-fraction",
            "0.5",
            "--rate",
            "2",
            "--seconds",
            "2",
            "--pattern",
            "zipf",
        ])
        .arg("--dir")
        .arg(dir.path())
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&plot)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("lag, captured -> durable"), "{stdout}");

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let size = 8u64 << 20;
    // Every disk of every agent, compared with its staging image after the writes.
    assert_eq!(report["verified_bytes"], 3 * 2 * size);
    assert_eq!(report["sync"]["bytes"], 3 * 2 * size);
    let written = report["continuous"]["written_bytes"].as_u64().unwrap();
    // 2 MiB/s for 2 s from each of 3 agents, give or take the last tick.
    assert!(written >= 10 << 20, "{written}");
    assert!(report["continuous"]["lag_samples"].as_u64().unwrap() > 0);
    let per_agent = report["per_agent"].as_array().unwrap();
    assert_eq!(per_agent.len(), 3);
    assert!(
        per_agent
            .iter()
            .all(|a| a["written_bytes"].as_u64() > Some(0))
    );
    // Half zeros travel as zero-fills: the wire carries much less than the images.
    let wire = report["wire_bytes"].as_u64().unwrap();
    assert!(wire < 3 * 2 * size * 3 / 4 + written * 2, "{wire}");
    assert!(report["receiver_peak_rss_bytes"].as_u64().unwrap() > 0);
    assert!(!report["throughput_series"].as_array().unwrap().is_empty());

    let png = std::fs::read(&plot).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(png.len() > 10_000, "an empty picture: {} bytes", png.len());
    // The temporary images and receiver data are gone.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

#[test]
fn bad_loadgen_options_are_refused_before_any_work() {
    for (args, expected) in [
        (&["--min-write", "1000"][..], "multiples of 512"),
        (
            &["--max-write", "2K", "--min-write", "4K"][..],
            "--min-write <= --max-write",
        ),
        (&["--zero-fraction", "1.5"][..], "between 0 and 1"),
        (&["--agents", "0"][..], "at least 1"),
        (&["--receiver", "127.0.0.1:1"][..], "--credentials"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = bench()
            .args(["loadgen", "--size", "1M", "--seconds", "1"])
            .args(args)
            .arg("--dir")
            .arg(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

#[test]
fn compare_names_a_missing_tool_and_how_to_install_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = bench()
        .args(["compare", "--size", "1M", "--runs", "1", "--dir"])
        .arg(dir.path())
        // No socat, no rsync, no cp on this PATH.
        .env("PATH", dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("missing: socat, rsync, cp")
            && stderr.contains("apt-get install socat rsync"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no work before the check"
    );
}
