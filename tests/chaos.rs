//! The chaos suite: while a producer keeps committing rows over many ordering keys, the relay
//! is SIGKILLed, its broker connection is cut and held half-open, the database is slowed
//! down, and the broker and PostgreSQL are restarted. After each fault: every committed row
//! delivered, first deliveries in order per key, inbox effects exactly once; at the end the
//! relay's memory is bounded.
//!
//! It restarts the shared broker and database, so it is the only test in this file (cargo
//! runs test files one after another).

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use outbox::inbox::{ConsumerConfig, Handler, HandlerError, Incoming, consume};
use serde::Deserialize;
use sqlx::postgres::PgConnection;
use tokio_util::sync::CancellationToken;

const KEYS: i64 = 40;

#[derive(Deserialize)]
struct Row {
    key: String,
    seq: i64,
}

/// Applies each message once: one `effects` row, numbered in the order applied.
#[derive(Clone)]
struct Apply;

impl Handler<Row> for Apply {
    async fn handle(&self, tx: &mut PgConnection, msg: &Incoming<Row>) -> Result<(), HandlerError> {
        sqlx::query("INSERT INTO effects (message_id, key, seq) VALUES ($1, $2, $3)")
            .bind(&msg.message_id)
            .bind(&msg.body.key)
            .bind(msg.body.seq)
            .execute(tx)
            .await?;
        Ok(())
    }
}

/// Commits rows continuously; remembers which surely committed and which may have.
struct Producer {
    committed: Arc<Mutex<Vec<String>>>,
    maybe: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Producer {
    /// Stops producing and waits for the last insert to finish.
    async fn finish(&self) {
        self.stop.cancel();
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            task.await.unwrap();
        }
    }

    fn start(pool: sqlx::PgPool, exchange: String) -> Self {
        let (committed, maybe, stop) = (
            Arc::<Mutex<Vec<String>>>::default(),
            Arc::<Mutex<Vec<String>>>::default(),
            CancellationToken::new(),
        );
        let (c, m, s) = (committed.clone(), maybe.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut seq = 0i64;
            while !s.is_cancelled() {
                let key = format!("k{}", seq % KEYS);
                let id = uuid::Uuid::new_v4().to_string();
                let insert = sqlx::query(
                    "INSERT INTO outbox (message_id, exchange, routing_key, ordering_key, payload)
                     VALUES ($1::uuid, $2, 'row', $3, jsonb_build_object('key', $3::text, 'seq', $4::bigint))",
                )
                .bind(&id)
                .bind(&exchange)
                .bind(&key)
                .bind(seq)
                .execute(&pool)
                .await;
                match insert {
                    Ok(_) => c.lock().unwrap().push(id),
                    Err(_) => {
                        // The database went away mid-statement: the row may or may not exist.
                        m.lock().unwrap().push(id);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                seq += 1;
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
        });
        Producer {
            committed,
            maybe,
            stop,
            task: Mutex::new(Some(task)),
        }
    }

    fn committed(&self) -> Vec<String> {
        self.committed.lock().unwrap().clone()
    }
}

/// Every delivery of a second queue, first deliveries in arrival order; reconnects.
#[derive(Default, Clone)]
struct Recorder {
    first: Arc<Mutex<Vec<(String, String, i64)>>>,
    seen: Arc<Mutex<HashSet<String>>>,
    duplicates: Arc<Mutex<usize>>,
}

impl Recorder {
    fn start(&self, queue: String, stop: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let Ok(conn) =
                    Connection::connect(&amqp_url(), ConnectionProperties::default()).await
                else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let Ok(channel) = conn.create_channel().await else {
                    continue;
                };
                let Ok(mut deliveries) = channel
                    .basic_consume(
                        queue.as_str().into(),
                        "recorder".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                while let Some(Ok(d)) = deliveries.next().await {
                    let id = d
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    let fresh = me.seen.lock().unwrap().insert(id.clone());
                    if fresh {
                        let row: Row = serde_json::from_slice(&d.data).unwrap();
                        me.first.lock().unwrap().push((id, row.key, row.seq));
                    } else if !d.redelivered {
                        *me.duplicates.lock().unwrap() += 1;
                    }
                    let _ = d.ack(BasicAckOptions::default()).await;
                }
            }
        });
    }
}

struct Relay2 {
    relay: Option<Relay>,
    db_url: String,
    table: outbox::TableName,
    amqp: String,
}

impl Relay2 {
    fn start(&mut self) {
        let env = [
            ("AMQP_URL", self.amqp.as_str()),
            ("OUTBOX_CONFIRM_TIMEOUT", "3s"),
            ("OUTBOX_CONNECT_TIMEOUT", "2s"),
            ("OUTBOX_BACKOFF_MIN", "200ms"),
            ("OUTBOX_BACKOFF_MAX", "1s"),
            ("OUTBOX_MAX_ATTEMPTS", "1000"),
        ];
        self.relay = Some(Relay::start(&self.db_url, &self.table, &env));
    }

    fn kill9(&mut self) {
        if let Some(r) = self.relay.as_mut() {
            r.kill9();
        }
    }

