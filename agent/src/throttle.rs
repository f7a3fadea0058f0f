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
    /// Wakes the senders waiting off credit when the rate changes, so that a raised
    /// limit applies to them at once instead of after the wait the old rate set.
    rate_changed: Notify,
}

/// The allowance as two running totals, so that a waiting sender holds a place in the
/// queue (a byte count), not a deadline computed at one rate: `allowed - taken` is the
/// allowance, negative when frames were let through on credit.
#[derive(Debug)]
struct Bucket {
    /// Bytes per second; 0 is unlimited.
    rate: u64,
    /// Bytes the rate has made available so far (minus what overflowed the burst).
    allowed: f64,
    /// Bytes senders have taken so far.
    taken: f64,
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
                allowed: 0.0,
                taken: 0.0,
                refilled: Instant::now(),
            }),
            rate_changed: Notify::new(),
        }
    }

    /// The limit in bytes per second (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.lock().rate
    }

    /// Applies a new limit from now on, to the senders already waiting too: credit
    /// already taken is paid back at the new rate.
    pub fn set_rate(&self, rate: u64) {
        let mut bucket = self.lock();
        if bucket.rate == rate {
            return;
        }
        tracing::info!(
            bytes_per_second = rate,
            "bandwidth limit {}",
            if rate == 0 { "lifted" } else { "set" }
        );
        bucket.refill(Instant::now());
        bucket.rate = rate;
        if rate == 0 {
            // Unlimited forgives the credit: nobody waits for it any more.
            bucket.allowed = bucket.taken;
        }
        bucket.cap();
        drop(bucket);
        self.rate_changed.notify_waiters();
    }

    /// Waits until `bytes` may be sent: until the allowance covers this frame and every
    /// frame taken before it, so that over any interval the average stays at the rate.
    pub async fn acquire(&self, bytes: usize) {
        let place = {
            let mut bucket = self.lock();
            if bucket.rate == 0 {
                return;
            }
            bucket.refill(Instant::now());
            bucket.taken += bytes as f64;
            // The sender may go once the allowance has caught up with everything taken
            // up to and including its own frame.
            bucket.taken
        };
        loop {
            let rate_changed = self.rate_changed.notified();
            tokio::pin!(rate_changed);
            rate_changed.as_mut().enable();
            let wait = {
                let mut bucket = self.lock();
                if bucket.rate == 0 {
                    return;
                }
                bucket.refill(Instant::now());
                let owed = place - bucket.allowed;
                if owed <= 0.0 {
                    return;
                }
                Duration::from_secs_f64(owed / bucket.rate as f64)
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = &mut rate_changed => {}
            }
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
            self.allowed += elapsed * self.rate as f64;
            self.cap();
        }
    }

    /// Unused allowance beyond the burst is lost, as in any token bucket.
    fn cap(&mut self) {
        self.allowed = self.allowed.min(self.taken + self.burst());
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

    #[tokio::test(start_paused = true)]
    async fn a_raised_limit_applies_at_once_to_senders_already_waiting() {
        // Four senders of 1 MiB frames at 1 MB/s: the last of them owes about 4 s.
        let throttle = std::sync::Arc::new(Throttle::new(1_000_000));
        let start = Instant::now();
        let mut senders = Vec::new();
        for _ in 0..4 {
            let throttle = std::sync::Arc::clone(&throttle);
            senders.push(tokio::spawn(async move {
                throttle.acquire(1 << 20).await;
                Instant::now()
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        throttle.set_rate(100_000_000);
        let mut last = start;
        for sender in senders {
            last = last.max(sender.await.unwrap());
        }
        // 0.1 s at 1 MB/s paid 0.1 MB; the other 4.1 MB at 100 MB/s take 41 ms more.
        let took = last - start;
        assert!(
            took < Duration::from_millis(200),
            "the waiting senders went after {took:?}, on the old rate's deadline"
        );

        // Lifting the limit releases a waiter at once too.
        throttle.set_rate(1_000);
        throttle.acquire(1 << 20).await;
        let waiter = {
            let throttle = std::sync::Arc::clone(&throttle);
            tokio::spawn(async move { throttle.acquire(1 << 20).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "1 MiB at 1 kB/s must wait");
        throttle.set_rate(0);
        tokio::time::timeout(Duration::from_millis(1), waiter)
            .await
            .expect("lifting the limit releases the waiting sender")
            .unwrap();
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
