//! Run with: `cargo run --release --example bench [-- --rows 100000 --json --only NAME --backend postgres|mysql|both --queue classic|quorum|both]`
//!
//! Figures for the relay against the broker's own ceiling, measured in the same run on the
//! local RabbitMQ (`AMQP_URL`), PostgreSQL (`BENCH_PG`) and MySQL or MariaDB (`BENCH_MYSQL`,
//! default `mysql://root@127.0.0.1:3306`). Each run of a scenario has a database of its own,
//! created, migrated by the store and dropped after. `--backend` (default `both`) chooses the
//! databases: every scenario but `scale` and `inbox` (PostgreSQL only) runs on each of them,
//! and prints a row per backend next to each other (`backend` in `--json`; `lapin` for the
//! broker alone), with its targets and whether they were met. Scenarios (`--only` runs those
//! whose name contains NAME):
//! - `raw`: lapin alone publishing with confirms, same window: bare messages (a short id), and
//!   the relay's own messages (same body, the contract's properties): the ceiling;
//! - `drain`: committed rows drained by the real `outbox relay` binary (release) into a
//!   classic and a quorum queue: rows/s, ratio to the ceiling, peak RSS, CPU per 10k rows,
//!   the share of the time the window was full (the relay waiting on the broker), and the
//!   cores the broker, the database server and the relay kept busy meanwhile (the ceiling
//!   shows the broker's alone), then the ceiling again beside threads spinning for the
//!   cores the database, and the database and relay beyond lapin's own, used in the drains
//!   (what lapin alone reaches with that much work beside it); a backlog committed before
//!   the relay starts (timed from the first row in the queue), and bursts committed while
//!   it idles (timed from the commit; on MySQL, which has no notifications, the bench then
//!   posts to the relay's `/wake` as a service there would, and the `quiet` scenario times
//!   the wait without it).
//!   Target: ratio >= 0.8;
//! - `latency`: single-row transactions at 100, 1,000 and 5,000 rows/s: commit-to-confirm and
//!   commit-to-consumer percentiles, and lapin's own publish-to-confirm at the same rate.
//!   Targets, commit-to-consumer p99: PostgreSQL 10 ms at 100 rows/s and 25 ms at 1,000;
//!   MySQL 25 ms at 100 rows/s;
//! - `idle`: an idle relay's RSS and database queries per second: on PostgreSQL the
//!   database's transactions (`pg_stat_database`), on MySQL the server's `Questions` less the
//!   bench's own reads of it, so every other client of that server counts too (run it on a
//!   quiet server; a warning names other sessions). Targets: 16 MiB, 1 query/s;
//! - `quiet`: the relay idle for a minute (`--quiet-secs`), then one row committed: how long
//!   until a consumer has it. Target: within `OUTBOX_POLL_INTERVAL`;
//! - `inbox` (PostgreSQL): the inbox consumer with exactly-once effects against a plain
//!   consumer;
//! - `scale` (PostgreSQL): the drain with a 1M-row backlog, and with 10M sent rows kept in
//!   the table;
//! - `big` (PostgreSQL, run only by `--only big`): a backlog of 10,000 rows of 1 MiB (`--rows`
//!   sets the count) under the default `OUTBOX_MAX_IN_FLIGHT_BYTES`, emptied by a consumer:
//!   the relay's peak RSS. Target: 64 MiB plus that bound.

use std::collections::BTreeMap;
use std::path::PathBuf;
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
use outbox::store::mysql::{MyStore, connect_options};
use outbox::store::postgres::PgStore;
use sqlx::mysql::{MySqlConnection, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Connection as _, Row};
use tokio::sync::Semaphore;

/// Unconfirmed publishes at most, for the raw publisher and the relay alike.
const WINDOW: usize = 1000;
/// Distinct ordering keys in the backlog.
const KEYS: usize = 1000;
/// The label of rows measuring the broker alone.
const LAPIN: &str = "lapin";

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

/// The database a scenario runs on.
#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Postgres,
    Mysql,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Mysql => "mysql",
        }
    }

    /// The command names of its server's processes.
    fn commands(self) -> &'static [&'static str] {
        match self {
            Backend::Postgres => &["postgres"],
            Backend::Mysql => &["mariadbd", "mysqld"],
        }
    }
}

/// A database server the bench creates its databases on.
#[derive(Clone)]
struct Server {
    backend: Backend,
    /// Its URL without a database name.
    url: String,
}

struct Args {
    rows: usize,
    /// Rounds of (ceiling, drain) per queue kind; medians are reported.
    rounds: usize,
    json: bool,
    /// Run only the scenarios whose name contains this.
    only: Option<String>,
    /// The databases to run on.
    backends: Vec<Backend>,
    /// How long the relay idles before the quiet scenario's row.
    quiet: Duration,
    /// The queue kinds the drains run on.
    queues: Vec<QueueKind>,
}

impl Args {
    /// `--rows` unless given.
    const DEFAULT_ROWS: usize = 100_000;
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        rows: Args::DEFAULT_ROWS,
        rounds: 3,
        json: false,
        only: None,
        backends: vec![Backend::Postgres, Backend::Mysql],
        quiet: Duration::from_secs(60),
        queues: vec![QueueKind::Classic, QueueKind::Quorum],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--rows" => a.rows = it.next().context("--rows needs a number")?.parse()?,
            "--rounds" => a.rounds = it.next().context("--rounds needs a number")?.parse()?,
            "--json" => a.json = true,
            "--only" => a.only = Some(it.next().context("--only needs a scenario name")?),
            "--backend" => {
                a.backends = match it.next().as_deref() {
                    Some("postgres") => vec![Backend::Postgres],
                    Some("mysql") => vec![Backend::Mysql],
                    Some("both") => vec![Backend::Postgres, Backend::Mysql],
                    other => bail!("--backend needs postgres, mysql or both, not {other:?}"),
                }
            }
            "--queue" => {
                a.queues = match it.next().as_deref() {
                    Some("classic") => vec![QueueKind::Classic],
                    Some("quorum") => vec![QueueKind::Quorum],
                    Some("both") => vec![QueueKind::Classic, QueueKind::Quorum],
                    other => bail!("--queue needs classic, quorum or both, not {other:?}"),
                }
            }
            "--quiet-secs" => {
                let secs = it.next().context("--quiet-secs needs a number")?.parse()?;
                a.quiet = Duration::from_secs(secs);
            }
            other => bail!(
                "unknown argument {other:?} (expected --rows N, --rounds N, --json, \
                 --only raw|drain|scale|latency|idle|quiet|inbox|telemetry|big, \
                 --backend postgres|mysql|both, --queue classic|quorum|both, --quiet-secs N)"
            ),
        }
    }
    Ok(a)
}

