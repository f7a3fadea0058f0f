//! The blockferry reference agent: reads each source volume once and ships it to a
//! receiver over mutual TLS, resuming from the receiver's watermark after any break.
//! Embedded by the receiver's `demo`, by end-to-end tests and by the load generator.

mod agent;
pub mod capture;
pub mod credentials;
pub mod dirty;
pub mod enroll;
pub mod inventory;
pub mod nbd;
mod progress;
pub mod proxy;
mod rescan;
pub mod resources;
mod session;
pub mod state;
pub mod throttle;
pub mod volume;

pub use agent::{Agent, AgentConfig, AgentError, AgentReport, AgentStats};
pub use capture::{Capture, CaptureError};
pub use credentials::{Credentials, CredentialsError};
pub use progress::ProgressMode;
pub use session::{Outcome, SessionError};
pub use volume::{Volume, VolumeError};

/// Initialises logging for the binaries: human-readable or JSON lines on stderr,
/// filtered by `RUST_LOG` (default `info`).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
