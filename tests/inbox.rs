//! The consumer inbox, on both backends: one effect per message id, retries, dead letters,
//! atomic consume-then-publish, the deduplication window, and the faults around them: a
//! handler whose transaction was aborted under it, a closed dead-letter channel, a database
//! that is down or frozen. On MySQL alone: the transaction's isolation level and timeouts.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use outbox::inbox::{ConsumerConfig, Database, Handler, HandlerError, Incoming, consume};
use serde::Deserialize;
use serde_json::json;
use sqlx::mysql::{MySqlConnection, MySqlPoolOptions};
use sqlx::{MySql, Postgres};
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
    /// Called inside the transaction after the effects are written, with the call number.
    hook: Option<Arc<Hook>>,
    /// Also enqueue an outbox row in the same transaction.
    enqueue: bool,
    /// Holds every call until it is open (a test lets deliveries pile up behind it).
    gate: Option<Arc<tokio::sync::watch::Sender<bool>>>,
}

impl Effects {
    /// Counts a call for `msg`; returns the how-manyth it is.
    fn count(&self, msg: &Incoming<Body>) -> usize {
        let mut calls = self.calls.lock().unwrap();
        let c = calls.entry(msg.message_id.clone()).or_default();
        *c += 1;
        *c
    }

    fn calls_of(&self, message_id: &str) -> usize {
        self.calls.lock().unwrap()[message_id]
    }
}

impl<DB: Database> Handler<Body, DB> for Effects
where
    DB::Connection: HandlerTx,
{
    async fn handle(
        &self,
        tx: &mut DB::Connection,
        msg: &Incoming<Body>,
    ) -> Result<(), HandlerError> {
        if let Some(gate) = &self.gate {
            let _ = gate.subscribe().wait_for(|open| *open).await;
        }
        let call = self.count(msg);
        let sql = "INSERT INTO effects (message_id, n) VALUES (?, ?)";
        tx.run(sql, &[Arg::Text(&msg.message_id), Arg::Int(msg.body.n)])
            .await?;
        if self.enqueue {
            let reply = outbox::Message::new("replies", &json!({"for": msg.message_id}))?;
            outbox::enqueue(tx, &reply).await?;
        }
        match &self.hook {
            Some(hook) => hook(msg, call),
            None => Ok(()),
        }
    }
}

/// A handler that loses its transaction under it and carries on, as a handler that logs an
/// error and goes on would: for the messages `picks` chooses, PostgreSQL's transaction is
/// aborted by a failing statement, MySQL's is rolled back (as the server does on a deadlock).
/// The effect row it then writes (errors ignored) must not be committed.
#[derive(Clone)]
struct LosesItsTransaction {
    picks: fn(i64) -> bool,
}

impl<DB: Database> Handler<Body, DB> for LosesItsTransaction
where
    DB::Connection: HandlerTx,
{
    async fn handle(
        &self,
        tx: &mut DB::Connection,
        msg: &Incoming<Body>,
    ) -> Result<(), HandlerError> {
        if (self.picks)(msg.body.n) {
            let sabotage = match DB::Connection::BACKEND {
                Backend::Postgres => "INSERT INTO no_such_table VALUES (1)",
                Backend::Mysql => "ROLLBACK",
            };
            let _ = tx.run(sabotage, &[]).await;
        }
        let sql = "INSERT INTO effects (message_id, n) VALUES (?, ?)";
        let _ = tx
            .run(sql, &[Arg::Text(&msg.message_id), Arg::Int(msg.body.n)])
            .await;
        Ok(())
    }
}

struct Setup {
    db: Db,
    queue: String,
    config: ConsumerConfig,
    publisher: lapin::Channel,
    conn: Connection,
}

async fn setup(backend: Backend) -> Setup {
    let db = Db::new(backend).await;
    db.execute("CREATE TABLE effects (message_id VARCHAR(255) NOT NULL, n BIGINT NOT NULL)")
        .await;
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
        conn,
    }
}

impl Setup {
    /// A consumer on the test database; it stops when the token is cancelled.
    fn start<H>(&self, handler: H) -> CancellationToken
    where
        H: Handler<Body, Postgres> + Handler<Body, MySql>,
    {
        self.start_on(&self.db.pool, handler).0
    }