/// What every scenario shares.
struct Bench {
    args: Args,
    /// The database servers chosen by `--backend`, in that order.
    servers: Vec<Server>,
    amqp: String,
    /// The bench's own broker connection (ceilings, queues, consumers).
    conn: Connection,
    /// The release `outbox` binary.
    relay_bin: PathBuf,
}

impl Bench {
    fn wanted(&self, name: &str) -> bool {
        self.args
            .only
            .as_deref()
            .is_none_or(|only| name.contains(only))
    }

    fn postgres(&self) -> Option<&Server> {
        self.servers.iter().find(|s| s.backend == Backend::Postgres)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let servers = args
        .backends
        .iter()
        .map(|&backend| Server {
            backend,
            url: match backend {
                Backend::Postgres => env("BENCH_PG", "postgres://postgres@127.0.0.1:5432"),
                Backend::Mysql => env("BENCH_MYSQL", "mysql://root@127.0.0.1:3306"),
            },
        })
        .collect();
    let amqp = env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
    let relay_bin = build_relay()?;
    let conn = Connection::connect(&amqp, ConnectionProperties::default())
        .await
        .context("RabbitMQ (start it with scripts/services.sh)")?;
    let b = Bench {
        args,
        servers,
        amqp,
        conn,
        relay_bin,
    };
    let mut report = Report::new(b.args.json);
    if b.wanted("raw") || b.wanted("drain") {
        drains(&b, &mut report).await?;
    }
    if b.wanted("latency") {
        latencies(&b, &mut report).await?;
    }
    if b.wanted("idle") {
        for server in &b.servers {
            let idle = idle_relay(&b, server, &[]).await?;
            report.row(
                "idle relay",
                server.backend.name(),
                &[
                    ("rss_mib", idle.rss_mib),
                    ("db_queries_per_s", idle.queries_per_s),
                ],
                &[
                    Target::at_most("rss_mib", 16.0),
                    Target::at_most("db_queries_per_s", 1.0),
                ],
            );
        }
    }
    if b.wanted("quiet") {
        quiets(&b, &mut report).await?;
    }
    let Some(pg) = b.postgres() else {
        if b.wanted("inbox") || b.wanted("scale") {
            eprintln!("the inbox and scale scenarios run on PostgreSQL only: skipped");
        }
        return Ok(());
    };
    if b.wanted("telemetry") {
        telemetry_cost(&b, pg, &mut report).await?;
    }
    // Ten gigabytes through the broker: only when asked for by name.
    if b.args.only.as_deref() == Some("big") {
        big_rows(&b, pg, &mut report).await?;
    }
    if b.wanted("inbox") {
        let inbox_rows = b.args.rows.min(20_000);
        let (inbox, plain) = inbox_consumer(&b, pg, inbox_rows).await?;
        report.row(
            &format!("inbox consumer, {inbox_rows} messages, exactly-once effects"),
            pg.backend.name(),
            &[
                ("msgs_per_s", inbox),
                ("plain_ack_msgs_per_s", plain),
                ("ratio_to_plain", inbox / plain),
            ],
            &[],
        );
    }
    // Last: its 10M-row table leaves the disk busy (checkpoint, dropped database) for a
    // while, which would show in the latency percentiles.
    if b.wanted("scale") {
        scale(&b, pg, &mut report).await?;
    }
    Ok(())
}

/// One backend's drains over the rounds, each divided by its round's ceiling.
#[derive(Default)]
struct DrainRuns {
    drains: Vec<Drain>,
    /// Backlog drains.
    ratios: Vec<f64>,
    /// Bursts into a table analyzed empty, and analyzed with a burst: their ratios, and
    /// their times from the commit to the first row in the queue.
    bursts: [(Vec<f64>, Vec<f64>); 2],
}

impl DrainRuns {
    /// The median of one figure of the backlog drains.
    fn median(&self, figure: impl Fn(&Drain) -> f64) -> f64 {
        median(&self.drains.iter().map(figure).collect::<Vec<_>>())
    }

    /// A backlog and the two bursts on `server`, against the ceiling `raw`.
    async fn round(
        &mut self,
        b: &Bench,
        server: &Server,
        kind: QueueKind,
        raw: f64,
    ) -> anyhow::Result<()> {
        let n = b.args.rows;
        let drain = backlog_drain(b, server, Backlog::new(kind, n)).await?;
        self.ratios.push(drain.rate / raw);
        self.drains.push(drain);
        let stats = [Stats::Empty, Stats::Burst];
        for (stats, (ratios, first)) in stats.into_iter().zip(&mut self.bursts) {
            let burst = Backlog {
                arrival: Arrival::Burst(stats),
                ..Backlog::new(kind, n)
            };
            let drain = backlog_drain(b, server, burst).await?;
            ratios.push(drain.rate / raw);
            first.extend(drain.commit_to_first_row_ms);
        }
        Ok(())
    }
}

/// The ceiling again, with threads spinning beside it for the CPU that a backend's backlog
/// drains used on top of the ceiling's own (the broker aside): first its database server's
/// alone, which any relay adds, then with the relay's beyond what lapin spends to publish
/// the same rows (`publisher_cpu`, seconds per message). On a machine where the broker
/// shares its cores, this is what lapin alone reaches with that much work beside it.
async fn loaded_ceilings(
    b: &Bench,
    kind: QueueKind,
    server: &Server,
    runs: &DrainRuns,
    raw: f64,
    publisher_cpu: f64,
    report: &mut Report,
) -> anyhow::Result<()> {
    let database = runs.median(|d| d.cores.database);
    let relay_beyond_lapin = runs.median(|d| (d.cores.relay - publisher_cpu * d.rate).max(0.0));
    let drain = runs.median(|d| d.rate);
    let loads = [
        ("the database's", database),
        (
            "the database's and the relay's beyond lapin's own",
            database + relay_beyond_lapin,
        ),
    ];
    for (whose, cores) in loads {
        let mut rates = Vec::new();
        for _ in 0..b.args.rounds {
            let _load = Load::start(cores);
            rates.push(raw_ceiling(&b.conn, kind, b.args.rows, Messages::Relay).await?);
        }
        let loaded = median(&rates);
        report.row(
            &format!(
                "raw ceiling beside a spinning load of {whose} cores in the drains, {} queue",
                kind.name()
            ),
            server.backend.name(),
            &[
                ("load_cores", cores),
                ("msgs_per_s", loaded),
                ("ratio_to_raw", loaded / raw),
                ("drain_ratio_to_it", drain / loaded),
            ],
            &[],
        );
    }
    Ok(())
}

/// Threads that keep `cores` of the machine busy until dropped, each spinning for its share
/// of every 10 ms and sleeping the rest, none above half a core (as the processes of a
/// database server and a relay would): CPU taken from the broker, without their work.
struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    const PERIOD: Duration = Duration::from_millis(10);

