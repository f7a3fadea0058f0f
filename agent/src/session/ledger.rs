//! The agent's epoch ledger, without I/O: which epochs were closed by a barrier, which
//! the receiver made durable, and what each one vouches for once it is (the capture
//! writes a consistent point covers, initial-sync watermarks, finished rescans). A
//! `Durable` from the receiver goes through [`EpochLedger::durable`] and nowhere else.

use std::collections::VecDeque;

/// Barriers sent but not yet durable. Bounds what a broken connection makes us resend.
pub(crate) const MAX_UNACKED_BARRIERS: u64 = 2;

/// A `Durable` the ledger cannot take: the receiver acknowledged what was never sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Durable for epoch {epoch}, but only {sent} were sent")]
pub(crate) struct NeverSent {
    pub(crate) epoch: u64,
    pub(crate) sent: u64,
}

/// What a newly durable epoch settles.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Settled {
    /// The newest epoch durable now.
    pub(crate) epoch: u64,
    /// Every capture write up to this sequence number is durable at the receiver.
    pub(crate) writes_through: Option<u64>,
    /// (disk, watermark): initial-sync progress now durable.
    pub(crate) watermarks: Vec<(usize, u64)>,
    /// Disks whose rescan is now complete and durable.
    pub(crate) rescans: Vec<usize>,
}

/// What one closed epoch vouches for.
#[derive(Debug)]
struct Claims {
    epoch: u64,
    /// The capture write sequence a consistent point covers.
    covers: Option<u64>,
    watermarks: Vec<(usize, u64)>,
    rescans: Vec<usize>,
}

#[derive(Debug, Default)]
pub(crate) struct EpochLedger {
    /// The last epoch closed by a barrier; writes carry `sent + 1`.
    sent: u64,
    /// The newest epoch the receiver made durable.
    durable: u64,
    /// Epochs closed and not yet durable that claim something, oldest first.
    pending: VecDeque<Claims>,
}

impl EpochLedger {
    /// A session whose receiver holds every epoch before `next_epoch` as durable.
    pub(crate) fn starting_at(next_epoch: u64) -> Self {
        let last = next_epoch.saturating_sub(1);
        Self {
            sent: last,
            durable: last,
            pending: VecDeque::new(),
        }
    }

    /// The epoch writes sent now belong to.
    pub(crate) fn open_epoch(&self) -> u64 {
        self.sent + 1
    }

    /// The last epoch closed.
    pub(crate) fn sent(&self) -> u64 {
        self.sent
    }

    pub(crate) fn durable(&self) -> u64 {
        self.durable
    }

    /// Whether another barrier may go now: few enough are unacknowledged.
    pub(crate) fn may_close(&self) -> bool {
        self.sent - self.durable < MAX_UNACKED_BARRIERS
    }

    /// Whether every epoch closed is durable.
    pub(crate) fn all_durable(&self) -> bool {
        self.sent == self.durable
    }

    /// Closes the open epoch. It claims initial-sync `watermarks` and finished
    /// `rescans`, and, as a point, every capture write up to `covers`. Returns the epoch
    /// closed. The caller waits for [`EpochLedger::may_close`] first.
    pub(crate) fn close(
        &mut self,
        watermarks: Vec<(usize, u64)>,
        rescans: Vec<usize>,
        covers: Option<u64>,
    ) -> u64 {
        debug_assert!(self.may_close(), "too many barriers unacknowledged");
        self.sent += 1;
        if !watermarks.is_empty() || !rescans.is_empty() || covers.is_some() {
            self.pending.push_back(Claims {
                epoch: self.sent,
                covers,
                watermarks,
                rescans,
            });
        }
        self.sent
    }

