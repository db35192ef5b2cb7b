//! The order/payment demo under chaos, checked against its databases: orders on
//! PostgreSQL, payments on MariaDB.

mod common;

use std::process::Command;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_order_is_settled_exactly_once_under_chaos() {
    let orders = Db::new(Backend::Postgres).await;
    let payments = Db::new(Backend::Mysql).await;
    let out = Command::new(demo_bin())
        .args(["--orders", "300", "--chaos", "--json", "--timeout", "120"])
        .env("ORDERS_DATABASE_URL", &orders.url)
        .env("PAYMENTS_DATABASE_URL", &payments.url)
        .env("AMQP_URL", amqp_url())
        .env("DEMO_PREFIX", unique("saga"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    println!("{summary}");
    assert_eq!(summary["ok"], true);
    assert!(
        summary["chaos"]["relay_kills"].as_u64().unwrap()
            + summary["chaos"]["consumer_kills"].as_u64().unwrap()
            > 0,
        "no fault was injected"
    );

    // The test reads the databases itself rather than trusting the summary.
    let statuses: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM orders GROUP BY 1 ORDER BY 1")
            .fetch_all(orders.pg())
            .await
            .unwrap();
    let total: i64 = statuses.iter().map(|s| s.1).sum();
    assert_eq!(total, 300);
    assert!(
        statuses
            .iter()
            .all(|(s, _)| s == "PAID" || s == "CANCELLED"),
        "{statuses:?}"
    );
    assert_eq!(
        statuses.len(),
        2,
        "both the payment and the compensation path ran: {statuses:?}"
    );
    let per_order: Vec<i64> = sqlx::query_scalar("SELECT count(*) FROM payments GROUP BY order_id")
        .fetch_all(payments.my())
        .await
        .unwrap();
    assert_eq!(per_order.len(), 300);
    assert!(
        per_order.iter().all(|&n| n == 1),
        "an order was charged twice"
    );
}