    fn start(cores: f64) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let n = (cores / 0.5).ceil().max(0.0) as usize;
        let busy = Load::PERIOD.mul_f64(cores / n.max(1) as f64);
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let started = Instant::now();
                        while started.elapsed() < busy {
                            std::hint::spin_loop();
                        }
                        std::thread::sleep(Load::PERIOD.saturating_sub(busy));
                    }
                })
            })
            .collect();
        Load { stop, threads }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The median ratio of some rounds, with the lowest and the highest.
fn ratio_spread(ratios: &[f64]) -> [(&'static str, f64); 3] {
    [
        ("ratio_to_raw", median(ratios)),
        ("ratio_min", ratios.iter().copied().fold(f64::MAX, f64::min)),
        ("ratio_max", ratios.iter().copied().fold(0.0, f64::max)),
    ]
}

/// The ceilings, and the drains on every backend against them.
async fn drains(b: &Bench, report: &mut Report) -> anyhow::Result<()> {
    let n = b.args.rows;
    let drain_target = Target::at_least("ratio_to_raw", 0.8);
    for &kind in &b.args.queues {
        let bare = raw_ceiling(&b.conn, kind, n, Messages::Bare).await?;
        report.row(
            &format!("raw ceiling, bare messages, {} queue", kind.name()),
            LAPIN,
            &[("msgs_per_s", bare)],
            &[],
        );
        // Rounds of (ceiling, drains): each drain against the ceiling measured next to it,
        // the median of the rounds reported, as this machine's speed drifts.
        let mut raws = Vec::new();
        let mut runs: Vec<DrainRuns> = b.servers.iter().map(|_| DrainRuns::default()).collect();
        let mut ceiling_cores = Vec::new();
        // The publisher's own CPU seconds per message (this process, lapin alone).
        let mut publisher_cpu = Vec::new();
        for _ in 0..b.args.rounds {
            let busy = Busy::start(&[]);
            let own = own_cpu_seconds();
            let raw = raw_ceiling(&b.conn, kind, n, Messages::Relay).await?;
            publisher_cpu.push((own_cpu_seconds() - own) / n as f64);
            ceiling_cores.push(busy.cores());
            raws.push(raw);
            if b.wanted("drain") {
                for (server, runs) in b.servers.iter().zip(&mut runs) {
                    runs.round(b, server, kind, raw).await?;
                }
            }
        }
        let raw = median(&raws);
        report.row(
            &format!("raw ceiling, the relay's messages, {} queue", kind.name()),
            LAPIN,
            &[
                ("msgs_per_s", raw),
                ("ratio_to_bare", raw / bare),
                Cores::medians(ceiling_cores)[0],
            ],
            &[],
        );
        if !b.wanted("drain") {
            continue;
        }
        for (server, runs) in b.servers.iter().zip(&runs) {
            let peak = runs
                .drains
                .iter()
                .map(|d| d.peak_rss_mib)
                .fold(0.0, f64::max);
            let mut figures = vec![("rows_per_s", runs.median(|d| d.rate))];
            figures.extend(ratio_spread(&runs.ratios));
            figures.push(("relay_peak_rss_mib", peak));
            figures.push(("relay_cpu_s_per_10k_rows", runs.median(|d| d.cpu_s_per_10k)));
            figures.push(("window_full", runs.median(|d| d.window_full)));
            figures.extend(Cores::medians(runs.drains.iter().map(|d| d.cores)));
            report.row(
                &format!("backlog drain {n} rows, {} queue", kind.name()),
                server.backend.name(),
                &figures,
                &[drain_target, Target::at_most("relay_peak_rss_mib", 64.0)],
            );
        }
        for (server, runs) in b.servers.iter().zip(&runs) {
            loaded_ceilings(b, kind, server, runs, raw, median(&publisher_cpu), report).await?;
        }
        for (i, stats) in [Stats::Empty, Stats::Burst].into_iter().enumerate() {
            for (server, runs) in b.servers.iter().zip(&runs) {
                let (ratios, first) = &runs.bursts[i];
                let mut figures = ratio_spread(ratios).to_vec();
                figures.push(("commit_to_first_row_ms", median(first)));
                report.row(
                    &format!(
                        "burst of {n} rows timed from its commit, {}, {} queue",
                        stats.name(),
                        kind.name()
                    ),
                    server.backend.name(),
                    &figures,
                    &[drain_target],
                );
            }
        }
    }
    Ok(())
}

/// Live latency at each rate: lapin alone, then every backend.
async fn latencies(b: &Bench, report: &mut Report) -> anyhow::Result<()> {
    for rate in [100, 1000, 5000] {
        let scenario = format!("live latency at {rate} rows/s (ms)");
        let raw = raw_confirm_latency(&b.conn, rate).await?;
        report.row(
            &scenario,
            LAPIN,
            &raw.figures("raw_publish_to_confirm"),
            &[],
        );
        for server in &b.servers {
            let l = live_latency(b, server, rate).await?;
            let mut figures = vec![
                ("offered_rows_per_s", rate as f64),
                ("achieved_rows_per_s", l.achieved),
            ];
            figures.extend(l.commit_to_consumer.figures("commit_to_consumer"));
            figures.extend(l.commit_to_confirm.figures("commit_to_confirm"));
            let p99 = match (server.backend, rate) {
                (Backend::Postgres, 100) => Some(10.0),
                (Backend::Postgres, 1000) | (Backend::Mysql, 100) => Some(25.0),
                _ => None,
            };
            let targets: Vec<Target> = p99
                .map(|ms| Target::at_most("commit_to_consumer_p99", ms))
                .into_iter()
                .collect();
            report.row(&scenario, server.backend.name(), &figures, &targets);
        }
    }
    Ok(())
}

/// The quiet minute on every backend.
async fn quiets(b: &Bench, report: &mut Report) -> anyhow::Result<()> {
    // What the relay processes run with: the default, unless this environment sets it.
    let default = outbox::config::RelayConfig::new(vec![]).poll_interval;
    let poll = match std::env::var("OUTBOX_POLL_INTERVAL") {
        Ok(v) => humantime::parse_duration(&v).context("OUTBOX_POLL_INTERVAL")?,
        Err(_) => default,
    };
    let poll_ms = poll.as_secs_f64() * 1000.0;
    for server in &b.servers {
        let waited = quiet_minute(b, server, poll).await?;
        report.row(
            &format!(
                "quiet: relay idle {} s, then one row: commit to consumer (ms)",
                b.args.quiet.as_secs()
            ),
            server.backend.name(),
            &[
                ("commit_to_consumer_ms", waited.as_secs_f64() * 1000.0),
                ("poll_interval_ms", poll_ms),
            ],
            &[Target::at_most("commit_to_consumer_ms", poll_ms)],
        );
    }
    Ok(())
}

/// PostgreSQL only: a 1M-row backlog, and a drain beside 10M sent rows, each against a base.
async fn scale(b: &Bench, pg: &Server, report: &mut Report) -> anyhow::Result<()> {
    let n = b.args.rows;
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
        let base = backlog_drain(b, pg, base).await?;
        let drain = backlog_drain(b, pg, big).await?;
        let name = if sent == 0 {
            format!("scale: backlog drain {rows} rows, classic queue")
        } else {
            format!("scale: drain {rows} rows with {sent} sent rows kept, classic queue")
        };
        report.row(
            &name,
            pg.backend.name(),
            &[
                ("rows_per_s", drain.rate),
                ("base_rows_per_s", base.rate),
                ("ratio_to_base", drain.rate / base.rate),
                ("relay_peak_rss_mib", drain.peak_rss_mib),
                ("relay_cpu_s_per_10k_rows", drain.cpu_s_per_10k),
            ],
            &[Target::at_least("ratio_to_base", 0.9)],
        );
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
async fn inbox_consumer(b: &Bench, pg: &Server, n: usize) -> anyhow::Result<(f64, f64)> {
    let conn = &b.conn;
    let db = BenchDb::create(pg).await?;
    let pool = db.pg()?.clone();
    sqlx::query("CREATE TABLE effects (message_id TEXT NOT NULL)")
        .execute(&pool)
        .await?;
    let queue = format!("bench-inbox-{}", uuid::Uuid::new_v4().simple());
    let config = outbox::inbox::ConsumerConfig::new(vec![b.amqp.clone()], "bench", queue.clone());
    // Let the consumer declare its queue, then fill it while nobody consumes.
    let stop = tokio_util::sync::CancellationToken::new();
    let first = tokio::spawn(outbox::inbox::consume(
        pool.clone(),
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
        pool.clone(),
        config.clone(),
        OneRow,
        stop.clone(),
    ));
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
            .fetch_one(&pool)
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
                payload(256).as_bytes(),
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
fn build_relay() -> anyhow::Result<PathBuf> {
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

/// A JSON body of `bytes` bytes (at least 24).
fn payload(bytes: usize) -> String {
    let body = format!("{{\"order_id\":42,\"pad\":\"{}\"}}", "x".repeat(bytes - 24));
    assert_eq!(body.len(), bytes);
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
    let body = payload(256);
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
    /// The cores the broker, the database server and the relay kept busy while timed.
    cores: Cores,
    /// The share of the looks (every 50 ms or so) that saw at least 90% of the window
    /// published and awaiting its confirm: the relay was waiting on the broker.
    window_full: f64,
    /// For a burst: from its commit to the first of its rows seen in the queue (looked at
    /// every 50 ms or so), which is how long the relay took to notice it.
    commit_to_first_row_ms: Option<f64>,
}

/// The cores the broker, the database server and the relay kept busy over some time.
#[derive(Clone, Copy, Default)]
struct Cores {
    broker: f64,
    database: f64,
    relay: f64,
}

impl Cores {
    /// The median of each, as figures.
    fn medians(all: impl IntoIterator<Item = Cores>) -> [(&'static str, f64); 3] {
        let all: Vec<Cores> = all.into_iter().collect();
        let of = |f: fn(&Cores) -> f64| median(&all.iter().map(f).collect::<Vec<_>>());
        [
            ("broker_cores", of(|c| c.broker)),
            ("database_cores", of(|c| c.database)),
            ("relay_cores", of(|c| c.relay)),
        ]
    }
}

/// The CPU time the broker, the database server and the relay have used since a start,
/// read off `/proc` by command name: a server's ended sessions count through their parent.
struct Busy {
    at: Instant,
    commands: [&'static [&'static str]; 3],
    cpu: [f64; 3],
}

impl Busy {
    /// From now, with the database server's `database` commands (none: no database).
    fn start(database: &'static [&'static str]) -> Self {
        let commands = [&["beam.smp"][..], database, &["outbox"][..]];
        Busy {
            at: Instant::now(),
            commands,
            cpu: commands.map(cpu_of_commands),
        }
    }

    fn cores(self) -> Cores {
        let secs = self.at.elapsed().as_secs_f64();
        let [broker, database, relay] =
            std::array::from_fn(|i| (cpu_of_commands(self.commands[i]) - self.cpu[i]) / secs);
        Cores {
            broker,
            database,
            relay,
        }
    }
}

/// The CPU seconds of every process running one of `commands`, with its reaped children.
fn cpu_of_commands(commands: &[&str]) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("stat")).ok())
        .filter_map(|stat| {
            let (head, _) = stat.rsplit_once(')')?;
            let (_, command) = head.split_once('(')?;
            commands
                .contains(&command)
                .then(|| stat_cpu_seconds(&stat, true))
        })
        .sum()
}

