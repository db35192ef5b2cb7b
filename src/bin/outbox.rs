//! `outbox`: the relay sidecar and its operator commands. Configuration comes from the
//! environment (see the README); this file only parses it and wires the library together.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use outbox::config::{Config, LogFormat, redact};
use outbox::telemetry::Telemetry;
use outbox::{Health, Store};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Parser)]
#[command(
    name = "outbox",
    version,
    about = "Transactional outbox relay to RabbitMQ"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar until SIGTERM/SIGINT.
    Relay,
    /// Apply the schema to DATABASE_URL (running it twice changes nothing).
    Migrate,
    /// Pending count, oldest pending age, dead count, blocked ordering keys.
    Status {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and release dead rows.
    Dead {
        #[command(subcommand)]
        action: DeadAction,
    },
}

#[derive(Subcommand)]
enum DeadAction {
    /// The dead rows with their last error.
    List {
        /// Print one JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Put dead rows back to pending with their attempts reset to 0.
    Retry {
        /// Every dead row.
        #[arg(long, conflicts_with = "message_ids")]
        all: bool,
        /// The message ids of the rows to retry.
        #[arg(required_unless_present = "all")]
        message_ids: Vec<String>,
        /// Retry rows older than the inbox deduplication window too (consumers may apply
        /// them a second time).
        #[arg(long)]
        force: bool,
    },
}

/// The log filter when `RUST_LOG` is unset. lapin logs every returned message, payload
/// included, at WARN: the relay reports those rows itself, without their bodies.
const DEFAULT_LOG: &str = "info,sqlx=warn,lapin::returned_messages=error";

/// How long open HTTP connections may delay the exit.
const HTTP_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Latency buckets, in seconds, for `outbox_publish_latency_seconds`.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Has glibc map allocations of 256 KiB and more and give them back when freed. Otherwise it
/// raises that threshold each time it frees one, and keeps large rows' copies in its heaps: a
/// drain of 10,000 rows of 1 MiB peaked at 74-79 MiB under a 16 MiB bound, 52-60 with this.
fn return_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: sets one of the allocator's tunables, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

fn main() -> ExitCode {
    return_large_allocations();
    let cli = Cli::parse();
    let mut errors = Vec::new();
    let filter =
        EnvFilter::try_from_default_env().or_else(|e| match std::env::var_os("RUST_LOG") {
            Some(_) => {
                errors.push(format!("RUST_LOG: invalid log filter ({e})"));
                Err(e)
            }
            None => Ok(EnvFilter::new(DEFAULT_LOG)),
        });
    let config =
        Config::from_env(matches!(cli.command, Command::Relay)).map_err(|e| errors.extend(e));
    let (Ok(filter), Ok(config)) = (filter, config) else {
        for line in errors {
            eprintln!("outbox: bad configuration: {line}");
        }
        return ExitCode::from(2);
    };
    let telemetry = match Telemetry::from_env("outbox-relay") {
        Ok(telemetry) => telemetry,
        Err(line) => {
            eprintln!("outbox: bad configuration: {line}");
            return ExitCode::from(2);
        }
    };
    init_logs(filter, config.log_format, telemetry.as_ref());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outbox: {e:#}");
            ExitCode::FAILURE
        }
    };
    drop(runtime);
    drop(telemetry); // exports the spans not yet sent
    code
}

/// Logs to stderr as text or JSON lines; spans to OTLP too when an endpoint is set.
fn init_logs(filter: EnvFilter, format: LogFormat, telemetry: Option<&Telemetry>) {
    let stderr = std::io::stderr;
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&stderr()))
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_span_list(false)
            .with_writer(stderr)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(telemetry.map(Telemetry::layer))
        .init();
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    let opts = config.store_options();
    let scheme = config.database_url.split("://").next().unwrap_or_default();
    let context = || format!("DATABASE_URL {}", redact(&config.database_url));
    match scheme {
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => {
            let store = outbox::store::postgres::PgStore::connect_lazy(&config.database_url, opts)
                .with_context(context)?;
            execute(command, store, config).await
        }
        #[cfg(feature = "mysql")]
        "mysql" | "mariadb" => {
            let store = outbox::store::mysql::MyStore::connect_lazy(&config.database_url, opts)
                .with_context(context)?;
            execute(command, store, config).await
        }
        other => bail!(
            "DATABASE_URL: {other}:// is not supported by this build (built without its feature)"
        ),
    }
}