    /// A consumer on `pool`, and its task (which ends when `consume` returns).
    fn start_on<H>(&self, pool: &Pool, handler: H) -> (CancellationToken, JoinHandle<()>)
    where
        H: Handler<Body, Postgres> + Handler<Body, MySql>,
    {
        let stop = CancellationToken::new();
        let task = pool.consume(self.config.clone(), handler, stop.clone());
        (stop, task)
    }

    /// A passive declare of the queue, on a fresh channel (a failed one closes its channel).
    async fn look(&self) -> Result<lapin::Queue, lapin::Error> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let ch = self.conn.create_channel().await.unwrap();
        ch.queue_declare(self.queue.as_str().into(), passive, Default::default())
            .await
    }

    /// Has a consumer declare the queue and leave it, so what is published next waits.
    async fn declare_queue(&self) {
        let declare = self.start(Effects::default());
        self.wait_for_consumers(1).await;
        declare.cancel();
        self.wait_for_consumers(0).await;
    }

    async fn wait_for_queue(&self) {
        eventually(
            "the consumer to declare its queue",
            Duration::from_secs(20),
            || async { self.look().await.is_ok() },
        )
        .await;
    }

    async fn wait_for_consumers(&self, n: u32) {
        eventually(
            &format!("{n} consumers on the queue"),
            Duration::from_secs(20),
            || async { self.look().await.is_ok_and(|q| q.consumer_count() == n) },
        )
        .await;
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

    /// Publishes `message_id` with the body `{"n": n}`.
    async fn publish_n(&self, message_id: &str, n: i64) {
        let body = format!("{{\"n\": {n}}}");
        self.publish(Some(message_id), body.as_bytes()).await;
    }

    /// Publishes `m-<n>` for each `n` of `range`, `copies` times in a row.
    async fn publish_numbered(&self, range: std::ops::Range<i64>, copies: usize) {
        for n in range {
            for _ in 0..copies {
                self.publish_n(&format!("m-{n}"), n).await;
            }
        }
    }

    /// The effects of `message_id` (the test's own ids need no quoting).
    async fn effects(&self, message_id: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM effects WHERE message_id = '{message_id}'");
        self.db.scalar(&sql).await
    }

    async fn total(&self, table: &str) -> i64 {
        self.db
            .scalar(&format!("SELECT count(*) FROM {table}"))
            .await
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
        self.publish_n("last", 99).await;
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

    /// A pool of one connection on the test database through `proxy`: a retry gets a slot
    /// only if a frozen connection gave its back.
    async fn one_connection_through(&self, proxy: &Proxy) -> Pool {
        let url = self.db.url_at(proxy.addr);
        Pool::connect(self.db.backend, &url, 1).await
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

/// The `x-outbox-error` header of a dead letter.
fn error_header(m: &lapin::message::BasicGetMessage) -> String {
    match header(m, "x-outbox-error") {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("no x-outbox-error header: {other:?}"),
    }
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_message_published_twice_has_one_effect(backend: Backend) {
        let mut s = setup(backend).await;
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
    async fn batches_holding_duplicates_and_recorded_ids_apply_each_message_once(backend: Backend) {
        let mut s = setup(backend).await;
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
    async fn a_redelivery_after_the_consumer_lost_its_connection_before_the_ack_has_one_effect(
        backend: Backend,
    ) {
        let mut s = setup(backend).await;
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
        s.publish_n("victim", 1).await;
        eventually("the victim's effects", Duration::from_secs(20), || async {
            s.effects("victim").await == 1
        })
        .await;
        // The broker redelivers the unacked message to the reconnected consumer, which acks it
        // without applying it again; a message after it proves the consumer is back.
        s.publish_n("after", 2).await;
        eventually(
            "the consumer to reconnect and go on",
            Duration::from_secs(30),
            || async { s.effects("after").await == 1 },
        )
        .await;
        eventually(
            "the victim's redelivery to be acked",
            Duration::from_secs(30),
            || async { s.ready().await == 0 },
        )
        .await;
        assert_eq!(s.effects("victim").await, 1);
        assert_eq!(
            handler.calls_of("victim"),
            1,
            "the handler ran again for a recorded message"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_handler_is_retried_then_dead_lettered_while_later_messages_are_handled(
        backend: Backend,
    ) {
        let s = setup(backend).await;
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
        s.publish_numbered(0..30, 1).await;
        s.wait_for_effects(29).await;
        assert_eq!(s.effects("m-13").await, 0);
        assert_eq!(
            s.effects("m-7").await,
            1,
            "a transient failure went to the dead-letter queue"
        );
        let dead = s.wait_for_dead_letters(1).await;
        assert_eq!(ids(&dead), HashSet::from(["m-13".to_string()]));
        assert_eq!(
            header(&dead[0], "x-outbox-attempts"),
            Some(AMQPValue::LongLongInt(3))
        );
        let error = error_header(&dead[0]);
        assert!(error.contains("poison"), "{error}");
        assert_eq!(handler.calls_of("m-13"), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handler_failing_after_writing_leaves_no_effect_and_is_retried(backend: Backend) {
        let s = setup(backend).await;
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
        s.declare_queue().await;
        s.publish_numbered(0..20, 1).await;
        let _stop = s.start(handler.clone());
        let dead = s.wait_for_dead_letters(1).await;
        s.wait_for_effects(19).await;
        assert_eq!(ids(&dead), HashSet::from(["m-13".to_string()]));
        assert_eq!(
            header(&dead[0], "x-outbox-attempts"),
            Some(AMQPValue::LongLongInt(3))
        );
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
    async fn a_batch_with_a_failing_message_is_rolled_back_and_each_applied_alone(
        backend: Backend,
    ) {
        let mut s = setup(backend).await;
        // One batch at a time: what arrives while one is applied waits to form the next.
        s.config.concurrency = 1;
        let gate = Arc::new(tokio::sync::watch::channel(false).0);
        let handler = Effects {
            // Several poison messages: whatever the batches, some fail behind others.
            hook: Some(Arc::new(|msg, _| match msg.body.n % 10 {
                3 => Err("poison: n = ..3 is refused".into()),
                _ => Ok(()),
            })),
            gate: Some(gate.clone()),
            ..Default::default()
        };
        // A backlog waiting for the consumer arrives as batches: the first batch is held
        // until every message has reached the consumer, so the next one holds all that are
        // left, poison among them, however slowly the machine delivers them.
        s.declare_queue().await;
        s.publish_numbered(0..30, 1).await;
        let _stop = s.start(handler.clone());
        eventually(
            "every message delivered to the consumer",
            Duration::from_secs(20),
            || async { s.ready().await == 0 },
        )
        .await;
        gate.send_replace(true);
        s.wait_for_effects(27).await;
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
    async fn a_malformed_delivery_is_dead_lettered_at_once(backend: Backend) {
        let s = setup(backend).await;
        let handler = Effects::default();
        let _stop = s.start(handler.clone());
        s.wait_for_queue().await;
        s.publish(None, b"{\"n\": 1}").await;
        s.publish(Some("not-json"), b"this is not json").await;
        s.publish(Some("wrong-shape"), b"{\"m\": \"x\"}").await;
        s.publish_n("good", 4).await;
        eventually(
            "the good message to be applied",
            Duration::from_secs(20),
            || async { s.effects("good").await == 1 },
        )
        .await;
        let dead = s.wait_for_dead_letters(3).await;
        let reasons: Vec<String> = dead.iter().map(error_header).collect();
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
    async fn hostile_deliveries_are_dead_lettered_with_their_reason_and_the_rest_applied_once(
        backend: Backend,
    ) {
        let mut s = setup(backend).await;
        s.config.prefetch_bytes = 64 * 1024;
        let handler = Effects::default();
        let _stop = s.start(handler.clone());
        s.wait_for_queue().await;
        // Valid JSON of the right shape, but larger than the whole byte budget.
        let big = format!(r#"{{"n": 1, "pad": "{}"}}"#, "a".repeat(100 * 1024));
        s.publish(Some("too-big"), big.as_bytes()).await;
        s.publish(Some("binary"), b"\xff\xfe\x00 not JSON").await;
        // The longest message id AMQP carries (a short string: 255 bytes), multi-byte, twice.
        let longest = format!("{}x", "\u{e9}".repeat(127));
        assert_eq!(longest.len(), 255);
        s.publish_n(&longest, 2).await;
        s.publish_n(&longest, 2).await;
        // Bodies of 10 KiB: a batch holds one of them (16 KiB each, for 4 batches at once).
        let pad = "b".repeat(10 * 1024);
        for n in 0..20 {
            let body = format!(r#"{{"n": {n}, "pad": "{pad}"}}"#);
            s.publish(Some(&format!("m-{n}")), body.as_bytes()).await;
        }
        s.publish_n("last", 99).await;
        s.wait_for_effects(22).await;
        let dead = s.wait_for_dead_letters(2).await;
        assert_eq!(ids(&dead), HashSet::from(["too-big".into(), "binary".into()]));
        let reason = |id: &str| {
            let one = |d: &&lapin::message::BasicGetMessage| ids(std::slice::from_ref(*d)).contains(id);
            error_header(dead.iter().find(one).unwrap())
        };
        let expected = format!(
            "the body ({} bytes) is larger than the inbox takes (prefetch_bytes 65536)",
            big.len()
        );
        assert!(reason("too-big").contains(&expected), "{}", reason("too-big"));
        assert!(reason("binary").contains("not the expected JSON"), "{}", reason("binary"));
        assert_eq!(s.effects(&longest).await, 1);
        for n in 0..20 {
            assert_eq!(s.effects(&format!("m-{n}")).await, 1, "m-{n}");
        }
        assert_eq!(s.total("outbox_inbox").await, 22);
        assert!(!handler.calls.lock().unwrap().contains_key("too-big"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outbox_rows_written_by_a_handler_exist_only_if_its_transaction_commits(
        backend: Backend,
    ) {
        let s = setup(backend).await;
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
        s.publish_numbered(0..10, 1).await;
        s.wait_for_effects(10).await;
        assert_eq!(
            s.total("outbox").await,
            10,
            "a rolled-back attempt left its outbox row"
        );
        assert!(handler.calls.lock().unwrap().values().all(|&c| c == 2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn inbox_rows_are_purged_after_the_deduplication_window(backend: Backend) {
        let mut s = setup(backend).await;
        s.config.dedup_window = Duration::from_secs(1);
        let handler = Effects::default();
        let _stop = s.start(handler.clone());
        s.wait_for_consumers(1).await;
        s.publish_n("m-1", 1).await;
        s.wait_for_effects(1).await;
        eventually(
            "its inbox row to be purged",
            Duration::from_secs(20),
            || async { s.total("outbox_inbox").await == 0 },
        )
        .await;
        // Past the window the same id is a new message: documented, and shown here.
        s.publish_n("m-1", 1).await;
        s.wait_for_effects(2).await;
        assert_eq!(handler.calls_of("m-1"), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_handler_whose_transaction_was_lost_under_it_is_never_acked_without_its_effects(
        backend: Backend,
    ) {
        let s = setup(backend).await;
        let handler = LosesItsTransaction {
            picks: |n| n % 10 == 3,
        };
        // A backlog arrives as batches: a lost transaction takes the batch's with it.
        s.declare_queue().await;
        s.publish_numbered(0..30, 1).await;
        let _stop = s.start(handler);
        let mut dead = s.wait_for_dead_letters(3).await;
        // A lone message goes through the single-message path from its first attempt.
        s.publish_n("m-43", 43).await;
        dead.extend(s.wait_for_dead_letters(1).await);
        let lost = ["m-3", "m-13", "m-23", "m-43"].map(String::from);
        assert_eq!(ids(&dead), HashSet::from(lost));
        for d in &dead {
            let error = error_header(d);
            assert!(error.contains("the transaction was aborted"), "{error}");
            assert_eq!(
                header(d, "x-outbox-attempts"),
                Some(AMQPValue::LongLongInt(3))
            );
        }
        s.wait_for_effects(27).await;
        for n in 0..30 {
            let expected = i64::from(n % 10 != 3);
            assert_eq!(s.effects(&format!("m-{n}")).await, expected, "m-{n}");
        }
        assert_eq!(s.effects("m-43").await, 0);
        let recorded: HashSet<String> =
            s.db.strings("SELECT message_id FROM outbox_inbox")
                .await
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
    async fn dead_letters_still_arrive_after_the_dead_letter_channel_was_closed(backend: Backend) {
        let s = setup(backend).await;
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
        // Consuming: its session is open and declares nothing more (a session that failed to
        // open would declare the exchange again when retried).
        s.wait_for_consumers(1).await;
        // Publishing to a missing exchange: the broker closes the dead-letter channel (404).
        let dead = s.config.dead_letter_queue();
        s.publisher
            .exchange_delete(dead.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .unwrap();
        s.publish_n("poison-1", 1).await;
        let calls = || handler.calls.lock().unwrap().get("poison-1").copied();
        eventually(
            "a failed dead letter and the message's redelivery",
            Duration::from_secs(30),
            || async { calls() > Some(s.config.max_attempts as usize) },
        )
        .await;
        declare_dead_letter_exchange(&s).await;
        s.publish_n("poison-2", 2).await;
        let letters = s.wait_for_dead_letters(2).await;
        assert_eq!(
            ids(&letters),
            HashSet::from(["poison-1".to_string(), "poison-2".to_string()])
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_consumer_whose_database_is_down_stops_at_shutdown_and_leaves_the_message_queued(
        backend: Backend,
    ) {
        let s = setup(backend).await;
        // Nothing listens there: every connection attempt is refused, the pool keeps trying.
        let down = format!("{}://root@127.0.0.1:{}/down", backend.scheme(), free_port());
        let pool = Pool::lazy(backend, &down);
        s.declare_queue().await;
        s.publish_n("stuck", 1).await;
        eventually(
            "the message to wait in the queue",
            Duration::from_secs(20),
            || async { s.ready().await == 1 },
        )
        .await;
        let (stop, task) = s.start_on(&pool, Effects::default());
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
    async fn a_transaction_on_a_frozen_connection_is_abandoned_and_retried_on_a_new_one(
        backend: Backend,
    ) {
        let mut s = setup(backend).await;
        s.config.transaction_timeout = Duration::from_secs(1);
        let proxy = Arc::new(Proxy::start(backend.addr()).await);
        // The retry's record of the same id waits on the frozen transaction's row lock, which
        // only the server releases, once the transaction timeout has passed.
        let pool = s.one_connection_through(&proxy).await;
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
        let _stop = s.start_on(&pool, handler.clone()).0;
        s.wait_for_consumers(1).await;
        s.publish_n("victim", 1).await;
        s.publish_n("after", 2).await;
        eventually(
            "both messages to be applied on a new connection",
            Duration::from_secs(20),
            || async { s.effects("victim").await == 1 && s.effects("after").await == 1 },
        )
        .await;
        assert_eq!(handler.calls_of("victim"), 2);
    }
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

/// What a MySQL handler saw of its session: wait_timeout, innodb_lock_wait_timeout,
/// autocommit and the transaction's isolation level.
type Seen = (u64, u64, i64, String);

/// Applies the message with [`Effects`] after recording what its MySQL session is set to.
#[derive(Clone, Default)]
struct SessionProbe {
    effects: Effects,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Handler<Body, MySql> for SessionProbe {
    async fn handle(
        &self,
        tx: &mut MySqlConnection,
        msg: &Incoming<Body>,
    ) -> Result<(), HandlerError> {
        let seen: Seen = sqlx::query_as(
            "SELECT @@SESSION.wait_timeout, @@SESSION.innodb_lock_wait_timeout,
                    @@SESSION.autocommit, trx_isolation_level
             FROM information_schema.innodb_trx WHERE trx_mysql_thread_id = CONNECTION_ID()",
        )
        .fetch_one(&mut *tx)
        .await?;
        self.seen.lock().unwrap().push(seen);
        Handler::<Body, MySql>::handle(&self.effects, tx, msg).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_the_inbox_transaction_is_read_committed_and_bounded_then_the_session_restored() {
    let mut s = setup(Backend::Mysql).await;
    s.config.transaction_timeout = Duration::from_millis(1500);
    // One connection: the session the handler saw is the one checked afterwards.
    let one = MySqlPoolOptions::new()
        .max_connections(1)
        .connect(&s.db.url)
        .await
        .unwrap();
    let (wait_timeout, lock_wait_timeout): (u64, u64) =
        sqlx::query_as("SELECT @@SESSION.wait_timeout, @@SESSION.innodb_lock_wait_timeout")
            .fetch_one(&one)
            .await
            .unwrap();
    let probe = SessionProbe::default();
    let stop = CancellationToken::new();
    tokio::spawn(consume(
        one.clone(),
        s.config.clone(),
        probe.clone(),
        stop.clone(),
    ));
    let _stop = stop.drop_guard();
    s.wait_for_consumers(1).await;
    s.publish_n("m-1", 1).await;
    s.wait_for_effects(1).await;
    let seen = probe.seen.lock().unwrap().clone();
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
