//! Failing rows: order per key across retries, dead rows, `dead retry`, and containment; on
//! both backends.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use serde_json::json;

/// The `seq` payloads received per ordering key, in arrival order.
fn by_key(received: &[Received]) -> BTreeMap<String, Vec<i64>> {
    let mut keys: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for m in received {
        keys.entry(m.body["key"].as_str().unwrap().to_owned())
            .or_default()
            .push(m.body["seq"].as_i64().unwrap());
    }
    keys
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_row_holds_back_only_its_key_and_order_survives_the_retry(backend: Backend) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let exchange = queue.exchange().await;
        queue.bind(&exchange, "ok").await;
        let fast_retry = [
            ("OUTBOX_BACKOFF_MIN", "50ms"),
            ("OUTBOX_BACKOFF_MAX", "200ms"),
            ("OUTBOX_MAX_ATTEMPTS", "1000"),
        ];
        let relay = Relay::start(&db.url, &db.table, &fast_retry);

        // Key k0 starts with a row nothing is bound for yet; k1..k4 flow freely.
        for seq in 0..10 {
            for k in 0..5 {
                let routing_key = if k == 0 && seq == 0 { "later" } else { "ok" };
                insert_to(&db, &exchange, routing_key, &format!("k{k}"), seq).await;
            }
        }
        queue.wait_for(40, Duration::from_secs(30)).await;
        eventually(
            "k0's head to have failed several times",
            Duration::from_secs(20),
            || async { db.count("ordering_key = 'k0' AND attempts >= 3").await == 1 },
        )
        .await;
        assert_eq!(
            by_key(&queue.received()).get("k0"),
            None,
            "k0 overtook its failing head"
        );
        let status = db.run_outbox(&["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        assert_eq!(status["blocked_ordering_keys"], json!(["k0"]));

        queue.bind(&exchange, "later").await;
        let received = queue.wait_for(50, Duration::from_secs(30)).await;
        for (key, seqs) in by_key(&received) {
            assert_eq!(seqs, (0..10).collect::<Vec<_>>(), "order of {key}");
        }
        let unroutable = relay.get("/metrics").await.1;
        assert!(
            unroutable.contains("outbox_publish_failures_total{reason=\"unroutable\"}"),
            "{unroutable}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unroutable_row_goes_dead_and_dead_retry_delivers_it_before_its_successors(
        backend: Backend,
    ) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let exchange = queue.exchange().await;
        queue.bind(&exchange, "ok").await;
        let env = [
            ("OUTBOX_BACKOFF_MIN", "20ms"),
            ("OUTBOX_BACKOFF_MAX", "50ms"),
            ("OUTBOX_MAX_ATTEMPTS", "3"),
        ];
        let _relay = Relay::start(&db.url, &db.table, &env);

        let dead_id = insert_to(&db, &exchange, "nowhere", "a", 0).await;
        for seq in 1..5 {
            insert_to(&db, &exchange, "ok", "a", seq).await;
        }
        for seq in 0..20 {
            insert_to(&db, &exchange, "ok", "b", seq).await;
        }
        queue.wait_for(20, Duration::from_secs(30)).await;
        eventually(
            "the unroutable row to be dead",
            Duration::from_secs(30),
            || async { db.count("state = 'dead'").await == 1 },
        )
        .await;

        let list = db.run_outbox(&["dead", "list", "--json"]);
        assert!(list.status.success());
        let dead: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
        assert_eq!(dead[0]["message_id"], json!(dead_id));
        assert_eq!(dead[0]["ordering_key"], json!("a"));
        assert_eq!(
            dead[0]["attempts"],
            json!(3),
            "dead after OUTBOX_MAX_ATTEMPTS attempts in all"
        );
        assert!(
            dead[0]["last_error"]
                .as_str()
                .unwrap()
                .contains("unroutable"),
            "{dead}"
        );
        assert!(
            !by_key(&queue.received()).contains_key("a"),
            "a dead row let its key through"
        );

        queue.bind(&exchange, "nowhere").await;
        // A row older than the consumers' deduplication window is refused without --force.
        let refused = db
            .outbox()
            .args(["dead", "retry", &dead_id])
            .env("OUTBOX_DEDUP_WINDOW", "1ms")
            .output()
            .unwrap();
        assert_eq!(refused.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&refused.stderr).contains("deduplication window"));
        assert_eq!(
            db.count("state = 'dead'").await,
            1,
            "a refused retry changed the row"
        );
        let retry = db.run_outbox(&["dead", "retry", &dead_id]);
        assert!(
            retry.status.success(),
            "{}",
            String::from_utf8_lossy(&retry.stderr)
        );
        let received = queue.wait_for(25, Duration::from_secs(30)).await;
        assert_eq!(by_key(&received)["a"], vec![0, 1, 2, 3, 4]);
        assert_eq!(db.count("state = 'dead'").await, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_rows_are_contained_missing_exchange_and_nested_headers(backend: Backend) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let env = [
            ("OUTBOX_BACKOFF_MIN", "20ms"),
            ("OUTBOX_BACKOFF_MAX", "50ms"),
            ("OUTBOX_MAX_ATTEMPTS", "2"),
        ];
        let _relay = Relay::start(&db.url, &db.table, &env);

        db.insert_row(&Row::new("x", json!({})).exchange("no-such-exchange"))
            .await;
        db.insert_row(&Row::new(&queue.name, json!({})).headers(json!({"deep": {"a": 1}})))
            .await;
        for seq in 0..30 {
            db.insert(
                &queue.name,
                Some("fine"),
                json!({"key": "fine", "seq": seq}),
            )
            .await;
        }
        let received = queue.wait_for(30, Duration::from_secs(30)).await;
        assert_eq!(by_key(&received)["fine"], (0..30).collect::<Vec<_>>());
        eventually(
            "both bad rows to be dead",
            Duration::from_secs(30),
            || async { db.count("state = 'dead'").await == 2 },
        )
        .await;
        let list = db.run_outbox(&["dead", "list", "--json"]);
        let text = String::from_utf8_lossy(&list.stdout);
        assert!(
            text.contains("no-such-exchange") && text.contains("deep"),
            "{text}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn returns_are_matched_to_their_own_rows_under_a_full_window(backend: Backend) {
        // lapin hands a basic.return to whichever confirm completes next, not to the message
        // that was returned; the relay must match returns by message id or it marks an
        // unroutable row sent (a lost message) and a routed one failed.
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let exchange = queue.exchange().await;
        queue.bind(&exchange, "ok").await;
        let rows: Vec<Row> = (1..=3000)
            .map(|i| {
                let routing_key = if i % 10 == 0 { "nowhere" } else { "ok" };
                Row::new(routing_key, json!({"i": i})).exchange(&exchange)
            })
            .collect();
        db.insert_rows(&rows).await;
        let unroutable = db.message_ids_where("routing_key = 'nowhere'").await;
        let _relay = Relay::start(&db.url, &db.table, &[("OUTBOX_MAX_ATTEMPTS", "1")]);

        eventually(
            "every row to be sent or dead",
            Duration::from_secs(60),
            || async { db.count("state = 'pending'").await == 0 },
        )
        .await;
        let dead = db.message_ids_where("state = 'dead'").await;
        let lost = unroutable.difference(&dead).count();
        let wrongly_failed = dead.difference(&unroutable).count();
        assert_eq!(
            (lost, wrongly_failed),
            (0, 0),
            "unroutable rows marked sent, routed rows marked dead"
        );
        let received = queue.wait_for(2700, Duration::from_secs(30)).await;
        assert!(received.iter().all(|m| !unroutable.contains(&m.message_id)));
    }
}

async fn insert_to(db: &Db, exchange: &str, routing_key: &str, key: &str, seq: i64) -> String {
    let row = Row::new(routing_key, json!({"key": key, "seq": seq}))
        .exchange(exchange)
        .key(key);
    db.insert_row(&row).await
}
