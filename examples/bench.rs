//! Run with: `cargo run --release --example bench [-- --rows 100000 --json --only drain|inbox]`
//!
//! Figures for the relay against the broker's own ceiling, measured in the same run on the
//! local PostgreSQL and RabbitMQ (`BENCH_PG`, `AMQP_URL` override them):
//! 1. raw ceiling: lapin alone publishing with confirms, same payload and window;
//! 2. backlog drain: committed rows drained by the real `outbox relay` binary (release),
//!    rows/s, its ratio to (1), and the relay's peak RSS;
//! 3. inbox consumer: messages/s applied with exactly-once effects (one row each), against a
//!    plain consumer that acks without a database.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sqlx::{AssertSqlSafe, PgPool};
use tokio::sync::Semaphore;

/// Unconfirmed publishes at most, for the raw publisher and the relay alike.
const WINDOW: usize = 1000;
/// Distinct ordering keys in the backlog.
const KEYS: usize = 1000;

#[derive(Clone, Copy, PartialEq)]
enum QueueKind {
    Classic,
    Quorum,
}

impl QueueKind {
    fn name(self) -> &'static str {
        match self {
            QueueKind::Classic => "classic",
            QueueKind::Quorum => "quorum",
        }
    }
}

struct Args {
    rows: usize,
    json: bool,
    /// Run only the scenarios whose name contains this.
    only: Option<String>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        rows: 100_000,
        json: false,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--rows" => a.rows = it.next().context("--rows needs a number")?.parse()?,
            "--json" => a.json = true,
            "--only" => a.only = Some(it.next().context("--only needs drain or inbox")?),
            other => {
                bail!("unknown argument {other:?} (expected --rows N, --json, --only drain|inbox)")
            }
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let pg =
        std::env::var("BENCH_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let amqp = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let relay_bin = build_relay()?;
    let conn = Connection::connect(&amqp, ConnectionProperties::default())
        .await
        .context("RabbitMQ (start it with scripts/services.sh)")?;
    let mut report = Report::new(args.json);

    let wanted = |name: &str| args.only.as_deref().is_none_or(|only| name.contains(only));
    for kind in [QueueKind::Classic, QueueKind::Quorum]
        .into_iter()
        .filter(|_| wanted("drain"))
    {
        let raw = raw_ceiling(&conn, kind, args.rows).await?;
        report.row(
            &format!("raw ceiling, {} queue", kind.name()),
            &[("msgs_per_s", raw)],
        );
        let drain = backlog_drain(&pg, &amqp, &conn, &relay_bin, kind, args.rows).await?;
        report.row(
            &format!("backlog drain {} rows, {} queue", args.rows, kind.name()),
            &[
                ("rows_per_s", drain.rate),
                ("ratio_to_raw", drain.rate / raw),
                ("relay_peak_rss_mib", drain.peak_rss_mib),
            ],
        );
    }
    if !wanted("inbox") {
        return Ok(());
    }
    let inbox_rows = args.rows.min(20_000);
    let (inbox, plain) = inbox_consumer(&pg, &amqp, &conn, inbox_rows).await?;
    report.row(
        &format!("inbox consumer, {inbox_rows} messages, exactly-once effects"),
        &[
            ("msgs_per_s", inbox),
            ("plain_ack_msgs_per_s", plain),
            ("ratio_to_plain", inbox / plain),
        ],
    );
    Ok(())
}

/// A trivial handler: one row per message.
#[derive(Clone)]
struct OneRow;

impl outbox::inbox::Handler<serde_json::Value> for OneRow {
    async fn handle(
        &self,
        tx: &mut sqlx::PgConnection,
        msg: &outbox::inbox::Incoming<serde_json::Value>,
    ) -> Result<(), outbox::inbox::HandlerError> {
        sqlx::query("INSERT INTO effects (message_id) VALUES ($1)")
            .bind(&msg.message_id)
            .execute(tx)
            .await?;
        Ok(())
    }
}

/// `n` messages applied by the inbox consumer (defaults: quorum queue, prefetch 64,
/// concurrency 8), against a plain consumer that acks each message without a database.
async fn inbox_consumer(
    pg: &str,
    amqp: &str,
    conn: &Connection,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    let db = BenchDb::create(pg).await?;
    sqlx::query("CREATE TABLE effects (message_id TEXT NOT NULL)")
        .execute(&db.pool)
        .await?;
    let queue = format!("bench-inbox-{}", uuid::Uuid::new_v4().simple());
    let config = outbox::inbox::ConsumerConfig::new(vec![amqp.to_owned()], "bench", queue.clone());
    // Let the consumer declare its queue, then fill it while nobody consumes.
    let stop = tokio_util::sync::CancellationToken::new();
    let first = tokio::spawn(outbox::inbox::consume(
        db.pool.clone(),
        config.clone(),
        OneRow,
        stop.clone(),
    ));
    // A fresh channel per look: a passive declare of a missing queue closes its channel.
    while queue_depth(&conn.create_channel().await?, &queue)
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = conn.create_channel().await?;
    stop.cancel();
    first.await?;
    fill(conn, &queue, n).await?;

    let stop = tokio_util::sync::CancellationToken::new();
    let start = Instant::now();
    let run = tokio::spawn(outbox::inbox::consume(
        db.pool.clone(),
        config.clone(),
        OneRow,
        stop.clone(),
    ));
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
            .fetch_one(&db.pool)
            .await?;
        if done as usize >= n {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "the inbox consumer took over 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let inbox = n as f64 / start.elapsed().as_secs_f64();
    stop.cancel();
    run.await?;

    fill(conn, &queue, n).await?;
    let plain = plain_consumer(conn, &queue, n, config.prefetch).await?;
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    channel
        .queue_delete(
            config.dead_letter_queue().as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await?;
    db.drop().await?;
    Ok((inbox, plain))
}

/// Publishes `n` messages with ids into `queue` and waits for their confirms.
async fn fill(conn: &Connection, queue: &str, n: usize) -> anyhow::Result<()> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for i in 0..n {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("m-{i}").into());
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                payload().as_bytes(),
                props,
            )
            .await?;
    }
    channel.wait_for_confirms().await?;
    Ok(())
}

