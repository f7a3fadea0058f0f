//! The dirty map: which blocks of each disk have changed and are not yet at the receiver.
//!
//! Its memory is bounded whatever the disks' sizes and however scattered the writes,
//! which is what lets one agent track 50 disks of 16 TiB each. Each disk is cut into
//! 256 MiB regions. Every region has an 8-byte mask of 4 MiB chunks (a *coarse* view,
//! always present: 512 KiB for a 16 TiB disk). A region may instead hold a *fine* bitmap of
//! its 4 KiB blocks (8 KiB), as long as the fine bitmaps of all disks stay within the
//! budget. Beyond the budget, new changes are tracked coarsely: more is re-read and
//! re-sent, nothing is ever forgotten.

use std::collections::HashMap;

/// Granularity of the fine view and of the protocol's blocks.
pub const BLOCK: u64 = 4096;
const REGION: u64 = 256 << 20;
const CHUNK: u64 = 4 << 20;
const BLOCKS_PER_REGION: u64 = REGION / BLOCK;
const FINE_WORDS: usize = (BLOCKS_PER_REGION / 64) as usize;
/// Bytes one fine bitmap costs, with its hash-map entry.
const FINE_COST: usize = FINE_WORDS * 8 + 48;

/// Default budget for fine bitmaps: 4096 regions, so up to 1 TiB of disk with changes
/// scattered at 4 KiB precision.
pub const DEFAULT_FINE_BUDGET: usize = 32 << 20;

#[derive(Debug)]
pub struct DirtyMap {
    disks: Vec<DiskMap>,
    fine_budget: usize,
    fine_used: usize,
}

#[derive(Debug)]
struct DiskMap {
    size: u64,
    /// Per region: bit i = the 4 MiB chunk i is dirty. Zero while the region is fine.
    coarse: Vec<u64>,
    fine: HashMap<u32, Box<[u64; FINE_WORDS]>>,
    dirty_bytes: u64,
    /// Where the next [`DirtyMap::pop_run`] starts looking, so that the whole disk is
    /// served in turn rather than its first blocks over and over.
    cursor: u64,
}

impl DirtyMap {
    /// A clean map for disks of `sizes` bytes, with `fine_budget` bytes for fine bitmaps.
    pub fn new(sizes: &[u64], fine_budget: usize) -> Self {
        Self {
            disks: sizes
                .iter()
                .map(|&size| DiskMap {
                    size,
                    coarse: vec![0; size.div_ceil(REGION) as usize],
                    fine: HashMap::new(),
                    dirty_bytes: 0,
                    cursor: 0,
                })
                .collect(),
            fine_budget,
            fine_used: 0,
        }
    }

    /// Memory held by the map's bitmaps (the fixed coarse masks and the fine bitmaps).
    pub fn memory_bytes(&self) -> usize {
        self.fine_used + self.disks.iter().map(|d| d.coarse.len() * 8).sum::<usize>()
    }

    /// Bytes marked dirty on `disk` (whole blocks or chunks, clamped to the disk's end).
    pub fn dirty_bytes(&self, disk: usize) -> u64 {
        self.disks[disk].dirty_bytes
    }

    pub fn total_dirty_bytes(&self) -> u64 {
        self.disks.iter().map(|d| d.dirty_bytes).sum()
    }

    /// Marks `[offset, offset + len)` of `disk` dirty (clamped to the disk).
    pub fn mark(&mut self, disk: usize, offset: u64, len: u64) {
        let size = self.disks[disk].size;
        let end = offset.saturating_add(len).min(size);
        if offset >= end {
            return;
        }
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        let mut block = first;
        while block <= last {
            let region = block / BLOCKS_PER_REGION;
            let region_last = ((region + 1) * BLOCKS_PER_REGION - 1).min(last);
            self.mark_in_region(disk, region, block, region_last);
            block = region_last + 1;
        }
    }

