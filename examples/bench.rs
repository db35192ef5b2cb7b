//! Run with: `cargo run --release --example bench [-- --rows 100000 --json --only NAME]`
//!
//! Figures for the relay against the broker's own ceiling, measured in the same run on the
//! local PostgreSQL and RabbitMQ (`BENCH_PG`, `AMQP_URL` override them). Scenarios (`--only`
//! runs those whose name contains NAME):
//! - `raw`: lapin alone publishing with confirms, same window: bare messages (a short id), and
//!   the relay's own messages (same body, the contract's properties): the ceiling;
//! - `drain`: committed rows drained by the real `outbox relay` binary (release) into a
//!   classic and a quorum queue: rows/s, ratio to the ceiling, peak RSS, CPU per 10k rows;
//! - `scale`: the same with a 1M-row backlog, and with 10M sent rows kept in the table;
//! - `latency`: single-row transactions at 100, 1,000 and 5,000 rows/s: commit-to-confirm and
//!   commit-to-consumer percentiles, and lapin's own publish-to-confirm at the same rate;
//! - `idle`: an idle relay's RSS and database queries per second;
//! - `inbox`: the inbox consumer with exactly-once effects against a plain consumer.

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
    /// Rounds of (ceiling, drain) per queue kind; medians are reported.
    rounds: usize,
    json: bool,
    /// Run only the scenarios whose name contains this.
    only: Option<String>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        rows: 100_000,
        rounds: 3,
        json: false,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--rows" => a.rows = it.next().context("--rows needs a number")?.parse()?,
            "--rounds" => a.rounds = it.next().context("--rounds needs a number")?.parse()?,
            "--json" => a.json = true,
            "--only" => a.only = Some(it.next().context("--only needs a scenario name")?),
            other => bail!(
                "unknown argument {other:?} (expected --rows N, --rounds N, --json, \
                 --only raw|drain|scale|latency|idle|inbox)"
            ),
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
    let n = args.rows;

    for kind in [QueueKind::Classic, QueueKind::Quorum] {
        if !(wanted("raw") || wanted("drain")) {
            continue;
        }
        let bare = raw_ceiling(&conn, kind, n, Messages::Bare).await?;
        report.row(
            &format!("raw ceiling, bare messages, {} queue", kind.name()),
            &[("msgs_per_s", bare)],
        );
        // Rounds of (ceiling, drain): each drain against the ceiling measured next to it,
        // the median of the rounds reported, as this machine's speed drifts.
        let (mut raws, mut drains, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let mut bursts: [Vec<f64>; 2] = Default::default();
        for _ in 0..args.rounds {
            let raw = raw_ceiling(&conn, kind, n, Messages::Relay).await?;
            raws.push(raw);
            if wanted("drain") {
                let drain =
                    backlog_drain(&pg, &amqp, &conn, &relay_bin, Backlog::new(kind, n)).await?;
                ratios.push(drain.rate / raw);
                drains.push(drain);
                for (stats, ratios) in [Stats::Empty, Stats::Burst].into_iter().zip(&mut bursts) {
                    let burst = Backlog {
                        arrival: Arrival::Burst(stats),
                        ..Backlog::new(kind, n)
                    };
                    let drain = backlog_drain(&pg, &amqp, &conn, &relay_bin, burst).await?;
                    ratios.push(drain.rate / raw);
                }
            }
        }
        let raw = median(&raws);
        report.row(
            &format!("raw ceiling, the relay's messages, {} queue", kind.name()),
            &[("msgs_per_s", raw), ("ratio_to_bare", raw / bare)],
        );
        if drains.is_empty() {
            continue;
        }
        let rates: Vec<f64> = drains.iter().map(|d| d.rate).collect();
        let cpu: Vec<f64> = drains.iter().map(|d| d.cpu_s_per_10k).collect();
        let peak = drains.iter().map(|d| d.peak_rss_mib).fold(0.0, f64::max);
        report.row(
            &format!("backlog drain {n} rows, {} queue", kind.name()),
            &[
                ("rows_per_s", median(&rates)),
                ("ratio_to_raw", median(&ratios)),
                ("ratio_min", ratios.iter().copied().fold(f64::MAX, f64::min)),
                ("ratio_max", ratios.iter().copied().fold(0.0, f64::max)),
                ("relay_peak_rss_mib", peak),
                ("relay_cpu_s_per_10k_rows", median(&cpu)),
            ],
        );
        for (stats, ratios) in [Stats::Empty, Stats::Burst].into_iter().zip(&bursts) {
            report.row(
                &format!(
                    "burst of {n} rows timed from its commit, {}, {} queue",
                    stats.name(),
                    kind.name()
                ),
                &[
                    ("ratio_to_raw", median(ratios)),
                    ("ratio_min", ratios.iter().copied().fold(f64::MAX, f64::min)),
                    ("ratio_max", ratios.iter().copied().fold(0.0, f64::max)),
                ],
            );
        }
    }
    if wanted("latency") {
        for rate in [100, 1000, 5000] {
            let l = live_latency(&pg, &amqp, &conn, rate).await?;
            let raw = raw_confirm_latency(&conn, rate).await?;
            let mut figures = vec![
                ("offered_rows_per_s", rate as f64),
                ("achieved_rows_per_s", l.achieved),
            ];
            figures.extend(l.commit_to_consumer.figures("commit_to_consumer"));
            figures.extend(l.commit_to_confirm.figures("commit_to_confirm"));
            figures.extend(raw.figures("raw_publish_to_confirm"));
            report.row(&format!("live latency at {rate} rows/s (ms)"), &figures);
        }
    }
    if wanted("idle") {
        let idle = idle_relay(&pg, &amqp, &relay_bin).await?;
        report.row(
            "idle relay",
            &[
                ("rss_mib", idle.rss_mib),
                ("db_queries_per_s", idle.queries_per_s),
            ],
        );
    }
    if wanted("inbox") {
        let inbox_rows = n.min(20_000);
        let (inbox, plain) = inbox_consumer(&pg, &amqp, &conn, inbox_rows).await?;
        report.row(
            &format!("inbox consumer, {inbox_rows} messages, exactly-once effects"),
            &[
                ("msgs_per_s", inbox),
                ("plain_ack_msgs_per_s", plain),
                ("ratio_to_plain", inbox / plain),
            ],
        );
    }
    // Last: its 10M-row table leaves the disk busy (checkpoint, dropped database) for a
    // while, which would show in the latency percentiles.
    if wanted("scale") {
        // Each against a base drain of `n` rows with the same settings, run just before it
        // (this machine's speed drifts over minutes), so that only the table differs. The
        // 1M backlog has a consumer keeping the queue short, in its base run too: a classic
        // queue holding a million messages is slower in itself.
        let base = Backlog::new(QueueKind::Classic, n);
        let consumed = Backlog {
            consume: true,
            ..base
        };
        let big_backlog = Backlog {
            rows: 10 * n,
            ..consumed
        };
        let kept = Backlog { keep: true, ..base };
        let big_table = Backlog {
            sent: 100 * n,
            ..kept
        };
        for (base, big) in [(consumed, big_backlog), (kept, big_table)] {
            let (rows, sent) = (big.rows, big.sent);
            let base = backlog_drain(&pg, &amqp, &conn, &relay_bin, base).await?;
            let drain = backlog_drain(&pg, &amqp, &conn, &relay_bin, big).await?;
            let name = if sent == 0 {
                format!("scale: backlog drain {rows} rows, classic queue")
            } else {
                format!("scale: drain {rows} rows with {sent} sent rows kept, classic queue")
            };
            report.row(
                &name,
                &[
                    ("rows_per_s", drain.rate),
                    ("base_rows_per_s", base.rate),
                    ("ratio_to_base", drain.rate / base.rate),
                    ("relay_peak_rss_mib", drain.peak_rss_mib),
                    ("relay_cpu_s_per_10k_rows", drain.cpu_s_per_10k),
                ],
            );
        }
    }
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

/// `n` messages applied by the inbox consumer (its defaults: quorum queue, prefetch 512,
/// batches of 128, 4 at once), against a plain consumer that acks each message without a
/// database.
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

/// Publishes to `queue` through the default exchange, mandatory, and waits for an ack.
async fn publish_confirmed(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
) -> anyhow::Result<()> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let confirm = channel
        .basic_publish("".into(), queue.into(), options, body, props)
        .await?
        .await?;
    anyhow::ensure!(confirm.is_ack(), "nack");
    Ok(())
}

