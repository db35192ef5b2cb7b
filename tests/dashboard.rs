//! The status page's JSON endpoints over plain HTTP: `/api/status` on a leader and a
//! standby, `/api/dead`, and `POST /api/dead/retry` answering 403 without a configured
//! token, 401 with a missing or wrong one, refusing rows past the deduplication window
//! unless forced, and releasing a dead row that then arrives. The page in a real browser
//! is `tests/browser.rs`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// `GET path` as JSON.
async fn get_json(relay: &Relay, path: &str) -> Value {
    let (code, body) = relay.get(path).await;
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

/// `POST /api/dead/retry` with `body`, and a bearer token if given.
async fn retry(relay: &Relay, token: Option<&str>, body: Value) -> (u16, Value) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    headers.extend(bearer.as_deref().map(|b| ("Authorization", b)));
    let (code, body) = http_request(
        relay.http,
        "POST",
        "/api/dead/retry",
        &headers,
        &body.to_string(),
    )
    .await;
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_and_dead_row_endpoints_need_the_token_and_keep_the_dedup_rule(
        backend: Backend,
    ) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let exchange = queue.exchange().await;
        let env = [
            ("OUTBOX_MAX_ATTEMPTS", "1"),
            ("OUTBOX_ADMIN_TOKEN", "s3cret"),
            ("OUTBOX_REPLICA_ID", "replica-a"),
            ("OUTBOX_DEDUP_WINDOW", "1ms"),
        ];
        let leader = Relay::start(&db.url, &db.table, &env);
        eventually("the relay to be ready", Duration::from_secs(20), || async {
            leader.get("/readyz").await.0 == 200
        })
        .await;
        let id = db.insert_row(&Row::new("nowhere", json!({"n": 1})).exchange(&exchange)).await;
        eventually("the row to go dead", Duration::from_secs(30), || async {
            get_json(&leader, "/api/dead").await["rows"].as_array().unwrap().len() == 1
        })
        .await;
        let dead = get_json(&leader, "/api/dead?offset=0&limit=10").await;
        assert_eq!(dead["rows"][0]["message_id"], json!(id));
        assert_eq!(dead["rows"][0]["exchange"], json!(exchange));
        assert!(dead["rows"][0]["last_error"].as_str().unwrap().contains("unroutable"));

        let status = get_json(&leader, "/api/status").await;
        assert_eq!(status["role"], json!("leader"), "{status}");
        assert_eq!(status["replica_id"], json!("replica-a"));
        assert_eq!(status["leader_replica_id"], json!("replica-a"));
        assert_eq!(status["admin"], json!(true));
        let node = status["broker"]["node"].as_str().unwrap();
        assert!(node.contains("***") && !node.contains(":guest@"), "{node}");
        assert!(status["database"].as_str().unwrap().ends_with(&db.name));
        eventually("the dead gauge", Duration::from_secs(10), || async {
            let status = get_json(&leader, "/api/status").await;
            status["metrics"]["outbox_dead_messages"] == json!(1.0)
        })
        .await;

        // A standby without a token: read-only, and it names the leader.
        let standby = Relay::start(&db.url, &db.table, &[("OUTBOX_REPLICA_ID", "replica-b")]);
        eventually("the standby to answer", Duration::from_secs(20), || async {
            standby.get("/readyz").await.0 == 200
        })
        .await;
        let status = get_json(&standby, "/api/status").await;
        assert_eq!(status["role"], json!("standby"), "{status}");
        assert_eq!(status["leader_replica_id"], json!("replica-a"));
        assert_eq!(status["admin"], json!(false));
        let all = json!({"all": true});
        assert_eq!(retry(&standby, Some("s3cret"), all.clone()).await.0, 403);

        assert_eq!(retry(&leader, None, all.clone()).await.0, 401);
        assert_eq!(retry(&leader, Some("s3cre"), all.clone()).await.0, 401);
        assert_eq!(retry(&leader, Some("S3CRET"), all.clone()).await.0, 401);
        assert_eq!(db.count("state = 'dead'").await, 1, "a refused retry changed the row");
        let huge = json!({"message_ids": vec![id.clone(); 3000]});
        assert_eq!(retry(&leader, Some("s3cret"), huge).await.0, 413);
        let bad = json!({"message_ids": ["not-a-uuid"]});
        assert_eq!(retry(&leader, Some("s3cret"), bad).await.0, 400);

        // Older than the 1 ms window: refused unless forced.
        let unknown = uuid::Uuid::new_v4().to_string();
        let ids = json!({"message_ids": [id, unknown]});
        let (code, answer) = retry(&leader, Some("s3cret"), ids.clone()).await;
        assert_eq!(code, 200, "{answer}");
        assert_eq!(answer["retried"], json!(0));
        let refused = &answer["refused"];
        assert_eq!(refused[0], json!({"message_id": unknown, "reason": "not_dead", "detail": refused[0]["detail"]}));
        assert_eq!(refused[1]["message_id"], json!(id));
        assert_eq!(refused[1]["reason"], json!("past_dedup_window"));
        assert!(refused[1]["detail"].as_str().unwrap().contains("deduplication window"));
        assert_eq!(db.count("state = 'dead'").await, 1);

        queue.bind(&exchange, "nowhere").await;
        let forced = json!({"message_ids": [id], "force": true});
        let (code, answer) = retry(&leader, Some("s3cret"), forced).await;
        assert_eq!((code, answer["retried"].clone()), (200, json!(1)), "{answer}");
        let received = queue.wait_for(1, Duration::from_secs(30)).await;
        assert_eq!(received[0].message_id, id);
        assert!(
            !leader.log_text().contains("s3cret") && !standby.log_text().contains("s3cret"),
            "the token was logged"
        );
    }
}
