//! Run with: `cargo run --release --example order_payment -- --orders 200 [--chaos] [--json]`
//!
//! The order/payment saga on two databases and two backends: the order service on
//! PostgreSQL (`ORDERS_DATABASE_URL`, default database `orders` on the local server), the
//! payment service on MySQL/MariaDB (`PAYMENTS_DATABASE_URL`, default database `payments` on
//! the local server), each created and migrated if missing, and RabbitMQ (`AMQP_URL`). Each service has its own outbox relay and inbox consumer, run
//! here as tasks of this process with the library's code. `--chaos` kills and restarts them
//! at random moments and publishes some messages a second time. The summary is computed from
//! the databases; the exit code is 1 if any order was not settled exactly once.

mod services;
mod supervisor;

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use outbox::config::RelayConfig;
use outbox::inbox::{ConsumerConfig, Handler, consume};
use outbox::store::mysql::MyStore;
use outbox::store::postgres::PgStore;
use outbox::{Health, Store, StoreOptions};
use serde::Serialize;
use sqlx::{AssertSqlSafe, MySqlPool, PgPool, Pool};
use std::sync::Arc;

use services::{ChargeCustomer, SettleOrder};
use supervisor::{Chaos, Component, ServiceDb};

/// Customers; the last `POOR` of them cannot pay, so both saga paths run.
const CUSTOMERS: i64 = 20;
const POOR: i64 = 5;
const RICH_BALANCE: i64 = 10_000_000;

struct Args {
    orders: usize,
    chaos: bool,
    json: bool,
    timeout: Duration,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        orders: 200,
        chaos: false,
        json: false,
        timeout: Duration::from_secs(180),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--orders" => a.orders = it.next().context("--orders needs a number")?.parse()?,
            "--chaos" => a.chaos = true,
            "--json" => a.json = true,
            "--timeout" => {
                a.timeout =
                    Duration::from_secs(it.next().context("--timeout needs seconds")?.parse()?)
            }
            other => bail!(
                "unknown argument {other:?} (expected --orders N, --chaos, --json, --timeout SECONDS)"
            ),
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let args = args()?;
    let orders_url = std::env::var("ORDERS_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/orders".into());
    let payments_url = std::env::var("PAYMENTS_DATABASE_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/payments".into());
    let amqp = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let prefix = std::env::var("DEMO_PREFIX").unwrap_or_else(|_| "demo".into());
    let (orders_ex, payments_ex) = (format!("{prefix}.orders"), format!("{prefix}.payments"));

    let orders = prepare_orders(&orders_url).await?;
    let payments = prepare_payments(&payments_url).await?;
    for customer in 1..=CUSTOMERS {
        let balance = if customer > CUSTOMERS - POOR {
            0
        } else {
            RICH_BALANCE
        };
        sqlx::query("INSERT INTO accounts (customer_id, balance) VALUES (?, ?)")
            .bind(customer)
            .bind(balance)
            .execute(&payments)
            .await?;
    }
    let initial_total = (CUSTOMERS - POOR) * RICH_BALANCE;
    let conn = Connection::connect(&amqp, ConnectionProperties::default())
        .await
        .context("RabbitMQ (start it with scripts/services.sh)")?;
    let channel = conn.create_channel().await?;
    for exchange in [&orders_ex, &payments_ex] {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
    }

    let mut components = vec![
        relay(
            "order relay",
            PgStore::new(orders.clone(), store_options()),
            &amqp,
        ),
        relay(
            "payment relay",
            MyStore::new(payments.clone(), store_options()),
            &amqp,
        ),
        consumer(
            "payment consumer",
            &payments,
            &amqp,
            &format!("{prefix}.payment-service"),
            (&orders_ex, "order.created"),
            ChargeCustomer {
                exchange: payments_ex.clone(),
            },
        ),
        consumer(
            "order consumer",
            &orders,
            &amqp,
            &format!("{prefix}.order-service"),
            (&payments_ex, "payment.*"),
            SettleOrder,
        ),
    ];
    // Consumers declare their queues; orders wait until they exist, or the first events
    // would find no queue bound yet.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let started = Instant::now();
    let chaos = args.chaos.then(|| {
        Chaos::start(
            std::mem::take(&mut components),
            [
                ServiceDb::Postgres(orders.clone()),
                ServiceDb::Mysql(payments.clone()),
            ],
            channel.clone(),
        )
    });
    // Under chaos the orders come more slowly, so the faults land in the middle of the work.
    let spacing = Duration::from_millis(if args.chaos { 10 } else { 2 });
    let placer = tokio::spawn(place_orders(
        orders.clone(),
        orders_ex.clone(),
        args.orders,
        spacing,
    ));
    placer.await??;
    let settled = wait_settled(&orders, args.timeout).await?;
    let (components, chaos_counts) = match chaos {
        Some(chaos) => chaos.stop().await,
        None => (components, Default::default()),
    };
    // Let duplicates and the last replies drain before counting.
    wait_quiet(&orders, &payments).await;
    for c in components {
        c.stop().await;
    }

