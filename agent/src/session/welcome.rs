//! What a Welcome means for this session, without I/O: it is checked against the disks
//! the agent offered, and turned into a plan per disk (sync from where, rescan up to
//! where, or wait for a sync slot).

use std::time::Duration;

use blockferry_proto::limits::MAX_STREAMS;
use blockferry_proto::{DiskState, RescanReason, Welcome};

use super::error::SessionError;

/// What the session does with one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DiskPlan {
    /// Bytes from the start that are durable at the receiver (the initial-sync watermark).
    pub(super) watermark: u64,
    /// The initial sync goes on from the watermark in this session.
    pub(super) sync: bool,
    /// The receiver asks for a rescan of `[0, end)`, and why.
    pub(super) rescan: Option<(u64, RescanReason)>,
    /// Waiting for one of the receiver's sync slots: changes below the watermark flow as
    /// usual; the sync or rescan starts in a later session.
    pub(super) queued: bool,
}

/// How the session runs, as the receiver said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan {
    pub(super) next_epoch: u64,
    /// Streams to open: what the receiver granted, never more than asked.
    pub(super) streams: u8,
    pub(super) heartbeat_every: Duration,
    /// Bytes between barriers.
    pub(super) barrier_interval: u64,
    pub(super) disks: Vec<DiskPlan>,
}

