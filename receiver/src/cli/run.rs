//! `run`: the receiver itself, from its flags, until SIGTERM or SIGINT.

use super::*;

/// The flags of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A TOML file of these settings (/etc/blockferry/receiver.toml in the package): each
    /// key is a flag's long name, with `_` or `-`; a flag given here wins over the file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Data directory: CA, catalog, staging images, admin socket. Created if missing.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Replication listener address.
    #[arg(long, default_value = crate::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Staging I/O engine: auto (io_uring, else sync with a warning), uring, sync.
    #[arg(long, default_value = "auto")]
    pub io_engine: IoEngine,
    /// io_uring writer threads, each with its own ring.
    #[arg(long, default_value_t = 1)]
    pub writer_threads: usize,
    /// Agents send a barrier (flush + durable watermark) after this many MiB.
    #[arg(long, default_value_t = 16)]
    pub barrier_interval_mib: u64,
    /// Streams (TLS connections) granted to one agent, 1 to 5.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub max_streams: u8,
    /// Control API (HTTPS: enrollment, renewal, status) address; "off" disables it.
    #[arg(long, default_value = "0.0.0.0:8443", value_parser = parse_control)]
    pub control: Control,
    /// Lifetime of agent certificates issued by the control API, in hours; agents
    /// renew well before it ends.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(1..=8760))]
    pub agent_cert_hours: u64,
    /// Prometheus metrics (plain HTTP, GET /metrics) address; "off" disables them.
    #[arg(long, default_value = crate::metrics::DEFAULT_METRICS, value_parser = parse_control)]
    pub metrics: Control,
    /// A disk with changes waiting and nothing made durable for this many seconds is
    /// STALLED (reason no_progress).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(5..=86400))]
    pub stall_after_secs: u64,
    /// Initial syncs and rescans running at once, all servers together; more wait as
    /// QUEUED. 0 is unlimited.
    #[arg(long, default_value_t = 0)]
    pub max_concurrent_syncs: usize,
    /// Where disks are staged: `file` (an image per disk in the data dir) or `ebs`
    /// (that image is a local base copy, and each recovery point becomes one EBS
    /// snapshot per disk, a chain of children, through the EBS direct APIs).
    #[arg(long, value_enum, default_value_t = Backend::File)]
    pub backend: Backend,
    /// The largest disk an agent may replicate, e.g. 16T; larger ones are refused.
    #[arg(long, default_value = "64T", value_parser = parse_size)]
    pub max_disk_size: u64,
    /// Receive buffers of all replication connections together, in MiB (about 1 MiB
    /// per stream in a session); connections beyond it are told to retry later.
    #[arg(long, default_value_t = crate::budget::DEFAULT_FRAME_BUFFER_MIB, value_parser = clap::value_parser!(u32).range(16..=1048576))]
    pub frame_buffer_mib: u32,
    /// File backend: recovery points as copies of the staging images under
    /// images/SERVER/points/EPOCH/: `auto` cuts them as reflinks where the staging
    /// file system shares extents (XFS, btrfs) and none elsewhere; `copy` falls back to
    /// a full copy of every image per point (its space, and a pause of the server's
    /// replication while it copies); `off` cuts none. (EBS: every point is a snapshot.)
    #[arg(long, value_enum, default_value_t = crate::points::FilePointMode::Auto)]
    pub recovery_points: crate::points::FilePointMode,
    /// A recovery point is cut at the first consistent point this many seconds after
    /// the previous one (0: as often as the previous point allows).
    #[arg(long, default_value_t = 600)]
    pub recovery_interval_secs: u64,
    /// How often the retention policies are enforced: points they drop are deleted
    /// (file backend) or their snapshots deleted in EC2 (EBS backend).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub retention_check_secs: u64,
    #[command(flatten)]
    pub ebs: EbsArgs,
    #[command(flatten)]
    pub aws: AwsArgs,
}

pub(super) async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let RunArgs {
        config: _,
        data_dir,
        listen,
        io_engine,
        writer_threads,
        barrier_interval_mib,
        max_streams,
        control,
        agent_cert_hours,
        metrics,
        stall_after_secs,
        max_concurrent_syncs,
        backend,
        max_disk_size,
        frame_buffer_mib,
        recovery_points,
        recovery_interval_secs,
        retention_check_secs,
        ebs,
        aws,
    } = args;
    if barrier_interval_mib == 0 {
        bail!("--barrier-interval-mib must be at least 1");
    }
    let mut config = ReceiverConfig::new(data_dir);
    config.listen = listen;
    config.io_engine = io_engine;
    config.writer_threads = writer_threads.max(1);
    config.barrier_interval = barrier_interval_mib << 20;
    config.max_streams = max_streams;
    config.control = control.0;
    config.agent_cert_lifetime = std::time::Duration::from_secs(agent_cert_hours * 3600);
    config.metrics = metrics.0;
    config.stall_after = std::time::Duration::from_secs(stall_after_secs);
    config.max_concurrent_syncs = max_concurrent_syncs;
    config.max_disk_size = max_disk_size;
    config.frame_buffer_mib = frame_buffer_mib;
    let recovery_interval = std::time::Duration::from_secs(recovery_interval_secs);
    config.recovery_points = recovery_points;
    config.recovery_interval = recovery_interval;
    config.retention_check = std::time::Duration::from_secs(retention_check_secs);
    if backend == Backend::Ebs {
        config.ebs = Some(ebs.config(&aws, recovery_interval)?);
    }
    let receiver = Receiver::start(config).await?;
    wait_for_signal().await;
    tracing::info!("shutting down: finishing sessions");
    receiver.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

