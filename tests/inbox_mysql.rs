//! The consumer inbox on MariaDB (or MySQL): one effect per message id, with the handler
//! writing through the MySQL transaction; duplicates in a batch and across batches, a failing
//! handler rolled back, the transaction's settings, and a transaction frozen with its client.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::mysql::{MySqlDb, pool};
use common::*;
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use outbox::inbox::{ConsumerConfig, Handler, HandlerError, Incoming, consume};
use serde::Deserialize;
use sqlx::mysql::{MySqlConnection, MySqlPool};
use sqlx::{MySql, Row};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Deserialize)]
struct Body {
    n: i64,
}

/// A test's say over a handler call: the message and the how-manyth call for its id.
type Hook = dyn Fn(&Incoming<Body>, usize) -> Result<(), HandlerError> + Send + Sync;

/// What a handler saw of its session: wait_timeout, innodb_lock_wait_timeout, autocommit
/// and the transaction's isolation level.
type Seen = (u64, u64, i64, String);

/// Writes one `effects` row per call through the MySQL transaction; fails as the test says;
/// counts calls per message id.
#[derive(Default, Clone)]
struct Effects {
    calls: Arc<Mutex<HashMap<String, usize>>>,
    /// Called inside the transaction after the effects are written, with the call number.
    hook: Option<Arc<Hook>>,
    /// Also records the session's settings here.
    seen: Option<Arc<Mutex<Vec<Seen>>>>,
    /// For the messages it picks, first rolls the transaction back, as the server does on a
    /// deadlock, and carries on as a handler that swallowed the error would.
    rolled_back: Option<fn(i64) -> bool>,
}

impl Handler<Body, MySql> for Effects {
    async fn handle(
        &self,
        tx: &mut MySqlConnection,
        msg: &Incoming<Body>,
    ) -> Result<(), HandlerError> {
        let call = {
            let mut calls = self.calls.lock().unwrap();
            let c = calls.entry(msg.message_id.clone()).or_default();
            *c += 1;
            *c
        };
        if self.rolled_back.is_some_and(|picks| picks(msg.body.n)) {
            sqlx::raw_sql("ROLLBACK").execute(&mut *tx).await?;
        }
        sqlx::query("INSERT INTO effects (message_id, n) VALUES (?, ?)")
            .bind(&msg.message_id)
            .bind(msg.body.n)
            .execute(&mut *tx)
            .await?;
        if let Some(seen) = &self.seen {
            let row = sqlx::query(
                "SELECT @@SESSION.wait_timeout, @@SESSION.innodb_lock_wait_timeout,
                        @@SESSION.autocommit, trx_isolation_level
                 FROM information_schema.innodb_trx WHERE trx_mysql_thread_id = CONNECTION_ID()",
            )
            .fetch_one(&mut *tx)
            .await?;
            seen.lock()
                .unwrap()
                .push((row.get(0), row.get(1), row.get(2), row.get(3)));
        }
        match &self.hook {
            Some(hook) => hook(msg, call),
            None => Ok(()),
        }
    }
}

struct Setup {
    db: MySqlDb,
    queue: String,
    config: ConsumerConfig,
    publisher: lapin::Channel,
    conn: Connection,
}

