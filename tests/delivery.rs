//! Committed rows are delivered, rolled-back rows never, with the contract's AMQP mapping;
//! on both backends.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use lapin::types::AMQPValue;
use serde_json::json;

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_transactions_deliver_committed_rows_once_and_rolled_back_never(
        backend: Backend,
    ) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        // PostgreSQL: a poll that never comes within the test, so late commits are found by
        // their notification. MySQL has no notifications: the harness's 200 ms poll finds them.
        let poll: &[(&str, &str)] = match backend {
            Backend::Postgres => &[("OUTBOX_POLL_INTERVAL", "600s")],
            Backend::Mysql => &[],
        };
        let _relay = Relay::start(&db.url, &db.table, poll);

        // A row that takes a lower id but commits after a later row has been delivered: a relay
        // that only read above the last id it claimed would skip it.
        let mut late = db.begin().await;
        let late_id = late
            .insert(&Row::new(&queue.name, json!({"late": true})))
            .await;
        let early_id = db.insert(&queue.name, None, json!({"early": true})).await;
        queue.wait_for(1, Duration::from_secs(20)).await;
        late.commit().await;

        let mut writers = Vec::new();
        for w in 0..8 {
            let (db, q) = (db.handle(), queue.name.clone());
            writers.push(tokio::spawn(async move {
                let (mut committed, mut rolled_back) = (Vec::new(), Vec::new());
                for t in 0..25 {
                    let mut tx = db.begin().await;
                    let mut ids = Vec::new();
                    for r in 0..(1 + t % 3) {
                        let row = Row::new(&q, json!({"writer": w, "tx": t, "row": r}));
                        ids.push(tx.insert(&row).await);
                    }
                    if t % 5 == 4 {
                        tx.rollback().await;
                        rolled_back.extend(ids);
                    } else {
                        tx.commit().await;
                        committed.extend(ids);
                    }
                }
                (committed, rolled_back)
            }));
        }
        let (mut committed, mut rolled_back) = (vec![late_id, early_id], Vec::new());
        for w in writers {
            let (c, r) = w.await.unwrap();
            committed.extend(c);
            rolled_back.extend(r);
        }
        assert!(!rolled_back.is_empty());

        let received = queue
            .wait_for(committed.len(), Duration::from_secs(60))
            .await;
        let mut seen: HashMap<String, usize> = HashMap::new();
        for m in &received {
            *seen.entry(m.message_id.clone()).or_default() += 1;
        }
        let committed: HashSet<String> = committed.into_iter().collect();
        let delivered: HashSet<String> = seen.keys().cloned().collect();
        assert_eq!(
            delivered, committed,
            "delivered set differs from committed set"
        );
        assert!(
            rolled_back.iter().all(|id| !seen.contains_key(id)),
            "a rolled-back row was published"
        );
        assert!(
            seen.values().all(|&n| n == 1),
            "duplicates without any fault: {seen:?}"
        );
        eventually("the table to drain", Duration::from_secs(10), || async {
            db.count("true").await == 0
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_committed_late_goes_out_before_the_next_row_of_its_key(backend: Backend) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        // No claim of the whole table within the test: on MySQL only the claim's look below
        // its floor can put the late row first (on PostgreSQL its notification does too).
        let _relay = Relay::start(&db.url, &db.table, &[("OUTBOX_POLL_INTERVAL", "600s")]);

        // The late row takes its id, then a row of another key is published above it.
        let mut late = db.begin().await;
        let late_id = late
            .insert(&Row::new(&queue.name, json!({"seq": 0})).key("account-7"))
            .await;
        db.insert(&queue.name, Some("account-8"), json!({"other": true}))
            .await;
        queue.wait_for(1, Duration::from_secs(20)).await;
        // Its transaction commits below the relay's floor, and the key's next row right after.
        late.commit().await;
        let next_id = db
            .insert(&queue.name, Some("account-7"), json!({"seq": 1}))
            .await;

        let received = queue.wait_for(3, Duration::from_secs(20)).await;
        let order: Vec<&str> = received
            .iter()
            .map(|m| m.message_id.as_str())
            .filter(|id| [late_id.as_str(), next_id.as_str()].contains(id))
            .collect();
        assert_eq!(
            order,
            [late_id.as_str(), next_id.as_str()],
            "the key's rows left in another order than their ids"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn published_message_carries_the_contract_properties_and_headers(backend: Backend) {
        let db = Db::with_table(backend, "orders_outbox").await;
        let queue = TestQueue::new().await;
        let exchange = queue.exchange().await;
        queue.bind(&exchange, "order.created").await;
        let _relay = Relay::start(&db.url, &db.table, &[("OUTBOX_APP_ID", "order-service")]);

        let row = Row::new("order.created", json!({"order_id": 42, "note": "é"}))
            .exchange(&exchange)
            .key("order-42")
            .message_type("OrderCreated")
            .headers(json!({"traceparent": "00-abc-def-01", "n": 5, "f": 1.5, "b": true}));
        let id = db.insert_row(&row).await;
        let created = db.created_epoch(&id).await;

        let m = queue.wait_for(1, Duration::from_secs(20)).await.remove(0);
        let p = &m.properties;
        assert_eq!(m.message_id, id);
        assert_eq!(m.routing_key, "order.created");
        assert_eq!(m.body, json!({"order_id": 42, "note": "é"}));
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(*p.timestamp(), Some(created as u64));
        assert_eq!(p.kind().as_ref().map(|s| s.as_str()), Some("OrderCreated"));
        assert_eq!(
            p.app_id().as_ref().map(|s| s.as_str()),
            Some("order-service")
        );
        let headers = p.headers().clone().expect("headers");
        let h = headers.inner();
        assert_eq!(
            h.get("traceparent"),
            Some(&AMQPValue::LongString("00-abc-def-01".into()))
        );
        assert_eq!(h.get("n"), Some(&AMQPValue::LongLongInt(5)));
        assert_eq!(h.get("f"), Some(&AMQPValue::Double(1.5)));
        assert_eq!(h.get("b"), Some(&AMQPValue::Boolean(true)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn library_enqueue_commits_with_the_callers_transaction(backend: Backend) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let _relay = Relay::start(&db.url, &db.table, &[]);

        let msg = |n: i32| {
            outbox::Message::new(queue.name.clone(), &json!({"n": n}))
                .unwrap()
                .ordering_key("k")
                .message_type("T")
        };
        let mut tx = db.begin().await;
        tx.enqueue(&msg(0)).await.unwrap();
        tx.rollback().await;
        let mut tx = db.begin().await;
        let batch: Vec<_> = (1..=50).map(msg).collect();
        tx.enqueue_all(&batch).await.unwrap();
        tx.commit().await;

        let received = queue.wait_for(50, Duration::from_secs(20)).await;
        let order: Vec<i64> = received
            .iter()
            .map(|m| m.body["n"].as_i64().unwrap())
            .collect();
        assert_eq!(
            order,
            (1..=50).collect::<Vec<_>>(),
            "one key, published in insertion order"
        );
        assert_eq!(received[0].message_id, batch[0].message_id.to_string());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_committed_row_wakes_the_relay_without_waiting_for_the_poll(backend: Backend) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        // Polling alone would take a minute: on PostgreSQL LISTEN/NOTIFY must wake the relay, on
        // MySQL the leader's regular look at the table (every OUTBOX_LEADER_CHECK, 200 ms here).
        let relay = Relay::start(&db.url, &db.table, &[("OUTBOX_POLL_INTERVAL", "60s")]);
        eventually("the relay to lead", Duration::from_secs(20), || async {
            relay.is_leader().await
        })
        .await;
        // Its first, immediate claim is behind it once it is connected and ready.
        eventually("the relay to be ready", Duration::from_secs(20), || async {
            relay.get("/readyz").await.0 == 200
        })
        .await;
        for i in 0..3 {
            db.insert(&queue.name, None, json!({"i": i})).await;
            queue.wait_for(i + 1, Duration::from_secs(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_20k_backlog_on_two_ordering_keys_drains_in_order(backend: Backend) {
        // Each claim looks up, for every row it reads, the row before it on its key: that must
        // not cost the number of rows waiting on the key. (Two keys allow two publishes in
        // flight: the broker's confirms bound the rate, about 2k rows/s here.)
        const BACKLOG: i64 = 20_000;
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let rows: Vec<Row> = (0..BACKLOG)
            .map(|seq| {
                let key = format!("k{}", seq % 2);
                Row::new(&queue.name, json!({"key": key, "seq": seq})).key(&key)
            })
            .collect();
        let all: HashSet<String> = db.insert_rows(&rows).await.into_iter().collect();
        let started = std::time::Instant::now();
        let _relay = Relay::start(&db.url, &db.table, &[]);
        queue.wait_for(1000, Duration::from_secs(10)).await;
        let first = started.elapsed();
        // About 9 s on a quiet machine; under the whole suite's load on two cores, up to 45.
        let received = queue
            .wait_for_distinct(all.len(), Duration::from_secs(90))
            .await;
        println!(
            "first 1000 rows after {first:?}, all {BACKLOG} after {:?}",
            started.elapsed()
        );
        let mut seen = HashSet::new();
        let mut last: HashMap<String, i64> = HashMap::new();
        for m in received
            .iter()
            .filter(|m| seen.insert(m.message_id.clone()))
        {
            let seq = m.body["seq"].as_i64().unwrap();
            let prev = last.insert(m.body["key"].as_str().unwrap().to_owned(), seq);
            assert!(prev.is_none_or(|p| p < seq), "key order broken at {seq}");
        }
        assert_eq!(seen, all);
    }
}
