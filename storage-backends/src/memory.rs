//! An in-memory store for unit tests: same contract, no durability.

use std::sync::Mutex;

#[derive(Debug)]
pub struct MemoryStore {
    bytes: Mutex<Vec<u8>>,
}

impl MemoryStore {
    pub fn new(size: usize) -> Self {
        Self {
            bytes: Mutex::new(vec![0; size]),
        }
    }

    pub fn size(&self) -> u64 {
        self.lock().len() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A panic while holding the lock cannot leave the bytes half-updated in a way that
        // matters to a test store; keep going.
        self.bytes
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Callers have checked the range against `size`.
    pub(crate) fn write_at(&self, offset: u64, data: &[u8]) {
        let at = offset as usize;
        self.lock()[at..at + data.len()].copy_from_slice(data);
    }

    pub(crate) fn write_zeroes(&self, offset: u64, len: u64) {
        let at = offset as usize;
        self.lock()[at..at + len as usize].fill(0);
    }

    pub(crate) fn read_at(&self, offset: u64, len: usize) -> Vec<u8> {
        let at = offset as usize;
        self.lock()[at..at + len].to_vec()
    }
}