/// The CPU seconds this process has used.
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    stat_cpu_seconds(&stat, false)
}

/// User and system CPU seconds of a `/proc/PID/stat` line, and of the reaped children.
fn stat_cpu_seconds(stat: &str, children: bool) -> f64 {
    // Fields after the command name (which may hold spaces): utime, stime, cutime and
    // cstime are the 12th to 15th, in clock ticks (100 per second on Linux).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let own = ticks(11) + ticks(12);
    let reaped = if children { ticks(13) + ticks(14) } else { 0.0 };
    (own + reaped) / 100.0
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
    /// The relay exports its spans to an OTLP/HTTP receiver at this address.
    otlp: Option<std::net::SocketAddr>,
    /// The size of each row's JSON body.
    body_bytes: usize,
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
            otlp: None,
            body_bytes: 256,
        }
    }
}

/// A backlog drained by a fresh relay process on `server`.
async fn backlog_drain(b: &Bench, server: &Server, backlog: Backlog) -> anyhow::Result<Drain> {
    let conn = &b.conn;
    let Backlog {
        kind,
        arrival,
        rows: n,
        sent,
        keep,
        consume,
        otlp,
        body_bytes,
    } = backlog;
    let body = payload(body_bytes);
    let db = BenchDb::create(server).await?;
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
        .execute(db.pg()?)
        .await?;
    }
    let retention = if keep { "7d" } else { "0s" };
    // Its `/metrics` say how full the window is. MySQL has no notifications: a service
    // there nudges its sidecar after committing, as the operations guide says (`POST
    // /wake`), or the relay finds a burst at its next look.
    let http = free_local_addr()?;
    let wake = match (arrival, server.backend) {
        (Arrival::Burst(_), Backend::Mysql) => Some(http),
        _ => None,
    };
    let start_relay = || {
        let endpoint = otlp.map(|addr| format!("http://{addr}"));
        let http = http.to_string();
        let mut env = vec![("OUTBOX_RETENTION", retention), ("OUTBOX_HTTP_ADDR", &http)];
        env.extend(
            endpoint
                .as_deref()
                .map(|e| ("OTEL_EXPORTER_OTLP_ENDPOINT", e)),
        );
        RelayProcess::start(&b.relay_bin, &db.url, &b.amqp, &env)
    };
    let (relay, committed) = match arrival {
        Arrival::Backlog => {
            db.pool.insert_rows(&queue, n, &body).await?;
            db.analyze().await?;
            (start_relay()?, None)
        }
        Arrival::Burst(stats) => {
            // An earlier burst, sent and deleted; the statistics taken while it was there,
            // or (as autovacuum leaves an outbox that deletes what it sends) once it was gone.
            db.pool.insert_rows(&queue, n, &body).await?;
            if stats == Stats::Burst {
                db.analyze().await?;
            }
            db.pool.execute("DELETE FROM outbox").await?;
            if stats == Stats::Empty {
                db.analyze().await?;
            }
            let relay = start_relay()?;
            // Connections and leadership are not throughput: the relay idles first.
            tokio::time::sleep(Duration::from_secs(3)).await;
            db.pool.insert_rows(&queue, n, &body).await?;
            let committed = Instant::now();
            if let Some(addr) = wake {
                post_wake(addr).await?;
            }
            (relay, Some(committed))
        }
    };
    let mut busy = committed.map(|_| Busy::start(server.backend.commands()));
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
    // Looks at the window while rows go through: how many had it (nearly) full.
    let (mut looks, mut full) = (0u32, 0u32);
    loop {
        let done = if consume {
            consumed.load(std::sync::atomic::Ordering::Relaxed)
        } else {
            queue_depth(&channel, &queue).await? as usize
        };
        if done > 0 && first.is_none() {
            first = Some((Instant::now(), done));
            busy.get_or_insert_with(|| Busy::start(server.backend.commands()));
        }
        if done >= n {
            break;
        }
        if first.is_some() {
            looks += 1;
            full += u32::from(unconfirmed(http).await? >= 0.9 * WINDOW as f64);
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
    let commit_to_first_row_ms = committed.zip(first).map(|(committed, (first, _))| {
        first.saturating_duration_since(committed).as_secs_f64() * 1000.0
    });
    peak = peak.max(relay.memory_mib("VmHWM:"));
    let cores = busy.map(Busy::cores).unwrap_or_default();
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
        cores,
        window_full: f64::from(full) / f64::from(looks.max(1)),
        commit_to_first_row_ms,
    })
}