/// A plain consumer of `queue` on a channel of its own: automatic acks, 1000 ahead.
async fn no_ack_consumer(conn: &Connection, queue: &str) -> anyhow::Result<lapin::Consumer> {
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(1000, lapin::options::BasicQosOptions::default())
        .await?;
    let options = lapin::options::BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let tag = format!("bench-{}", uuid::Uuid::new_v4().simple());
    Ok(channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            options,
            FieldTable::default(),
        )
        .await?)
}

/// What the raw publisher sends.
#[derive(Clone, Copy)]
enum Messages {
    /// The body, persistent, a short message id.
    Bare,
    /// What the relay sends: the same body with the contract's properties (a UUID message
    /// id, `content_type`, `timestamp`, persistent).
    Relay,
}

impl Messages {
    fn properties(self, i: usize) -> BasicProperties {
        let props = BasicProperties::default().with_delivery_mode(2);
        match self {
            Messages::Bare => props.with_message_id(i.to_string().into()),
            Messages::Relay => props
                .with_message_id(uuid::Uuid::new_v4().to_string().into())
                .with_content_type("application/json".into())
                .with_timestamp(1_700_000_000 + i as u64),
        }
    }
}

/// lapin alone: `n` 256-byte messages with confirms, `WINDOW` unconfirmed at most.
async fn raw_ceiling(
    conn: &Connection,
    kind: QueueKind,
    n: usize,
    messages: Messages,
) -> anyhow::Result<f64> {
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
        let props = messages.properties(i);
        confirms.push(async move {
            let confirmed = publish_confirmed(&channel, &queue, body, props).await;
            drop(permit);
            confirmed
        });
        while let Some(Some(done)) = futures_util::FutureExt::now_or_never(confirms.next()) {
            done?;
        }
        if window.available_permits() == 0
            && let Some(done) = confirms.next().await
        {
            done?;
        }
    }
    while let Some(done) = confirms.next().await {
        done?;
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
    cpu_s_per_10k: f64,
}

