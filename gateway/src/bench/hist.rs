//! A lock-free latency histogram that merges across processes.
//!
//! Load processes record with relaxed atomic increments (no lock on the hot path, any number of
//! tasks), ship a sparse snapshot as JSON, and the orchestrator merges snapshots before asking
//! for percentiles. Buckets are log-linear: exact below 64 ns, then 32 sub-buckets per power of
//! two, so every reported value is within about 3 % of the truth from nanoseconds to minutes.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two (5 bits of precision).
const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
/// Values below this are their own bucket.
const LINEAR: u64 = 64;
/// Powers of two covered above `LINEAR` (2^6 .. 2^44 ns, i.e. up to ~4.9 hours).
const OCTAVES: u64 = 38;
/// Total bucket count.
const BUCKETS: usize = (LINEAR + OCTAVES * SUB) as usize;

fn bucket(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let e = 63 - u64::from(v.leading_zeros()); // >= 6
    let sub = (v >> (e - u64::from(SUB_BITS))) & (SUB - 1);
    let idx = LINEAR + (e - 6) * SUB + sub;
    (idx as usize).min(BUCKETS - 1)
}

/// The middle of a bucket's value range: what a percentile falling into it reports.
fn value_of(idx: usize) -> u64 {
    let idx = idx as u64;
    if idx < LINEAR {
        return idx;
    }
    let e = (idx - LINEAR) / SUB + 6;
    let sub = (idx - LINEAR) % SUB;
    let width = 1u64 << (e - u64::from(SUB_BITS));
    (1u64 << e) + sub * width + width / 2
}

/// A histogram that many tasks record into concurrently.
pub struct Histogram {
    counts: Box<[AtomicU64]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Histogram {
    /// Records one value (nanoseconds).
    pub fn record(&self, v: u64) {
        self.counts[bucket(v)].fetch_add(1, Ordering::Relaxed);
    }

    /// The non-empty buckets; with `reset`, empties the histogram in the same pass.
    pub fn snapshot(&self, reset: bool) -> Sparse {
        let mut buckets = Vec::new();
        for (i, c) in self.counts.iter().enumerate() {
            let n = if reset {
                c.swap(0, Ordering::Relaxed)
            } else {
                c.load(Ordering::Relaxed)
            };
            if n > 0 {
                buckets.push((i as u32, n));
            }
        }
        Sparse { buckets }
    }
}

/// A histogram as shipped between processes: `(bucket, count)` pairs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sparse {
    /// Non-empty buckets in ascending order.
    pub buckets: Vec<(u32, u64)>,
}

impl Sparse {
    /// Adds another snapshot into this one.
    pub fn merge(&mut self, other: &Sparse) {
        let mut dense = vec![0u64; BUCKETS];
        for &(i, n) in self.buckets.iter().chain(other.buckets.iter()) {
            if let Some(slot) = dense.get_mut(i as usize) {
                *slot += n;
            }
        }
        self.buckets = dense
            .into_iter()
            .enumerate()
            .filter(|(_, n)| *n > 0)
            .map(|(i, n)| (i as u32, n))
            .collect();
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|(_, n)| n).sum()
    }

    /// The value at quantile `q` (0.0..=1.0), in nanoseconds; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for &(i, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                return value_of(i as usize);
            }
        }
        self.buckets
            .last()
            .map_or(0, |&(i, _)| value_of(i as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_within_a_few_percent() {
        for v in [
            0u64,
            1,
            63,
            64,
            65,
            100,
            1_000,
            12_345,
            1_000_000,
            987_654_321,
        ] {
            let got = value_of(bucket(v));
            let err = (got as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err <= 0.035, "{v} -> {got} ({err})");
        }
    }

    #[test]
    fn quantiles_of_a_merged_snapshot() {
        let a = Histogram::default();
        let b = Histogram::default();
        for v in 1..=900u64 {
            a.record(v * 1000);
        }
        for v in 901..=1000u64 {
            b.record(v * 1000);
        }
        let mut s = a.snapshot(true);
        s.merge(&b.snapshot(false));
        assert_eq!(s.count(), 1000);
        let p50 = s.quantile(0.5) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.035, "{p50}");
        let p99 = s.quantile(0.99) as f64;
        assert!((p99 - 990_000.0).abs() / 990_000.0 < 0.035, "{p99}");
        assert_eq!(a.snapshot(false).count(), 0, "reset empties");
    }
}
