//! The status page in a real browser (headless Chromium over WebDriver, see
//! `common/browser.rs`), on PostgreSQL: its figures match `/metrics`, a chart grows as rows
//! flow, a memory alarm shows as a banner and clears, a dead row is retried only with the
//! token and then arrives, and data holding HTML is shown as text. Each test has its own
//! database, queue, relay and browser; the alarm, which blocks the whole broker, waits for
//! the others to finish (see `BROKER`).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// The contract's gauges and the published count, as the page shows them.
const METRICS: [&str; 7] = [
    "outbox_pending_messages",
    "outbox_oldest_pending_age_seconds",
    "outbox_dead_messages",
    "outbox_published_total",
    "outbox_broker_connected",
    "outbox_broker_blocked",
    "outbox_leader",
];

/// The alarm test holds it exclusively; every other test shares it, so that none of them
/// publishes while the broker is blocked.
static BROKER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A ready relay on a database of its own, and a browser on its status page once the
/// page's script has updated it.
async fn open_page(env: &[(&str, &str)]) -> (Db, TestQueue, Relay, Browser) {
    let db = Db::new(Backend::Postgres).await;
    let queue = TestQueue::new().await;
    let relay = Relay::start(&db.url, &db.table, env);
    eventually("the relay to be ready", Duration::from_secs(20), || async {
        relay.get("/readyz").await.0 == 200
    })
    .await;
    let browser = Browser::start().await;
    browser.goto(&format!("http://{}/", relay.http)).await;
    eventually(
        "the page to update itself",
        Duration::from_secs(10),
        || async {
            let updated = browser.text("#updated").await;
            updated.as_str().is_some_and(|t| t.starts_with("updated"))
        },
    )
    .await;
    (db, queue, relay, browser)
}

/// A row that goes dead at once (with `OUTBOX_MAX_ATTEMPTS=1`): its key is not routed.
async fn dead_row(db: &Db, queue: &TestQueue, ordering_key: &str) -> (String, String) {
    let exchange = queue.exchange().await;
    let row = Row::new("nowhere", json!({}))
        .exchange(&exchange)
        .key(ordering_key);
    let id = db.insert_row(&row).await;
    eventually("the row to go dead", Duration::from_secs(30), || async {
        db.count("state = 'dead'").await == 1
    })
    .await;
    (id, exchange)
}

