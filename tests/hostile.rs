//! Rows that try to hurt, on both backends: large rows bound the relay's memory by bytes, a
//! body past the broker's `max_message_size` goes dead without looping, and hostile shapes
//! (huge or many headers, long names, numbers past i64, control characters in names, deep
//! JSON) fail alone, each with a clear `last_error`, never breaking the connection.

mod common;

use std::time::Duration;

use common::*;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;

/// The broker's `max_message_size`, lowered for a test and put back whatever happens. It is
/// read when a channel opens: set it before the relay connects.
struct MaxMessageSize(String);

impl MaxMessageSize {
    fn set(bytes: usize) -> Self {
        let was = rabbitmqctl(&["eval", "application:get_env(rabbit, max_message_size)."]);
        let was = was
            .trim_start_matches("{ok,")
            .trim_end_matches('}')
            .to_owned();
        set_max_message_size(&bytes.to_string());
        MaxMessageSize(was)
    }
}

impl Drop for MaxMessageSize {
    fn drop(&mut self) {
        set_max_message_size(&self.0);
    }
}

fn set_max_message_size(value: &str) {
    let expr = format!("application:set_env(rabbit, max_message_size, {value}).");
    rabbitmqctl(&["eval", &expr]);
}

/// A queue of its own that nobody consumes (its messages are only counted), deleted after.
struct Sink {
    conn: Connection,
    name: String,
}

impl Sink {
    async fn new() -> Self {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ: start it with scripts/services.sh");
        let name = unique("sink");
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        Sink { conn, name }
    }

    async fn count(&self) -> u32 {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let ch = self.conn.create_channel().await.unwrap();
        ch.queue_declare(self.name.as_str().into(), passive, FieldTable::default())
            .await
            .unwrap()
            .message_count()
    }

    async fn delete(self) {
        let ch = self.conn.create_channel().await.unwrap();
        let _ = ch
            .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

/// Inserts `n` rows of a JSON body of `bytes` bytes for `queue`, one ordering key each, in
/// one statement run by the server.
async fn insert_large(db: &Db, queue: &str, n: usize, bytes: usize) {
    let sql = match db.backend {
        Backend::Postgres => format!(
            "INSERT INTO outbox (routing_key, ordering_key, payload)
             SELECT '{queue}', 'k' || i, jsonb_build_object('blob', repeat('x', {bytes}))
             FROM generate_series(1, {n}) i"
        ),
        Backend::Mysql => format!(
            "INSERT INTO outbox (routing_key, ordering_key, payload)
             WITH RECURSIVE s (i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n})
             SELECT '{queue}', CONCAT('k', i), JSON_OBJECT('blob', REPEAT('x', {bytes})) FROM s"
        ),
    };
    db.execute(&sql).await;
}

/// The relay's peak resident memory so far, in MiB.
fn peak_mib(relay: &Relay) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", relay.child.id())).unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024.0
}

/// Waits until row `message_id` is dead; its last error.
async fn dead_error(db: &Db, message_id: &str) -> String {
    let dead = format!("message_id = '{message_id}' AND state = 'dead'");
    eventually(
        &format!("row {message_id} dead"),
        Duration::from_secs(30),
        || async { db.count(&dead).await == 1 },
    )
    .await;
    let sql = format!("SELECT last_error FROM outbox WHERE {dead}");
    db.strings(&sql).await.remove(0)
}

/// How often the relay opened a broker connection.
fn connections(relay: &Relay) -> usize {
    relay.log_text().matches("connected to the broker").count()
}