/// An address on the loopback that was free a moment ago.
fn free_local_addr() -> anyhow::Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// `POST /wake` to a relay's HTTP address, as a service does after its commit: 204 expected.
async fn post_wake(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let answer = http_request(addr, "POST /wake").await?;
    anyhow::ensure!(
        answer.starts_with("HTTP/1.1 204"),
        "POST /wake answered {:?}",
        answer.lines().next()
    );
    Ok(())
}

/// The relay's `outbox_unconfirmed_publishes`.
async fn unconfirmed(addr: std::net::SocketAddr) -> anyhow::Result<f64> {
    let answer = http_request(addr, "GET /metrics").await?;
    answer
        .lines()
        .find_map(|l| l.strip_prefix("outbox_unconfirmed_publishes "))
        .and_then(|v| v.trim().parse().ok())
        .context("no outbox_unconfirmed_publishes in /metrics")
}

/// The whole answer of the relay at `addr` to `request` (method and path, no body),
/// within 2 s.
async fn http_request(addr: std::net::SocketAddr, request: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let head = format!(
            "{request} HTTP/1.1\r\nHost: relay\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        anyhow::Ok(answer)
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .with_context(|| format!("{request}: no answer within 2 s"))?
}

/// What exporting spans costs the relay: CPU per 10k rows of a classic backlog, its rate,
/// and idle memory, with no OTLP endpoint and with one (a sink that reads and drops).
async fn telemetry_cost(b: &Bench, server: &Server, report: &mut Report) -> anyhow::Result<()> {
    let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sink_addr = sink.local_addr()?;
    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| async move {
            count.fetch_add(body.len(), std::sync::atomic::Ordering::Relaxed);
        }),
    );
    let server_task = tokio::spawn(async move { axum::serve(sink, app).await });
    let rows = b.args.rows.min(20_000);
    for otlp in [None, Some(sink_addr)] {
        let drain = backlog_drain(
            b,
            server,
            Backlog {
                otlp,
                ..Backlog::new(QueueKind::Classic, rows)
            },
        )
        .await?;
        let endpoint = otlp.map(|addr| format!("http://{addr}"));
        let env: Vec<(&str, &str)> = endpoint
            .iter()
            .map(|e| ("OTEL_EXPORTER_OTLP_ENDPOINT", e.as_str()))
            .collect();
        let idle = idle_relay(b, server, &env).await?;
        let exported = received.swap(0, std::sync::atomic::Ordering::Relaxed);
        report.row(
            match otlp {
                None => "spans not exported (no OTLP endpoint)",
                Some(_) => "spans exported over OTLP/HTTP",
            },
            server.backend.name(),
            &[
                ("cpu_s_per_10k_rows", drain.cpu_s_per_10k),
                ("rows_per_s", drain.rate),
                ("idle_rss_mib", idle.rss_mib),
                ("otlp_bytes_per_row", exported as f64 / rows as f64),
            ],
            &[Target::at_most("idle_rss_mib", 16.0)],
        );
    }
    server_task.abort();
    Ok(())
}