/// The value each `data-metric` element shows.
async fn shown(browser: &Browser) -> Value {
    browser
        .eval(
            "const shown = {};
             for (const e of document.querySelectorAll('[data-metric]')) shown[e.dataset.metric] = e.textContent;
             return shown;",
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_numbers_shown_match_the_metrics() {
    let _turn = BROKER.read().await;
    let env = [("OUTBOX_MAX_ATTEMPTS", "1")];
    let (db, queue, relay, browser) = open_page(&env).await;
    for seq in 0..20 {
        db.insert(&queue.name, None, json!({ "seq": seq })).await;
    }
    dead_row(&db, &queue, "k").await;
    queue.wait_for(20, Duration::from_secs(30)).await;
    eventually(
        "the page to show /metrics' values",
        Duration::from_secs(15),
        || async {
            let page = shown(&browser).await;
            let mut metrics = Vec::new();
            for name in METRICS {
                metrics.push(relay.metric(name).await);
            }
            METRICS.iter().zip(&metrics).all(|(name, value)| {
                let on_page = page[name].as_str().and_then(|t| t.parse::<f64>().ok());
                matches!((on_page, value), (Some(a), Some(b)) if (a - b).abs() < 1e-6)
            })
        },
    )
    .await;
    let page = shown(&browser).await;
    assert_eq!(page["outbox_published_total"], json!("20"), "{page}");
    assert_eq!(page["outbox_dead_messages"], json!("1"), "{page}");
    assert_eq!(page["outbox_leader"], json!("1"), "{page}");
    println!("page shows {page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chart_gains_points_as_rows_flow() {
    let _turn = BROKER.read().await;
    let (db, queue, _relay, browser) = open_page(&[]).await;
    // The x and y of each point of the published line, and whether p50 has a point.
    let read = || async {
        let v = browser
            .eval(
                "const line = document.querySelector('[data-chart=published] polyline');
                 const pts = line.points, ys = [];
                 for (let i = 0; i < pts.numberOfItems; i++) ys.push(pts.getItem(i).y);
                 const p50 = document.querySelector('[data-chart=latency] polyline[data-series=p50]');
                 return [pts.numberOfItems, Math.min(...ys), p50.points.numberOfItems];",
            )
            .await;
        let n = |i: usize| v[i].as_f64().unwrap_or(0.0);
        (n(0), n(1), n(2))
    };
    let (before, lowest, _) = read().await;
    assert!(
        lowest >= 99.0,
        "a published point before any row flowed: {lowest}"
    );
    let producer = tokio::spawn({
        let (db, queue) = (db.handle(), queue.name.clone());
        async move {
            for seq in 0..30 {
                db.insert(&queue, None, json!({ "seq": seq })).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    eventually(
        "the charts to draw the flow",
        Duration::from_secs(20),
        || async {
            let (points, lowest, p50) = read().await;
            points > before && lowest < 99.0 && p50 >= 1.0
        },
    )
    .await;
    producer.await.unwrap();
    queue.wait_for(30, Duration::from_secs(30)).await;
    let (points, lowest, p50) = read().await;
    println!(
        "published chart: {before} -> {points} points, highest at y={lowest}; p50 points: {p50}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_shows_as_a_banner_and_clears() {
    let _turn = BROKER.write().await;
    let (db, queue, relay, browser) = open_page(&[]).await;
    let hidden = || async {
        browser
            .eval("return document.getElementById('alarm').hidden")
            .await
    };
    assert_eq!(hidden().await, json!(true));
    let settings = BrokerSettings::save();
    rabbitmqctl(&["set_vm_memory_high_watermark", "0.000001"]);
    // RabbitMQ tells a connection it is blocked when it next publishes.
    let id = db.insert(&queue.name, None, json!({})).await;
    eventually("the banner", Duration::from_secs(30), || async {
        hidden().await == json!(false)
    })
    .await;
    let text = browser.text("#alarm-text").await;
    assert!(text.as_str().unwrap().contains("memory alarm"), "{text}");
    let since = browser.text("#alarm-since").await;
    assert!(since.as_str().unwrap().starts_with("since "), "{since}");
    let link = browser
        .eval("return document.getElementById('alarm-docs').getAttribute('href')")
        .await;
    let link = link.as_str().unwrap();
    assert!(link.ends_with("#memory-and-disk-alarms"), "{link}");
    let (code, guide) = relay.get(link.split('#').next().unwrap()).await;
    assert_eq!(code, 200);
    assert!(guide.contains("## Memory and disk alarms"));
    settings.restore();
    eventually("the banner to clear", Duration::from_secs(30), || async {
        hidden().await == json!(true)
    })
    .await;
    let received = queue.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(received[0].message_id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_row_is_retried_from_the_page_only_with_the_token() {
    let _turn = BROKER.read().await;
    let env = [
        ("OUTBOX_MAX_ATTEMPTS", "1"),
        ("OUTBOX_ADMIN_TOKEN", "s3cret"),
    ];
    let (db, queue, _relay, browser) = open_page(&env).await;
    let (id, exchange) = dead_row(&db, &queue, "k").await;
    let row = format!("tr[data-message-id=\"{id}\"]");
    let present = || async {
        let selector = serde_json::to_string(&row).unwrap();
        browser
            .eval(&format!(
                "return document.querySelector({selector}) !== null"
            ))
            .await
    };
    eventually(
        "the dead row on the page",
        Duration::from_secs(10),
        || async { present().await == json!(true) },
    )
    .await;
    browser.click(&format!("{row} input[type=checkbox]")).await;
    browser.click("#retry-selected").await;
    eventually(
        "the retry to be refused",
        Duration::from_secs(10),
        || async {
            browser
                .text("#retry-result")
                .await
                .as_str()
                .is_some_and(|t| t.starts_with("401"))
        },
    )
    .await;
    assert_eq!(
        db.count("state = 'dead'").await,
        1,
        "retried without the token"
    );

    queue.bind(&exchange, "nowhere").await;
    browser.type_into("#token", "s3cret").await;
    browser.click("#retry-selected").await;
    eventually("the retry to be done", Duration::from_secs(10), || async {
        browser.text("#retry-result").await == json!("1 retried")
    })
    .await;
    let received = queue.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(received[0].message_id, id);
    eventually(
        "the row to leave the page",
        Duration::from_secs(10),
        || async { present().await == json!(false) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_holding_html_is_shown_as_text() {
    let _turn = BROKER.read().await;
    let env = [("OUTBOX_MAX_ATTEMPTS", "1")];
    let (db, queue, relay, browser) = open_page(&env).await;
    let key = "<img src=x onerror=\"window.pwned=1\">";
    let (id, _) = dead_row(&db, &queue, key).await;
    db.execute("UPDATE outbox SET last_error = '<b id=\"injected\">boom</b>'")
        .await;
    let (_, html) = relay.get("/").await;
    assert!(!html.contains("<img src=x") && html.contains("&lt;img src=x"));
    // Rendered by the server first, then by the script.
    browser.goto(&format!("http://{}/", relay.http)).await;
    let cells = format!("tr[data-message-id=\"{id}\"]");
    let check = || async {
        let selector = serde_json::to_string(&cells).unwrap();
        browser
            .eval(&format!(
                "const row = document.querySelector({selector});
                 return [document.querySelectorAll('img').length, document.getElementById('injected') === null,
                         window.pwned === undefined, row && row.textContent,
                         document.getElementById('blocked-keys').textContent];"
            ))
            .await
    };
    eventually(
        "the row, shown as text",
        Duration::from_secs(10),
        || async {
            let last = check().await;
            assert_eq!(
                (&last[0], &last[1], &last[2]),
                (&json!(0), &json!(true), &json!(true)),
                "{last}"
            );
            let row = last[3].as_str().unwrap_or_default();
            row.contains(key)
                && row.contains("<b id=\"injected\">boom</b>")
                && last[4] == json!(key)
        },
    )
    .await;
}
