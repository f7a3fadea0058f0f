//! The blockferry reference agent: reads each source volume once and ships it to a
//! receiver over mutual TLS, resuming from the receiver's watermark after any break.
//! Embedded by the receiver's `demo`, by end-to-end tests and by the load generator.

mod agent;
pub mod blocktrace;
pub mod capture;
pub mod credentials;
pub mod dirty;
pub mod enroll;
pub mod freeze;
mod ftrace;
pub mod inventory;
pub mod nbd;
mod progress;
pub mod proxy;
pub mod quiet;
mod rescan;
pub mod resources;
mod session;
pub mod state;
pub mod throttle;
pub mod tracking;
pub mod volume;

pub use agent::{Agent, AgentConfig, AgentError, AgentReport, AgentStats};
pub use capture::{Capture, CaptureError};
pub use credentials::{Credentials, CredentialsError};
pub use progress::ProgressMode;
pub use session::{Outcome, SessionError};
pub use volume::{Volume, VolumeError};