/// A backlog of 1 MiB rows (`--rows`, 10,000 by default: 10 GiB) under the default
/// `OUTBOX_MAX_IN_FLIGHT_BYTES` (16 MiB), drained into a classic queue that a consumer empties:
/// the relay's peak RSS against its drain budget plus that bound.
async fn big_rows(b: &Bench, server: &Server, report: &mut Report) -> anyhow::Result<()> {
    const MIB: usize = 1024 * 1024;
    let bound_mib = outbox::config::RelayConfig::new(vec![]).max_in_flight_bytes / MIB;
    let rows = if b.args.rows == Args::DEFAULT_ROWS {
        10_000
    } else {
        b.args.rows
    };
    let backlog = Backlog {
        consume: true,
        body_bytes: MIB,
        ..Backlog::new(QueueKind::Classic, rows)
    };
    let drain = backlog_drain(b, server, backlog).await?;
    report.row(
        &format!("backlog of {rows} rows of 1 MiB, OUTBOX_MAX_IN_FLIGHT_BYTES {bound_mib} MiB"),
        server.backend.name(),
        &[
            ("rows_per_s", drain.rate),
            ("relay_peak_rss_mib", drain.peak_rss_mib),
        ],
        &[Target::at_most(
            "relay_peak_rss_mib",
            64.0 + bound_mib as f64,
        )],
    );
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
    let body = payload(256);
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
async fn live_latency(b: &Bench, server: &Server, rate: usize) -> anyhow::Result<Latency> {
    static RECORDER: std::sync::Once = std::sync::Once::new();
    RECORDER.call_once(|| {
        let _ = metrics::set_global_recorder(ConfirmRecorder);
    });
    let conn = &b.conn;
    let db = BenchDb::create(server).await?;
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

    let shutdown = tokio_util::sync::CancellationToken::new();
    let health = Arc::new(outbox::Health::default());
    let relay = db.spawn_relay(&b.amqp, health.clone(), shutdown.clone())?;
    while health.snapshot().status != "ready" {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Steady state: the first rows go through before the clock starts.
    let writers = Pool::connect(server.backend, &db.url, 64).await?;
    for i in 0..100 {
        writers
            .insert_one(&queue, &format!("key-{i}"), "{}")
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
    let body = payload(256);
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
            let key = format!("key-{}", i % KEYS);
            let (id, created_us) = writers.insert_one(&queue, &key, &body).await?;
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
    relay.await??;
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

/// A relay leading an empty table: its resident memory, and the statements its database
/// counts per second.
async fn idle_relay(b: &Bench, server: &Server, env: &[(&str, &str)]) -> anyhow::Result<Idle> {
    let db = BenchDb::create(server).await?;
    let relay = RelayProcess::start(&b.relay_bin, &db.url, &b.amqp, env)?;
    let mut counter = QueryCounter::open(&db).await?;
    // PostgreSQL's statistics of other sessions are read as of their last flush (at most 1 s
    // old while busy, 10 s when idle): the window below is long enough for that to cancel.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let (before, t0) = (counter.read().await?, Instant::now());
    tokio::time::sleep(Duration::from_secs(40)).await;
    let after = counter.read().await?;
    let queries_per_s = (after - before) as f64 / t0.elapsed().as_secs_f64();
    let rss_mib = relay.memory_mib("VmRSS:");
    counter.warn_of_others(&db.name).await?;
    drop(relay);
    db.drop().await?;
    Ok(Idle {
        rss_mib,
        queries_per_s,
    })
}

/// A relay idle for `--quiet-secs` after its last row, and a random part of `poll`, then one
/// row committed: how long until a consumer has it.
async fn quiet_minute(b: &Bench, server: &Server, poll: Duration) -> anyhow::Result<Duration> {
    let db = BenchDb::create(server).await?;
    let channel = b.conn.create_channel().await?;
    let queue = declare(&channel, QueueKind::Classic).await?;
    let mut deliveries = no_ack_consumer(&b.conn, &queue).await?;
    let relay = RelayProcess::start(&b.relay_bin, &db.url, &b.amqp, &[])?;
    // A first row through: the relay leads and has published once, then goes quiet.
    db.pool.insert_rows(&queue, 1, &payload(256)).await?;
    next_delivery(&mut deliveries, Duration::from_secs(60))
        .await
        .context("the first row")?;
    // At a random moment of the relay's cycle of looks: the first row's delivery may have
    // been timed by a look, and whole seconds later would then always land just after one.
    let phase = (uuid::Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0;
    tokio::time::sleep(b.args.quiet + poll.mul_f64(phase)).await;
    db.pool.insert_rows(&queue, 1, &payload(256)).await?;
    let committed = Instant::now();
    next_delivery(&mut deliveries, Duration::from_secs(30))
        .await
        .context("the row after the quiet")?;
    let waited = committed.elapsed();
    drop(relay);
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    db.drop().await?;
    Ok(waited)
}

/// Waits for the next delivery, `within` at most.
async fn next_delivery(deliveries: &mut lapin::Consumer, within: Duration) -> anyhow::Result<()> {
    tokio::time::timeout(within, deliveries.next())
        .await
        .context("no delivery in time")?
        .context("the consumer ended")??;
    Ok(())
}

/// A database of the benchmark's own, migrated.
struct BenchDb {
    server: Server,
    name: String,
    url: String,
    pool: Pool,
}

impl BenchDb {
    async fn create(server: &Server) -> anyhow::Result<Self> {
        let name = format!("outbox_bench_{}", uuid::Uuid::new_v4().simple());
        server.admin(format!("CREATE DATABASE {name}")).await?;
        let url = format!("{}/{name}", server.url);
        let pool = Pool::connect(server.backend, &url, 10).await?;
        pool.migrate().await?;
        Ok(BenchDb {
            server: server.clone(),
            name,
            url,
            pool,
        })
    }

    /// The pool, for the scenarios that run on PostgreSQL only.
    fn pg(&self) -> anyhow::Result<&PgPool> {
        match &self.pool {
            Pool::Pg(pool) => Ok(pool),
            Pool::My(_) => bail!("this scenario runs on PostgreSQL only"),
        }
    }

    /// Statistics as the server would keep them for what the table holds now (autovacuum on
    /// PostgreSQL, InnoDB's persistent statistics on MySQL).
    async fn analyze(&self) -> anyhow::Result<()> {
        self.pool
            .execute(match self.server.backend {
                Backend::Postgres => "VACUUM ANALYZE outbox",
                Backend::Mysql => "ANALYZE TABLE outbox",
            })
            .await
    }

    /// The library's relay in this process: default settings, no HTTP server.
    fn spawn_relay(
        &self,
        amqp: &str,
        health: Arc<outbox::Health>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<tokio::task::JoinHandle<outbox::Result<()>>> {
        let mut config = outbox::config::RelayConfig::new(vec![amqp.to_owned()]);
        config.http_addr = None;
        let opts = outbox::StoreOptions::new(Default::default());
        Ok(match self.server.backend {
            Backend::Postgres => {
                let store = PgStore::connect_lazy(&self.url, opts)?;
                tokio::spawn(outbox::relay::run(store, config, health, shutdown))
            }
            Backend::Mysql => {
                let store = MyStore::connect_lazy(&self.url, opts)?;
                tokio::spawn(outbox::relay::run(store, config, health, shutdown))
            }
        })
    }

    async fn drop(self) -> anyhow::Result<()> {
        self.pool.close().await;
        let force = match self.server.backend {
            Backend::Postgres => " WITH (FORCE)",
            Backend::Mysql => "",
        };
        self.server
            .admin(format!("DROP DATABASE {}{force}", self.name))
            .await
    }
}

impl Server {
    /// Runs one statement on a session of its own, outside the bench's databases.
    async fn admin(&self, sql: String) -> anyhow::Result<()> {
        let sql = AssertSqlSafe(sql);
        match self.backend {
            Backend::Postgres => {
                let mut conn = PgConnection::connect(&format!("{}/postgres", self.url))
                    .await
                    .context("PostgreSQL (start it with scripts/services.sh)")?;
                sqlx::raw_sql(sql).execute(&mut conn).await?;
                conn.close().await?;
            }
            Backend::Mysql => {
                let mut conn = self.mysql().await?;
                sqlx::raw_sql(sql).execute(&mut conn).await?;
                conn.close().await?;
            }
        }
        Ok(())
    }

    /// A MySQL session outside the bench's databases.
    async fn mysql(&self) -> anyhow::Result<MySqlConnection> {
        MySqlConnection::connect_with(&connect_options(&self.url)?)
            .await
            .context("MySQL or MariaDB at BENCH_MYSQL (scripts/services.sh starts MariaDB)")
    }
}

/// A pool on a bench database, and the statements the scenarios write with, per dialect.
#[derive(Clone)]
enum Pool {
    Pg(PgPool),
    My(MySqlPool),
}

impl Pool {
    async fn connect(backend: Backend, url: &str, max: u32) -> anyhow::Result<Self> {
        Ok(match backend {
            Backend::Postgres => Pool::Pg(
                PgPoolOptions::new()
                    .max_connections(max)
                    .connect(url)
                    .await?,
            ),
            Backend::Mysql => Pool::My(
                MySqlPoolOptions::new()
                    .max_connections(max)
                    .connect_with(connect_options(url)?)
                    .await?,
            ),
        })
    }

    /// The schema, applied by the store as `outbox migrate` does.
    async fn migrate(&self) -> anyhow::Result<()> {
        let opts = outbox::StoreOptions::new(Default::default());
        match self {
            Pool::Pg(pool) => outbox::Store::migrate(&PgStore::new(pool.clone(), opts)).await?,
            Pool::My(pool) => outbox::Store::migrate(&MyStore::new(pool.clone(), opts)).await?,
        };
        Ok(())
    }

    async fn execute(&self, sql: &'static str) -> anyhow::Result<()> {
        match self {
            Pool::Pg(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ())?,
            Pool::My(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ())?,
        }
        Ok(())
    }

    async fn close(&self) {
        match self {
            Pool::Pg(pool) => pool.close().await,
            Pool::My(pool) => pool.close().await,
        }
    }

    /// Commits `n` rows for `queue` over `KEYS` ordering keys in one statement.
    async fn insert_rows(&self, queue: &str, n: usize, body: &str) -> anyhow::Result<()> {
        match self {
            Pool::Pg(pool) => {
                sqlx::query(
                    "INSERT INTO outbox (routing_key, ordering_key, payload)
                     SELECT $1, 'key-' || (i % $2), $3::jsonb FROM generate_series(1, $4) i",
                )
                .bind(queue)
                .bind(KEYS as i64)
                .bind(body)
                .bind(n as i64)
                .execute(pool)
                .await?;
            }
            Pool::My(pool) => {
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO outbox (routing_key, ordering_key, payload)
                     SELECT ?, CONCAT('key-', i % ?), ? FROM ({}) numbers WHERE i < ?",
                    numbers_below(n)
                )))
                .bind(queue)
                .bind(KEYS as i64)
                .bind(body)
                .bind(n as i64)
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// One row in a transaction of its own: its message id and `created_at` (µs since the
    /// epoch), once committed.
    async fn insert_one(
        &self,
        queue: &str,
        key: &str,
        body: &str,
    ) -> anyhow::Result<(String, i64)> {
        Ok(match self {
            Pool::Pg(pool) => {
                let mut tx = pool.begin().await?;
                let row = sqlx::query_as(
                    "INSERT INTO outbox (routing_key, ordering_key, payload)
                     VALUES ($1, $2, $3::jsonb)
                     RETURNING message_id::text,
                               (extract(epoch FROM created_at) * 1000000)::bigint",
                )
                .bind(queue)
                .bind(key)
                .bind(body)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                row
            }
            Pool::My(pool) => {
                // No RETURNING on MySQL: the row is read back by its key, in the transaction.
                let mut tx = pool.begin().await?;
                let id = sqlx::query(
                    "INSERT INTO outbox (routing_key, ordering_key, payload) VALUES (?, ?, ?)",
                )
                .bind(queue)
                .bind(key)
                .bind(body)
                .execute(&mut *tx)
                .await?
                .last_insert_id();
                let row = sqlx::query_as(
                    "SELECT message_id, CAST(UNIX_TIMESTAMP(created_at) * 1000000 AS SIGNED)
                     FROM outbox WHERE id = ?",
                )
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
                tx.commit().await?;
                row
            }
        })
    }
}

/// A MySQL query of the numbers `i` from 0 up to at least `n`: a cross join of digit tables,
/// as recursive queries are capped at 1000 rows by default.
fn numbers_below(n: usize) -> String {
    let digits = (0..10)
        .map(|d| format!("SELECT {d} AS d"))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let places = n.saturating_sub(1).max(1).to_string().len();
    let sum: Vec<String> = (0..places)
        .map(|p| format!("{} * d{p}.d", 10usize.pow(p as u32)))
        .collect();
    let tables: Vec<String> = (0..places).map(|p| format!("({digits}) d{p}")).collect();
    format!("SELECT {} AS i FROM {}", sum.join(" + "), tables.join(", "))
}

/// How many statements a bench database has run so far, read on a session of its own.
enum QueryCounter {
    /// The database's transactions, committed or rolled back (every statement outside a
    /// transaction is one), read from `postgres`.
    Pg { conn: PgConnection, db: String },
    /// The server's `Questions` (statements from every client), less this session's own
    /// reads of it, one each.
    My { conn: MySqlConnection, reads: i64 },
}

impl QueryCounter {
    async fn open(db: &BenchDb) -> anyhow::Result<Self> {
        Ok(match db.server.backend {
            Backend::Postgres => QueryCounter::Pg {
                conn: PgConnection::connect(&format!("{}/postgres", db.server.url)).await?,
                db: db.name.clone(),
            },
            Backend::Mysql => QueryCounter::My {
                conn: db.server.mysql().await?,
                reads: 0,
            },
        })
    }

    async fn read(&mut self) -> anyhow::Result<i64> {
        match self {
            QueryCounter::Pg { conn, db } => {
                sqlx::query("SELECT pg_stat_clear_snapshot()")
                    .execute(&mut *conn)
                    .await?;
                Ok(sqlx::query_scalar(
                    "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database
                     WHERE datname = $1",
                )
                .bind(&*db)
                .fetch_one(&mut *conn)
                .await?)
            }
            QueryCounter::My { conn, reads } => {
                let row = sqlx::raw_sql("SHOW GLOBAL STATUS LIKE 'Questions'")
                    .fetch_one(&mut *conn)
                    .await?;
                *reads += 1;
                let questions: String = row.try_get(1)?;
                Ok(questions.parse::<i64>()? - *reads)
            }
        }
    }

    /// On MySQL, where every client's statements count: warns of sessions outside `db`.
    async fn warn_of_others(self, db: &str) -> anyhow::Result<()> {
        let QueryCounter::My { mut conn, .. } = self else {
            return Ok(());
        };
        let others: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST
             WHERE ID <> CONNECTION_ID() AND COALESCE(DB, '') <> ?
               AND COMMAND NOT IN ('Daemon', 'Binlog Dump')
               AND USER NOT IN ('system user', 'event_scheduler')",
        )
        .bind(db)
        .fetch_one(&mut conn)
        .await?;
        if others > 0 {
            eprintln!(
                "warning: {others} other sessions on the MySQL server: their statements in \
                 the idle window count as the relay's"
            );
        }
        conn.close().await?;
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
        stat_cpu_seconds(&stat, false)
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A bound a figure should stay within.
#[derive(Clone, Copy)]
struct Target {
    figure: &'static str,
    /// The bound, and whether it is a floor (`>=`) or a ceiling (`<=`).
    bound: f64,
    floor: bool,
}

impl Target {
    fn at_least(figure: &'static str, bound: f64) -> Self {
        Target {
            figure,
            bound,
            floor: true,
        }
    }

    fn at_most(figure: &'static str, bound: f64) -> Self {
        Target {
            figure,
            bound,
            floor: false,
        }
    }

    fn bound(&self) -> String {
        format!("{} {}", if self.floor { ">=" } else { "<=" }, self.bound)
    }

    /// Whether `figures` meet it (a figure missing or not a number does not).
    fn met(&self, figures: &[(&str, f64)]) -> bool {
        figures
            .iter()
            .find(|(name, _)| *name == self.figure)
            .is_some_and(|&(_, f)| {
                if self.floor {
                    f >= self.bound
                } else {
                    f <= self.bound
                }
            })
    }
}

/// Prints a table for people or one JSON line per scenario and backend.
struct Report {
    json: bool,
}

impl Report {
    fn new(json: bool) -> Self {
        if !json {
            println!("{:<88} {:<8} figures  [targets]", "scenario", "backend");
        }
        Report { json }
    }

    /// One row: `backend` names the database, or [`LAPIN`] for the broker alone.
    fn row(&mut self, scenario: &str, backend: &str, figures: &[(&str, f64)], targets: &[Target]) {
        if self.json {
            let mut v: BTreeMap<&str, serde_json::Value> = figures
                .iter()
                .map(|(k, f)| (*k, serde_json::json!((f * 1000.0).round() / 1000.0)))
                .collect();
            v.insert("scenario", scenario.into());
            v.insert("backend", backend.into());
            if !targets.is_empty() {
                let targets: serde_json::Map<String, serde_json::Value> = targets
                    .iter()
                    .map(|t| {
                        let target = serde_json::json!({"bound": t.bound(), "met": t.met(figures)});
                        (t.figure.to_owned(), target)
                    })
                    .collect();
                v.insert("targets", targets.into());
            }
            println!("{}", serde_json::to_string(&v).unwrap_or_default());
        } else {
            let text: Vec<String> = figures.iter().map(|(k, f)| format!("{k}={f:.2}")).collect();
            let targets: Vec<String> = targets
                .iter()
                .map(|t| {
                    let met = if t.met(figures) { "met" } else { "NOT MET" };
                    format!("{} {}: {met}", t.figure, t.bound())
                })
                .collect();
            let targets = if targets.is_empty() {
                String::new()
            } else {
                format!("  [{}]", targets.join("; "))
            };
            println!("{scenario:<88} {backend:<8} {}{targets}", text.join("  "));
        }
    }
}
