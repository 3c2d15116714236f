//! Purge fences: a purged key's jobs that were already on their way to the partition when it
//! was purged are dropped when they arrive, not released.
//!
//! A purge ([`crate::inspect::Partitions::purge`]) reads `WEIR_JOBS`' last sequence, has the
//! partition drop the key's held and parked jobs, then deletes the key's jobs stored up to that
//! sequence. Jobs JetStream had already delivered to the partition's pull buffer are out of the
//! stream's reach, and the partition has not seen them yet: without a fence they would be read
//! after the purge and released, after jobs stored later were deleted. So the partition keeps
//! `(key, below)`: a fresh job of that key with a stream sequence under `below` is acked and
//! dropped. The fence is needed only while such a job can still arrive: the buffer is read
//! within moments, and a job the stream no longer holds is never delivered again; it is kept for
//! the partition's `fence_for` (two `ack_wait`s) all the same, then forgotten, so fences never
//! pile up.

use tokio::time::Instant;

/// The partition's purge fences; almost always empty, and then one length check per job.
#[derive(Debug, Default)]
pub struct Fences {
    /// `(key, below, until)`: a handful at most, so a vector.
    fences: Vec<(String, u64, Instant)>,
}

impl Fences {
    /// Fences `key` below stream sequence `below` until `until`; a later purge of the same key
    /// moves its fence.
    pub fn set(&mut self, key: &str, below: u64, until: Instant) {
        match self.fences.iter_mut().find(|f| f.0 == key) {
            Some(f) => {
                f.1 = f.1.max(below);
                f.2 = f.2.max(until);
            }
            None => self.fences.push((key.to_string(), below, until)),
        }
    }

    /// Whether the fresh job `seq` of `key` was purged; forgets fences past their time.
    pub fn purged(&mut self, key: &str, seq: u64, now: Instant) -> bool {
        if self.fences.is_empty() {
            return false;
        }
        self.fences.retain(|f| f.2 > now);
        self.fences.iter().any(|f| f.0 == key && seq < f.1)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.fences.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_fence_drops_only_older_jobs_of_its_key_and_only_for_a_while() {
        let t0 = Instant::now();
        let mut f = Fences::default();
        assert!(!f.purged("a", 1, t0));
        f.set("a", 100, t0 + Duration::from_secs(60));
        assert!(f.purged("a", 99, t0));
        assert!(!f.purged("a", 100, t0), "stored after the purge began");
        assert!(!f.purged("b", 5, t0), "another key");
        // A second purge of the same key moves the fence rather than adding one.
        f.set("a", 200, t0 + Duration::from_secs(90));
        assert_eq!(f.len(), 1);
        assert!(f.purged("a", 150, t0 + Duration::from_secs(61)));
        assert!(!f.purged("a", 150, t0 + Duration::from_secs(90)));
        assert_eq!(f.len(), 0, "forgotten once past its time");
    }
}
