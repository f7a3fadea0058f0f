//! A smoke run of every benchmark command at tiny sizes: each must run to its end and
//! print its figures (not meet its targets: debug builds on a shared machine measure
//! nothing). What a run prints is the interface BENCHMARKS.md quotes, so the lines these
//! tests look for are the ones a reader of the figures needs.

use std::path::PathBuf;
use std::process::Command;

fn bench(args: &[&str]) -> String {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_blockferry-bench"));
    for sibling in ["blockferry-receiver", "blockferry-agent"] {
        assert!(
            bin.with_file_name(sibling).exists(),
            "the benchmarks start {sibling} from beside them: build the workspace (cargo test --workspace)"
        );
    }
    let out = Command::new(&bin).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "blockferry-bench {} failed ({}):\n{stdout}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Every needle is in the output (each names a figure the command must print).
fn assert_prints(out: &str, needles: &[&str]) {
    for needle in needles {
        assert!(out.contains(needle), "no {needle:?} in:\n{out}");
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").unwrap()
}

#[test]
fn initial_sync_prints_both_sides_and_their_ratio() {
    let dir = scratch();
    let out = bench(&[
        "initial-sync",
        "--size",
        "16M",
        "--runs",
        "1",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_prints(
        &out,
        &[
            "baseline  copy + fdatasync",
            "ratio blockferry / baseline",
            "peak RSS",
        ],
    );
}

#[test]
fn continuous_prints_lag_and_cpu_per_rate() {
    let dir = scratch();
    let out = bench(&[
        "continuous",
        "--rates",
        "2",
        "--seconds",
        "2",
        "--size",
        "32M",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_prints(&out, &["lag p99", "agent %", "receiver %"]);
}

#[test]
fn compare_prints_every_contender_and_checks_the_targets() {
    let dir = scratch();
    let out = bench(&[
        "compare",
        "--size",
        "16M",
        "--runs",
        "1",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_prints(
        &out,
        &[
            "blockferry (loopback mTLS)",
            "socat TLS 1.3 pipe + fsync",
            "rsync daemon",
        ],
    );
    assert!(
        out.contains("met") || out.contains("MISSED"),
        "no target checked:\n{out}"
    );
}

#[test]
fn ebs_upload_prints_throughput_beside_its_ceiling() {
    let out = bench(&[
        "ebs-upload",
        "--blocks",
        "16",
        "--latency-ms",
        "5",
        "--concurrency",
        "1,4",
    ]);
    assert_prints(&out, &["ceiling", "of ceiling"]);
}

#[test]
fn rescan_prints_its_time_beside_rsync_and_reading_both() {
    let dir = scratch();
    let out = bench(&[
        "rescan",
        "--size",
        "16M",
        "--runs",
        "1",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_prints(
        &out,
        &[
            "lower bound: read both images",
            "blockferry rescan",
            "rsync --inplace",
        ],
    );
}

#[test]
fn tracking_prints_each_source_and_the_steady_rate() {
    if !is_root() {
        eprintln!("SKIP: tracking needs root (loop devices, tracefs)");
        return;
    }
    let out = bench(&[
        "tracking",
        "--size",
        "64M",
        "--seconds",
        "1",
        "--rounds",
        "1",
    ]);
    assert_prints(
        &out,
        &[
            "IOPS/off",
            "tracker, ftrace",
            "tracker, perf ring",
            "of 4 KiB writes, ftrace",
        ],
    );
}

#[test]
fn tracked_prints_the_agents_cpu_and_lag() {
    if !is_root() {
        eprintln!("SKIP: tracked needs root (loop devices, tracefs)");
        return;
    }
    let out = bench(&[
        "tracked",
        "--rates",
        "10",
        "--seconds",
        "3",
        "--size",
        "64M",
    ]);
    assert_prints(
        &out,
        &["lag p99", "agent peak RSS", "agent process CPU at 10 MiB/s"],
    );
}

#[test]
fn points_prints_cut_and_full_copy_time_and_space() {
    let dir = scratch();
    let out = bench(&[
        "points",
        "--size",
        "32M",
        "--runs",
        "1",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_prints(
        &out,
        &[
            "point cut (copy)",
            "full copy (cp --reflink=never + fsync)",
            "time ratio cut/full",
            "space ratio cut/full",
        ],
    );
    if is_root() && out.contains("loop-mounted XFS") {
        assert_prints(&out, &["point cut (reflink)", "a kept point after 1%"]);
    }
}