/// The median of a few figures.
fn median(figures: &[f64]) -> f64 {
    let mut sorted = figures.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// What the table's statistics say when a burst arrives.
#[derive(Clone, Copy, PartialEq)]
enum Stats {
    /// The table was analyzed empty, after an earlier burst was deleted: an outbox that
    /// deletes what it sends, at rest.
    Empty,
    /// The table was analyzed holding an earlier burst of the same size.
    Burst,
}

impl Stats {
    fn name(self) -> &'static str {
        match self {
            Stats::Empty => "table analyzed empty",
            Stats::Burst => "table analyzed with a burst",
        }
    }
}

/// How the rows reach the relay.
#[derive(Clone, Copy, PartialEq)]
enum Arrival {
    /// Committed (and analyzed) before the relay starts; the clock runs from the first row
    /// in the queue to the last.
    Backlog,
    /// Committed in one transaction while the relay idles; the clock runs from the commit.
    Burst(Stats),
}

/// What a drain run sets up.
#[derive(Clone, Copy)]
struct Backlog {
    kind: QueueKind,
    /// How the rows arrive.
    arrival: Arrival,
    /// Committed rows to drain, over `KEYS` ordering keys.
    rows: usize,
    /// Rows already sent, written first.
    sent: usize,
    /// Retention on: sent rows are updated, not deleted.
    keep: bool,
    /// A consumer empties the queue as it fills (else the queue keeps every message).
    consume: bool,
}

