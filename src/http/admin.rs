//! The dead rows on the status page: `GET /api/dead` lists them a page at a time, and
//! `POST /api/dead/retry` puts some or all back to pending under the same deduplication-window
//! rule as `outbox dead retry`. Retrying needs `OUTBOX_ADMIN_TOKEN` as a bearer token; without
//! one configured the endpoint answers 403 whatever is sent.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::dashboard::Dashboard;
use crate::config::Secret;
use crate::store::{Refusal, RetryPlan, Store, plan_retry};

/// Dead rows per page at most.
const MAX_PAGE: u64 = 500;

/// `GET /api/dead` and `POST /api/dead/retry`.
pub(super) fn routes<S: Store>() -> Router<Arc<Dashboard<S>>> {
    Router::new()
        .route("/api/dead", get(list::<S>))
        .route("/api/dead/retry", post(retry::<S>))
}

/// Which page of dead rows.
#[derive(Deserialize)]
struct Page {
    /// Rows skipped, oldest first.
    #[serde(default)]
    offset: u64,
    /// Rows at most (default 50, at most 500).
    limit: Option<u64>,
}

/// What to retry.
#[derive(Deserialize)]
struct RetryRequest {
    /// The rows' message ids.
    #[serde(default)]
    message_ids: Vec<String>,
    /// Every dead row instead.
    #[serde(default)]
    all: bool,
    /// Retry rows older than the deduplication window too.
    #[serde(default)]
    force: bool,
}

/// An answer with a JSON body `{"error": why}`.
fn error(code: StatusCode, why: &str) -> Response {
    (code, Json(json!({ "error": why }))).into_response()
}

async fn list<S: Store>(State(d): State<Arc<Dashboard<S>>>, Query(p): Query<Page>) -> Response {
    let limit = p.limit.unwrap_or(50).clamp(1, MAX_PAGE);
    match d.store.dead_page(p.offset, limit).await {
        Ok(rows) => Json(json!({
            "rows": rows,
            "offset": p.offset,
            "limit": limit,
            "total": d.health.snapshot().stats.dead,
            "admin": d.admin_token.is_some(),
        }))
        .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

async fn retry<S: Store>(
    State(d): State<Arc<Dashboard<S>>>,
    headers: HeaderMap,
    body: Json<RetryRequest>,
) -> Response {
    if let Err(code) = authorize(d.admin_token.as_ref(), &headers) {
        return denied(code);
    }
    let request = body.0;
    if let Err(why) = request.check() {
        return error(StatusCode::BAD_REQUEST, &why);
    }
    let ids = (!request.all).then_some(&request.message_ids[..]);
    let window = d.dedup_window;
    let done = async {
        let plan = plan_retry(&d.store, ids, request.force, window).await?;
        Ok::<_, crate::Error>((plan.execute(&d.store).await?, plan))
    };
    let (retried, plan) = match done.await {
        Ok(done) => done,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    tracing::info!(
        retried,
        refused = plan.refused.len(),
        force = request.force,
        "dead rows retried from the status page"
    );
    Json(json!({ "retried": retried, "refused": refusals(&plan, window) })).into_response()
}

impl RetryRequest {
    /// Names rows one way (ids or all), and only message ids.
    fn check(&self) -> Result<(), String> {
        if self.all != self.message_ids.is_empty() {
            return Err("give message_ids or all, not both".into());
        }
        match self
            .message_ids
            .iter()
            .find(|id| uuid::Uuid::parse_str(id).is_err())
        {
            Some(bad) => Err(format!("{bad:?} is not a message id (a UUID)")),
            None => Ok(()),
        }
    }
}

/// The refused rows, each with its reason and a sentence for the page.
fn refusals(plan: &RetryPlan, window: Duration) -> Vec<Value> {
    let window = humantime::format_duration(window);
    let detail = |reason| match reason {
        Refusal::PastDedupWindow => format!(
            "older than the deduplication window ({window}): consumers may no longer recognise it and could apply it twice; retry with force to send it anyway"
        ),
        Refusal::NotDead => "no dead row has this message id".to_owned(),
    };
    let refused = plan.refused.iter();
    refused
        .map(
            |r| json!({"message_id": r.message_id, "reason": r.reason, "detail": detail(r.reason)}),
        )
        .collect()
}

/// 403 when no token is configured, 401 unless `Authorization: Bearer <token>` matches.
fn authorize(token: Option<&Secret>, headers: &HeaderMap) -> Result<(), StatusCode> {
    let token = token.ok_or(StatusCode::FORBIDDEN)?;
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if same(given.as_bytes(), token.expose().as_bytes()) => Ok(()),
        _ => Err(StatusCode::UNAUTHORIZED),
    }
}

/// The answer to a refused request (403 or 401, with its challenge).
fn denied(code: StatusCode) -> Response {
    if code == StatusCode::FORBIDDEN {
        let why = "read-only: OUTBOX_ADMIN_TOKEN is not set on this relay";
        return error(code, why);
    }
    let mut denied = error(code, "a valid bearer token is needed");
    let challenge = header::HeaderValue::from_static("Bearer");
    denied
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, challenge);
    denied
}

/// Compares in time that depends on the lengths only, not on where the bytes differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3cret", b"s3creT"));
        assert!(!same(b"s3cret", b"s3cre"));
        let token = Secret::new("s3cret");
        let mut headers = HeaderMap::new();
        assert_eq!(authorize(None, &headers), Err(StatusCode::FORBIDDEN));
        assert_eq!(
            authorize(Some(&token), &headers),
            Err(StatusCode::UNAUTHORIZED)
        );
        headers.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert_eq!(authorize(Some(&token), &headers), Ok(()));
        assert_eq!(authorize(None, &headers), Err(StatusCode::FORBIDDEN));
    }
}
