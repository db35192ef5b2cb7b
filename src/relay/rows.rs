//! The rows a leader holds, from their claim until their mark is written: those that may be
//! published now, those waiting behind an earlier row of their key, and those awaiting their
//! confirm. A key has at most one row published and unconfirmed.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::message::OutboxRow;
use crate::store::Failure;

/// The held rows of one leadership term.
#[derive(Default)]
pub(super) struct Rows {
    /// Rows claimed and not yet marked, whatever their stage, with their size: never
    /// claimed again while here.
    held: HashMap<i64, usize>,
    /// The sizes of the held rows, added up.
    bytes: usize,
    /// Rows that may be published now, in claim order.
    ready: VecDeque<Arc<OutboxRow>>,
    /// Keys with a row ready or unconfirmed, and the rows of that key waiting behind it.
    keys: HashMap<String, VecDeque<Arc<OutboxRow>>>,
    /// Keys whose failed row is not yet marked, with that row: claims drop their rows.
    failing: HashMap<String, i64>,
    /// Rows published on the current connection, waiting for their confirm.
    unconfirmed: HashMap<i64, Arc<OutboxRow>>,
    /// The highest id claimed this term.
    top: i64,
}

impl Rows {
    /// How many rows are held.
    pub(super) fn len(&self) -> usize {
        self.held.len()
    }

    /// The text of the held rows, in bytes.
    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The highest id claimed this term.
    pub(super) fn top(&self) -> i64 {
        self.top
    }

    /// Published rows waiting for their confirm.
    pub(super) fn unconfirmed(&self) -> usize {
        self.unconfirmed.len()
    }

    /// No row may be published now.
    pub(super) fn none_ready(&self) -> bool {
        self.ready.is_empty()
    }

    /// The held ids: a claim skips them (and a store may look below its floor for rows
    /// that are not among them).
    pub(super) fn held(&self) -> Vec<i64> {
        self.held.keys().copied().collect()
    }

    /// Holds row `id`.
    fn hold(&mut self, row: &OutboxRow) {
        let size = row.bytes();
        self.bytes += size;
        self.held.insert(row.id, size);
    }

    /// Lets row `id` go.
    fn release(&mut self, id: i64) {
        if let Some(size) = self.held.remove(&id) {
            self.bytes -= size;
        }
    }

    /// Holds a claimed row: ready if its key has nothing ahead, else behind its key's rows.
    /// A row whose key has an earlier pending row that is not held is left behind, and that
    /// earlier row's id returned: it was committed late, or its notification never came,
    /// and must go first.
    pub(super) fn take(&mut self, row: OutboxRow) -> Option<i64> {
        self.top = self.top.max(row.id);
        if let Some(previous) = row.previous
            && !self.held.contains_key(&previous)
        {
            return Some(previous);
        }
        let row = Arc::new(row);
        let Some(key) = &row.ordering_key else {
            self.hold(&row);
            self.ready.push_back(row);
            return None;
        };
        if self.failing.contains_key(key) {
            // Claimed before the failure was marked: found again once its key is released.
            return None;
        }
        self.hold(&row);
        match self.keys.get_mut(key) {
            Some(behind) => {
                // Normally the last; a row committed late goes among the others by id.
                let at = behind.partition_point(|r| r.id < row.id);
                behind.insert(at, row);
            }
            None => {
                self.keys.insert(key.clone(), VecDeque::new());
                self.ready.push_back(row);
            }
        }
        None
    }

    /// The next row to publish, now awaiting its confirm.
    pub(super) fn publish(&mut self) -> Option<Arc<OutboxRow>> {
        let row = self.ready.pop_front()?;
        self.unconfirmed.insert(row.id, row.clone());
        Some(row)
    }

    /// The published row `id`, no longer awaiting its confirm.
    pub(super) fn settled(&mut self, id: i64) -> Option<Arc<OutboxRow>> {
        self.unconfirmed.remove(&id)
    }

    /// A row was confirmed: the next row of its key becomes ready.
    pub(super) fn confirmed(&mut self, row: &OutboxRow) {
        let Some(key) = &row.ordering_key else {
            return;
        };
        match self.keys.get_mut(key).and_then(VecDeque::pop_front) {
            Some(next) => self.ready.push_back(next),
            None => {
                self.keys.remove(key);
            }
        }
    }

    /// A row failed: the rows of its key held behind it are dropped (claims find them again
    /// once it is sent), and until its failure is marked claims drop its key's rows.
    pub(super) fn failed(&mut self, row: &OutboxRow) {
        if let Some(key) = &row.ordering_key {
            for behind in self.keys.remove(key).into_iter().flatten() {
                self.release(behind.id);
            }
            self.failing.insert(key.clone(), row.id);
        }
    }

    /// The connection was given up: the unconfirmed rows go back to the front, in id order.
    pub(super) fn unpublish(&mut self) {
        let mut rows: Vec<Arc<OutboxRow>> = self.unconfirmed.drain().map(|(_, r)| r).collect();
        rows.sort_unstable_by_key(|row| std::cmp::Reverse(row.id));
        for row in rows {
            self.ready.push_front(row);
        }
    }

    /// A mark of these rows is written: they are no longer held, and the claims now hold
    /// back the keys of the failed ones.
    pub(super) fn marked(&mut self, sent: &[i64], failed: &[Failure]) {
        for &id in sent.iter().chain(failed.iter().map(|f| &f.id)) {
            self.release(id);
        }
        self.failing
            .retain(|_, id| !failed.iter().any(|f| f.id == *id));
    }

    /// Panics unless every row is in one place at most, and only if held.
    #[cfg(test)]
    pub(super) fn check_consistency(&self) {
        let mut seen = std::collections::HashSet::new();
        let places = self
            .ready
            .iter()
            .chain(self.keys.values().flatten())
            .map(|r| r.id)
            .chain(self.unconfirmed.keys().copied());
        for id in places {
            assert!(seen.insert(id), "row {id} is in two places at once");
            assert!(
                self.held.contains_key(&id),
                "row {id} is handled but not held"
            );
        }
        assert_eq!(self.bytes, self.held.values().sum::<usize>(), "held bytes");
    }
}