    /// Marks blocks `first..=last`, all inside `region`.
    fn mark_in_region(&mut self, disk: usize, region: u64, first: u64, last: u64) {
        let key = region as u32;
        let base = region * BLOCKS_PER_REGION;
        let d = &mut self.disks[disk];
        let chunk_aligned = (first * BLOCK).is_multiple_of(CHUNK)
            && (((last + 1) * BLOCK).is_multiple_of(CHUNK) || (last + 1) * BLOCK >= d.size);
        // Whole chunks of a clean region are exact in the coarse view and cost nothing;
        // anything finer gets a fine bitmap while the budget allows, taking over the
        // region's coarse bits.
        let wants_fine = !(chunk_aligned && d.coarse[region as usize] == 0);
        if wants_fine
            && !d.fine.contains_key(&key)
            && self.fine_used + FINE_COST <= self.fine_budget
        {
            let mut bits = Box::new([0u64; FINE_WORDS]);
            let mask = std::mem::take(&mut d.coarse[region as usize]);
            let region_blocks = (d.size - region * REGION)
                .div_ceil(BLOCK)
                .min(BLOCKS_PER_REGION);
            for c in (0..64u64).filter(|c| mask & (1 << c) != 0) {
                let first_block = c * (CHUNK / BLOCK);
                for i in first_block..(first_block + CHUNK / BLOCK).min(region_blocks) {
                    bits[(i / 64) as usize] |= 1 << (i % 64);
                }
            }
            d.fine.insert(key, bits);
            self.fine_used += FINE_COST;
        }
        let use_fine = d.fine.contains_key(&key);
        if use_fine {
            let bits = d.fine.get_mut(&key).expect("inserted above");
            let mut newly = 0u64;
            for b in first..=last {
                let i = (b - base) as usize;
                let mask = 1u64 << (i % 64);
                if bits[i / 64] & mask == 0 {
                    bits[i / 64] |= mask;
                    newly += block_bytes(d.size, b);
                }
            }
            d.dirty_bytes += newly;
        } else {
            let region_start = region * REGION;
            let (c0, c1) = (
                (first * BLOCK - region_start) / CHUNK,
                (last * BLOCK - region_start) / CHUNK,
            );
            for c in c0..=c1 {
                let mask = 1u64 << c;
                if d.coarse[region as usize] & mask == 0 {
                    d.coarse[region as usize] |= mask;
                    d.dirty_bytes += chunk_bytes(d.size, region_start + c * CHUNK);
                }
            }
        }
    }

    /// Whether the block holding `offset` is marked.
    pub fn is_dirty(&self, disk: usize, offset: u64) -> bool {
        let d = &self.disks[disk];
        if offset >= d.size {
            return false;
        }
        let region = offset / REGION;
        match d.fine.get(&(region as u32)) {
            Some(bits) => {
                let i = ((offset - region * REGION) / BLOCK) as usize;
                bits[i / 64] & (1 << (i % 64)) != 0
            }
            None => d.coarse[region as usize] & (1 << ((offset % REGION) / CHUNK)) != 0,
        }
    }

    /// Takes the next dirty run of `disk` at or after its cursor (wrapping around), clears
    /// it, and returns `(offset, len)`. A run is at most `max_len` bytes of fine blocks, or
    /// one coarse 4 MiB chunk. `None` when the disk is clean.
    pub fn pop_run(&mut self, disk: usize, max_len: u64) -> Option<(u64, u64)> {
        let max_blocks = (max_len / BLOCK).max(1);
        let d = &mut self.disks[disk];
        if d.dirty_bytes == 0 {
            return None;
        }
        let regions = d.coarse.len() as u64;
        let start_region = (d.cursor / REGION).min(regions.saturating_sub(1));
        for step in 0..=regions {
            let region = (start_region + step) % regions;
            // The first region is looked at from the cursor, and again from its start
            // after the wrap.
            let from = if step == 0 {
                d.cursor.max(region * REGION)
            } else {
                region * REGION
            };
            if let Some(run) = take_from_region(d, region, from, max_blocks, &mut self.fine_used) {
                d.cursor = run.0 + run.1;
                if d.cursor >= d.size {
                    d.cursor = 0;
                }
                return Some(run);
            }
        }
        None
    }
}

