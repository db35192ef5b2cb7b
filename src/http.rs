//! `/healthz`, `/readyz`, `/metrics`, `POST /wake` and the status page ([`dashboard`], with
//! the dead rows' endpoints in `admin`), on `OUTBOX_HTTP_ADDR`.

mod admin;
pub mod dashboard;
mod page;

pub use dashboard::Dashboard;

use std::sync::Arc;

use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
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

/// How long a client may take to send a request's headers: a slow one would hold its
/// connection (and a file descriptor) for as long as it likes.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long any request may take to answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a response may wait for a client that does not read it: the connection is then
/// closed (a client that stopped reading holds a task and its response forever otherwise).
const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request body any endpoint reads.
const BODY_LIMIT: usize = 64 * 1024;

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
        .merge(dashboard::router(dashboard))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(guard));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: try again shortly.
                    tracing::warn!(error = %e, "HTTP: accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return Ok(()),
        };
        tokio::spawn(connection(stream, app.clone(), shutdown.clone()));
    }
}

/// One client's connection: HTTP/1.1 with deadlines on its headers and on each write, ended
/// gracefully at shutdown (what it is writing then has the write deadline too).
async fn connection(stream: tokio::net::TcpStream, app: Router, shutdown: CancellationToken) {
    let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
    stream.set_write_timeout(Some(WRITE_STALL_TIMEOUT));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(
            hyper_util::rt::TokioIo::new(Box::pin(stream)),
            hyper_util::service::TowerToHyperService::new(app),
        );
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Answers 413 for a declared body past [`BODY_LIMIT`] on any endpoint, whether it reads
/// its body or not (those that do stop at the same limit), and 503 for a request that takes
/// longer than [`REQUEST_TIMEOUT`].
async fn guard(request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n").into_response();
    }
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "no answer in time\n").into_response(),
    }
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
