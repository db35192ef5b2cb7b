//! The last 15 minutes at one-second resolution, for the status page's charts: a fixed ring
//! of 900 samples (about 60 KiB) filled by a sampler task from the relay's running totals
//! ([`crate::tally`]) and its live state ([`Health`]). It also remembers when the current
//! broker alarm began.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::Health;
use crate::tally::{self, REASONS, Totals};

/// Samples kept: 15 minutes of seconds.
pub const CAPACITY: usize = 900;

/// One second of the relay's life.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// When it was taken, in seconds since the epoch.
    pub at: u64,
    /// Rows published during the second.
    pub published: u32,
    /// Failed attempts during the second, by the index of their reason in [`REASONS`].
    pub failures: [u32; REASONS.len()],
    /// Pending rows at the end of the second.
    pub pending: i64,
    /// Age of the oldest pending row at the end of the second.
    pub oldest_pending_age: f32,
    /// Median publish latency of the rows confirmed during the second, in seconds.
    pub p50: Option<f32>,
    /// 99th percentile of the same.
    pub p99: Option<f32>,
}

/// A broker alarm as the relay saw it begin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alarm {
    /// The broker's reason (`low on memory`, `low on disk`).
    pub reason: String,
    /// When the relay first saw it, in seconds since the epoch.
    pub since: u64,
}

/// The ring of samples and the current alarm.
#[derive(Debug, Default)]
pub struct History {
    /// The samples, oldest first, at most [`CAPACITY`].
    samples: Mutex<VecDeque<Sample>>,
    /// The broker alarm under way, if any.
    alarm: Mutex<Option<Alarm>>,
}

impl History {
    /// The samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .expect("history lock")
            .iter()
            .copied()
            .collect()
    }

    fn push(&self, sample: Sample) {
        let mut samples = self.samples.lock().expect("history lock");
        if samples.len() == CAPACITY {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// Starts or ends the alarm as the broker's blocking reason says (a new reason restarts
    /// it) and returns it.
    pub fn note_blocked(&self, reason: Option<String>) -> Option<Alarm> {
        let mut alarm = self.alarm.lock().expect("history lock");
        match reason {
            None => *alarm = None,
            Some(reason) if alarm.as_ref().is_some_and(|a| a.reason == reason) => {}
            Some(reason) => {
                *alarm = Some(Alarm {
                    reason,
                    since: now(),
                })
            }
        }
        alarm.clone()
    }
}

/// Seconds since the epoch.
fn now() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH);
    since.unwrap_or_default().as_secs()
}

/// Takes a sample every second until `shutdown`.
pub async fn sample(history: Arc<History>, health: Arc<Health>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut before = tally::totals();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let totals = tally::totals();
        let snap = health.snapshot();
        history.note_blocked(snap.broker_blocked);
        let mut sample = difference(&before, &totals, now());
        sample.pending = snap.stats.pending;
        sample.oldest_pending_age = snap.stats.oldest_pending_age_seconds as f32;
        history.push(sample);
        before = totals;
    }
}

/// What happened between two readings of the totals.
fn difference(before: &Totals, after: &Totals, at: u64) -> Sample {
    let delta = |a: u64, b: u64| u32::try_from(b.saturating_sub(a)).unwrap_or(u32::MAX);
    let latency: [u64; tally::BUCKETS] =
        std::array::from_fn(|i| after.latency[i].saturating_sub(before.latency[i]));
    let quantile = |q| tally::quantile(&latency, q).map(|s| s as f32);
    Sample {
        at,
        published: delta(before.published, after.published),
        failures: std::array::from_fn(|i| delta(before.failures[i], after.failures[i])),
        pending: 0,
        oldest_pending_age: 0.0,
        p50: quantile(0.5),
        p99: quantile(0.99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_900_seconds() {
        let history = History::default();
        let zero = Totals {
            published: 0,
            failures: [0; REASONS.len()],
            latency: [0; tally::BUCKETS],
        };
        for at in 0..1000 {
            history.push(difference(&zero, &zero, at));
        }
        let samples = history.samples();
        assert_eq!(samples.len(), CAPACITY);
        assert_eq!((samples[0].at, samples[CAPACITY - 1].at), (100, 999));
        let began = history.note_blocked(Some("low on memory".into())).unwrap();
        let still = history.note_blocked(Some("low on memory".into())).unwrap();
        assert_eq!(began, still);
        assert_eq!(history.note_blocked(None), None);
    }
}