on_both_backends! {
    /// 300 rows of 1 MiB with an 8 MiB bound: the relay's peak memory stays within its
    /// draining budget (64 MiB) plus the bound; it reached 381 MiB when only the count of
    /// rows was bounded. (Each row in flight is in memory twice, as held text and as lapin's
    /// frames: measured 41-45 MiB with a 1 MiB bound, 51-57 with 8, 86-106 with 32.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_is_bounded_by_bytes_as_well_as_by_count(backend: Backend) {
        let db = Db::new(backend).await;
        let sink = Sink::new().await;
        insert_large(&db, &sink.name, 300, 1 << 20).await;
        let relay = Relay::start(&db.url, &db.table, &[("OUTBOX_MAX_IN_FLIGHT_BYTES", "8MiB")]);
        eventually("300 rows of 1 MiB in the queue", Duration::from_secs(120), || async {
            sink.count().await == 300
        })
        .await;
        let peak = peak_mib(&relay);
        println!("relay peak RSS draining 300 rows of 1 MiB, bound 8 MiB: {peak:.1} MiB");
        assert!(peak < 64.0 + 8.0, "peak RSS {peak:.1} MiB");
        sink.delete().await;
    }

    /// A body past the broker's max_message_size goes dead saying so; the relay learns the
    /// limit from the one refusal, so it does not loop, and rows of other keys flow. With
    /// OUTBOX_MAX_MESSAGE_SIZE set to the broker's limit, not even that one connection is
    /// lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_row_larger_than_the_broker_takes_goes_dead_without_looping(backend: Backend) {
        let _limit = MaxMessageSize::set(4 << 20);
        for knob in [None, Some("4MiB")] {
            let db = Db::new(backend).await;
            let queue = TestQueue::new().await;
            let env: Vec<(&str, &str)> = knob.map(|k| ("OUTBOX_MAX_MESSAGE_SIZE", k)).into_iter().collect();
            let relay = Relay::start(&db.url, &db.table, &env);
            insert_large(&db, &queue.name, 1, 5 << 20).await;
            let big = db.message_ids().await.into_iter().next().unwrap();
            for i in 0..20 {
                db.insert(&queue.name, Some(&format!("small-{i}")), json!({"i": i})).await;
            }
            queue.wait_for_distinct(20, Duration::from_secs(30)).await;
            let error = dead_error(&db, &big).await;
            assert!(error.contains("max_message_size 4194304"), "{error}");
            assert_eq!(db.count(&format!("message_id = '{big}' AND attempts = 1")).await, 1);
            let opened = connections(&relay);
            let allowed = if knob.is_some() { 1 } else { 2 };
            assert!(opened <= allowed, "{opened} broker connections (knob {knob:?}): {}", relay.log_text());
            assert!(queue.received().iter().all(|m| m.message_id != big));
        }
    }

    /// Hostile shapes, each on its own key beside healthy rows: every one fails alone with a
    /// clear last_error, the healthy rows (and a deeply nested body, which is valid JSON) are
    /// delivered, and no connection is ever lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_rows_fail_alone_with_a_clear_error(backend: Backend) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let relay = Relay::start(&db.url, &db.table, &[("OUTBOX_MAX_ATTEMPTS", "1")]);
        let many: serde_json::Map<String, serde_json::Value> =
            (0..3000).map(|i| (format!("h{i}"), json!("value"))).collect();
        let long_name = "n".repeat(256);
        let fits = "n".repeat(255);
        let with_headers = |key: &str, headers: serde_json::Value| {
            Row::new(&queue.name, json!({})).key(key).headers(headers)
        };
        let hostile = [
            (with_headers("many", json!(many)), "more than one AMQP frame carries"),
            (with_headers("long", json!({ long_name: 1 })), "longer than 255 bytes"),
            (with_headers("huge-int", json!({"n": u64::MAX})), "signed 64-bit range"),
            (Row::new(&queue.name, json!({})).key("ctl-ex").exchange("ex\u{7}\u{1b}[31m"), "exchange"),
            (Row::new("route\u{1}\u{7f}x", json!({})).key("ctl-rk"), "unroutable"),
        ];
        let mut ids = Vec::new();
        for (row, _) in &hostile {
            ids.push(db.insert_row(row).await);
        }
        // As deep as each database stores (MariaDB's JSON stops at 32 levels) and the test's
        // consumer parses (serde_json stops at 128).
        let depth = match backend {
            Backend::Postgres => 100,
            Backend::Mysql => 30,
        };
        let mut deep = json!(1);
        for _ in 0..depth {
            deep = json!([deep]);
        }
        let mut healthy = vec![
            db.insert_row(&with_headers("fits", json!({ fits: 1 }))).await,
            db.insert_row(&Row::new(&queue.name, deep).key("deep")).await,
        ];
        for i in 0..10 {
            healthy.push(db.insert(&queue.name, Some(&format!("ok-{i}")), json!({"i": i})).await);
        }
        let got = queue.wait_for_distinct(healthy.len(), Duration::from_secs(30)).await;
        let mut got: Vec<String> = got.into_iter().map(|m| m.message_id).collect();
        got.sort();
        healthy.sort();
        assert_eq!(got, healthy);
        for (id, (_, says)) in ids.iter().zip(&hostile) {
            let error = dead_error(&db, id).await;
            assert!(error.contains(says), "{id}: {error:?} should say {says:?}");
        }
        assert_eq!(relay.metric("outbox_publish_failures_total{reason=\"connection\"}").await, None);
        assert_eq!(connections(&relay), 1, "{}", relay.log_text());
    }
}
