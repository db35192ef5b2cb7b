//! `/healthz`, `/readyz`, `/metrics`, `POST /wake` and the status page ([`dashboard`], with
//! the dead rows' endpoints in `admin`), on `OUTBOX_HTTP_ADDR`.

mod admin;
pub mod dashboard;
mod page;

pub use dashboard::Dashboard;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{Health, Store};

/// What the handlers read.
#[derive(Clone)]
struct Shared {
    /// The relay's live state.
    health: Arc<Health>,
    /// Renders the Prometheus text.
    prometheus: PrometheusHandle,
}

/// Serves the endpoints on `listener` until `shutdown`.
pub async fn serve<S: Store>(
    listener: TcpListener,
    health: Arc<Health>,
    prometheus: PrometheusHandle,
    dashboard: Dashboard<S>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(alive))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/wake", post(wake))
        .with_state(Shared { health, prometheus })
        .merge(dashboard::router(dashboard));
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
