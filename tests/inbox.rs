//! The consumer inbox: one effect per message id, retries, dead letters, atomic
//! consume-then-publish, the deduplication window, and the faults around them: a handler
//! that swallows a database error, a closed dead-letter channel, a database that is down
//! or frozen.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use outbox::inbox::{ConsumerConfig, Handler, HandlerError, Incoming, consume};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnection, PgPoolOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Deserialize)]
struct Body {
    n: i64,
}

/// A test's say over a handler call: the message and the how-manyth call for its id.
type Hook = dyn Fn(&Incoming<Body>, usize) -> Result<(), HandlerError> + Send + Sync;

/// Writes one `effects` row per call; fails as the test says; counts calls per message id.
#[derive(Default, Clone)]
struct Effects {
    calls: Arc<Mutex<HashMap<String, usize>>>,
    /// Called inside the transaction before the effects are returned, with the call number.
    hook: Option<Arc<Hook>>,
    /// Also enqueue an outbox row in the same transaction.
    enqueue: bool,
}

impl Handler<Body> for Effects {
    async fn handle(
        &self,
        tx: &mut PgConnection,
        msg: &Incoming<Body>,
    ) -> Result<(), HandlerError> {
        let call = {
            let mut calls = self.calls.lock().unwrap();
            let c = calls.entry(msg.message_id.clone()).or_default();
            *c += 1;
            *c
        };
        sqlx::query("INSERT INTO effects (message_id, n) VALUES ($1, $2)")
            .bind(&msg.message_id)
            .bind(msg.body.n)
            .execute(&mut *tx)
            .await?;
        if self.enqueue {
            let reply = outbox::Message::new("replies", &json!({"for": msg.message_id}))?;
            outbox::enqueue(&mut *tx, &reply).await?;
        }
        match &self.hook {
            Some(hook) => hook(msg, call),
            None => Ok(()),
        }
    }
}

struct Setup {
    db: TestDb,
    queue: String,
    config: ConsumerConfig,
    publisher: lapin::Channel,
    _conn: Connection,
}

async fn setup() -> Setup {
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE effects (message_id TEXT NOT NULL, n BIGINT NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let queue = unique("inbox");
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
        _conn: conn,
    }
}

impl Setup {
    fn start(&self, handler: impl Handler<Body>) -> CancellationToken {
        self.start_on(self.db.pool.clone(), handler).0
    }

    /// A consumer on `pool`, and its task (which ends when `consume` returns).
    fn start_on(
        &self,
        pool: PgPool,
        handler: impl Handler<Body>,
    ) -> (CancellationToken, JoinHandle<()>) {
        let stop = CancellationToken::new();
        let task = tokio::spawn(consume(pool, self.config.clone(), handler, stop.clone()));
        (stop, task)
    }

    /// A passive declare of the queue, on a fresh channel (a failed one closes its channel).
    async fn look(&self) -> Result<lapin::Queue, lapin::Error> {
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let ch = self._conn.create_channel().await.unwrap();
        ch.queue_declare(self.queue.as_str().into(), passive, Default::default())
            .await
    }

    /// Has a consumer declare the queue and leave it, so what is published next waits.
    async fn declare_queue(&self) {
        let declare = self.start(Effects::default());
        self.wait_for_queue().await;
        declare.cancel();
        eventually(
            "the declaring consumer to leave",
            Duration::from_secs(20),
            || async { self.consumers().await == 0 },
        )
        .await;
    }

    async fn wait_for_queue(&self) {
        eventually(
            "the consumer to declare its queue",
            Duration::from_secs(20),
            || async { self.look().await.is_ok() },
        )
        .await;
    }

    /// Consumers on the queue now.
    async fn consumers(&self) -> u32 {
        self.look().await.unwrap().consumer_count()
    }

    /// Messages ready in the queue now (delivered, unacked ones are not counted).
    async fn ready(&self) -> u32 {
        self.look().await.unwrap().message_count()
    }

    async fn publish(&self, message_id: Option<&str>, body: &[u8]) {
        let mut props = BasicProperties::default().with_content_type("application/json".into());
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        self.publisher
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap();
    }

    /// Publishes `m-0`, `m-1`, ... with bodies `{"n": 0}`, `{"n": 1}`, ...
    async fn publish_numbered(&self, count: usize) {
        for n in 0..count {
            self.publish(
                Some(&format!("m-{n}")),
                format!("{{\"n\": {n}}}").as_bytes(),
            )
            .await;
        }
    }

