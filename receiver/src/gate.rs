//! The epoch gate of a session (invariant 3): epoch E is *sealed* once its barrier has
//! arrived on every stream of the session, and *applied* once every write submitted before
//! those barriers has completed. A stream that has delivered barrier E reads nothing more
//! until E is applied, so writes of epoch E+1 never reach a staging image before all of
//! epoch E: at any instant the images hold all of epochs ≤ E plus part of E+1, and the
//! consistent point E that the barrier worker then records is crash-consistent across
//! every disk of the server.

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

/// The barriers of one session's streams, without I/O: the session core owns it, and the
/// driver makes streams that wait at a barrier wait until [`EpochGate::applied_through`]
/// reaches their epoch.
#[derive(Debug)]
pub(crate) struct EpochGate {
    streams: u8,
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
            next: first_epoch,
            arrived: 0,
            through: 0,
            progress: Vec::new(),
            rescan_done: Vec::new(),
            inconsistent: false,
            applied_through: first_epoch.saturating_sub(1),
        }
    }

    /// Records barrier `epoch` from `stream`, after writes up to sequence `through` were
    /// submitted. Returns the sealed epoch when this was the last stream to deliver it.
    pub(crate) fn arrive(
        &mut self,
        stream: u8,
        epoch: u64,
        through: u64,
        progress: &[(u16, u64)],
        rescan_done: &[u16],
        consistent: bool,
    ) -> Result<Option<Sealed>, GateError> {
        if epoch != self.next {
            return Err(GateError::WrongEpoch {
                stream,
                got: epoch,
                expected: self.next,
            });
        }
        let bit = 1u8 << stream;
        if self.arrived & bit != 0 {
            return Err(GateError::Duplicate { stream, epoch });
        }
        self.arrived |= bit;
        self.through = self.through.max(through);
        self.inconsistent |= !consistent;
        for &(disk, watermark) in progress {
            match self.progress.iter_mut().find(|(d, _)| *d == disk) {
                Some((_, w)) => *w = (*w).max(watermark),
                None => self.progress.push((disk, watermark)),
            }
        }
        for &disk in rescan_done {
            if !self.rescan_done.contains(&disk) {
                self.rescan_done.push(disk);
            }
        }
        if self.arrived.count_ones() < u32::from(self.streams) {
            return Ok(None);
        }
        let sealed = Sealed {
            epoch,
            through: self.through,
            progress: std::mem::take(&mut self.progress),
            rescan_done: std::mem::take(&mut self.rescan_done),
            consistent: !std::mem::take(&mut self.inconsistent),
        };
        self.next = epoch + 1;
        self.arrived = 0;
        Ok(Some(sealed))
    }

    /// Called once every write of `epoch` has completed: streams waiting at its barrier
    /// may go on.
    pub(crate) fn mark_applied(&mut self, epoch: u64) {
        self.applied_through = self.applied_through.max(epoch);
    }

    /// The epoch whose barriers are being collected.
    pub(crate) fn next(&self) -> u64 {
        self.next
    }

    /// Every epoch up to this one is applied.
    pub(crate) fn applied_through(&self) -> u64 {
        self.applied_through
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_seals_when_every_stream_delivered_it() {
        let mut gate = EpochGate::new(3, 10);
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
        let mut gate = EpochGate::new(2, 1);
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

    #[test]
    fn an_epoch_is_applied_only_when_marked_so() {
        let mut gate = EpochGate::new(2, 7);
        assert_eq!(
            gate.applied_through(),
            6,
            "the epoch before the first is applied"
        );
        gate.arrive(0, 7, 3, &[], &[], true).unwrap();
        gate.arrive(1, 7, 4, &[], &[], true).unwrap().unwrap();
        assert_eq!(gate.applied_through(), 6, "sealed is not applied");
        gate.mark_applied(7);
        assert_eq!(gate.applied_through(), 7);
        gate.mark_applied(5);
        assert_eq!(gate.applied_through(), 7, "never goes back");
    }
}