fn take_from_region(
    d: &mut DiskMap,
    region: u64,
    from: u64,
    max_blocks: u64,
    fine_used: &mut usize,
) -> Option<(u64, u64)> {
    let key = region as u32;
    let region_start = region * REGION;
    if let Some(bits) = d.fine.get_mut(&key) {
        let start_index = ((from - region_start) / BLOCK) as usize;
        let first = first_set_bit(&bits[..], start_index)?;
        let mut end = first;
        while end < BLOCKS_PER_REGION as usize
            && (end - first) < max_blocks as usize
            && bits[end / 64] & (1 << (end % 64)) != 0
        {
            bits[end / 64] &= !(1 << (end % 64));
            end += 1;
        }
        let empty = bits.iter().all(|&w| w == 0);
        let offset = region_start + first as u64 * BLOCK;
        let len = ((end - first) as u64 * BLOCK).min(d.size - offset);
        d.dirty_bytes -= len;
        if empty {
            d.fine.remove(&key);
            *fine_used -= FINE_COST;
        }
        return Some((offset, len));
    }
    let mask = d.coarse[region as usize];
    let from_chunk = (from - region_start) / CHUNK;
    let c = (from_chunk..64).find(|&c| mask & (1 << c) != 0)?;
    d.coarse[region as usize] &= !(1 << c);
    let offset = region_start + c * CHUNK;
    let len = chunk_bytes(d.size, offset);
    d.dirty_bytes -= len;
    Some((offset, len))
}

/// The first set bit at or after `from`, a word at a time (a region has 65,536 bits).
fn first_set_bit(bits: &[u64], from: usize) -> Option<usize> {
    let mut word = from / 64;
    let mut w = *bits.get(word)? & (!0u64 << (from % 64));
    loop {
        if w != 0 {
            return Some(word * 64 + w.trailing_zeros() as usize);
        }
        word += 1;
        w = *bits.get(word)?;
    }
}

fn block_bytes(size: u64, block: u64) -> u64 {
    BLOCK.min(size - block * BLOCK)
}