/// Consumes `n` messages with the same prefetch, acking each without a database.
async fn plain_consumer(
    conn: &Connection,
    queue: &str,
    n: usize,
    prefetch: u16,
) -> anyhow::Result<f64> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, lapin::options::BasicQosOptions::default())
        .await?;
    let mut deliveries = channel
        .basic_consume(
            queue.into(),
            "plain".into(),
            lapin::options::BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let start = Instant::now();
    for _ in 0..n {
        let d = deliveries.next().await.context("consumer ended")??;
        d.ack(lapin::options::BasicAckOptions::default()).await?;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    channel.close(200, "done".into()).await?;
    Ok(rate)
}

/// Builds the release `outbox` binary beside this example and returns its path.
fn build_relay() -> anyhow::Result<std::path::PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--bin", "outbox"])
        .status()?;
    anyhow::ensure!(status.success(), "building the relay failed");
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .context("target directory")?;
    Ok(dir.join("outbox"))
}

fn payload() -> String {
    let body = format!("{{\"order_id\":42,\"pad\":\"{}\"}}", "x".repeat(256 - 24));
    assert_eq!(body.len(), 256);
    body
}

async fn declare(channel: &Channel, kind: QueueKind) -> anyhow::Result<String> {
    let name = format!("bench-{}-{}", kind.name(), uuid::Uuid::new_v4().simple());
    let mut args = FieldTable::default();
    if kind == QueueKind::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    Ok(name)
}

async fn queue_depth(channel: &Channel, name: &str) -> anyhow::Result<u32> {
    let passive = QueueDeclareOptions {
        passive: true,
        durable: true,
        ..Default::default()
    };
    Ok(channel
        .queue_declare(name.into(), passive, FieldTable::default())
        .await?
        .message_count())
}

/// lapin alone: `n` persistent 256-byte messages with confirms, `WINDOW` unconfirmed at most.
async fn raw_ceiling(conn: &Connection, kind: QueueKind, n: usize) -> anyhow::Result<f64> {
    let channel = conn.create_channel().await?;
    let queue = declare(&channel, kind).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let body = payload();
    let window = Arc::new(Semaphore::new(WINDOW));
    let mut confirms = FuturesUnordered::new();
    let start = Instant::now();
    for i in 0..n {
        let permit = window.clone().acquire_owned().await?;
        let (channel, queue, body) = (channel.clone(), queue.clone(), body.as_bytes());
        let v = std::env::var("BENCH_PROPS").unwrap_or_default();
        let props = if !v.is_empty() {
            let mut p = BasicProperties::default().with_delivery_mode(2);
            if v.contains('c') {
                p = p.with_content_type("application/json".into());
            }
            if v.contains('t') {
                p = p.with_timestamp(1_700_000_000 + i as u64);
            }
            p = if v.contains('u') {
                p.with_message_id(uuid::Uuid::new_v4().to_string().into())
            } else {
                p.with_message_id(i.to_string().into())
            };
            p
        } else {
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(i.to_string().into())
        };
        confirms.push(async move {
            let c = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    props,
                )
                .await?
                .await;
            drop(permit);
            c
        });
        while let Some(Some(done)) = futures_util::FutureExt::now_or_never(confirms.next()) {
            anyhow::ensure!(done?.is_ack(), "nack");
        }
        if window.available_permits() == 0
            && let Some(done) = confirms.next().await
        {
            anyhow::ensure!(done?.is_ack(), "nack");
        }
    }
    while let Some(done) = confirms.next().await {
        anyhow::ensure!(done?.is_ack(), "nack");
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(rate)
}