impl Backlog {
    fn new(kind: QueueKind, rows: usize) -> Self {
        Backlog {
            kind,
            arrival: Arrival::Backlog,
            rows,
            sent: 0,
            keep: false,
            consume: false,
        }
    }
}

/// A backlog drained by a fresh relay process.
async fn backlog_drain(
    pg: &str,
    amqp: &str,
    conn: &Connection,
    relay_bin: &std::path::Path,
    backlog: Backlog,
) -> anyhow::Result<Drain> {
    let Backlog {
        kind,
        arrival,
        rows: n,
        sent,
        keep,
        consume,
    } = backlog;
    let db = BenchDb::create(pg).await?;
    let channel = conn.create_channel().await?;
    let queue = declare(&channel, kind).await?;
    if sent > 0 {
        // Small bodies: the claim never reads sent rows, only their index entries and heap
        // pages count, and 10M full rows would take this machine's disk minutes to write.
        sqlx::query(
            "INSERT INTO outbox (routing_key, ordering_key, payload, state, sent_at, created_at)
             SELECT 'done', 'key-' || (i % 1000), '{}', 'sent', now() - interval '1 day',
                    now() - interval '1 day'
             FROM generate_series(1, $1) i",
        )
        .bind(sent as i64)
        .execute(&db.pool)
        .await?;
    }
    let retention = if keep { "7d" } else { "0s" };
    let start_relay =
        || RelayProcess::start(relay_bin, &db.url, amqp, &[("OUTBOX_RETENTION", retention)]);
    let (relay, committed) = match arrival {
        Arrival::Backlog => {
            insert_rows(&db.pool, &queue, n).await?;
            analyze(&db.pool).await?;
            (start_relay()?, None)
        }
        Arrival::Burst(stats) => {
            // An earlier burst, sent and deleted; the statistics taken while it was there,
            // or (as autovacuum leaves an outbox that deletes what it sends) once it was gone.
            insert_rows(&db.pool, &queue, n).await?;
            if stats == Stats::Burst {
                analyze(&db.pool).await?;
            }
            sqlx::query("DELETE FROM outbox").execute(&db.pool).await?;
            if stats == Stats::Empty {
                analyze(&db.pool).await?;
            }
            let relay = start_relay()?;
            // Connections and leadership are not throughput: the relay idles first.
            tokio::time::sleep(Duration::from_secs(3)).await;
            insert_rows(&db.pool, &queue, n).await?;
            (relay, Some(Instant::now()))
        }
    };
    // The clock runs from the commit of a burst, or for a backlog from the first rows seen
    // in the queue (the process start, connections and leadership are not throughput), to
    // the last row.
    let launched = Instant::now();
    let consumed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reader = if consume {
        let mut deliveries = no_ack_consumer(conn, &queue).await?;
        let consumed = consumed.clone();
        Some(tokio::spawn(async move {
            while let Some(Ok(_)) = deliveries.next().await {
                consumed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }))
    } else {
        None
    };
    let mut first: Option<(Instant, usize)> = None;
    let mut peak = 0.0f64;
    loop {
        let done = if consume {
            consumed.load(std::sync::atomic::Ordering::Relaxed)
        } else {
            queue_depth(&channel, &queue).await? as usize
        };
        if done > 0 && first.is_none() {
            first = Some((Instant::now(), done));
        }
        if done >= n {
            break;
        }
        peak = peak.max(relay.memory_mib("VmHWM:"));
        anyhow::ensure!(
            launched.elapsed() < Duration::from_secs(1200),
            "drain took over 20 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (t0, d0) = committed
        .map(|at| (at, 0))
        .or(first)
        .unwrap_or((launched, 0));
    let rate = (n - d0) as f64 / t0.elapsed().as_secs_f64();
    peak = peak.max(relay.memory_mib("VmHWM:"));
    let cpu = relay.cpu_seconds();
    drop(relay);
    if let Some(reader) = reader {
        reader.abort();
    }
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    db.drop().await?;
    Ok(Drain {
        rate,
        peak_rss_mib: peak,
        cpu_s_per_10k: cpu / n as f64 * 10_000.0,
    })
}

/// Commits `n` rows for `queue` over `KEYS` ordering keys in one transaction.
async fn insert_rows(pool: &PgPool, queue: &str, n: usize) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO outbox (routing_key, ordering_key, payload)
         SELECT $1, 'key-' || (i % $2), $3::jsonb FROM generate_series(1, $4) i",
    )
    .bind(queue)
    .bind(KEYS as i64)
    .bind(payload())
    .bind(n as i64)
    .execute(pool)
    .await?;
    Ok(())
}

/// Statistics as autovacuum would leave them for what the table holds now.
async fn analyze(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query("VACUUM ANALYZE outbox").execute(pool).await?;
    Ok(())
}

/// Percentiles of a sample, in milliseconds.
struct Percentiles(Vec<f64>);

impl Percentiles {
    fn new(mut seconds: Vec<f64>) -> Self {
        seconds.sort_by(f64::total_cmp);
        Percentiles(seconds)
    }

    fn at(&self, q: f64) -> f64 {
        let i = ((self.0.len() as f64 * q).ceil() as usize).clamp(1, self.0.len().max(1)) - 1;
        self.0.get(i).map_or(f64::NAN, |s| s * 1000.0)
    }

    fn figures(&self, name: &'static str) -> Vec<(&'static str, f64)> {
        let label = |q: &str| -> &'static str { format!("{name}_{q}").leak() };
        vec![
            (label("p50"), self.at(0.50)),
            (label("p99"), self.at(0.99)),
            (label("p99_9"), self.at(0.999)),
        ]
    }
}

/// What the in-process relay records in `outbox_publish_latency_seconds` (confirm time minus
/// the row's `created_at`), with the wall-clock time it was recorded: the confirm's.
static CONFIRMS: std::sync::Mutex<Vec<(f64, f64)>> = std::sync::Mutex::new(Vec::new());

/// Seconds since the Unix epoch.
fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// A metrics recorder that keeps every publish latency and ignores the rest.
struct ConfirmRecorder;

struct ConfirmHistogram;

impl metrics::HistogramFn for ConfirmHistogram {
    fn record(&self, value: f64) {
        CONFIRMS
            .lock()
            .expect("confirms")
            .push((epoch_now(), value));
    }
}

impl metrics::Recorder for ConfirmRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        if key.name() == outbox::metrics::PUBLISH_LATENCY {
            metrics::Histogram::from_arc(Arc::new(ConfirmHistogram))
        } else {
            metrics::Histogram::noop()
        }
    }
}