async fn setup() -> Setup {
    let db = MySqlDb::new().await;
    sqlx::query("CREATE TABLE effects (message_id VARCHAR(255) NOT NULL, n BIGINT NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let queue = unique("inbox_mysql");
    let mut config = ConsumerConfig::new(vec![amqp_url()], "test-consumer", queue.clone());
    config.queue_ttl = Some(Duration::from_secs(600));
    config.retry_min = Duration::from_millis(10);
    config.retry_max = Duration::from_millis(50);
    config.max_attempts = 3;
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ: start it with scripts/services.sh");
    let publisher = conn.create_channel().await.unwrap();
    Setup {
        db,
        queue,
        config,
        publisher,
        conn,
    }
}

impl Setup {
    /// A consumer on the test database; it stops when the token is cancelled.
    fn start(&self, handler: Effects) -> CancellationToken {
        self.start_on(self.db.pool.clone(), handler)
    }

    fn start_on(&self, pool: MySqlPool, handler: Effects) -> CancellationToken {
        let stop = CancellationToken::new();
        tokio::spawn(consume(pool, self.config.clone(), handler, stop.clone()));
        stop
    }

    /// The queue's consumers, once it has been declared.
    async fn consumers(&self) -> Option<u32> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let ch = self.conn.create_channel().await.unwrap();
        let queue = ch.queue_declare(self.queue.as_str().into(), passive, Default::default());
        queue.await.ok().map(|q| q.consumer_count())
    }

    async fn wait_for_consumers(&self, n: u32) {
        eventually(
            &format!("{n} consumers on the queue"),
            Duration::from_secs(20),
            || async { self.consumers().await == Some(n) },
        )
        .await;
    }

    async fn publish(&self, message_id: &str, n: i64) {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(message_id.into());
        self.publisher
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                format!("{{\"n\": {n}}}").as_bytes(),
                props,
            )
            .await
            .unwrap();
    }

    /// Publishes `m-<n>` for each `n` of `range`, `copies` times in a row.
    async fn publish_numbered(&self, range: std::ops::Range<i64>, copies: usize) {
        for n in range {
            for _ in 0..copies {
                self.publish(&format!("m-{n}"), n).await;
            }
        }
    }

    async fn effects(&self, message_id: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM effects WHERE message_id = ?")
            .bind(message_id)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    async fn total(&self, table: &str) -> i64 {
        let count = format!("SELECT count(*) FROM {table}");
        sqlx::query_scalar(sqlx::AssertSqlSafe(count))
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    async fn wait_for_effects(&self, n: i64) {
        eventually(&format!("{n} effects"), Duration::from_secs(30), || async {
            self.total("effects").await == n
        })
        .await;
    }

    /// Publishes `last` and waits for its effect: with one batch at a time, every copy
    /// published before it has been handled.
    async fn drain(&self) {
        self.publish("last", 99).await;
        eventually("the last message", Duration::from_secs(20), || async {
            self.effects("last").await == 1
        })
        .await;
    }

    /// Every `m-<n>` of `range` and `last` have exactly one effect and one inbox row.
    async fn assert_once_each(&self, range: std::ops::Range<i64>) {
        for n in range.clone() {
            assert_eq!(self.effects(&format!("m-{n}")).await, 1, "m-{n}");
        }
        let all = range.end - range.start + 1;
        assert_eq!(self.total("effects").await, all);
        assert_eq!(self.total("outbox_inbox").await, all);
    }

    /// Takes messages from the dead-letter queue until there are `n`.
    async fn wait_for_dead_letters(&self, n: usize) -> Vec<lapin::message::BasicGetMessage> {
        let dead = self.config.dead_letter_queue();
        let taken = Mutex::new(Vec::new());
        eventually(
            &format!("{n} dead letters"),
            Duration::from_secs(20),
            || async {
                let get = BasicGetOptions { no_ack: true };
                while let Some(m) = self
                    .publisher
                    .basic_get(dead.as_str().into(), get)
                    .await
                    .unwrap()
                {
                    taken.lock().unwrap().push(m);
                }
                taken.lock().unwrap().len() >= n
            },
        )
        .await;
        taken.into_inner().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_a_message_published_twice_has_one_effect() {
    let mut s = setup().await;
    s.config.concurrency = 1;
    let handler = Effects::default();
    let _stop = s.start(handler.clone());
    s.wait_for_consumers(1).await;
    s.publish_numbered(0..10, 2).await;
    s.drain().await;
    s.assert_once_each(0..10).await;
    assert!(handler.calls.lock().unwrap().values().all(|&c| c == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_batches_holding_duplicates_and_recorded_ids_apply_each_message_once() {
    let mut s = setup().await;
    s.config.concurrency = 1;
    // m-0..m-4 are applied first, by a consumer that then leaves.
    let first = s.start(Effects::default());
    s.wait_for_consumers(1).await;
    s.publish_numbered(0..5, 1).await;
    s.wait_for_effects(5).await;
    first.cancel();
    s.wait_for_consumers(0).await;
    // A backlog, arriving as batches: two copies of each id, the first five recorded before.
    s.publish_numbered(0..30, 2).await;
    let handler = Effects::default();
    let _stop = s.start(handler.clone());
    s.drain().await;
    let calls = handler.calls.lock().unwrap().clone();
    assert!(
        (0..5).all(|n| !calls.contains_key(&format!("m-{n}"))),
        "a recorded message was run again: {calls:?}"
    );
    assert!(
        calls.values().all(|&c| c == 1),
        "a batch was rolled back and its messages run again: {calls:?}"
    );
    s.assert_once_each(0..30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_a_failing_handler_leaves_no_effect_and_is_retried_or_dead_lettered() {
    let s = setup().await;
    let handler = Effects {
        // Every first attempt fails after writing its effects; m-13 always fails.
        hook: Some(Arc::new(|msg, call| match (msg.body.n, call) {
            (13, _) => Err("poison: n = 13 is refused".into()),
            (_, 1) => Err("first attempt fails after writing".into()),
            _ => Ok(()),
        })),
        ..Default::default()
    };
    // A backlog waiting for the consumer arrives as batches: they fail and are rolled back.
    let declare = s.start(Effects::default());
    s.wait_for_consumers(1).await;
    declare.cancel();
    s.wait_for_consumers(0).await;
    s.publish_numbered(0..20, 1).await;
    let _stop = s.start(handler.clone());
    let dead = s.wait_for_dead_letters(1).await;
    s.wait_for_effects(19).await;
    assert_eq!(
        dead[0]
            .delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .as_str(),
        "m-13"
    );
    let attempts = dead[0]
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-outbox-attempts").cloned());
    assert_eq!(attempts, Some(AMQPValue::LongLongInt(3)));
    assert_eq!(
        s.effects("m-13").await,
        0,
        "a failed attempt left its effects"
    );
    for n in (0..20).filter(|&n| n != 13) {
        assert_eq!(s.effects(&format!("m-{n}")).await, 1, "m-{n}");
    }
    let calls = handler.calls.lock().unwrap().clone();
    assert_eq!(calls["m-13"], 3);
    assert!(calls.values().all(|&c| c >= 2), "{calls:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_a_transaction_rolled_back_under_the_handler_is_never_acked_and_leaves_no_effect() {
    let s = setup().await;
    let handler = Effects {
        rolled_back: Some(|n| n % 10 == 3),
        ..Default::default()
    };
    let _stop = s.start(handler.clone());
    s.wait_for_consumers(1).await;
    s.publish_numbered(0..20, 1).await;
    let dead = s.wait_for_dead_letters(2).await;
    s.wait_for_effects(18).await;
    let mut ids: Vec<String> = dead
        .iter()
        .map(|d| {
            d.delivery
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .to_string()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["m-13", "m-3"]);
    let error = dead[0]
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-outbox-error").cloned());
    let Some(AMQPValue::LongString(error)) = error else {
        panic!("no x-outbox-error header")
    };
    assert!(error.to_string().contains("aborted"), "{error}");
    // The writes after the rollback were not committed on their own, attempt after attempt.
    assert_eq!(s.effects("m-3").await + s.effects("m-13").await, 0);
    assert_eq!(s.total("outbox_inbox").await, 18);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_the_inbox_transaction_is_read_committed_and_bounded_then_the_session_restored() {
    let mut s = setup().await;
    s.config.transaction_timeout = Duration::from_millis(1500);
    // One connection: the session the handler saw is the one checked afterwards.
    let one = pool(&s.db.url, 1).await;
    let (wait_timeout, lock_wait_timeout): (u64, u64) =
        sqlx::query_as("SELECT @@SESSION.wait_timeout, @@SESSION.innodb_lock_wait_timeout")
            .fetch_one(&one)
            .await
            .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler = Effects {
        seen: Some(seen.clone()),
        ..Default::default()
    };
    let _stop = s.start_on(one.clone(), handler);
    s.wait_for_consumers(1).await;
    s.publish("m-1", 1).await;
    s.wait_for_effects(1).await;
    let seen = seen.lock().unwrap().clone();
    // Whole seconds, rounded up; autocommit off; READ COMMITTED.
    assert_eq!(seen, vec![(2, 2, 0, "READ COMMITTED".to_string())]);
    let after: (u64, u64, i64) = sqlx::query_as(
        "SELECT @@SESSION.wait_timeout, @@SESSION.innodb_lock_wait_timeout, @@SESSION.autocommit",
    )
    .fetch_one(&one)
    .await
    .unwrap();
    assert_eq!(after, (wait_timeout, lock_wait_timeout, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_a_transaction_frozen_with_its_client_is_ended_by_the_server_and_retried() {
    let mut s = setup().await;
    s.config.transaction_timeout = Duration::from_secs(1);
    let mut through = url::Url::parse(&s.db.url).unwrap();
    let server = (through.host_str().unwrap(), through.port().unwrap_or(3306));
    let server = tokio::net::lookup_host(server)
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = Arc::new(Proxy::start(server).await);
    through.set_port(Some(proxy.addr.port())).unwrap();
    through.set_host(Some("127.0.0.1")).unwrap();
    // One connection: the retry gets a slot only if the frozen one gave its back. Its
    // INSERT IGNORE of the same id then waits on the frozen transaction's row lock, which
    // only the server's wait_timeout releases (the default is 8 hours).
    let pool = pool(through.as_str(), 1).await;
    let freeze = proxy.clone();
    let handler = Effects {
        hook: Some(Arc::new(move |msg, call| {
            if msg.message_id == "victim" && call == 1 {
                freeze.freeze_open(); // the check and the COMMIT never reach the database
            }
            Ok(())
        })),
        ..Default::default()
    };
    let _stop = s.start_on(pool, handler.clone());
    s.wait_for_consumers(1).await;
    s.publish("victim", 1).await;
    s.publish("after", 2).await;
    eventually(
        "both messages to be applied on a new connection",
        Duration::from_secs(20),
        || async { s.effects("victim").await == 1 && s.effects("after").await == 1 },
    )
    .await;
    assert_eq!(handler.calls.lock().unwrap()["victim"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_inbox_rows_are_purged_after_the_deduplication_window() {
    let mut s = setup().await;
    s.config.dedup_window = Duration::from_secs(1);
    let handler = Effects::default();
    let _stop = s.start(handler.clone());
    s.wait_for_consumers(1).await;
    s.publish("m-1", 1).await;
    s.wait_for_effects(1).await;
    eventually(
        "its inbox row to be purged",
        Duration::from_secs(20),
        || async { s.total("outbox_inbox").await == 0 },
    )
    .await;
    // Past the window the same id is a new message: documented, and shown here.
    s.publish("m-1", 1).await;
    s.wait_for_effects(2).await;
    assert_eq!(handler.calls.lock().unwrap()["m-1"], 2);
}
