//! What an operator sets per source server to hold the agent back: the bandwidth limit,
//! one token bucket shared by every stream of the agent so that the limit holds for the
//! sum however the work spreads, and the pause, which stops the sending altogether.
//!
//! The receiver sends both in `Welcome` and again in `SettingsUpdate` whenever they
//! change; a change applies to the next frame each stream sends.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// An operator's pause of the server's replication. While paused the agent sends no
/// data, no checksum requests and no barriers; it keeps capturing changes into its dirty
/// map and keeps heartbeating, so the receiver shows the backlog growing.
///
/// It is not part of the token bucket on purpose: heartbeats pass the bucket, and they
/// must keep flowing while replication is paused.
#[derive(Debug, Default)]
pub struct Pause {
    paused: AtomicBool,
    changed: Notify,
}

impl Pause {
    pub fn set(&self, paused: bool) {
        if self.paused.swap(paused, Ordering::SeqCst) != paused {
            if paused {
                tracing::info!("replication paused by an operator: changes are tracked, not sent");
            } else {
                tracing::info!("replication resumed by an operator");
            }
            self.changed.notify_waiters();
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Completes at the next change of the pause. Create it before checking
    /// [`Self::is_paused`], and a change in between is not missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Returns once replication is not paused.
    pub async fn resumed(&self) {
        loop {
            let changed = self.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !self.is_paused() {
                return;
            }
            changed.await;
        }
    }
}

/// How much unused allowance may build up, in time at the current rate: enough to keep
/// streams busy between frames, too little to distort a 10-second average.
const BURST: Duration = Duration::from_millis(100);
/// The least burst, so that a low limit still lets a whole control frame through at once.
const MIN_BURST_BYTES: f64 = 64.0 * 1024.0;

#[derive(Debug)]
pub struct Throttle {
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes per second; 0 is unlimited.
    rate: u64,
    /// Allowance in bytes; negative when frames were let through on credit.
    tokens: f64,
    refilled: Instant,
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Throttle {
    pub fn new(rate: u64) -> Self {
        Self {
            state: Mutex::new(Bucket {
                rate,
                tokens: 0.0,
                refilled: Instant::now(),
            }),
        }
    }

    /// The limit in bytes per second (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.lock().rate
    }

    /// Applies a new limit from now on. Credit already taken is paid back at the new rate.
    pub fn set_rate(&self, rate: u64) {
        let mut bucket = self.lock();
        if bucket.rate != rate {
            tracing::info!(
                bytes_per_second = rate,
                "bandwidth limit {}",
                if rate == 0 { "lifted" } else { "set" }
            );
        }
        bucket.refill(Instant::now());
        bucket.rate = rate;
        bucket.tokens = bucket.tokens.min(bucket.burst());
    }

    /// Waits until `bytes` may be sent. A frame larger than the allowance goes through on
    /// credit, and the senders after it wait the credit off: over any interval the
    /// average stays at the rate.
    pub async fn acquire(&self, bytes: usize) {
        let wait = {
            let mut bucket = self.lock();
            if bucket.rate == 0 {
                return;
            }
            let now = Instant::now();
            bucket.refill(now);
            bucket.tokens -= bytes as f64;
            (bucket.tokens < 0.0)
                .then(|| Duration::from_secs_f64(-bucket.tokens / bucket.rate as f64))
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Bucket {
    fn burst(&self) -> f64 {
        (self.rate as f64 * BURST.as_secs_f64()).max(MIN_BURST_BYTES)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        if self.rate > 0 {
            self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.burst());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes let through by several senders in `span` of (paused, so exact) time.
    async fn throughput(throttle: &std::sync::Arc<Throttle>, span: Duration) -> u64 {
        let end = Instant::now() + span;
        let mut senders = Vec::new();
        for frame in [1 << 20, 300 << 10, 4096] {
            let throttle = std::sync::Arc::clone(throttle);
            senders.push(tokio::spawn(async move {
                let mut sent = 0u64;
                while Instant::now() < end {
                    throttle.acquire(frame).await;
                    sent += frame as u64;
                }
                sent
            }));
        }
        let mut total = 0;
        for sender in senders {
            total += sender.await.unwrap();
        }
        total
    }

    #[tokio::test(start_paused = true)]
    async fn streams_together_keep_to_the_rate_and_follow_a_change() {
        let throttle = std::sync::Arc::new(Throttle::new(5_000_000));
        let sent = throughput(&throttle, Duration::from_secs(10)).await;
        let rate = sent as f64 / 10.0;
        assert!(
            (rate - 5e6).abs() < 0.05 * 5e6,
            "{rate} B/s at a 5 MB/s limit"
        );

        throttle.set_rate(10_000_000);
        let sent = throughput(&throttle, Duration::from_secs(10)).await;
        let rate = sent as f64 / 10.0;
        assert!((rate - 10e6).abs() < 0.05 * 10e6, "{rate} B/s at 10 MB/s");

        throttle.set_rate(0);
        let start = Instant::now();
        throttle.acquire(1 << 30).await;
        assert_eq!(start.elapsed(), Duration::ZERO, "unlimited must not wait");
    }

    #[tokio::test]
    async fn a_paused_sender_waits_until_it_is_resumed() {
        let pause = std::sync::Arc::new(Pause::default());
        pause.resumed().await;
        pause.set(true);
        let waiter = {
            let pause = std::sync::Arc::clone(&pause);
            tokio::spawn(async move { pause.resumed().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "a paused sender must wait");
        pause.set(true);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "pausing again is no resume");
        pause.set(false);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("a resume wakes the waiting sender")
            .unwrap();
    }
}