struct Latency {
    achieved: f64,
    commit_to_consumer: Percentiles,
    commit_to_confirm: Percentiles,
}

/// lapin alone publishing the relay's messages one by one at `rate` msgs/s to a classic
/// queue for as many messages as [`live_latency`] writes: publish-to-confirm latency, the
/// broker's part of insert-to-confirm.
async fn raw_confirm_latency(conn: &Connection, rate: usize) -> anyhow::Result<Percentiles> {
    let channel = conn.create_channel().await?;
    let queue = declare(&channel, QueueKind::Classic).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let body = payload();
    let mut confirms = FuturesUnordered::new();
    let mut latencies = Vec::new();
    let start = tokio::time::Instant::now();
    for i in 0..live_rows(rate) {
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => break,
                Some(done) = confirms.next(), if !confirms.is_empty() => latencies.push(done?),
            }
        }
        let (channel, queue, body) = (channel.clone(), queue.clone(), body.as_bytes());
        let props = Messages::Relay.properties(i);
        confirms.push(async move {
            let sent = Instant::now();
            publish_confirmed(&channel, &queue, body, props).await?;
            anyhow::Ok(sent.elapsed().as_secs_f64())
        });
    }
    while let Some(done) = confirms.next().await {
        latencies.push(done?);
    }
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(Percentiles::new(latencies))
}

