//! A workload for fault tests: a producer committing rows over many ordering keys, the relay's
//! output recorded at the broker, and an inbox consumer applying it; with the checks that
//! every committed row arrives, first deliveries keep their key's order and effects happen once.
//! The outbox is on either backend; the consumer keeps its inbox and effects in the same
//! database, as a service would.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use outbox::inbox::{ConsumerConfig, Database, Handler, HandlerError, Incoming, QueueType};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::db::{Backend, Db, DbHandle, Row};
use super::inbox::{Arg, HandlerTx};
use super::{eventually, unique};

/// Ordering keys the producer cycles through.
const KEYS: i64 = 40;

#[derive(Deserialize)]
struct Body {
    key: String,
    seq: i64,
}

/// Applies each message once: one `effects` row, numbered in the order applied.
#[derive(Clone)]
struct Apply;

impl<DB: Database> Handler<Body, DB> for Apply
where
    DB::Connection: HandlerTx,
{
    async fn handle(
        &self,
        tx: &mut DB::Connection,
        msg: &Incoming<Body>,
    ) -> Result<(), HandlerError> {
        let sql = "INSERT INTO effects (message_id, ordering_key, seq) VALUES (?, ?, ?)";
        let (id, key) = (Arg::Text(&msg.message_id), Arg::Text(&msg.body.key));
        tx.run(sql, &[id, key, Arg::Int(msg.body.seq)]).await?;
        Ok(())
    }
}

/// What the fault tests share.
pub struct Workload {
    /// The outbox, and where the consumer applies the messages.
    pub db: Db,
    committed: Arc<Mutex<Vec<String>>>,
    maybe: Arc<Mutex<Vec<String>>>,
    recorded: Recorded,
    producing: CancellationToken,
    producer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    stop: CancellationToken,
}

/// What the test checked at the end.
#[derive(Debug)]
pub struct Totals {
    pub committed: usize,
    pub maybe_committed: usize,
    pub duplicates_at_broker: usize,
}

impl Workload {
    /// Creates a database on `backend`, declares an exchange and a recording queue on
    /// `amqp_urls[0]`, starts an inbox consumer (and, if `record`, a raw recorder that counts
    /// duplicates at the broker) over all of them, and a producer committing rows for that
    /// exchange.
    pub async fn start(
        backend: Backend,
        amqp_urls: &[String],
        queue_type: QueueType,
        record: bool,
    ) -> Self {
        let db = Db::new(backend).await;
        db.execute(&format!(
            "CREATE TABLE effects (applied {}, message_id VARCHAR(255) NOT NULL, ordering_key VARCHAR(255) NOT NULL, seq BIGINT NOT NULL)",
            backend.auto_id()
        ))
        .await;
        let exchange = unique("fault");
        let record_queue = unique("fault_rec");
        declare(&amqp_urls[0], &exchange, &record_queue, queue_type).await;
        let stop = CancellationToken::new();
        let recorded = Recorded {
            enabled: record,
            ..Default::default()
        };
        if record {
            tokio::spawn(
                recorded
                    .clone()
                    .run(amqp_urls.to_vec(), record_queue, stop.clone()),
            );
        }
        let mut config = ConsumerConfig::new(amqp_urls.to_vec(), "fault", unique("fault_inbox"));
        config.bindings = vec![(exchange.clone(), "#".into())];
        config.concurrency = 1;
        config.queue_type = queue_type;
        config.queue_ttl = Some(Duration::from_secs(900));
        db.pool.consume(config, Apply, stop.clone());
        let (committed, maybe, producing) =
            (Arc::default(), Arc::default(), CancellationToken::new());
        let producer = tokio::spawn(produce(
            db.handle(),
            exchange,
            Arc::clone(&committed),
            Arc::clone(&maybe),
            producing.clone(),
        ));
        let w = Workload {
            db,
            committed,
            maybe,
            recorded,
            producing,
            producer: Mutex::new(Some(producer)),
            stop,
        };
        eventually(
            "the producer to commit its first rows",
            Duration::from_secs(20),
            || async { w.committed().len() >= 100 },
        )
        .await;
        w
    }

    fn committed(&self) -> Vec<String> {
        self.committed.lock().unwrap().clone()
    }