    /// The receiver says `epoch` is durable. Every stream hears of each durable epoch,
    /// so the news may be old: `Ok(None)` then.
    pub(crate) fn durable_through(&mut self, epoch: u64) -> Result<Option<Settled>, NeverSent> {
        if epoch > self.sent {
            return Err(NeverSent {
                epoch,
                sent: self.sent,
            });
        }
        if epoch <= self.durable {
            return Ok(None);
        }
        self.durable = epoch;
        let mut settled = Settled {
            epoch,
            ..Settled::default()
        };
        while self.pending.front().is_some_and(|c| c.epoch <= epoch) {
            let claims = self.pending.pop_front().expect("checked");
            if let Some(seq) = claims.covers {
                settled.writes_through = Some(settled.writes_through.unwrap_or(0).max(seq));
            }
            settled.watermarks.extend(claims.watermarks);
            settled.rescans.extend(claims.rescans);
        }
        Ok(Some(settled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_starts_where_the_receiver_is_durable() {
        let ledger = EpochLedger::starting_at(42);
        assert_eq!(ledger.sent(), 41);
        assert_eq!(ledger.durable(), 41);
        assert_eq!(
            ledger.open_epoch(),
            42,
            "writes carry the epoch Welcome named"
        );
        assert!(ledger.all_durable());
        assert_eq!(EpochLedger::starting_at(0).open_epoch(), 1);
    }

    #[test]
    fn at_most_two_barriers_wait_for_their_durable() {
        let mut ledger = EpochLedger::starting_at(1);
        ledger.close(Vec::new(), Vec::new(), None);
        assert!(ledger.may_close());
        ledger.close(Vec::new(), Vec::new(), None);
        assert!(
            !ledger.may_close(),
            "a broken connection loses two intervals at most"
        );
        ledger.durable_through(1).unwrap();
        assert!(ledger.may_close());
        assert!(!ledger.all_durable());
        ledger.durable_through(2).unwrap();
        assert!(ledger.all_durable());
    }

    #[test]
    fn a_durable_for_an_epoch_never_sent_is_refused() {
        let mut ledger = EpochLedger::starting_at(5);
        ledger.close(Vec::new(), Vec::new(), None);
        assert_eq!(
            ledger.durable_through(6),
            Err(NeverSent { epoch: 6, sent: 5 })
        );
        assert_eq!(ledger.durable(), 4, "nothing moved");
    }

    #[test]
    fn each_epoch_settles_once_and_in_order_what_it_claimed() {
        let mut ledger = EpochLedger::starting_at(1);
        ledger.close(vec![(0, 1 << 20)], Vec::new(), Some(10));
        ledger.close(Vec::new(), Vec::new(), None);
        ledger.durable_through(1).unwrap();
        ledger.close(vec![(0, 2 << 20), (1, 4096)], vec![1], Some(30));

        assert_eq!(
            ledger.durable_through(3),
            Ok(Some(Settled {
                epoch: 3,
                writes_through: Some(30),
                watermarks: vec![(0, 2 << 20), (1, 4096)],
                rescans: vec![1],
            }))
        );
        // Every stream repeats the news; the first word is enough.
        assert_eq!(ledger.durable_through(3), Ok(None));
        assert_eq!(ledger.durable_through(2), Ok(None));
    }

    #[test]
    fn a_durable_covering_several_epochs_settles_all_of_them() {
        let mut ledger = EpochLedger::starting_at(1);
        ledger.close(vec![(0, 100)], Vec::new(), Some(5));
        ledger.close(Vec::new(), vec![2], None);
        let settled = ledger.durable_through(2).unwrap().unwrap();
        assert_eq!(settled.writes_through, Some(5));
        assert_eq!(settled.watermarks, vec![(0, 100)]);
        assert_eq!(settled.rescans, vec![2]);
        ledger.close(vec![(0, 300)], Vec::new(), Some(9));
        let settled = ledger.durable_through(3).unwrap().unwrap();
        assert_eq!(
            settled.writes_through,
            Some(9),
            "epoch 3's point, not before"
        );
        assert_eq!(settled.watermarks, vec![(0, 300)]);
    }
}