/// Rows written per live-latency run: about 8 seconds' worth.
fn live_rows(rate: usize) -> usize {
    (rate * 8).clamp(1000, 40_000)
}

/// Single-row transactions at `rate` rows/s for a few seconds, relayed by an in-process
/// relay (default settings) to a classic queue read by a plain consumer.
async fn live_latency(
    pg: &str,
    amqp: &str,
    conn: &Connection,
    rate: usize,
) -> anyhow::Result<Latency> {
    static RECORDER: std::sync::Once = std::sync::Once::new();
    RECORDER.call_once(|| {
        let _ = metrics::set_global_recorder(ConfirmRecorder);
    });
    let db = BenchDb::create(pg).await?;
    let channel = conn.create_channel().await?;
    let queue = declare(&channel, QueueKind::Classic).await?;
    let received = Arc::new(std::sync::Mutex::new(Vec::<(String, Instant)>::new()));
    let mut deliveries = no_ack_consumer(conn, &queue).await?;
    let reader = tokio::spawn({
        let received = received.clone();
        async move {
            while let Some(Ok(d)) = deliveries.next().await {
                let id = d.properties.message_id().as_ref().map(|s| s.to_string());
                received
                    .lock()
                    .expect("received")
                    .push((id.unwrap_or_default(), Instant::now()));
            }
        }
    });

    let store = outbox::store::postgres::PgStore::connect_lazy(
        &db.url,
        outbox::StoreOptions::new(Default::default()),
    )?;
    let mut config = outbox::config::RelayConfig::new(vec![amqp.to_owned()]);
    config.http_addr = None;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let health = Arc::new(outbox::Health::default());
    let relay = tokio::spawn(outbox::relay::run(
        store,
        config,
        health.clone(),
        shutdown.clone(),
    ));
    while health.snapshot().status != "ready" {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Steady state: the first rows go through before the clock starts.
    let writers = sqlx::postgres::PgPoolOptions::new()
        .max_connections(64)
        .connect(&db.url)
        .await?;
    for _ in 0..100 {
        sqlx::query("INSERT INTO outbox (routing_key, payload) VALUES ($1, '{}')")
            .bind(&queue)
            .execute(&writers)
            .await?;
    }
    while received.lock().expect("received").len() < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    received.lock().expect("received").clear();
    CONFIRMS.lock().expect("confirms").clear();

    let total = live_rows(rate);
    // Per row: message id, commit instant, created_at in µs, commit wall-clock time.
    type Committed = (String, Instant, i64, f64);
    let committed = Arc::new(std::sync::Mutex::new(Vec::<Committed>::with_capacity(
        total,
    )));
    let body = payload();
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate as f64)).await;
        let (writers, committed, queue, body) = (
            writers.clone(),
            committed.clone(),
            queue.clone(),
            body.clone(),
        );
        tasks.spawn(async move {
            let mut tx = writers.begin().await?;
            let (id, created_us): (String, i64) = sqlx::query_as(
                "INSERT INTO outbox (routing_key, ordering_key, payload)
                 VALUES ($1, $2, $3::jsonb)
                 RETURNING message_id::text, (extract(epoch FROM created_at) * 1000000)::bigint",
            )
            .bind(&queue)
            .bind(format!("key-{}", i % KEYS))
            .bind(&body)
            .fetch_one(&mut *tx)
            .await?;
            tx.commit().await?;
            committed.lock().expect("committed").push((
                id,
                Instant::now(),
                created_us,
                epoch_now(),
            ));
            anyhow::Ok(())
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.lock().expect("received").len() < total {
        anyhow::ensure!(
            Instant::now() < deadline,
            "not every row reached the consumer"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A confirm can come after the delivery.
    while CONFIRMS.lock().expect("confirms").len() < total {
        anyhow::ensure!(Instant::now() < deadline, "not every row was confirmed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    relay.await?;
    reader.abort();
    let committed = std::mem::take(&mut *committed.lock().expect("committed"));
    // The relay reports a confirm as its latency from the row's created_at; the recorder
    // reads the clock a moment after the relay did, so confirm time minus latency is the
    // row's created_at or a little later: the latest row created up to then (within 1 ms)
    // is the one.
    let by_created: std::collections::BTreeMap<i64, f64> = committed
        .iter()
        .map(|(_, _, created_us, commit)| (*created_us, *commit))
        .collect();
    let commit_to_confirm: Vec<f64> = std::mem::take(&mut *CONFIRMS.lock().expect("confirms"))
        .into_iter()
        .filter_map(|(confirmed, latency)| {
            let created_us = ((confirmed - latency) * 1e6).round() as i64;
            by_created
                .range(created_us - 1000..=created_us + 1)
                .next_back()
                .map(|(_, commit)| (confirmed - commit).max(0.0))
        })
        .collect();
    anyhow::ensure!(
        commit_to_confirm.len() >= total,
        "only {} of {total} confirms matched their rows",
        commit_to_confirm.len()
    );
    let at: std::collections::HashMap<String, Instant> = committed
        .into_iter()
        .map(|(id, at, _, _)| (id, at))
        .collect();
    let commit_to_consumer = received
        .lock()
        .expect("received")
        .iter()
        .filter_map(|(id, got)| {
            at.get(id)
                .map(|c| got.saturating_duration_since(*c).as_secs_f64())
        })
        .collect();
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    writers.close().await;
    db.drop().await?;
    Ok(Latency {
        achieved,
        commit_to_consumer: Percentiles::new(commit_to_consumer),
        commit_to_confirm: Percentiles::new(commit_to_confirm),
    })
}

struct Idle {
    rss_mib: f64,
    queries_per_s: f64,
}

/// A relay leading an empty table: its resident memory, and the transactions its database
/// counts per second (every query the relay sends outside a transaction is one).
async fn idle_relay(pg: &str, amqp: &str, relay_bin: &std::path::Path) -> anyhow::Result<Idle> {
    let db = BenchDb::create(pg).await?;
    let relay = RelayProcess::start(relay_bin, &db.url, amqp, &[])?;
    let admin = PgPool::connect(&format!("{pg}/postgres")).await?;
    let transactions = || async {
        // The statistics of other sessions are read as of the last flush (at most 1 s old
        // while busy, 10 s when idle): the window below is long enough for that to cancel.
        sqlx::query_scalar::<_, i64>(
            "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = $1",
        )
        .bind(&db.name)
        .fetch_one(&admin)
        .await
    };
    tokio::time::sleep(Duration::from_secs(15)).await;
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&admin)
        .await?;
    let (before, t0) = (transactions().await?, Instant::now());
    tokio::time::sleep(Duration::from_secs(40)).await;
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&admin)
        .await?;
    let after = transactions().await?;
    let queries_per_s = (after - before) as f64 / t0.elapsed().as_secs_f64();
    let rss_mib = relay.memory_mib("VmRSS:");
    drop(relay);
    admin.close().await;
    db.drop().await?;
    Ok(Idle {
        rss_mib,
        queries_per_s,
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
            outbox::StoreOptions::new(Default::default()),
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
    fn start(
        bin: &std::path::Path,
        db: &str,
        amqp: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let child = Command::new(bin)
            .arg("relay")
            .env("DATABASE_URL", db)
            .env("AMQP_URL", amqp)
            .env("OUTBOX_HTTP_ADDR", "")
            .env("OUTBOX_MAX_IN_FLIGHT", WINDOW.to_string())
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()?;
        Ok(RelayProcess(child))
    }

    /// A memory figure of `/proc/PID/status` (`VmHWM:` peak, `VmRSS:` now).
    fn memory_mib(&self, field: &str) -> f64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// User and system CPU time used so far.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces): utime and stime are the
        // 12th and 13th, in clock ticks (100 per second on Linux).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (ticks(11) + ticks(12)) / 100.0
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
            println!("{:<66} figures", "scenario");
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
            println!("{scenario:<66} {}", text.join("  "));
        }
    }
}