    /// Waits until every row committed so far has been applied and recorded; prints how long
    /// it took since the fault ended.
    pub async fn converge(&self, phase: &str) {
        let since = Instant::now();
        let want: HashSet<String> = self.committed().into_iter().collect();
        let deadline = since + Duration::from_secs(90);
        loop {
            let applied: HashSet<String> = self
                .db
                .try_strings("SELECT message_id FROM effects")
                .await
                .unwrap_or_default()
                .into_iter()
                .collect();
            let seen = self.recorded.seen.lock().unwrap().clone();
            let not_applied = want.iter().filter(|id| !applied.contains(*id)).count();
            let not_recorded = if self.recorded.enabled {
                want.iter().filter(|id| !seen.contains(*id)).count()
            } else {
                0
            };
            if not_applied + not_recorded == 0 {
                break;
            }
            if Instant::now() > deadline {
                let pending = self
                    .db
                    .try_scalar("SELECT count(*) FROM outbox")
                    .await
                    .unwrap_or(-1);
                let (sessions, deliveries) = *self.recorded.sessions.lock().unwrap();
                panic!(
                    "'{phase}': after 90 s, {not_applied} rows not applied, {not_recorded} not recorded, {pending} still in the outbox (the recorder consumed {sessions} times and took {deliveries} deliveries)"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "{phase}: {} rows so far, all delivered and applied {:?} after the fault, {} duplicates at the broker so far",
            want.len(),
            since.elapsed(),
            self.recorded.duplicates.lock().unwrap()
        );
    }

    /// Stops producing, waits for the last rows, and checks exactly-once effects, nothing
    /// uncommitted, and first deliveries in order per key.
    pub async fn finish(self) -> Totals {
        self.producing.cancel();
        let producer = self.producer.lock().unwrap().take();
        if let Some(p) = producer {
            p.await.unwrap();
        }
        self.converge("final").await;
        let effects: Vec<(String, String, i64)> = self
            .db
            .rows("SELECT message_id, ordering_key, seq FROM effects ORDER BY applied")
            .await;
        let ids: HashSet<&String> = effects.iter().map(|e| &e.0).collect();
        assert_eq!(ids.len(), effects.len(), "a message was applied twice");
        let committed: HashSet<String> = self.committed().into_iter().collect();
        let maybe: HashSet<String> = self.maybe.lock().unwrap().iter().cloned().collect();
        assert!(
            ids.iter()
                .all(|id| committed.contains(*id) || maybe.contains(*id)),
            "an uncommitted row was applied"
        );
        for (what, rows) in [
            (
                "first deliveries",
                self.recorded.first.lock().unwrap().clone(),
            ),
            ("applied effects", effects),
        ] {
            let mut last: HashMap<String, i64> = HashMap::new();
            for (_, key, seq) in rows {
                let prev = last.insert(key.clone(), seq);
                assert!(
                    prev.is_none_or(|p| p < seq),
                    "{what}: key {key} went from {prev:?} to {seq}"
                );
            }
        }
        self.stop.cancel();
        Totals {
            committed: committed.len(),
            maybe_committed: maybe.len(),
            duplicates_at_broker: *self.recorded.duplicates.lock().unwrap(),
        }
    }
}

async fn declare(url: &str, exchange: &str, queue: &str, queue_type: QueueType) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("RabbitMQ: start it with scripts/services.sh");
    let channel = conn.create_channel().await.unwrap();
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(900_000));
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// Commits a row every few milliseconds; on an error the row may or may not exist.
async fn produce(
    db: DbHandle,
    exchange: String,
    committed: Arc<Mutex<Vec<String>>>,
    maybe: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
) {
    let mut seq = 0i64;
    while !stop.is_cancelled() {
        let id = uuid::Uuid::new_v4().to_string();
        let key = format!("k{}", seq % KEYS);
        let row = Row::new("row", serde_json::json!({"key": key, "seq": seq}))
            .message_id(&id)
            .exchange(&exchange)
            .key(&key);
        match db.try_insert_row(&row).await {
            Ok(_) => committed.lock().unwrap().push(id),
            Err(_) => {
                maybe.lock().unwrap().push(id);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        seq += 1;
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
}

/// Every delivery of the recording queue; first deliveries in arrival order. Reconnects over
/// the nodes; a delivery the broker flags as redelivered is not a duplicate publish.
#[derive(Default, Clone)]
struct Recorded {
    enabled: bool,
    first: Arc<Mutex<Vec<(String, String, i64)>>>,
    seen: Arc<Mutex<HashSet<String>>>,
    duplicates: Arc<Mutex<usize>>,
    /// How many times it has consumed, and how many deliveries it has taken: a check that
    /// times out says whether the recorder was still at work.
    sessions: Arc<Mutex<(usize, usize)>>,
}

impl Recorded {
    async fn run(self, urls: Vec<String>, queue: String, stop: CancellationToken) {
        let mut next = 0;
        while !stop.is_cancelled() {
            let url = &urls[next % urls.len()];
            next += 1;
            let consumer = async {
                let conn = outbox::broker::connect(url, &Default::default()).await?;
                let channel = conn.create_channel().await?;
                let deliveries = channel
                    .basic_consume(
                        queue.as_str().into(),
                        "recorder".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                Ok::<_, lapin::Error>((conn, deliveries))
            };
            let Ok(Ok((conn, deliveries))) =
                tokio::time::timeout(Duration::from_secs(5), consumer).await
            else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            self.sessions.lock().unwrap().0 += 1;
            let mut deliveries =
                std::pin::pin!(deliveries.take_until(outbox::broker::closed(&conn)));
            while let Some(Ok(d)) = deliveries.next().await {
                let id = d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                if self.seen.lock().unwrap().insert(id.clone()) {
                    let row: Body = serde_json::from_slice(&d.data).unwrap();
                    self.first.lock().unwrap().push((id, row.key, row.seq));
                } else if !d.redelivered {
                    *self.duplicates.lock().unwrap() += 1;
                }
                self.sessions.lock().unwrap().1 += 1;
                let ack = d.ack(BasicAckOptions::default());
                if !matches!(
                    tokio::time::timeout(Duration::from_secs(5), ack).await,
                    Ok(Ok(_))
                ) {
                    break;
                }
            }
        }
    }
}
