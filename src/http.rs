//! `/healthz`, `/readyz`, `/metrics`, a status page and `POST /wake`, on `OUTBOX_HTTP_ADDR`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Health;

/// What the handlers read.
#[derive(Clone)]
struct Shared {
    /// The relay's live state.
    health: Arc<Health>,
    /// Renders the Prometheus text.
    prometheus: PrometheusHandle,
}

/// Serves the endpoints on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    prometheus: PrometheusHandle,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(page))
        .route("/healthz", get(alive))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/wake", post(wake))
        .with_state(Shared { health, prometheus });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn alive(State(s): State<Shared>) -> Response {
    match s.health.stalled() {
        None => "ok\n".into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("stalled: {why}\n")).into_response(),
    }
}

async fn ready(State(s): State<Shared>) -> Response {
    let snap = s.health.snapshot();
    let code = if snap.status == "not ready" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    let mut body = serde_json::to_value(&snap).unwrap_or_default();
    body["reasons"] = not_ready_reasons(&snap).into();
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Plain words for each thing that keeps the relay from being ready.
fn not_ready_reasons(snap: &crate::health::Snapshot) -> Vec<String> {
    let mut reasons = Vec::new();
    if !snap.database {
        reasons.push("database unreachable".to_owned());
    }
    if snap.leader && !snap.broker_connected {
        reasons.push("broker not connected".to_owned());
    }
    if let Some(why) = &snap.broker_blocked {
        reasons.push(format!("broker blocked publishing: {why}"));
    }
    reasons
}

/// A service nudges its sidecar after a commit: no body, nothing read, nothing to protect.
async fn wake(State(s): State<Shared>) -> StatusCode {
    s.health.wake();
    StatusCode::NO_CONTENT
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.prometheus.render(),
    )
}

async fn page(State(s): State<Shared>) -> Html<String> {
    let snap = s.health.snapshot();
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let reasons = not_ready_reasons(&snap).join("; ");
    let rows = [
        ("status", snap.status.to_owned()),
        (
            "why not ready",
            if reasons.is_empty() {
                "-".into()
            } else {
                reasons
            },
        ),
        ("leader", yes_no(snap.leader).into()),
        ("database reachable", yes_no(snap.database).into()),
        ("broker connected", yes_no(snap.broker_connected).into()),
        (
            "broker blocked",
            snap.broker_blocked.clone().unwrap_or_else(|| "no".into()),
        ),
        ("pending messages", snap.stats.pending.to_string()),
        (
            "oldest pending age (s)",
            format!("{:.1}", snap.stats.oldest_pending_age_seconds),
        ),
        ("dead messages", snap.stats.dead.to_string()),
    ];
    let body: String = rows
        .iter()
        .map(|(k, v)| format!("<tr><th>{k}</th><td>{}</td></tr>\n", escape(v)))
        .collect();
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"2\">\
         <title>outbox relay</title></head><body><h1>outbox relay</h1><table>\n{body}</table>\
         <p><a href=\"/metrics\">metrics</a> · <a href=\"/readyz\">readyz</a></p></body></html>"
    ))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
