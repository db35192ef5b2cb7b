//! What only the MySQL/MariaDB backend has to prove: without notifications, a row that
//! commits after higher ids were published is still found within the poll interval; the
//! relay's claims and marks never make a service's inserts wait on a lock; and the binary
//! takes `mariadb://` URLs. (Two relays, one leader, SIGKILL and takeover on MySQL:
//! `process.rs`, `one_of_two_relays_leads_and_the_other_takes_over_after_sigkill::mysql`.)

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

async fn wait_leading(relay: &Relay) {
    eventually("the relay to lead", Duration::from_secs(20), || async {
        relay.is_leader().await && relay.get("/readyz").await.0 == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_id_committed_after_higher_ids_were_published_arrives_within_the_poll_interval() {
    let db = Db::new(Backend::Mysql).await;
    let queue = TestQueue::new().await;
    let poll = Duration::from_secs(1);
    // Sent rows are kept, so that their ids can be compared afterwards.
    let relay = Relay::start(
        &db.url,
        &db.table,
        &[("OUTBOX_POLL_INTERVAL", "1s"), ("OUTBOX_RETENTION", "1h")],
    );
    wait_leading(&relay).await;

    // The service's transaction takes its id, then waits.
    let mut late = db.begin().await;
    let late_id = late
        .insert(&Row::new(&queue.name, json!({"late": true})))
        .await;
    // Meanwhile other transactions commit rows with higher ids, and keep doing so: the relay
    // is never quiet, so nothing but its poll of the whole table can find the late row.
    let producing = Arc::new(AtomicBool::new(true));
    let producer = {
        let (db, q, producing) = (db.handle(), queue.name.clone(), producing.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut pace = tokio::time::interval(Duration::from_millis(20));
            while producing.load(Ordering::SeqCst) {
                pace.tick().await;
                ids.push(db.insert(&q, None, json!({"n": ids.len()})).await);
            }
            ids
        })
    };
    queue.wait_for(20, Duration::from_secs(20)).await;
    let published_before = queue.count();

    let committed = Instant::now();
    late.commit().await;
    let margin = Duration::from_secs(2);
    eventually(
        "the late row within the poll interval and a margin",
        poll + margin,
        || async { queue.received().iter().any(|m| m.message_id == late_id) },
    )
    .await;
    let took = committed.elapsed();
    producing.store(false, Ordering::SeqCst);
    let others = producer.await.unwrap();

    let late_row = db.row_id(&late_id).await;
    let first_other = db.row_id(&others[0]).await;
    assert!(
        late_row < first_other,
        "the late row ({late_row}) should hold a lower id than the rows published before it ({first_other})"
    );
    let mut all: HashSet<String> = others.into_iter().collect();
    all.insert(late_id);
    let received = queue
        .wait_for_distinct(all.len(), Duration::from_secs(20))
        .await;
    let got: HashSet<String> = received.into_iter().map(|m| m.message_id).collect();
    assert_eq!(got, all);
    println!(
        "late row (id {late_row}, below {published_before} rows already published) arrived {took:?} after its commit"
    );
}

/// Without notifications a quiet relay finds a new row at its next poll, which backs off to
/// OUTBOX_POLL_INTERVAL: after three quiet seconds the next is about two seconds away. A
/// service that posts `/wake` after its commit has the row published at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_whose_service_posts_wake_after_its_commit_is_published_at_once() {
    let db = Db::new(Backend::Mysql).await;
    let queue = TestQueue::new().await;
    let relay = Relay::start(
        &db.url,
        &db.table,
        &[
            ("OUTBOX_POLL_INTERVAL", "10s"),
            ("OUTBOX_LEADER_CHECK", "10s"),
            ("OUTBOX_LEASE_TIMEOUT", "30s"),
        ],
    );
    wait_leading(&relay).await;
    let service = db.handle();
    let mut took = Vec::new();
    for round in 0..3 {
        // The stimulus, not a wait for a condition: the relay idles, its polls back off.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let id = service
            .insert(&queue.name, None, json!({"round": round}))
            .await;
        let committed = Instant::now();
        assert_eq!(http_post(relay.http, "/wake").await.0, 204);
        eventually(
            "the row within 500 ms of its commit and wake",
            Duration::from_millis(500),
            || async { queue.received().iter().any(|m| m.message_id == id) },
        )
        .await;
        took.push(committed.elapsed());
    }
    println!("commit + POST /wake to consumer, after 3 s quiet (checked every 50 ms): {took:?}");
}

/// Percentile `p` (0 to 1) of sorted `xs`.
fn percentile(xs: &[Duration], p: f64) -> Duration {
    xs[((xs.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn service_inserts_never_wait_on_the_relay_while_it_drains_a_100k_backlog() {
    const BACKLOG: usize = 100_000;
    const KEYS: usize = 100;
    let db = Db::new(Backend::Mysql).await;
    let queue = TestQueue::new().await;
    let loaded = Instant::now();
    let backlog: Vec<Row> = (0..BACKLOG)
        .map(|i| {
            let key = format!("k{}", i % KEYS);
            Row::new(&queue.name, json!({"key": key, "seq": i})).key(&key)
        })
        .collect();
    let mut all: HashSet<String> = db.insert_rows(&backlog).await.into_iter().collect();
    println!("{BACKLOG} rows loaded in {:?}", loaded.elapsed());

    let drain = Instant::now();
    let _relay = Relay::start(&db.url, &db.table, &[]);
    eventually(
        "the drain to be under way",
        Duration::from_secs(30),
        || async { queue.count() >= 1000 },
    )
    .await;

    // A service writing the same ordering keys (and rows without one), one transaction
    // every 10 ms, for as long as the drain goes on.
    let mut latencies = Vec::new();
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    let mut n = 0;
    while queue.count() < BACKLOG {
        assert!(
            drain.elapsed() < Duration::from_secs(300),
            "the backlog did not drain within 300 s ({} delivered)",
            queue.count()
        );
        pace.tick().await;
        let started = Instant::now();
        let mut tx = db.begin().await;
        let key = format!("k{}", n % KEYS);
        let keyed = Row::new(&queue.name, json!({"key": key, "seq": BACKLOG + n})).key(&key);
        all.insert(tx.insert(&keyed).await);
        all.insert(tx.insert(&Row::new(&queue.name, json!({"n": n}))).await);
        tx.commit().await;
        latencies.push(started.elapsed());
        n += 1;
    }
    let drained = drain.elapsed();
    latencies.sort();
    let (p50, p99, max) = (
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        *latencies.last().unwrap(),
    );
    println!(
        "{BACKLOG} rows drained in {drained:?}; {n} service transactions of 2 inserts meanwhile: p50 {p50:?}, p99 {p99:?}, max {max:?}"
    );
    assert!(n >= 50, "only {n} service transactions during the drain");
    assert!(
        max < Duration::from_secs(1),
        "a service transaction took {max:?} during the drain (p99 {p99:?})"
    );
    let received = queue
        .wait_for_distinct(all.len(), Duration::from_secs(120))
        .await;
    let got: HashSet<String> = received.into_iter().map(|m| m.message_id).collect();
    assert_eq!(got.len(), all.len());
    assert_eq!(got, all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_takes_mariadb_urls() {
    let db = Db::new(Backend::Mysql).await;
    let queue = TestQueue::new().await;
    let url = db.url.replacen("mysql://", "mariadb://", 1);
    assert_ne!(url, db.url);
    let outbox = |args: &[&str]| {
        let out = outbox_bin()
            .args(args)
            .env("DATABASE_URL", &url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "outbox {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    // Already migrated by the harness: a second run changes nothing.
    outbox(&["migrate"]);
    let before = db.count("true").await;
    let id = db
        .insert(&queue.name, None, json!({"via": "mariadb"}))
        .await;
    let status = outbox(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["pending"], json!(before + 1), "{status}");

    let _relay = Relay::start(&url, &db.table, &[]);
    let m = queue.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(m[0].message_id, id);
}

/// On a Galera node MariaDB 10.11 grants `GET_LOCK` on that node alone (others refuse it):
/// relays on two nodes would both lead. The relay exits 1 saying so in one line, and
/// publishes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_on_a_galera_node_exits_saying_so_in_one_line() {
    let node = MariadbNode::galera();
    let url = format!("mysql://root@127.0.0.1:{}/outbox", node.port);
    let migrated = outbox_bin()
        .arg("migrate")
        .env("DATABASE_URL", &url)
        .output()
        .unwrap();
    assert!(migrated.status.success(), "{migrated:?}");

    let mut relay = Relay::start(&url, &outbox::TableName::default(), &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = relay.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the relay still runs on a Galera node"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = relay.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    let said: Vec<&str> = log.lines().filter(|l| l.contains("Galera")).collect();
    assert_eq!(said.len(), 1, "one line names Galera: {log}");
    assert!(
        said[0].starts_with("outbox: unsupported database: this server is a Galera Cluster node"),
        "{log}"
    );
    assert!(!log.contains("leading"), "{log}");
}