struct Drain {
    rate: f64,
    peak_rss_mib: f64,
}

/// `n` committed rows over `KEYS` ordering keys, drained by a fresh relay process.
async fn backlog_drain(
    pg: &str,
    amqp: &str,
    conn: &Connection,
    relay_bin: &std::path::Path,
    kind: QueueKind,
    n: usize,
) -> anyhow::Result<Drain> {
    let db = BenchDb::create(pg).await?;
    let channel = conn.create_channel().await?;
    let queue = declare(&channel, kind).await?;
    sqlx::query(
        "INSERT INTO outbox (routing_key, ordering_key, payload)
         SELECT $1, CASE WHEN $2 > 1 THEN 'key-' || (i % $2) END, $3::jsonb FROM generate_series(1, $4) i",
    )
    .bind(&queue)
    .bind(std::env::var("BENCH_KEYS").map_or(KEYS as i64, |v| v.parse().unwrap()))
    .bind(payload())
    .bind(n as i64)
    .execute(&db.pool)
    .await?;
    sqlx::query("VACUUM ANALYZE outbox")
        .execute(&db.pool)
        .await?;

    let start = Instant::now();
    let relay = RelayProcess::start(relay_bin, &db.url, amqp)?;
    let mut peak = 0.0f64;
    while (queue_depth(&channel, &queue).await? as usize) < n {
        peak = peak.max(relay.peak_rss_mib());
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "drain took over 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    peak = peak.max(relay.peak_rss_mib());
    drop(relay);
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    db.drop().await?;
    Ok(Drain {
        rate,
        peak_rss_mib: peak,
    })
}

/// A database of the benchmark's own, migrated.
struct BenchDb {
    server: String,
    name: String,
    url: String,
    pool: PgPool,
}

impl BenchDb {
    async fn create(server: &str) -> anyhow::Result<Self> {
        let name = format!("outbox_bench_{}", uuid::Uuid::new_v4().simple());
        let admin = PgPool::connect(&format!("{server}/postgres"))
            .await
            .context("PostgreSQL (start it with scripts/services.sh)")?;
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await?;
        let url = format!("{server}/{name}");
        let pool = PgPool::connect(&url).await?;
        let store = outbox::store::postgres::PgStore::new(
            pool.clone(),
            outbox::StoreOptions {
                table: Default::default(),
                retention: Duration::ZERO,
            },
        );
        outbox::Store::migrate(&store).await?;
        Ok(BenchDb {
            server: server.to_owned(),
            name,
            url,
            pool,
        })
    }

    async fn drop(self) -> anyhow::Result<()> {
        self.pool.close().await;
        let admin = PgPool::connect(&format!("{}/postgres", self.server)).await?;
        sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE {} WITH (FORCE)",
            self.name
        )))
        .execute(&admin)
        .await?;
        Ok(())
    }
}

/// The release relay as a child process, killed when dropped.
struct RelayProcess(Child);

impl RelayProcess {
    fn start(bin: &std::path::Path, db: &str, amqp: &str) -> anyhow::Result<Self> {
        let child = Command::new(bin)
            .arg("relay")
            .env(
                "DATABASE_URL",
                format!("{db}?options=-c%20synchronous_commit%3Doff"),
            )
            .env("AMQP_URL", amqp)
            .env("OUTBOX_HTTP_ADDR", "")
            .env("OUTBOX_MAX_IN_FLIGHT", WINDOW.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?;
        Ok(RelayProcess(child))
    }

    /// VmHWM of the process: its peak resident memory so far.
    fn peak_rss_mib(&self) -> f64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Prints a table for people or one JSON line per scenario.
struct Report {
    json: bool,
}

impl Report {
    fn new(json: bool) -> Self {
        if !json {
            println!("{:<48} figures", "scenario");
        }
        Report { json }
    }

    fn row(&mut self, scenario: &str, figures: &[(&str, f64)]) {
        if self.json {
            let mut v: BTreeMap<&str, serde_json::Value> = figures
                .iter()
                .map(|(k, f)| (*k, serde_json::json!((f * 1000.0).round() / 1000.0)))
                .collect();
            v.insert("scenario", scenario.into());
            println!("{}", serde_json::to_string(&v).unwrap_or_default());
        } else {
            let text: Vec<String> = figures.iter().map(|(k, f)| format!("{k}={f:.2}")).collect();
            println!("{scenario:<48} {}", text.join("  "));
        }
    }
}