/// Checks `welcome` against the disks offered (name, size) and the streams asked for.
pub(super) fn plan(
    offered: &[(&str, u64)],
    asked_streams: u8,
    welcome: &Welcome,
) -> Result<Plan, SessionError> {
    if welcome.disks.len() != offered.len() {
        return Err(SessionError::Protocol(format!(
            "Welcome lists {} disks, the agent sent {}",
            welcome.disks.len(),
            offered.len()
        )));
    }
    for (&(name, size), d) in offered.iter().zip(&welcome.disks) {
        if name != d.name || size != d.size || d.sync_watermark > d.size {
            return Err(SessionError::Protocol(format!(
                "Welcome describes disk {} ({} bytes, watermark {}) but the agent has {} ({} bytes)",
                d.name, d.size, d.sync_watermark, name, size
            )));
        }
    }
    if welcome.next_epoch == 0 {
        return Err(SessionError::Protocol(
            "Welcome names epoch 0 as the next epoch".into(),
        ));
    }
    let settings = &welcome.settings;
    // Dirty tracking and checksums work on the dirty map's blocks; a receiver that wants
    // others is one this agent cannot serve.
    if settings.block_size != crate::rescan::SUM_BLOCK {
        return Err(SessionError::Protocol(format!(
            "the receiver asks for {}-byte blocks; this agent tracks and checksums {}-byte blocks",
            settings.block_size,
            crate::rescan::SUM_BLOCK
        )));
    }
    // Writes are whole blocks; an alignment of whole blocks (EBS takes 512 KiB) is met
    // at the receiver, which completes partial ones from its base copy.
    if settings.alignment == 0
        || !settings.alignment.is_power_of_two()
        || !settings.alignment.is_multiple_of(settings.block_size)
    {
        return Err(SessionError::Protocol(format!(
            "the receiver asks for an alignment of {} bytes: not a power of two and a multiple of its {}-byte blocks",
            settings.alignment, settings.block_size
        )));
    }
    let disks = welcome
        .disks
        .iter()
        .map(|resume| {
            let queued = resume.state == DiskState::QUEUED;
            DiskPlan {
                watermark: resume.sync_watermark,
                sync: resume.sync_watermark < resume.size && !queued,
                rescan: (resume.rescan.is_some() && resume.sync_watermark > 0 && !queued)
                    .then_some((resume.sync_watermark, resume.rescan)),
                queued,
            }
        })
        .collect();
    Ok(Plan {
        next_epoch: welcome.next_epoch,
        streams: settings
            .max_streams
            .clamp(1, MAX_STREAMS)
            .min(asked_streams.max(1)),
        heartbeat_every: Duration::from_millis(u64::from(settings.heartbeat_interval_ms.max(500))),
        barrier_interval: settings.barrier_interval.max(1 << 20),
        disks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockferry_proto::{DiskResume, Settings};

    fn welcome(disks: Vec<DiskResume>) -> Welcome {
        Welcome {
            session_id: [9; 16],
            next_epoch: 12,
            settings: Settings {
                bandwidth_limit: 0,
                max_streams: 4,
                block_size: 4096,
                alignment: 4096,
                barrier_interval: 1000,
                heartbeat_interval_ms: 100,
                paused: false,
                unknown_flags: 0,
            },
            disks,
        }
    }

    fn resume(name: &str, size: u64, watermark: u64) -> DiskResume {
        DiskResume {
            name: name.into(),
            size,
            sync_watermark: watermark,
            state: DiskState::INITIAL_SYNC,
            rescan: RescanReason::NONE,
        }
    }

    #[test]
    fn each_disk_syncs_from_its_watermark_or_rescans_what_the_receiver_holds() {
        let mut rescanned = resume("vdb", 8192, 8192);
        rescanned.state = DiskState::RESCAN;
        rescanned.rescan = RescanReason::UNCLEAN_SHUTDOWN;
        let plan = plan(
            &[("vda", 8192), ("vdb", 8192)],
            8,
            &welcome(vec![resume("vda", 8192, 4096), rescanned]),
        )
        .unwrap();
        assert_eq!(plan.next_epoch, 12);
        assert_eq!(plan.streams, 4, "what the receiver granted");
        assert_eq!(
            plan.heartbeat_every,
            Duration::from_millis(500),
            "at most twice a second"
        );
        assert_eq!(
            plan.barrier_interval,
            1 << 20,
            "barriers at least 1 MiB apart"
        );
        assert_eq!(
            plan.disks,
            vec![
                DiskPlan {
                    watermark: 4096,
                    sync: true,
                    rescan: None,
                    queued: false
                },
                DiskPlan {
                    watermark: 8192,
                    sync: false,
                    rescan: Some((8192, RescanReason::UNCLEAN_SHUTDOWN)),
                    queued: false
                },
            ]
        );
        assert_eq!(plan_streams(2), 2, "never more than the agent asked for");
    }

    fn plan_streams(asked: u8) -> u8 {
        plan(
            &[("vda", 8192)],
            asked,
            &welcome(vec![resume("vda", 8192, 0)]),
        )
        .unwrap()
        .streams
    }

    #[test]
    fn a_queued_disk_neither_syncs_nor_rescans_in_this_session() {
        let mut queued = resume("vda", 8192, 4096);
        queued.state = DiskState::QUEUED;
        queued.rescan = RescanReason::AGENT_REINSTALLED;
        let plan = plan(&[("vda", 8192)], 1, &welcome(vec![queued])).unwrap();
        assert_eq!(
            plan.disks[0],
            DiskPlan {
                watermark: 4096,
                sync: false,
                rescan: None,
                queued: true
            }
        );
    }

    #[test]
    fn a_welcome_that_does_not_match_the_disks_offered_is_refused() {
        for (offered, disks, what) in [
            (vec![("vda", 8192)], vec![], "lists 0 disks"),
            (
                vec![("vda", 8192)],
                vec![resume("vdb", 8192, 0)],
                "describes disk vdb",
            ),
            (
                vec![("vda", 8192)],
                vec![resume("vda", 4096, 0)],
                "4096 bytes",
            ),
            (
                vec![("vda", 8192)],
                vec![resume("vda", 8192, 8193)],
                "watermark 8193",
            ),
        ] {
            let err = plan(&offered, 1, &welcome(disks)).unwrap_err();
            assert!(matches!(err, SessionError::Protocol(_)), "{what}: {err}");
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
        let mut zero = welcome(vec![resume("vda", 8192, 0)]);
        zero.next_epoch = 0;
        assert!(plan(&[("vda", 8192)], 1, &zero).is_err());
    }

    #[test]
    fn block_size_and_alignment_must_be_ones_this_agent_can_honour() {
        let ok = welcome(vec![resume("vda", 8192, 0)]);
        let mut ebs = ok.clone();
        ebs.settings.alignment = 512 << 10;
        assert!(
            plan(&[("vda", 8192)], 1, &ebs).is_ok(),
            "EBS blocks are whole blocks"
        );
        for (block_size, alignment, what) in [
            (512, 4096, "512-byte blocks"),
            (4096, 6144, "alignment of 6144"),
            (4096, 0, "alignment of 0"),
            (4096, 2048, "alignment of 2048"),
        ] {
            let mut odd = ok.clone();
            odd.settings.block_size = block_size;
            odd.settings.alignment = alignment;
            let err = plan(&[("vda", 8192)], 1, &odd).unwrap_err();
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
    }
}