fn chunk_bytes(size: u64, chunk_start: u64) -> u64 {
    CHUNK.min(size - chunk_start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn the_first_set_bit_is_found_from_any_start() {
        let mut bits = vec![0u64; FINE_WORDS];
        assert_eq!(first_set_bit(&bits, 0), None);
        for bit in [0usize, 63, 64, 4097, BLOCKS_PER_REGION as usize - 1] {
            bits[bit / 64] |= 1 << (bit % 64);
        }
        let naive = |from: usize| {
            (from..BLOCKS_PER_REGION as usize).find(|&i| bits[i / 64] & (1 << (i % 64)) != 0)
        };
        for from in [
            0,
            1,
            63,
            64,
            65,
            4096,
            4097,
            4098,
            BLOCKS_PER_REGION as usize - 1,
        ] {
            assert_eq!(first_set_bit(&bits, from), naive(from), "from {from}");
        }
        assert_eq!(first_set_bit(&bits, BLOCKS_PER_REGION as usize), None);
    }

    /// Drains a disk; returns the set of blocks the runs covered.
    fn drain(map: &mut DirtyMap, disk: usize, max_len: u64) -> BTreeSet<u64> {
        let mut covered = BTreeSet::new();
        while let Some((offset, len)) = map.pop_run(disk, max_len) {
            assert!(len > 0);
            for b in offset / BLOCK..(offset + len).div_ceil(BLOCK) {
                covered.insert(b);
            }
        }
        assert_eq!(
            map.dirty_bytes(disk),
            0,
            "drained disk still counts dirty bytes"
        );
        covered
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        /// With room for fine bitmaps, the map is exact: it returns exactly the blocks
        /// that were marked, and counts their bytes.
        #[test]
        fn exact_within_budget(marks in proptest::collection::vec(prop_oneof![
            (0u64..(600 << 20), 1u64..300_000),
            // Whole 4 MiB chunks, which start out coarse.
            (0u64..150, 1u64..4).prop_map(|(c, n)| (c * CHUNK, n * CHUNK)),
        ], 1..60)) {
            let size = (600 << 20) + 1234;
            let mut map = DirtyMap::new(&[size], usize::MAX);
            let mut model = BTreeSet::new();
            for &(offset, len) in &marks {
                map.mark(0, offset, len);
                let end = (offset + len).min(size);
                for b in offset / BLOCK..end.div_ceil(BLOCK) {
                    model.insert(b);
                }
            }
            let model_bytes: u64 = model.iter().map(|&b| block_bytes(size, b)).sum();
            let coarse_exact = map.dirty_bytes(0) >= model_bytes;
            prop_assert!(coarse_exact);
            for &b in &model {
                prop_assert!(map.is_dirty(0, b * BLOCK), "block {} not dirty", b);
            }
            let covered = drain(&mut map, 0, 1 << 20);
            prop_assert!(model.is_subset(&covered));
            // Extra blocks only come from whole-chunk marks, which are exact anyway.
            prop_assert_eq!(covered, model);
        }

        /// With no budget at all, tracking is coarse but still never loses a block.
        #[test]
        fn never_loses_a_block_without_budget(marks in proptest::collection::vec((0u64..(2u64 << 30), 1u64..100_000), 1..80), budget in 0usize..(4 * FINE_COST)) {
            let size = 2u64 << 30;
            let mut map = DirtyMap::new(&[size], budget);
            let mut model = BTreeSet::new();
            for &(offset, len) in &marks {
                map.mark(0, offset, len);
                for b in offset / BLOCK..(offset + len).min(size).div_ceil(BLOCK) {
                    model.insert(b);
                }
                prop_assert!(map.fine_used <= budget);
            }
            let covered = drain(&mut map, 0, 1 << 20);
            prop_assert!(model.is_subset(&covered));
            prop_assert_eq!(map.memory_bytes(), 8 * 8, "fine bitmaps are freed once drained");
        }
    }

    #[test]
    fn a_small_write_into_a_coarse_region_stays_precise() {
        let mut map = DirtyMap::new(&[1 << 30], usize::MAX);
        map.mark(0, 8 << 20, 4 << 20); // one whole chunk: coarse, no bitmap
        assert_eq!(map.memory_bytes(), 4 * 8);
        map.mark(0, (20 << 20) + 4096, 10); // one block elsewhere in the region
        assert_eq!(map.dirty_bytes(0), (4 << 20) + 4096);
        let covered = drain(&mut map, 0, 8 << 20);
        let expected: BTreeSet<u64> = ((8 << 20) / BLOCK..(12 << 20) / BLOCK)
            .chain([((20 << 20) + 4096) / BLOCK])
            .collect();
        assert_eq!(covered, expected);
    }

    #[test]
    fn runs_respect_max_len_and_rotate_through_the_disk() {
        let mut map = DirtyMap::new(&[1 << 30], usize::MAX);
        map.mark(0, 4096, 3 << 20);
        map.mark(0, 900 << 20, 8192);
        let (o, l) = map.pop_run(0, 1 << 20).unwrap();
        assert_eq!((o, l), (4096, 1 << 20));
        // A write behind the cursor waits its turn: the disk is served in order.
        map.mark(0, 0, 4096);
        assert_eq!(map.pop_run(0, 1 << 20), Some((4096 + (1 << 20), 1 << 20)));
        assert_eq!(map.pop_run(0, 1 << 20), Some((4096 + (2 << 20), 1 << 20)));
        assert_eq!(map.pop_run(0, 1 << 20), Some((900 << 20, 8192)));
        assert_eq!(map.pop_run(0, 1 << 20), Some((0, 4096)));
        assert_eq!(map.pop_run(0, 1 << 20), None);
    }

    #[test]
    fn fifty_sixteen_tib_disks_stay_within_budget() {
        let sizes = vec![16u64 << 40; 50];
        let budget = DEFAULT_FINE_BUDGET;
        let mut map = DirtyMap::new(&sizes, budget);
        // A million scattered 4 KiB writes over all disks.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut model: Vec<(usize, u64)> = Vec::new();
        for _ in 0..1_000_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let disk = (x % 50) as usize;
            let offset = (x >> 8) % (16u64 << 40) / BLOCK * BLOCK;
            map.mark(disk, offset, BLOCK);
            if model.len() < 10_000 {
                model.push((disk, offset));
            }
        }
        let fixed = 50 * (16usize << 40) / (256 << 20) * 8;
        assert_eq!(
            fixed,
            25 << 20,
            "the coarse masks of 50 x 16 TiB take 25 MiB"
        );
        assert!(
            map.memory_bytes() <= fixed + budget,
            "{} bytes",
            map.memory_bytes()
        );
        for (disk, offset) in model {
            assert!(map.is_dirty(disk, offset));
        }
    }
}
