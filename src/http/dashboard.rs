//! The status page at `GET /`: one self-contained page (HTML, CSS and JavaScript embedded
//! in the binary, nothing fetched from elsewhere) that renders the current figures on the
//! server and then updates itself every second from `GET /api/status` and
//! `GET /api/history`. The operations guide is served beside it, for the alarm banner's link.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use serde_json::{Value, json};

use crate::config::Secret;
use crate::health::Snapshot;
use crate::history::{History, Sample};
use crate::store::{DeadRow, Store};
use crate::tally::REASONS;
use crate::{Health, metrics as m};

/// The page; `{{name}}` marks a value filled in (escaped) by [`page`].
const PAGE: &str = include_str!("page.html");
/// Its style sheet, inlined in place of `/*STYLE*/`.
const STYLE: &str = include_str!("page.css");
/// Its script, inlined in place of `/*SCRIPT*/`.
const SCRIPT: &str = include_str!("page.js");
/// The operations guide, which the alarm banner links to.
const OPERATIONS: &str = include_str!("../../docs/operations.md");
/// How long the page waits for the database before answering without what it asked.
const DB_WAIT: Duration = Duration::from_secs(2);
/// Where the guide explains the watermarks and what to do during an alarm.
pub const ALARM_DOCS: &str = "docs/operations.md#memory-and-disk-alarms";

/// What the status page reads and may change, besides the relay's health.
pub struct Dashboard<S> {
    /// The table, for dead rows, blocked keys and the leader's name.
    pub store: S,
    /// The relay's live state.
    pub health: Arc<Health>,
    /// The last 15 minutes, filled by [`crate::history::sample`].
    pub history: Arc<History>,
    /// This relay's name (`OUTBOX_REPLICA_ID`).
    pub replica_id: String,
    /// The database's URL, redacted.
    pub database: String,
    /// `OUTBOX_ADMIN_TOKEN`: without it the page is read-only.
    pub admin_token: Option<Secret>,
    /// `OUTBOX_DEDUP_WINDOW`: older dead rows are retried only when forced.
    pub dedup_window: Duration,
}

/// The page's routes: `/`, `/api/status`, `/api/history`, the dead rows and the guide.
pub fn router<S: Store>(dashboard: Dashboard<S>) -> Router {
    Router::new()
        .route("/", get(page::<S>))
        .route("/api/status", get(status::<S>))
        .route("/api/history", get(history::<S>))
        .route("/docs/operations.md", get(operations))
        .merge(super::admin::routes())
        .with_state(Arc::new(dashboard))
}

/// The gauges of the contract and the published count, as `/metrics` has them now.
fn gauges(snap: &Snapshot) -> [(&'static str, f64); 7] {
    let flag = |b: bool| f64::from(u8::from(b));
    [
        (m::PENDING, snap.stats.pending as f64),
        (m::OLDEST_PENDING_AGE, snap.stats.oldest_pending_age_seconds),
        (m::DEAD, snap.stats.dead as f64),
        (m::BROKER_CONNECTED, flag(snap.broker_connected)),
        (m::BROKER_BLOCKED, flag(snap.broker_blocked.is_some())),
        (m::LEADER, flag(snap.leader)),
        (m::PUBLISHED, crate::tally::totals().published as f64),
    ]
}

/// What `read` found, unless it failed or the database took over [`DB_WAIT`]: the page
/// answers without it rather than hang while the database is down.
async fn quick<T>(read: impl Future<Output = crate::Result<T>>) -> Option<T> {
    tokio::time::timeout(DB_WAIT, read).await.ok()?.ok()
}

/// Which alarm a blocking reason names.
fn alarm_kind(reason: &str) -> &'static str {
    match reason {
        r if r.contains("memory") => "memory",
        r if r.contains("disk") => "disk",
        _ => "resource",
    }
}

async fn status<S: Store>(State(d): State<Arc<Dashboard<S>>>) -> Json<Value> {
    let snap = d.health.snapshot();
    let (keys, holder) = tokio::join!(
        quick(d.store.blocked_keys()),
        quick(d.store.leader_holder())
    );
    let metrics: serde_json::Map<String, Value> = gauges(&snap)
        .into_iter()
        .map(|(name, value)| (name.to_owned(), json!(value)))
        .collect();
    let alarm = d
        .history
        .note_blocked(snap.broker_blocked.clone())
        .map(|a| json!({"kind": alarm_kind(&a.reason), "reason": a.reason, "since": a.since}));
    Json(json!({
        "status": snap.status,
        "role": if snap.leader { "leader" } else { "standby" },
        "replica_id": d.replica_id,
        "leader_replica_id": holder.flatten(),
        "database": d.database,
        "database_reachable": snap.database,
        "broker": {
            "node": d.health.broker_node(),
            "connected": snap.broker_connected,
            "blocked": snap.broker_blocked,
        },
        "alarm": alarm,
        "alarm_docs": ALARM_DOCS,
        "metrics": metrics,
        "blocked_ordering_keys": keys,
        "admin": d.admin_token.is_some(),
        "dedup_window_seconds": d.dedup_window.as_secs(),
    }))
}

