//! Running totals of what this process published, kept beside the Prometheus metrics (whose
//! handle only renders text) so that the status page's sampler can take per-second
//! differences: rows published, failures by reason, and publish latencies in log-spaced
//! buckets, fine enough for a per-second p50 and p99. Process-wide, like the metrics
//! recorder; a few hundred bytes of atomics.

use std::sync::atomic::{AtomicU64, Ordering};

/// The `reason` labels of `outbox_publish_failures_total`; anything else counts as `other`.
pub const REASONS: [&str; 7] = [
    "nack",
    "unroutable",
    "rejected",
    "timeout",
    "connection",
    "bad_row",
    "other",
];

/// Latency buckets: bucket `i` holds latencies up to `FIRST_BOUND * RATIO^i` seconds.
pub const BUCKETS: usize = 56;
/// Upper bound of the first bucket (0.5 ms).
const FIRST_BOUND: f64 = 0.0005;
/// Each bucket's bound over the one before: a quantile is known to within this factor.
const RATIO: f64 = 1.25;

/// Everything counted so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Totals {
    /// Rows confirmed and marked sent.
    pub published: u64,
    /// Failed attempts, by the index of their reason in [`REASONS`].
    pub failures: [u64; REASONS.len()],
    /// Publish latencies counted per bucket.
    pub latency: [u64; BUCKETS],
}

/// The process's counters.
struct Tally {
    /// Rows confirmed and marked sent.
    published: AtomicU64,
    /// Failed attempts by reason.
    failures: [AtomicU64; REASONS.len()],
    /// Latencies per bucket.
    latency: [AtomicU64; BUCKETS],
}

static TALLY: Tally = Tally {
    published: AtomicU64::new(0),
    failures: [const { AtomicU64::new(0) }; REASONS.len()],
    latency: [const { AtomicU64::new(0) }; BUCKETS],
};

/// Counts `n` rows published.
pub(crate) fn published(n: u64) {
    TALLY.published.fetch_add(n, Ordering::Relaxed);
}

/// Counts `n` failed attempts for `reason`.
pub(crate) fn failed(reason: &str, n: u64) {
    let i = REASONS.iter().position(|r| *r == reason);
    let i = i.unwrap_or(REASONS.len() - 1);
    TALLY.failures[i].fetch_add(n, Ordering::Relaxed);
}

/// Counts one publish latency, in seconds.
pub(crate) fn latency(seconds: f64) {
    TALLY.latency[bucket(seconds)].fetch_add(1, Ordering::Relaxed);
}

/// The bucket of a latency.
fn bucket(seconds: f64) -> usize {
    if seconds <= FIRST_BOUND {
        return 0;
    }
    let i = (seconds / FIRST_BOUND).ln() / RATIO.ln();
    (i.ceil() as usize).min(BUCKETS - 1)
}

/// Everything counted so far.
pub fn totals() -> Totals {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Totals {
        published: load(&TALLY.published),
        failures: TALLY.failures.each_ref().map(load),
        latency: TALLY.latency.each_ref().map(load),
    }
}

/// The `q` quantile (0 to 1) of latencies counted per bucket, as the geometric middle of
/// its bucket; `None` when nothing was counted.
pub fn quantile(counts: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    let i = counts.iter().position(|&c| {
        seen += c;
        seen >= rank
    })?;
    let upper = FIRST_BOUND * RATIO.powi(i as i32);
    Some(if i == 0 { upper } else { upper / RATIO.sqrt() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_a_bucket() {
        let mut counts = [0; BUCKETS];
        for ms in 1..=100 {
            counts[bucket(f64::from(ms) / 1000.0)] += 1;
        }
        let p50 = quantile(&counts, 0.5).unwrap();
        let p99 = quantile(&counts, 0.99).unwrap();
        assert!((0.05 / RATIO..=0.05 * RATIO).contains(&p50), "{p50}");
        assert!((0.099 / RATIO..=0.099 * RATIO).contains(&p99), "{p99}");
        assert_eq!(quantile(&[0; BUCKETS], 0.5), None);
        assert_eq!(bucket(0.0), 0);
        assert_eq!(bucket(1e9), BUCKETS - 1);
    }
}
