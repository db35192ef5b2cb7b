//! The marks a leader owes the table: confirmed rows to record as sent, failed attempts to
//! record, and the one mark written at a time.

use std::time::{Duration, Instant};

use crate::store::Failure;

/// How long a confirmed row may wait for its mark while more confirms are coming. Marks are
/// off the publishing path, so this only trades commits per second against rows held.
pub(super) const MARK_DELAY: Duration = Duration::from_millis(25);

/// What one mark records.
#[derive(Debug, Default)]
pub(super) struct Mark {
    /// Confirmed rows.
    pub(super) sent: Vec<i64>,
    /// Failed attempts.
    pub(super) failed: Vec<Failure>,
    /// The smallest confirmed row that had failed before: its mark releases its key's later
    /// rows, which the claims skipped.
    pub(super) released: Option<i64>,
}

impl Mark {
    /// It changes what claims may return: a failure, or a retried row's success.
    pub(super) fn is_exclusive(&self) -> bool {
        !self.failed.is_empty() || self.released.is_some()
    }

    fn len(&self) -> usize {
        self.sent.len() + self.failed.len()
    }
}

/// Marks waiting and the mark being written.
#[derive(Default)]
pub(super) struct Marks {
    /// What the next mark will record.
    waiting: Mark,
    /// When the oldest of them arrived.
    since: Option<Instant>,
    /// The mark being written, kept so that a failed one can be tried again.
    running: Option<Mark>,
}

impl Marks {
    /// A row was confirmed; `retried` if it had failed before.
    pub(super) fn sent(&mut self, now: Instant, id: i64, retried: bool) {
        self.since.get_or_insert(now);
        self.waiting.sent.push(id);
        if retried {
            self.waiting.released = Some(self.waiting.released.map_or(id, |r| r.min(id)));
        }
    }

    /// A publish attempt failed.
    pub(super) fn failed(&mut self, now: Instant, failure: Failure) {
        self.since.get_or_insert(now);
        self.waiting.failed.push(failure);
    }

    /// Confirms and failures waiting for a mark.
    pub(super) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// What waits changes what claims may return, or the mark being written does.
    pub(super) fn exclusive(&self) -> bool {
        self.waiting.is_exclusive() || self.running.as_ref().is_some_and(Mark::is_exclusive)
    }

    /// A mark is being written.
    pub(super) fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// When the oldest waiting row has waited `MARK_DELAY`.
    pub(super) fn due_at(&self) -> Option<Instant> {
        self.since.map(|t| t + MARK_DELAY)
    }

    /// Starts a mark of everything waiting; returns what to write.
    pub(super) fn start(&mut self) -> (Vec<i64>, Vec<Failure>) {
        let mark = std::mem::take(&mut self.waiting);
        self.since = None;
        let write = (mark.sent.clone(), mark.failed.clone());
        self.running = Some(mark);
        write
    }

    /// The mark was written: what it recorded.
    pub(super) fn written(&mut self) -> Mark {
        self.running.take().expect("a mark was running")
    }

    /// The mark failed: what it held waits again, before what came since.
    pub(super) fn failed_to_write(&mut self, now: Instant) {
        let mut mark = self.running.take().expect("a mark was running");
        mark.sent.append(&mut self.waiting.sent);
        mark.failed.append(&mut self.waiting.failed);
        mark.released = match (mark.released, self.waiting.released) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.waiting = mark;
        self.since.get_or_insert(now);
    }
}