/// The samples as columns, oldest first; failures only for reasons seen in the window.
async fn history<S: Store>(State(d): State<Arc<Dashboard<S>>>) -> Json<Value> {
    let samples = d.history.samples();
    let column = |f: &dyn Fn(&Sample) -> Value| samples.iter().map(f).collect::<Vec<_>>();
    let failures: serde_json::Map<String, Value> = REASONS
        .iter()
        .enumerate()
        .filter(|(i, _)| samples.iter().any(|s| s.failures[*i] > 0))
        .map(|(i, reason)| (reason.to_string(), column(&|s| json!(s.failures[i])).into()))
        .collect();
    Json(json!({
        "at": column(&|s| json!(s.at)),
        "published": column(&|s| json!(s.published)),
        "failures": failures,
        "pending": column(&|s| json!(s.pending)),
        "oldest_pending_age": column(&|s| json!(s.oldest_pending_age)),
        "p50": column(&|s| json!(s.p50)),
        "p99": column(&|s| json!(s.p99)),
    }))
}

/// The page with the current figures written in, so that it reads right before its script
/// runs (and without one).
async fn page<S: Store>(State(d): State<Arc<Dashboard<S>>>) -> Html<String> {
    let snap = d.health.snapshot();
    let banner = match d.history.note_blocked(snap.broker_blocked.clone()) {
        Some(a) => format!("{} alarm: {}", alarm_kind(&a.reason), a.reason),
        None => String::new(),
    };
    let mut values: Vec<(&str, String)> = gauges(&snap)
        .into_iter()
        .map(|(name, value)| (name, value.to_string()))
        .collect();
    values.extend([
        (
            "role",
            if snap.leader { "leader" } else { "standby" }.into(),
        ),
        ("replica_id", d.replica_id.clone()),
        (
            "hidden",
            if banner.is_empty() { "hidden" } else { "" }.into(),
        ),
        ("banner", banner),
        ("alarm_docs", ALARM_DOCS.into()),
    ]);
    let dead = quick(d.store.dead_page(0, 50)).await.unwrap_or_default();
    let html = fill(PAGE, &values)
        .replace("<!--DEAD_ROWS-->", &dead_rows(&dead))
        .replace("/*STYLE*/", STYLE);
    Html(html.replace("/*SCRIPT*/", SCRIPT))
}

/// The first page of dead rows as table rows, until the script takes over.
fn dead_rows(rows: &[DeadRow]) -> String {
    let mut html = String::new();
    for r in rows {
        let cells = [
            r.ordering_key.clone().unwrap_or_else(|| "-".into()),
            format!("{} / {}", r.exchange, r.routing_key),
            r.attempts.to_string(),
            r.last_error.clone().unwrap_or_default(),
            format!("{:.0}s", r.age_seconds),
        ];
        let id = escape(&r.message_id);
        let _ = write!(html, "<tr data-message-id=\"{id}\"><td></td><td>{id}</td>");
        for cell in cells {
            let _ = write!(html, "<td>{}</td>", escape(&cell));
        }
        html.push_str("</tr>\n");
    }
    html
}

/// `template` with each `{{name}}` of `values` replaced by its value, escaped, in one pass
/// (a value is never read as a placeholder).
fn fill(template: &str, values: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            rest = &rest[open..];
            break;
        };
        match values.iter().find(|(name, _)| *name == &after[..close]) {
            Some((_, value)) => out.push_str(&escape(value)),
            None => out.push_str(&rest[open..open + close + 4]),
        }
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    out
}

async fn operations() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        OPERATIONS,
    )
}

/// Text made safe for HTML content and attribute values.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_escapes_values_and_reads_them_once() {
        let values = [("a", "<b>{{b}}</b>".to_owned()), ("b", "x\"y".to_owned())];
        assert_eq!(
            fill("[{{a}}|{{b}}|{{c}}]", &values),
            "[&lt;b&gt;{{b}}&lt;/b&gt;|x&quot;y|{{c}}]"
        );
    }
}