/// `argv` with the settings of `run --config FILE` added as the flags they stand for:
/// each key of the TOML file is a long flag of `run` with `_` or `-` (`listen =
/// "0.0.0.0:1500"`, `ebs_tag = ["k=v"]` for a repeatable flag, `true` for a switch). A
/// flag on the command line wins over the file. A key that is no flag of `run`, or a
/// value that is no string, number, switch or list of them, is an error naming the file
/// and the key. Everything else (types, ranges) is checked by the flags' own parsers.
/// Other commands, and `run` without `--config`, get `argv` back unchanged.
pub fn with_config_file(argv: Vec<std::ffi::OsString>) -> anyhow::Result<Vec<std::ffi::OsString>> {
    use clap::Args as _;
    let text: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // The subcommand is the first argument that is not a flag (the only global flag,
    // --log-json, takes no value).
    let Some(run_at) = text
        .iter()
        .skip(1)
        .position(|a| !a.starts_with('-'))
        .map(|i| i + 1)
    else {
        return Ok(argv);
    };
    if text[run_at] != "run" {
        return Ok(argv);
    }
    let after = &text[run_at + 1..];
    let config = after.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--config=")
            .map(str::to_owned)
            .or_else(|| (a == "--config").then(|| after.get(i + 1).cloned().unwrap_or_default()))
    });
    let Some(config) = config else {
        return Ok(argv);
    };
    if config.is_empty() {
        bail!("--config needs a file");
    }
    let raw = std::fs::read_to_string(&config)
        .with_context(|| format!("reading the receiver's configuration {config}"))?;
    let table: toml::Table = raw
        .parse()
        .with_context(|| format!("{config} is not valid TOML"))?;
    let flags = RunArgs::augment_args(clap::Command::new("run"));
    let known: Vec<String> = flags
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .collect();
    let given = |flag: &str| {
        after
            .iter()
            .any(|a| a == &format!("--{flag}") || a.starts_with(&format!("--{flag}=")))
    };
    let mut extra = Vec::new();
    for (key, value) in &table {
        let flag = key.replace('_', "-");
        if !known.contains(&flag) || flag == "config" {
            bail!(
                "{config}: unknown setting {key:?}; the settings are the long flags of `blockferry-receiver run` (see run --help), e.g. listen = \"0.0.0.0:1500\""
            );
        }
        if given(&flag) {
            continue;
        }
        let scalar = |value: &toml::Value| -> anyhow::Result<String> {
            match value {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                other => bail!(
                    "{config}: setting {key:?} is a {}; give a string, a number, true/false, or a list of them",
                    other.type_str()
                ),
            }
        };
        match value {
            toml::Value::Boolean(true) => extra.push(format!("--{flag}")),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(values) => {
                for value in values {
                    extra.push(format!("--{flag}={}", scalar(value)?));
                }
            }
            value => extra.push(format!("--{flag}={}", scalar(value)?)),
        }
    }
    let mut argv = argv;
    argv.extend(extra.into_iter().map(std::ffi::OsString::from));
    Ok(argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<std::ffi::OsString> {
        args.iter().map(std::ffi::OsString::from).collect()
    }

    fn parse(args: Vec<std::ffi::OsString>) -> RunArgs {
        match Cli::try_parse_from(args).unwrap().command {
            Command::Run(run) => run,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_config_file_sets_flags_and_the_command_line_wins() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("receiver.toml");
        std::fs::write(
            &file,
            "data_dir = \"/srv/bf\"\nlisten = \"127.0.0.1:1600\"\nmax-streams = 3\n\
             ebs_tag = [\"team=dr\", \"cost=7\"]\nbackend = \"ebs\"\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let args = parse(
            with_config_file(argv(&[
                "r",
                "run",
                "--config",
                path,
                "--listen",
                "0.0.0.0:1500",
            ]))
            .unwrap(),
        );
        assert_eq!(args.data_dir, PathBuf::from("/srv/bf"));
        assert_eq!(
            args.listen,
            "0.0.0.0:1500".parse().unwrap(),
            "the flag wins"
        );
        assert_eq!(args.max_streams, 3);
        assert!(matches!(args.backend, Backend::Ebs));
        let tags = format!("{:?}", args.ebs);
        assert!(tags.contains("team") && tags.contains("cost"), "{tags}");

        // Other commands, and run without --config, are left alone.
        let other = argv(&["r", "status", "--data-dir", "/x"]);
        assert_eq!(with_config_file(other.clone()).unwrap(), other);
    }

    #[test]
    fn a_bad_config_file_is_refused_naming_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("receiver.toml");
        let path = file.to_str().unwrap().to_owned();
        for (text, needle) in [
            ("data_dir = \"/x\"\nlisten_port = 1500\n", "listen_port"),
            ("config = \"/etc/other.toml\"\n", "\"config\""),
            ("data_dir = { path = \"/x\" }\n", "table"),
            ("data_dir = \n", "not valid TOML"),
        ] {
            std::fs::write(&file, text).unwrap();
            let err = with_config_file(argv(&["r", "run", "--config", &path])).unwrap_err();
            let message = format!("{err:#}");
            assert!(
                message.contains(&path) && message.contains(needle),
                "{message}"
            );
        }
        let err =
            with_config_file(argv(&["r", "run", "--config", "/nonexistent.toml"])).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent.toml"));
        // A value of the wrong type is refused by the flag's own parser.
        std::fs::write(&file, "data_dir = \"/x\"\nmax_streams = 9\n").unwrap();
        let argv = with_config_file(argv(&["r", "run", "--config", &path])).unwrap();
        assert!(Cli::try_parse_from(argv).is_err());
    }
}
