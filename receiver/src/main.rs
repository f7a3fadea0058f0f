//! `blockferry-receiver`: parse arguments, start logging, run.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // glibc raises its mmap threshold after large buffers are freed, and then keeps
    // them: the receive buffers of connections that came and went stayed resident. A
    // fixed threshold gives them back.
    // SAFETY: mallopt only adjusts allocator parameters; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
    let argv = match blockferry_receiver::cli::with_config_file(std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(err) => {
            eprintln!("error: {err:#}");
            return ExitCode::from(2);
        }
    };
    let cli = blockferry_receiver::cli::Cli::parse_from(argv);
    blockferry_util::logging::init(cli.log_json);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(blockferry_receiver::cli::run(cli.command)) {
        Ok(code) => code,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