    fn peak_rss_mib(&self) -> f64 {
        let pid = self.relay.as_ref().unwrap().child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} could not run ({e})"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pg_version() -> String {
    std::fs::read_dir("/etc/postgresql")
        .expect("a Debian PostgreSQL cluster (scripts/services.sh)")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .max()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_fault_is_survived_without_loss_reordering_or_double_effects() {
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE effects (applied BIGSERIAL PRIMARY KEY, message_id TEXT NOT NULL, key TEXT NOT NULL, seq BIGINT NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .expect("RabbitMQ: start it with scripts/services.sh");
    let channel = conn.create_channel().await.unwrap();
    let exchange = unique("chaos");
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let recorded = unique("chaos_rec");
    let mut args = FieldTable::default();
    args.insert(
        "x-expires".into(),
        lapin::types::AMQPValue::LongInt(900_000),
    );
    channel
        .queue_declare(
            recorded.as_str().into(),
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
            recorded.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    drop(conn);

    let stop = CancellationToken::new();
    let recorder = Recorder::default();
    recorder.start(recorded, stop.clone());
    let mut config = ConsumerConfig::new(vec![amqp_url()], "chaos", unique("chaos_inbox"));
    config.bindings = vec![(exchange.clone(), "#".into())];
    config.concurrency = 1;
    config.queue_ttl = Some(Duration::from_secs(900));
    tokio::spawn(consume(db.pool.clone(), config, Apply, stop.clone()));

    let amqp_proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let pg_proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut relay = Relay2 {
        relay: None,
        db_url: db.url.replace("127.0.0.1:5432", &pg_proxy.addr.to_string()),
        table: db.table.clone(),
        amqp: format!("amqp://guest:guest@{}/%2f", amqp_proxy.addr),
    };
    relay.start();
    let producer = Producer::start(db.pool.clone(), exchange);

    let converge = |phase: &'static str, since: Instant| {
        let (db, recorder, producer) = (&db, &recorder, &producer);
        async move {
            let want: HashSet<String> = producer.committed().into_iter().collect();
            eventually(
                &format!(
                    "every row committed before the end of '{phase}' to be applied and recorded"
                ),
                Duration::from_secs(90),
                || async {
                    let applied: HashSet<String> =
                        sqlx::query_scalar("SELECT message_id FROM effects")
                            .fetch_all(&db.pool)
                            .await
                            .unwrap_or_default()
                            .into_iter()
                            .collect();
                    let seen = recorder.seen.lock().unwrap().clone();
                    want.iter()
                        .all(|id| applied.contains(id) && seen.contains(id))
                },
            )
            .await;
            println!(
                "{phase}: {} rows so far, recovered {:?} after the fault, {} duplicates so far",
                want.len(),
                since.elapsed(),
                recorder.duplicates.lock().unwrap()
            );
        }
    };

    eventually(
        "the producer to commit its first rows",
        Duration::from_secs(20),
        || async { producer.committed().len() >= 100 },
    )
    .await;
    converge("warm-up", Instant::now()).await;

    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        relay.kill9();
        relay.start();
    }
    converge("relay SIGKILLed three times", Instant::now()).await;

    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        amqp_proxy.sever();
    }
    converge("broker connection cut twice mid-publish", Instant::now()).await;

    amqp_proxy.blackhole();
    tokio::time::sleep(Duration::from_secs(6)).await;
    amqp_proxy.sever();
    amqp_proxy.delay(Duration::ZERO);
    converge("broker connection held half-open for 6 s", Instant::now()).await;

    pg_proxy.delay(Duration::from_millis(30));
    tokio::time::sleep(Duration::from_secs(5)).await;
    pg_proxy.delay(Duration::ZERO);
    converge(
        "database slowed by 30 ms per packet for 5 s",
        Instant::now(),
    )
    .await;

    run("rabbitmqctl", &["stop_app"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    run("rabbitmqctl", &["start_app"]);
    converge("broker restarted (stop_app / start_app)", Instant::now()).await;

    run(
        "pg_ctlcluster",
        &[
            "--skip-systemctl-redirect",
            &pg_version(),
            "main",
            "restart",
        ],
    );
    converge("PostgreSQL restarted", Instant::now()).await;

    producer.finish().await;
    converge("final", Instant::now()).await;

    // Exactly-once effects, nothing outside what was (maybe) committed.
    let effects: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT message_id, key, seq FROM effects ORDER BY applied")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let ids: HashSet<&String> = effects.iter().map(|e| &e.0).collect();
    assert_eq!(ids.len(), effects.len(), "a message was applied twice");
    let committed: HashSet<String> = producer.committed().into_iter().collect();
    let maybe: HashSet<String> = producer.maybe.lock().unwrap().iter().cloned().collect();
    assert!(
        ids.iter()
            .all(|id| committed.contains(*id) || maybe.contains(*id)),
        "an uncommitted row was applied"
    );
    // First deliveries (at the broker, and as applied) in order per key.
    for (what, rows) in [
        ("first deliveries", recorder.first.lock().unwrap().clone()),
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
    let rss = relay.peak_rss_mib();
    println!(
        "rows committed: {}, maybe committed: {}, broker duplicates: {}, relay peak RSS: {rss:.1} MiB",
        committed.len(),
        maybe.len(),
        recorder.duplicates.lock().unwrap()
    );
    assert!(rss > 0.0 && rss < 128.0, "relay peak RSS {rss:.1} MiB");
    stop.cancel();
}
