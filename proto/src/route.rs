//! The stream-routing rule (invariant 2): every write of a block travels on one stream,
//! so that the writes of a block reach the receiver in the order the agent sent them.
//! Both sides depend on it, so it lives with the protocol.

/// Bytes of a block group: writes are split at group boundaries, and a group never
/// changes streams.
pub const BLOCK_GROUP: u64 = 1 << 20;

/// The stream a block group travels on: a fixed function of disk and 1 MiB group, so
/// every write of a block always takes the same stream.
pub fn stream_for(disk: u16, offset: u64, streams: usize) -> usize {
    let group = offset / BLOCK_GROUP;
    let mut x = (u64::from(disk) << 48) ^ group;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x % streams.max(1) as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_groups_spread_over_streams_and_stay_put() {
        let mut counts = [0usize; 4];
        for group in 0..4000u64 {
            let s = stream_for(1, group * BLOCK_GROUP, 4);
            assert_eq!(
                s,
                stream_for(1, group * BLOCK_GROUP + 4096, 4),
                "same group, same stream"
            );
            assert_eq!(s, stream_for(1, (group + 1) * BLOCK_GROUP - 1, 4));
            counts[s] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "uneven spread: {counts:?}");
        assert!((0..100).all(|g| stream_for(0, g * BLOCK_GROUP, 1) == 0));
        assert!(
            (0..100).all(|g| stream_for(0, g * BLOCK_GROUP, 0) == 0),
            "no streams counts as one"
        );
    }
}