    async fn effects(&self, message_id: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM effects WHERE message_id = $1")
            .bind(message_id)
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    async fn total_effects(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM effects")
            .fetch_one(&self.db.pool)
            .await
            .unwrap()
    }

    /// Takes messages from the dead-letter queue until there are `n`.
    async fn wait_for_dead_letters(&self, n: usize) -> Vec<lapin::message::BasicGetMessage> {
        let dead = self.config.dead_letter_queue();
        let taken = Mutex::new(Vec::new());
        eventually(
            &format!("{n} dead letters"),
            Duration::from_secs(20),
            || async {
                while let Some(m) = self
                    .publisher
                    .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: true })
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

/// The message ids of `dead`.
fn ids(dead: &[lapin::message::BasicGetMessage]) -> HashSet<String> {
    dead.iter()
        .filter_map(|d| d.delivery.properties.message_id().as_ref())
        .map(|id| id.to_string())
        .collect()
}

fn header(m: &lapin::message::BasicGetMessage, name: &str) -> Option<AMQPValue> {
    m.delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name).cloned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_twice_has_one_effect() {
    let s = setup().await;
    let handler = Effects::default();
    let _stop = s.start(handler.clone());
    s.wait_for_queue().await;
    for i in 0..5 {
        s.publish(
            Some(&format!("m-{i}")),
            format!("{{\"n\": {i}}}").as_bytes(),
        )
        .await;
        s.publish(
            Some(&format!("m-{i}")),
            format!("{{\"n\": {i}}}").as_bytes(),
        )
        .await;
    }
    s.publish(Some("last"), b"{\"n\": 99}").await;
    eventually(
        "the last message to be applied",
        Duration::from_secs(20),
        || async { s.effects("last").await == 1 },
    )
    .await;
    eventually(
        "all messages to be applied",
        Duration::from_secs(20),
        || async { s.total_effects().await >= 6 },
    )
    .await;
    for i in 0..5 {
        assert_eq!(s.effects(&format!("m-{i}")).await, 1, "m-{i} applied twice");
    }
    assert_eq!(s.total_effects().await, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_holding_both_copies_of_a_message_applies_it_once_without_a_rollback() {
    let s = setup().await;
    s.declare_queue().await;
    for n in 0..20 {
        let (id, body) = (format!("m-{n}"), format!("{{\"n\": {n}}}"));
        s.publish(Some(&id), body.as_bytes()).await;
        s.publish(Some(&id), body.as_bytes()).await;
    }
    let handler = Effects::default();
    let _stop = s.start(handler.clone());
    eventually(
        "every message to be applied",
        Duration::from_secs(20),
        || async { s.total_effects().await == 20 },
    )
    .await;
    let calls = handler.calls.lock().unwrap().clone();
    assert!(
        calls.values().all(|&c| c == 1),
        "a batch was rolled back and its messages run again: {calls:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_after_the_consumer_lost_its_connection_before_the_ack_has_one_effect() {
    let mut s = setup().await;
    let proxy = Arc::new(Proxy::start("127.0.0.1:5672".parse().unwrap()).await);
    s.config.amqp_urls = vec![format!("amqp://guest:guest@{}/%2f", proxy.addr)];
    let cut = proxy.clone();
    let handler = Effects {
        hook: Some(Arc::new(move |msg, call| {
            if msg.message_id == "victim" && call == 1 {
                cut.sever(); // the effects commit after this, the ack cannot reach the broker
            }
            Ok(())
        })),
        ..Default::default()
    };
    let _stop = s.start(handler.clone());
    s.wait_for_queue().await;
    s.publish(Some("victim"), b"{\"n\": 1}").await;
    eventually("the victim's effects", Duration::from_secs(20), || async {
        s.effects("victim").await == 1
    })
    .await;
    // The broker redelivers the unacked message to the reconnected consumer, which acks it
    // without applying it again; a message after it proves the consumer is back.
    s.publish(Some("after"), b"{\"n\": 2}").await;
    eventually(
        "the consumer to reconnect and go on",
        Duration::from_secs(30),
        || async { s.effects("after").await == 1 },
    )
    .await;
    eventually(
        "the victim's redelivery to be acked",
        Duration::from_secs(30),
        || async {
            let ch = s.publisher.clone();
            let q = ch
                .queue_declare(
                    s.queue.as_str().into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    Default::default(),
                )
                .await
                .unwrap();
            q.message_count() == 0
        },
    )
    .await;
    assert_eq!(s.effects("victim").await, 1);
    assert_eq!(
        handler.calls.lock().unwrap()["victim"],
        1,
        "the handler ran again for a recorded message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_handler_is_retried_then_dead_lettered_while_later_messages_are_handled() {
    let s = setup().await;
    let handler = Effects {
        hook: Some(Arc::new(|msg, call| match msg.body.n {
            13 => Err("poison: n = 13 is refused".into()),
            // A transient database error is retried without counting an attempt.
            7 if call <= 5 => Err(Box::new(sqlx::Error::PoolTimedOut)),
            _ => Ok(()),
        })),
        ..Default::default()
    };
    let _stop = s.start(handler.clone());
    s.wait_for_queue().await;
    s.publish_numbered(30).await;
    eventually(
        "every other message to be applied",
        Duration::from_secs(30),
        || async { s.total_effects().await == 29 },
    )
    .await;
    assert_eq!(s.effects("m-13").await, 0);
    assert_eq!(
        s.effects("m-7").await,
        1,
        "a transient failure went to the dead-letter queue"
    );
    let dead = s.wait_for_dead_letters(1).await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(
        d.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("m-13")
    );
    assert_eq!(
        header(d, "x-outbox-attempts"),
        Some(AMQPValue::LongLongInt(3))
    );
    let Some(AMQPValue::LongString(error)) = header(d, "x-outbox-error") else {
        panic!("no x-outbox-error header")
    };
    assert!(error.to_string().contains("poison"), "{error}");
    assert_eq!(handler.calls.lock().unwrap()["m-13"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_a_failing_message_is_rolled_back_and_each_applied_alone() {
    let s = setup().await;
    let handler = Effects {
        // Several poison messages: whatever the batches, some fail behind others.
        hook: Some(Arc::new(|msg, _| match msg.body.n % 10 {
            3 => Err("poison: n = ..3 is refused".into()),
            _ => Ok(()),
        })),
        ..Default::default()
    };
    // A backlog waiting for the consumer arrives as batches.
    s.declare_queue().await;
    s.publish_numbered(30).await;
    let _stop = s.start(handler.clone());
    eventually(
        "every other message to be applied",
        Duration::from_secs(30),
        || async { s.total_effects().await == 27 },
    )
    .await;
    for n in 0..30 {
        let expected = i64::from(n % 10 != 3);
        assert_eq!(s.effects(&format!("m-{n}")).await, expected, "m-{n}");
    }
    let dead = s.wait_for_dead_letters(3).await;
    for d in &dead {
        assert_eq!(
            header(d, "x-outbox-attempts"),
            Some(AMQPValue::LongLongInt(3))
        );
    }
    let calls = handler.calls.lock().unwrap().clone();
    // A batch's attempt counts: three calls in all, not four.
    for poison in ["m-3", "m-13", "m-23"] {
        assert_eq!(calls[poison], 3, "{poison}");
    }
    assert!(
        calls.values().any(|&c| c == 2),
        "no message was run in a rolled-back batch and then alone: {calls:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_delivery_is_dead_lettered_at_once() {
    let s = setup().await;
    let handler = Effects::default();
    let _stop = s.start(handler.clone());
    s.wait_for_queue().await;
    s.publish(None, b"{\"n\": 1}").await;
    s.publish(Some("not-json"), b"this is not json").await;
    s.publish(Some("wrong-shape"), b"{\"m\": \"x\"}").await;
    s.publish(Some("good"), b"{\"n\": 4}").await;
    eventually(
        "the good message to be applied",
        Duration::from_secs(20),
        || async { s.effects("good").await == 1 },
    )
    .await;
    let dead = s.wait_for_dead_letters(3).await;
    let reasons: Vec<String> = dead
        .iter()
        .map(|d| match header(d, "x-outbox-error") {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("no reason: {other:?}"),
        })
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("no message_id")),
        "{reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.contains("not the expected JSON"))
            .count(),
        2,
        "{reasons:?}"
    );
    assert!(
        dead.iter()
            .all(|d| header(d, "x-outbox-attempts") == Some(AMQPValue::LongLongInt(0)))
    );
    assert_eq!(
        handler.calls.lock().unwrap().len(),
        1,
        "the handler saw a malformed delivery"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_rows_written_by_a_handler_exist_only_if_its_transaction_commits() {
    let s = setup().await;
    let handler = Effects {
        enqueue: true,
        hook: Some(Arc::new(|_, call| {
            if call == 1 {
                Err("first attempt fails after enqueueing".into())
            } else {
                Ok(())
            }
        })),
        ..Default::default()
    };
    let _stop = s.start(handler.clone());
    s.wait_for_queue().await;
    s.publish_numbered(10).await;
    eventually(
        "all messages to be applied",
        Duration::from_secs(20),
        || async { s.total_effects().await == 10 },
    )
    .await;
    let replies: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(replies, 10, "a rolled-back attempt left its outbox row");
    assert!(handler.calls.lock().unwrap().values().all(|&c| c == 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_rows_are_purged_after_the_deduplication_window() {
    let mut s = setup().await;
    s.config.dedup_window = Duration::from_secs(1);
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let handler = Effects {
        hook: Some(Arc::new(move |_, _| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })),
        ..Default::default()
    };
    let _stop = s.start(handler);
    s.wait_for_queue().await;
    s.publish(Some("old"), b"{\"n\": 1}").await;
    eventually(
        "the message to be applied",
        Duration::from_secs(20),
        || async { s.effects("old").await == 1 },
    )
    .await;
    eventually(
        "its inbox row to be purged",
        Duration::from_secs(20),
        || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox_inbox")
                .fetch_one(&s.db.pool)
                .await
                .unwrap()
                == 0
        },
    )
    .await;
    // Past the window the same id is a new message: documented, and shown here.
    s.publish(Some("old"), b"{\"n\": 1}").await;
    eventually(
        "the replay to be applied again",
        Duration::from_secs(20),
        || async { s.effects("old").await == 2 },
    )
    .await;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A handler that "logs and carries on": it ignores the errors of its statements. For the
/// messages `poison` picks it first runs a statement that fails, which aborts the
/// transaction; the effect row it writes after that is silently lost.
#[derive(Clone)]
struct Swallows {
    /// Which messages run the failing statement.
    poison: fn(i64) -> bool,
}

impl Handler<Body> for Swallows {
    async fn handle(
        &self,
        tx: &mut PgConnection,
        msg: &Incoming<Body>,
    ) -> Result<(), HandlerError> {
        if (self.poison)(msg.body.n) {
            let _ = sqlx::query("INSERT INTO no_such_table VALUES (1)")
                .execute(&mut *tx)
                .await;
        }
        let _ = sqlx::query("INSERT INTO effects (message_id, n) VALUES ($1, $2)")
            .bind(&msg.message_id)
            .bind(msg.body.n)
            .execute(&mut *tx)
            .await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_swallows_a_database_error_is_never_acked_without_its_effects() {
    let s = setup().await;
    let handler = Swallows {
        poison: |n| n % 10 == 3,
    };
    // A backlog arrives as batches: a swallowed error aborts the batch's transaction.
    s.declare_queue().await;
    s.publish_numbered(30).await;
    let _stop = s.start(handler);
    let mut dead = s.wait_for_dead_letters(3).await;
    // A lone message goes through the single-message path from its first attempt.
    s.publish(Some("m-43"), b"{\"n\": 43}").await;
    dead.extend(s.wait_for_dead_letters(1).await);
    let poisoned = ["m-3", "m-13", "m-23", "m-43"].map(String::from);
    assert_eq!(ids(&dead), HashSet::from(poisoned.clone()));
    for d in &dead {
        let Some(AMQPValue::LongString(error)) = header(d, "x-outbox-error") else {
            panic!("no x-outbox-error header")
        };
        assert!(
            error.to_string().contains("swallowed a database error"),
            "{error}"
        );
        assert_eq!(
            header(d, "x-outbox-attempts"),
            Some(AMQPValue::LongLongInt(3))
        );
    }
    eventually(
        "every other message to be applied",
        Duration::from_secs(20),
        || async { s.total_effects().await == 27 },
    )
    .await;
    for n in 0..30 {
        let expected = i64::from(n % 10 != 3);
        assert_eq!(s.effects(&format!("m-{n}")).await, expected, "m-{n}");
    }
    assert_eq!(s.effects("m-43").await, 0);
    let recorded: HashSet<String> = sqlx::query_scalar("SELECT message_id FROM outbox_inbox")
        .fetch_all(&s.db.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let applied: HashSet<String> = (0..30)
        .filter(|n| n % 10 != 3)
        .map(|n| format!("m-{n}"))
        .collect();
    assert_eq!(
        recorded, applied,
        "the inbox rows are not the applied messages"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_still_arrive_after_the_dead_letter_channel_was_closed() {
    let s = setup().await;
    let handler = Effects {
        hook: Some(Arc::new(|msg, _| {
            match msg.message_id.starts_with("poison") {
                true => Err("poison".into()),
                false => Ok(()),
            }
        })),
        ..Default::default()
    };
    let _stop = s.start(handler.clone());
    s.wait_for_queue().await;
    // Consuming: its session is open and declares nothing more (a session that failed to
    // open would declare the exchange again when retried).
    eventually(
        "the consumer to consume",
        Duration::from_secs(20),
        || async { s.consumers().await == 1 },
    )
    .await;
    // Publishing to a missing exchange: the broker closes the dead-letter channel (404).
    let dead = s.config.dead_letter_queue();
    s.publisher
        .exchange_delete(dead.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    s.publish(Some("poison-1"), b"{\"n\": 1}").await;
    let calls = || handler.calls.lock().unwrap().get("poison-1").copied();
    eventually(
        "a failed dead letter and the message's redelivery",
        Duration::from_secs(30),
        || async { calls() > Some(s.config.max_attempts as usize) },
    )
    .await;
    declare_dead_letter_exchange(&s).await;
    s.publish(Some("poison-2"), b"{\"n\": 2}").await;
    let letters = s.wait_for_dead_letters(2).await;
    assert_eq!(
        ids(&letters),
        HashSet::from(["poison-1".to_string(), "poison-2".to_string()])
    );
}

/// The dead-letter exchange and its binding to the dead-letter queue, as the consumer
/// declares them.
async fn declare_dead_letter_exchange(s: &Setup) {
    let dead = s.config.dead_letter_queue();
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    s.publisher
        .exchange_declare(
            dead.as_str().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await
        .unwrap();
    s.publisher
        .queue_bind(
            dead.as_str().into(),
            dead.as_str().into(),
            s.queue.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_database_is_down_stops_at_shutdown_and_leaves_the_message_queued() {
    let s = setup().await;
    // Nothing listens there: every connection attempt is refused, the pool keeps trying.
    let down = format!("postgres://postgres@127.0.0.1:{}/down", free_port());
    let pool = PgPoolOptions::new().connect_lazy(&down).unwrap();
    s.declare_queue().await;
    s.publish(Some("stuck"), b"{\"n\": 1}").await;
    eventually(
        "the message to wait in the queue",
        Duration::from_secs(20),
        || async { s.ready().await == 1 },
    )
    .await;
    let (stop, task) = s.start_on(pool, Effects::default());
    eventually(
        "the message to be delivered to the consumer",
        Duration::from_secs(20),
        || async { s.ready().await == 0 },
    )
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("consume did not return at shutdown")
        .unwrap();
    eventually(
        "the unacked message to be back in the queue",
        Duration::from_secs(20),
        || async { s.ready().await == 1 },
    )
    .await;
    let _stop = s.start(Effects::default());
    eventually(
        "the message to be redelivered and applied",
        Duration::from_secs(20),
        || async { s.effects("stuck").await == 1 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_on_a_frozen_connection_is_abandoned_and_retried_on_a_new_one() {
    let mut s = setup().await;
    s.config.transaction_timeout = Duration::from_secs(1);
    let proxy = Arc::new(Proxy::start(database_addr(&s.db.url).await).await);
    let mut through = url::Url::parse(&s.db.url).unwrap();
    through.set_port(Some(proxy.addr.port())).unwrap();
    through.set_host(Some("127.0.0.1")).unwrap();
    // One connection: the retry gets a slot only if the frozen connection gave its back.
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(through.as_str())
        .await
        .unwrap();
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
    let _stop = s.start_on(pool, handler.clone()).0;
    s.wait_for_queue().await;
    s.publish(Some("victim"), b"{\"n\": 1}").await;
    s.publish(Some("after"), b"{\"n\": 2}").await;
    eventually(
        "both messages to be applied on a new connection",
        Duration::from_secs(20),
        || async { s.effects("victim").await == 1 && s.effects("after").await == 1 },
    )
    .await;
    assert_eq!(handler.calls.lock().unwrap()["victim"], 2);
}

/// The address of the PostgreSQL server in `url`.
async fn database_addr(url: &str) -> SocketAddr {
    let url = url::Url::parse(url).unwrap();
    let host = url.host_str().unwrap();
    let port = url.port().unwrap_or(5432);
    tokio::net::lookup_host((host, port))
        .await
        .unwrap()
        .next()
        .unwrap()
}