    let summary = Summary::read(
        &orders,
        &payments,
        initial_total,
        started.elapsed(),
        settled,
        chaos_counts,
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{}", summary.line());
    }
    if !summary.ok {
        std::process::exit(1);
    }
    Ok(())
}

/// The order service's database on PostgreSQL: created if missing, the outbox schema and
/// the service's own applied, the demo's tables emptied so the summary speaks of this run.
async fn prepare_orders(url: &str) -> anyhow::Result<PgPool> {
    let (server, name) = url
        .rsplit_once('/')
        .context("database URL without a database name")?;
    let admin = PgPool::connect(&format!("{server}/postgres"))
        .await
        .context("PostgreSQL (start it with scripts/services.sh)")?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&admin)
            .await?;
    if !exists {
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&admin)
            .await?;
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(12)
        .connect(url)
        .await?;
    PgStore::new(pool.clone(), store_options())
        .migrate()
        .await?;
    sqlx::raw_sql(services::ORDERS_SCHEMA)
        .execute(&pool)
        .await?;
    sqlx::query("TRUNCATE orders, outbox, outbox_inbox RESTART IDENTITY")
        .execute(&pool)
        .await?;
    Ok(pool)
}

/// The payment service's database on MySQL/MariaDB, prepared the same way.
async fn prepare_payments(url: &str) -> anyhow::Result<MySqlPool> {
    let (server, name) = url
        .rsplit_once('/')
        .context("database URL without a database name")?;
    let admin = MySqlPool::connect(server)
        .await
        .context("MySQL/MariaDB (start it with scripts/services.sh)")?;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE DATABASE IF NOT EXISTS `{name}`"
    )))
    .execute(&admin)
    .await?;
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(12)
        .connect(url)
        .await?;
    MyStore::new(pool.clone(), store_options())
        .migrate()
        .await?;
    sqlx::raw_sql(services::PAYMENTS_SCHEMA)
        .execute(&pool)
        .await?;
    for table in ["accounts", "payments", "outbox", "outbox_inbox"] {
        sqlx::query(AssertSqlSafe(format!("TRUNCATE {table}")))
            .execute(&pool)
            .await?;
    }
    Ok(pool)
}

/// Sent rows are kept an hour, so the chaos can publish some of them a second time.
fn store_options() -> StoreOptions {
    StoreOptions {
        retention: Duration::from_secs(3600),
        ..StoreOptions::new(Default::default())
    }
}

fn relay(name: &'static str, store: impl Store, amqp: &str) -> Component {
    let mut config = RelayConfig::new(vec![amqp.to_owned()]);
    config.http_addr = None;
    config.poll_interval = Duration::from_millis(250);
    config.leader_check = Duration::from_millis(250);
    config.backoff_min = Duration::from_millis(100);
    config.backoff_max = Duration::from_secs(2);
    Component::start(name, move |stop| {
        let run = outbox::relay::run(
            store.clone(),
            config.clone(),
            Arc::new(Health::default()),
            stop,
        );
        async move {
            if let Err(e) = run.await {
                tracing::error!(error = %e, "{name}: the relay cannot lead");
            }
        }
    })
}

fn consumer<T, H, DB>(
    name: &'static str,
    pool: &Pool<DB>,
    amqp: &str,
    queue: &str,
    binding: (&str, &str),
    handler: H,
) -> Component
where
    T: serde::de::DeserializeOwned + Send + Sync + 'static,
    H: Handler<T, DB> + Clone,
    DB: outbox::inbox::Database,
{
    let mut config = ConsumerConfig::new(vec![amqp.to_owned()], name, queue);
    config.bindings = vec![(binding.0.to_owned(), binding.1.to_owned())];
    let pool = pool.clone();
    Component::start(name, move |stop| {
        consume(pool.clone(), config.clone(), handler.clone(), stop)
    })
}

async fn place_orders(
    pool: PgPool,
    exchange: String,
    n: usize,
    spacing: Duration,
) -> anyhow::Result<()> {
    for i in 0..n as i64 {
        let customer = 1 + (i * 7) % CUSTOMERS;
        let amount = 100 + (i * 7919) % 9900;
        let mut tx = pool.begin().await?;
        services::place_order(&mut tx, &exchange, customer, amount)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        tx.commit().await?;
        tokio::time::sleep(spacing).await;
    }
    Ok(())
}

