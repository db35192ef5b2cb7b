//! `outbox migrate`, `OUTBOX_TABLE`, `outbox status`, and retention of sent rows.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test]
async fn migrate_twice_changes_nothing_and_keeps_its_own_history_table() {
    let db = TestDb::with_table("billing_outbox").await; // migrated once by the helper
    let again = outbox_cmd(&db, &["migrate"]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(String::from_utf8_lossy(&again.stdout).contains("up to date"));

    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        tables,
        [
            "billing_outbox",
            "billing_outbox_inbox",
            "billing_outbox_leader",
            "billing_outbox_schema_history"
        ]
    );
    let history: i64 = sqlx::query_scalar("SELECT count(*) FROM billing_outbox_schema_history")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(history, 4);
    // A second outbox table in the same database gets its own objects and history.
    let second = outbox_bin()
        .arg("migrate")
        .env("DATABASE_URL", &db.url)
        .env("OUTBOX_TABLE", "audit_outbox")
        .output()
        .unwrap();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let triggers: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(triggers, 2);

    let bad = outbox_bin()
        .arg("migrate")
        .env("DATABASE_URL", &db.url)
        .env("OUTBOX_TABLE", "x-y")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("OUTBOX_TABLE"));
}

#[tokio::test]
async fn the_contracts_minimal_insert_works_as_written() {
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO outbox (exchange, routing_key, ordering_key, message_type, payload)
         VALUES ('orders', 'order.created', 'order-42', 'OrderCreated', '{\"order_id\": 42}')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let out = outbox_cmd(&db, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["pending"], json!(1));
    assert_eq!(status["dead"], json!(0));
    assert!(status["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_rows_are_kept_for_the_retention_then_purged() {
    let db = TestDb::new().await;
    let queue = TestQueue::new().await;
    let _relay = Relay::start(&db.url, &db.table, &[("OUTBOX_RETENTION", "3s")]);
    for i in 0..10 {
        db.insert(&queue.name, None, json!({"i": i})).await;
    }
    queue.wait_for(10, Duration::from_secs(20)).await;
    eventually(
        "rows to be marked sent",
        Duration::from_secs(10),
        || async { db.count("state = 'sent' AND sent_at IS NOT NULL").await == 10 },
    )
    .await;
    eventually(
        "sent rows to be purged after the retention",
        Duration::from_secs(20),
        || async { db.count("true").await == 0 },
    )
    .await;
}
