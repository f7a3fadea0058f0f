//! Progress for people: a bar on a terminal (indicatif), a log line every few seconds
//! otherwise, nothing for embedded use.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::agent::AgentStats;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, log lines otherwise.
    Auto,
    /// Log lines every 10 s.
    Log,
    Quiet,
}

pub(crate) struct Progress {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    pub(crate) fn start(mode: ProgressMode, stats: Arc<AgentStats>) -> Self {
        let task = match mode {
            ProgressMode::Quiet => None,
            ProgressMode::Auto if std::io::stderr().is_terminal() => Some(tokio::spawn(bar(stats))),
            ProgressMode::Auto | ProgressMode::Log => Some(tokio::spawn(log_lines(stats))),
        };
        Self { task }
    }

    pub(crate) fn finish(self) {
        if let Some(task) = self.task {
            task.abort();
        }
    }
}

async fn bar(stats: Arc<AgentStats>) {
    let bar = ProgressBar::new(stats.total_bytes());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} sent, {msg} ({bytes_per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    loop {
        bar.set_position(stats.sent_bytes());
        bar.set_message(format!(
            "{} durable",
            indicatif::HumanBytes(stats.durable_bytes())
        ));
        if stats.synced.load(std::sync::atomic::Ordering::Relaxed) {
            bar.finish();
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn log_lines(stats: Arc<AgentStats>) {
    let total = stats.total_bytes().max(1);
    let mut interval = tokio::time::interval(Duration::from_secs(10));
    interval.tick().await;
    loop {
        interval.tick().await;
        let (sent, durable) = (stats.sent_bytes(), stats.durable_bytes());
        tracing::info!(
            sent,
            durable,
            total,
            percent = format!("{:.1}", durable as f64 * 100.0 / total as f64),
            "initial sync progress"
        );
        if stats.synced.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
    }
}
