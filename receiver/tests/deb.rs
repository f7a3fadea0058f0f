//! The .deb packages (deploy/deb/build-debs) installed, upgraded and purged with dpkg in
//! a scratch Debian root (mmdebstrap minbase with systemd, cached by recipe as a
//! tarball): the blockferry user and a 0700 data dir of its own, the receiver enabled
//! and reading its packaged configuration, the agent installed but not enabled; an
//! operator's edit of the configuration survives an upgrade; a purge removes the
//! configuration and the enablement and keeps the staging data.
//!
//! Needs root, mmdebstrap and the network to Debian's mirror the first time.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
const PACKAGES: &str = "systemd";

fn run(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The scratch root's tarball, built once per recipe.
fn root_tarball() -> PathBuf {
    let cache = PathBuf::from("/var/cache/blockferry-tests");
    let recipe = format!("{SUITE} {MIRROR} minbase {PACKAGES}");
    let tarball = cache.join(format!("debroot-{:016x}.tar", fnv(&recipe)));
    if tarball.exists() {
        return tarball;
    }
    std::fs::create_dir_all(&cache).unwrap();
    let partial = tarball.with_extension("tar.partial");
    run(Command::new("mmdebstrap")
        .args([
            "--variant=minbase",
            "--format=tar",
            &format!("--include={PACKAGES}"),
            SUITE,
        ])
        .arg(&partial)
        .arg(MIRROR));
    std::fs::rename(&partial, &tarball).unwrap();
    tarball
}

fn build_debs(out: &Path, version: &str) -> (PathBuf, PathBuf) {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_blockferry-receiver"))
        .parent()
        .unwrap()
        .to_owned();
    assert!(
        bin_dir.join("blockferry-agent").exists(),
        "the agent binary is built by cargo test --workspace (scripts/test)"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/deb/build-debs");
    let printed = run(Command::new(script)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--out")
        .arg(out)
        .args(["--version", version, "--compression", "none"]));
    let mut debs = printed.lines().map(PathBuf::from);
    (debs.next().unwrap(), debs.next().unwrap())
}

/// An enablement link (pointing into the root, so not followed from outside it).
fn linked(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

fn chroot(root: &Path, args: &[&str]) -> String {
    run(Command::new("chroot").arg(root).args(args))
}

fn dpkg_install(root: &Path, debs: &[&Path]) -> String {
    let mut args = vec!["dpkg".to_owned(), "-i".to_owned()];
    for deb in debs {
        let name = deb.file_name().unwrap().to_str().unwrap();
        std::fs::copy(deb, root.join("tmp").join(name)).unwrap();
        args.push(format!("/tmp/{name}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    chroot(root, &args)
}

#[test]
fn the_packages_install_upgrade_and_purge_in_a_debian_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: dpkg in a scratch root needs root");
        return;
    }
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-xf")
        .arg(root_tarball()));

    // Install.
    let (receiver, agent) = build_debs(&dir.path().join("v1"), "0.1.0");
    dpkg_install(&root, &[&receiver, &agent]);
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("blockferry:"))
        .expect("the blockferry system user");
    let uid: u32 = user.split(':').nth(2).unwrap().parse().unwrap();
    assert!(uid < 1000, "not a system user: {user}");
    let data = root.join("var/lib/blockferry-receiver");
    let meta = std::fs::metadata(&data).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o700);
    assert_eq!(meta.uid(), uid);
    let config = root.join("etc/blockferry/receiver.toml");
    assert_eq!(std::fs::metadata(&config).unwrap().mode() & 0o777, 0o640);
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    assert!(
        linked(&wants.join("blockferry-receiver.service")),
        "the receiver is enabled"
    );
    assert!(
        !linked(&wants.join("blockferry-agent.service")),
        "the agent is not enabled before it is configured"
    );
    assert_eq!(
        std::fs::metadata(root.join("etc/blockferry-agent"))
            .unwrap()
            .mode()
            & 0o777,
        0o700
    );
    let version = chroot(&root, &["blockferry-receiver", "--version"]);
    assert!(version.contains("0.1.0"), "{version}");
    chroot(&root, &["blockferry-agent", "--version"]);
    // The packaged configuration is one the receiver takes (bad keys would stop it).
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/blockferry-receiver.service"))
        .unwrap();
    assert!(
        unit.contains("--config /etc/blockferry/receiver.toml") && unit.contains("User=blockferry")
    );
    let argv = blockferry_receiver::cli::with_config_file(
        [
            "blockferry-receiver",
            "run",
            "--config",
            config.to_str().unwrap(),
        ]
        .iter()
        .map(std::ffi::OsString::from)
        .collect(),
    )
    .unwrap();
    let joined: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert!(
        joined.contains(&"--data-dir=/var/lib/blockferry-receiver".to_owned()),
        "{joined:?}"
    );
    use clap::Parser as _;
    blockferry_receiver::cli::Cli::try_parse_from(argv).expect("the packaged settings parse");

    // Upgrade: an operator's edit and the staging data stay.
    let mut edited = std::fs::read_to_string(&config).unwrap();
    edited.push_str("recovery_interval_secs = 300\n");
    std::fs::write(&config, &edited).unwrap();
    std::fs::write(data.join("catalog.redb"), b"staged").unwrap();
    let (receiver2, agent2) = build_debs(&dir.path().join("v2"), "0.1.1");
    dpkg_install(&root, &[&receiver2, &agent2]);
    let status = chroot(
        &root,
        &[
            "dpkg-query",
            "-W",
            "blockferry-receiver",
            "blockferry-agent",
        ],
    );
    assert!(
        status.contains("blockferry-receiver\t0.1.1") && status.contains("blockferry-agent\t0.1.1"),
        "{status}"
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert_eq!(std::fs::read(data.join("catalog.redb")).unwrap(), b"staged");
    assert!(linked(&wants.join("blockferry-receiver.service")));

    // Purge: configuration and enablement go, the staging data stays (and is named).
    let said = chroot(
        &root,
        &["dpkg", "--purge", "blockferry-receiver", "blockferry-agent"],
    );
    assert!(said.contains("/var/lib/blockferry-receiver"), "{said}");
    assert!(!root.join("usr/bin/blockferry-receiver").exists());
    assert!(!config.exists() && !root.join("etc/blockferry").exists());
    assert!(!linked(&wants.join("blockferry-receiver.service")));
    assert!(!root.join("etc/blockferry-agent").exists());
    assert!(!root.join("etc/default/blockferry-agent").exists());
    assert_eq!(std::fs::read(data.join("catalog.redb")).unwrap(), b"staged");
}