/// Waits until no order is pending; false at the deadline.
async fn wait_settled(orders: &PgPool, timeout: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let pending: i64 =
            sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'PENDING'")
                .fetch_one(orders)
                .await?;
        if pending == 0 {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(false)
}

/// Waits (up to 30 s) until both outboxes have nothing pending and the inboxes stop growing.
async fn wait_quiet(orders: &PgPool, payments: &MySqlPool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last_applied = -1;
    // The same SQL on both backends.
    let q = "SELECT (SELECT count(*) FROM outbox WHERE state = 'pending'), (SELECT count(*) FROM outbox_inbox)";
    while Instant::now() < deadline {
        let (p1, a1): (i64, i64) = sqlx::query_as(q).fetch_one(orders).await.unwrap_or((1, 0));
        let (p2, a2): (i64, i64) = sqlx::query_as(q)
            .fetch_one(payments)
            .await
            .unwrap_or((1, 0));
        let (pending, applied) = (p1 + p2, a1 + a2);
        if pending == 0 && applied == last_applied {
            return;
        }
        last_applied = applied;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What the databases say after the run.
#[derive(Serialize)]
struct Summary {
    orders: i64,
    paid: i64,
    cancelled: i64,
    pending: i64,
    /// Orders with exactly one payment, and the fewest and most payments of any order.
    orders_with_one_payment: i64,
    min_payments_per_order: i64,
    max_payments_per_order: i64,
    /// Orders whose status disagrees with their payment (PAID without SUCCEEDED, ...).
    mismatched: i64,
    /// Current balances plus succeeded payments equal the seeded total; none is negative.
    balances_consistent: bool,
    settled_in_time: bool,
    seconds: f64,
    chaos: supervisor::ChaosCounts,
    ok: bool,
}

impl Summary {
    async fn read(
        orders: &PgPool,
        payments: &MySqlPool,
        initial_total: i64,
        elapsed: Duration,
        settled: bool,
        chaos: supervisor::ChaosCounts,
    ) -> anyhow::Result<Self> {
        let (total, paid, cancelled, pending): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE status = 'PAID'), count(*) FILTER (WHERE status = 'CANCELLED'),
                    count(*) FILTER (WHERE status = 'PENDING') FROM orders",
        )
        .fetch_one(orders)
        .await?;
        let statuses: Vec<(i64, String)> = sqlx::query_as("SELECT id, status FROM orders")
            .fetch_all(orders)
            .await?;
        let payments_by_order: Vec<(i64, i64, Option<String>)> = sqlx::query_as(
            "SELECT order_id, count(*), min(status) FROM payments GROUP BY order_id",
        )
        .fetch_all(payments)
        .await?;
        let per_order: std::collections::HashMap<i64, (i64, Option<String>)> = payments_by_order
            .into_iter()
            .map(|(o, n, s)| (o, (n, s)))
            .collect();
        let counts: Vec<i64> = statuses
            .iter()
            .map(|(id, _)| per_order.get(id).map_or(0, |p| p.0))
            .collect();
        let mismatched = statuses
            .iter()
            .filter(|(id, status)| {
                let payment = per_order.get(id).and_then(|p| p.1.as_deref());
                !matches!(
                    (status.as_str(), payment),
                    ("PAID", Some("SUCCEEDED")) | ("CANCELLED", Some("FAILED"))
                )
            })
            .count() as i64;
        let (balances, charged, negative): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT CAST(COALESCE(sum(balance), 0) AS SIGNED) FROM accounts),
                    (SELECT CAST(COALESCE(sum(amount), 0) AS SIGNED) FROM payments WHERE status = 'SUCCEEDED'),
                    (SELECT count(*) FROM accounts WHERE balance < 0)",
        )
        .fetch_one(payments)
        .await?;
        let one = counts.iter().filter(|&&c| c == 1).count() as i64;
        let balances_consistent = balances + charged == initial_total && negative == 0;
        let ok = settled
            && pending == 0
            && one == total
            && mismatched == 0
            && balances_consistent
            && total > 0;
        Ok(Summary {
            orders: total,
            paid,
            cancelled,
            pending,
            orders_with_one_payment: one,
            min_payments_per_order: counts.iter().copied().min().unwrap_or(0),
            max_payments_per_order: counts.iter().copied().max().unwrap_or(0),
            mismatched,
            balances_consistent,
            settled_in_time: settled,
            seconds: (elapsed.as_secs_f64() * 10.0).round() / 10.0,
            chaos,
            ok,
        })
    }

    fn line(&self) -> String {
        format!(
            "orders={} paid={} cancelled={} pending={} payments_per_order={}..{} (exactly one: {}) mismatched={} balances={} \
             relay_kills={} consumer_kills={} duplicates_injected={} seconds={} => {}",
            self.orders,
            self.paid,
            self.cancelled,
            self.pending,
            self.min_payments_per_order,
            self.max_payments_per_order,
            self.orders_with_one_payment,
            self.mismatched,
            if self.balances_consistent {
                "consistent"
            } else {
                "INCONSISTENT"
            },
            self.chaos.relay_kills,
            self.chaos.consumer_kills,
            self.chaos.duplicates_injected,
            self.seconds,
            if self.ok { "OK" } else { "FAILED" }
        )
    }
}
