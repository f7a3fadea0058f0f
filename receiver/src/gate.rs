//! The epoch gate of a session (invariant 3): epoch E is *sealed* once its barrier has
//! arrived on every stream of the session, and *applied* once every write submitted before
//! those barriers has completed. A stream that has delivered barrier E reads nothing more
//! until E is applied, so writes of epoch E+1 never reach a staging image before all of
//! epoch E: at any instant the images hold all of epochs ≤ E plus part of E+1, and the
//! consistent point E that the barrier worker then records is crash-consistent across
//! every disk of the server.

use std::sync::Mutex;

use crate::lock;
use tokio::sync::Notify;

/// Why a barrier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum GateError {
    #[error("barrier for epoch {got} on stream {stream}, but the next epoch is {expected}")]
    WrongEpoch { stream: u8, got: u64, expected: u64 },
    #[error("stream {stream} sent the barrier for epoch {epoch} twice")]
    Duplicate { stream: u8, epoch: u64 },
}

/// An epoch whose barrier has arrived on every stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sealed {
    pub(crate) epoch: u64,
    /// Sequence number of the last write submitted before the last of the barriers.
    pub(crate) through: u64,
    /// Initial-sync progress claimed by the barriers: (disk index, watermark).
    pub(crate) progress: Vec<(u16, u64)>,
    /// Disks whose rescan the barriers claim complete.
    pub(crate) rescan_done: Vec<u16>,
    /// Every stream's barrier says the epoch ends at a crash-consistent point.
    pub(crate) consistent: bool,
}

#[derive(Debug)]
pub(crate) struct EpochGate {
    streams: u8,
    state: Mutex<State>,
    applied: Notify,
}

#[derive(Debug)]
struct State {
    /// The epoch whose barriers are being collected.
    next: u64,
    /// Bit i: stream i has delivered barrier `next`.
    arrived: u8,
    through: u64,
    progress: Vec<(u16, u64)>,
    rescan_done: Vec<u16>,
    /// A stream's barrier for `next` said it is not a consistent point.
    inconsistent: bool,
    applied_through: u64,
}

impl EpochGate {
    /// A gate for a session of `streams` streams whose first barrier is `first_epoch`.
    pub(crate) fn new(streams: u8, first_epoch: u64) -> Self {
        Self {
            streams,
            state: Mutex::new(State {
                next: first_epoch,
                arrived: 0,
                through: 0,
                progress: Vec::new(),
                rescan_done: Vec::new(),
                inconsistent: false,
                applied_through: first_epoch.saturating_sub(1),
            }),
            applied: Notify::new(),
        }
    }

    /// Records barrier `epoch` from `stream`, after writes up to sequence `through` were
    /// submitted. Returns the sealed epoch when this was the last stream to deliver it.
    pub(crate) fn arrive(
        &self,
        stream: u8,
        epoch: u64,
        through: u64,
        progress: &[(u16, u64)],
        rescan_done: &[u16],
        consistent: bool,
    ) -> Result<Option<Sealed>, GateError> {
        let mut state = lock(&self.state);
        if epoch != state.next {
            return Err(GateError::WrongEpoch {
                stream,
                got: epoch,
                expected: state.next,
            });
        }
        let bit = 1u8 << stream;
        if state.arrived & bit != 0 {
            return Err(GateError::Duplicate { stream, epoch });
        }
        state.arrived |= bit;
        state.through = state.through.max(through);
        state.inconsistent |= !consistent;
        for &(disk, watermark) in progress {
            match state.progress.iter_mut().find(|(d, _)| *d == disk) {
                Some((_, w)) => *w = (*w).max(watermark),
                None => state.progress.push((disk, watermark)),
            }
        }
        for &disk in rescan_done {
            if !state.rescan_done.contains(&disk) {
                state.rescan_done.push(disk);
            }
        }
        if state.arrived.count_ones() < u32::from(self.streams) {
            return Ok(None);
        }
        let sealed = Sealed {
            epoch,
            through: state.through,
            progress: std::mem::take(&mut state.progress),
            rescan_done: std::mem::take(&mut state.rescan_done),
            consistent: !std::mem::take(&mut state.inconsistent),
        };
        state.next = epoch + 1;
        state.arrived = 0;
        Ok(Some(sealed))
    }

    /// Called once every write of `epoch` has completed: streams waiting at its barrier
    /// may go on.
    pub(crate) fn mark_applied(&self, epoch: u64) {
        let mut state = lock(&self.state);
        state.applied_through = state.applied_through.max(epoch);
        drop(state);
        self.applied.notify_waiters();
    }

    /// Waits until `epoch` is applied.
    pub(crate) async fn wait_applied(&self, epoch: u64) {
        loop {
            let notified = self.applied.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if lock(&self.state).applied_through >= epoch {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn an_epoch_seals_when_every_stream_delivered_it() {
        let gate = EpochGate::new(3, 10);
        assert_eq!(gate.arrive(0, 10, 5, &[(0, 100)], &[], true), Ok(None));
        assert_eq!(
            gate.arrive(2, 10, 9, &[(0, 300), (1, 7)], &[], true),
            Ok(None)
        );
        let sealed = gate.arrive(1, 10, 7, &[], &[], true).unwrap().unwrap();
        assert_eq!(sealed.epoch, 10);
        assert_eq!(
            sealed.through, 9,
            "the last write before any of the barriers"
        );
        assert_eq!(sealed.progress, vec![(0, 300), (1, 7)]);
        assert!(sealed.consistent);
        // The next epoch starts empty; one stream's "not consistent" makes it so.
        assert_eq!(gate.arrive(0, 11, 10, &[], &[], false), Ok(None));
        assert_eq!(gate.arrive(1, 11, 10, &[], &[], true), Ok(None));
        let sealed = gate.arrive(2, 11, 12, &[], &[], true).unwrap().unwrap();
        assert!(!sealed.consistent);
        assert_eq!(gate.arrive(0, 12, 12, &[], &[], true), Ok(None));
    }

    #[test]
    fn out_of_order_and_duplicate_barriers_are_refused() {
        let gate = EpochGate::new(2, 1);
        assert!(matches!(
            gate.arrive(0, 2, 0, &[], &[], true),
            Err(GateError::WrongEpoch { expected: 1, .. })
        ));
        gate.arrive(0, 1, 0, &[], &[], true).unwrap();
        assert!(matches!(
            gate.arrive(0, 1, 0, &[], &[], true),
            Err(GateError::Duplicate { .. })
        ));
    }

    #[tokio::test]
    async fn streams_wait_at_a_barrier_until_its_epoch_is_applied() {
        let gate = Arc::new(EpochGate::new(2, 1));
        gate.arrive(0, 1, 3, &[], &[], true).unwrap();
        let waiter = tokio::spawn({
            let gate = Arc::clone(&gate);
            async move { gate.wait_applied(1).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "stream 0 must not pass barrier 1 before it is applied"
        );
        gate.arrive(1, 1, 4, &[], &[], true).unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "sealed is not applied");
        gate.mark_applied(1);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