async fn execute(command: Command, store: impl Store, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Relay => relay(store, config).await,
        Command::Migrate => {
            let applied = store.migrate().await.context("migration failed")?;
            if applied.is_empty() {
                println!("schema of table {} is up to date", config.table);
            }
            for name in applied {
                println!("applied {name} to table {}", config.table);
            }
            Ok(())
        }
        Command::Status { json } => status(store, json).await,
        Command::Dead {
            action: DeadAction::List { json },
        } => dead_list(store, json).await,
        Command::Dead {
            action:
                DeadAction::Retry {
                    all,
                    message_ids,
                    force,
                },
        } => {
            for id in &message_ids {
                uuid::Uuid::parse_str(id)
                    .with_context(|| format!("{id:?} is not a message id (a UUID)"))?;
            }
            if !force {
                refuse_rows_past_dedup_window(&store, all, &message_ids, config.dedup_window)
                    .await?;
            }
            let n = store
                .dead_retry((!all).then_some(&message_ids[..]))
                .await
                .context("dead retry failed")?;
            println!("{n} dead row(s) put back to pending");
            Ok(())
        }
    }
}

async fn relay(store: impl Store, config: Config) -> anyhow::Result<()> {
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(outbox::metrics::PUBLISH_LATENCY.into()),
            LATENCY_BUCKETS,
        )?
        .install_recorder()
        .context("metrics recorder")?;
    outbox::metrics::describe();
    let health = Arc::new(Health::new(config.relay.stall_timeout));
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let upkeep = prometheus.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let http = match config.relay.http_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("OUTBOX_HTTP_ADDR: cannot listen on {addr}"))?;
            tracing::info!(%addr, "HTTP endpoints listening");
            let dashboard = dashboard(&store, &config, &health, &shutdown);
            Some(tokio::spawn(outbox::http::serve(
                listener,
                health.clone(),
                prometheus,
                dashboard,
                shutdown.clone(),
            )))
        }
        None => None,
    };
    tracing::info!(table = %config.table, nodes = config.relay.amqp_urls.len(), database = %redact(&config.database_url), "relay starting");
    let ran = outbox::relay::run(store, config.relay, health, shutdown.clone()).await;
    shutdown.cancel();
    if let Some(http) = http {
        // A client that holds its connection open does not hold the exit.
        match tokio::time::timeout(HTTP_CLOSE_TIMEOUT, http).await {
            Ok(served) => served?.context("HTTP server")?,
            Err(_) => tracing::warn!("HTTP connections still open at exit: dropped"),
        }
    }
    ran?;
    tracing::info!("relay stopped");
    Ok(())
}

/// The status page's view of the relay, with its sampler running until `shutdown`.
fn dashboard<S: Store>(
    store: &S,
    config: &Config,
    health: &Arc<Health>,
    shutdown: &CancellationToken,
) -> outbox::http::Dashboard<S> {
    let history = Arc::new(outbox::history::History::default());
    tokio::spawn(outbox::history::sample(
        history.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    outbox::http::Dashboard {
        store: store.clone(),
        health: health.clone(),
        history,
        replica_id: config.replica_id.clone(),
        database: redact(&config.database_url),
        admin_token: config.relay.admin_token.clone(),
        dedup_window: config.dedup_window,
    }
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    shutdown.cancel();
}

/// Refuses the whole retry when a requested row is older than the consumers' deduplication
/// window (see [`outbox::store::plan_retry`]).
async fn refuse_rows_past_dedup_window(
    store: &impl Store,
    all: bool,
    ids: &[String],
    window: Duration,
) -> anyhow::Result<()> {
    let plan = outbox::store::plan_retry(store, (!all).then_some(ids), false, window)
        .await
        .context("reading the outbox table")?;
    let old = plan.refused_for(outbox::store::Refusal::PastDedupWindow);
    if !old.is_empty() {
        bail!(
            "{} dead row(s) are older than the inbox deduplication window ({}), so consumers may no longer recognise them and could apply them twice: {}. Re-run with --force to retry them anyway",
            old.len(),
            humantime::format_duration(window),
            old.join(", ")
        );
    }
    Ok(())
}

async fn status(store: impl Store, json: bool) -> anyhow::Result<()> {
    let stats = store.stats().await.context("reading the outbox table")?;
    let blocked = store
        .blocked_keys()
        .await
        .context("reading the outbox table")?;
    if json {
        let mut v = serde_json::to_value(&stats)?;
        v["blocked_ordering_keys"] = blocked.into();
        println!("{v}");
    } else {
        println!("pending:               {}", stats.pending);
        println!(
            "oldest pending age:    {:.1}s",
            stats.oldest_pending_age_seconds
        );
        println!("dead:                  {}", stats.dead);
        println!(
            "blocked ordering keys: {}",
            if blocked.is_empty() {
                "none".into()
            } else {
                blocked.join(", ")
            }
        );
    }
    Ok(())
}

async fn dead_list(store: impl Store, json: bool) -> anyhow::Result<()> {
    let rows = store
        .dead_list()
        .await
        .context("reading the outbox table")?;
    if json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no dead rows");
    }
    for r in rows {
        println!(
            "{}  key={}  attempts={}  {}/{}  age={:.0}s\n    {}",
            r.message_id,
            r.ordering_key.as_deref().unwrap_or("-"),
            r.attempts,
            r.exchange,
            r.routing_key,
            r.age_seconds,
            r.last_error.as_deref().unwrap_or("")
        );
    }
    Ok(())
}
