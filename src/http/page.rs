//! The status page at `GET /`: one self-contained page (HTML, CSS and JavaScript embedded
//! in the binary, nothing fetched from elsewhere) rendered with the current figures and the
//! first dead rows, so that it reads right before its script runs (and without one); the
//! script then updates it in place every second.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::response::Html;

use super::dashboard::{ALARM_DOCS, Dashboard, alarm_kind, gauges, quick};
use crate::store::{DeadRow, Store};

/// The page; `{{name}}` marks a value filled in (escaped) by [`page`].
const PAGE: &str = include_str!("page.html");
/// Its style sheet, inlined in place of `/*STYLE*/`.
const STYLE: &str = include_str!("page.css");
/// Its script, inlined in place of `/*SCRIPT*/`.
const SCRIPT: &str = include_str!("page.js");

/// The page with the current figures written in.
pub(super) async fn page<S: Store>(State(d): State<Arc<Dashboard<S>>>) -> Html<String> {
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
