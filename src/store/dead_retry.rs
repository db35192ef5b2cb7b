//! Releasing dead rows under the deduplication-window rule, for `outbox dead retry` and the
//! status page alike: a dead row older than the consumers' inbox window may already have
//! been applied (published, then not marked), so retrying it could apply it twice.

use std::time::Duration;

use serde::Serialize;

use super::Store;
use crate::Result;

/// A requested row that a retry leaves alone, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refused {
    /// The row's message id, as requested.
    pub message_id: String,
    /// Why it is left alone.
    pub reason: Refusal,
}

/// Why a retry leaves a row alone.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// Older than `OUTBOX_DEDUP_WINDOW`: consumers may no longer recognise it (force it).
    PastDedupWindow,
    /// No dead row has this message id (already retried, sent, or never there).
    NotDead,
}

/// What a retry of some or all dead rows would do.
#[derive(Debug, Clone, Default)]
pub struct RetryPlan {
    /// The message ids of the dead rows to put back to pending.
    pub retry: Vec<String>,
    /// The requested rows left alone.
    pub refused: Vec<Refused>,
}

/// Sorts the dead rows named by `ids` (every dead row when `None`) into those to retry and
/// those refused: rows past `window` are refused unless `force`, and ids of no dead row are.
pub async fn plan_retry(
    store: &impl Store,
    ids: Option<&[String]>,
    force: bool,
    window: Duration,
) -> Result<RetryPlan> {
    let dead = store.dead_list().await?;
    let mut plan = RetryPlan::default();
    for id in ids.unwrap_or_default() {
        if !dead.iter().any(|r| &r.message_id == id) {
            plan.refused.push(refused(id, Refusal::NotDead));
        }
    }
    let wanted = dead
        .into_iter()
        .filter(|r| ids.is_none_or(|ids| ids.contains(&r.message_id)));
    for row in wanted {
        if !force && row.age_seconds > window.as_secs_f64() {
            plan.refused
                .push(refused(&row.message_id, Refusal::PastDedupWindow));
        } else {
            plan.retry.push(row.message_id);
        }
    }
    Ok(plan)
}

fn refused(message_id: &str, reason: Refusal) -> Refused {
    Refused {
        message_id: message_id.to_owned(),
        reason,
    }
}

impl RetryPlan {
    /// The message ids refused for `reason`.
    pub fn refused_for(&self, reason: Refusal) -> Vec<&str> {
        let ids = self.refused.iter().filter(|r| r.reason == reason);
        ids.map(|r| r.message_id.as_str()).collect()
    }

    /// Puts the planned rows back to pending; returns how many were.
    pub async fn execute(&self, store: &impl Store) -> Result<u64> {
        if self.retry.is_empty() {
            return Ok(0);
        }
        store.dead_retry(Some(&self.retry)).await
    }
}
