//! Faults that close nothing: connections that go silent (a NAT forgot an idle flow, a host
//! lost power), and a database that is down or frozen. Each test puts the relay behind the
//! fault proxy (`tests/common/proxy.rs`) and checks that nothing waits forever, nothing is
//! lost and order per key holds. On both backends: the database proxy sits in front of
//! PostgreSQL or MariaDB.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const MQ: &str = "127.0.0.1:5672";

/// The URL of `db` through `proxy`.
fn through(db: &Db, proxy: &Proxy) -> String {
    db.url_at(proxy.addr)
}

/// A fault proxy in front of `db`'s server.
async fn db_proxy(db: &Db) -> Proxy {
    Proxy::start(db.backend.addr()).await
}

/// The broker's URL through `proxy`.
fn amqp_through(proxy: &Proxy) -> String {
    format!("amqp://guest:guest@{}/%2f", proxy.addr)
}

/// Commits `n` rows over `keys` ordering keys, each with its key and sequence number.
async fn commit_rows(db: &Db, queue: &TestQueue, n: i64, keys: i64) -> HashSet<String> {
    let mut ids = HashSet::new();
    for seq in 0..n {
        let key = format!("k{}", seq % keys);
        let body = json!({"key": key, "seq": seq});
        ids.insert(db.insert(&queue.name, Some(&key), body).await);
    }
    ids
}

/// Checks that the first arrival of each message is in sequence order within its key.
fn assert_first_arrivals_in_order(received: &[Received]) {
    let mut first = HashSet::new();
    let mut last: HashMap<String, i64> = HashMap::new();
    for m in received
        .iter()
        .filter(|m| first.insert(m.message_id.clone()))
    {
        let key = m.body["key"].as_str().unwrap().to_owned();
        let seq = m.body["seq"].as_i64().unwrap();
        let prev = last.insert(key.clone(), seq);
        assert!(
            prev.is_none_or(|p| p < seq),
            "key {key}: {seq} arrived first after {prev:?}"
        );
    }
}

/// CPU seconds (user and system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

async fn wait_ready(relay: &Relay) {
    eventually("the relay to be ready", Duration::from_secs(30), || async {
        relay.get("/readyz").await.0 == 200 && relay.is_leader().await
    })
    .await;
}

/// A ready relay, with `env`, on a database and a queue of its own, that reaches the broker
/// through a fault proxy.
async fn relay_behind_broker_proxy(
    backend: Backend,
    env: &[(&str, &str)],
) -> (Db, TestQueue, Proxy, Relay) {
    let db = Db::new(backend).await;
    let queue = TestQueue::new().await;
    let mq = Proxy::start(MQ.parse().unwrap()).await;
    let amqp = amqp_through(&mq);
    let mut env = env.to_vec();
    env.push(("AMQP_URL", amqp.as_str()));
    let relay = Relay::start(&db.url, &db.table, &env);
    wait_ready(&relay).await;
    (db, queue, mq, relay)
}

/// The relay's CPU time while its database is unreachable for 30 s, in `fault`.
async fn cpu_while_the_database_is_unreachable(
    backend: Backend,
    fault: impl Fn(&Proxy),
    heal: impl Fn(&Proxy),
) {
    let db = Db::new(backend).await;
    let queue = TestQueue::new().await;
    let dbp = db_proxy(&db).await;
    let relay = Relay::start(&through(&db, &dbp), &db.table, &[]);
    wait_ready(&relay).await;
    commit_rows(&db, &queue, 20, 2).await;
    queue.wait_for_distinct(20, Duration::from_secs(30)).await;
    let ids = commit_rows(&db, &queue, 20, 2).await;
    fault(&dbp);
    let before = cpu_seconds(relay.child.id());
    tokio::time::sleep(Duration::from_secs(30)).await;
    let used = cpu_seconds(relay.child.id()) - before;
    println!("relay CPU over 30 s without its database: {used:.2} s");
    assert!(
        used < 0.05 * 30.0,
        "the relay used {used:.2} s of CPU in 30 s"
    );
    heal(&dbp);
    let received = queue.wait_for_distinct(40, Duration::from_secs(60)).await;
    let got: HashSet<String> = received.iter().map(|m| m.message_id.clone()).collect();
    assert!(ids.is_subset(&got));
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rows_committed_after_a_quiet_spell_behind_idle_freezing_proxies_are_all_delivered(
        backend: Backend,
    ) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let dbp = db_proxy(&db).await;
        let mq = Proxy::start(MQ.parse().unwrap()).await;
        let amqp = amqp_through(&mq);
        let mut relay = Relay::start(
            &through(&db, &dbp),
            &db.table,
            &[
                ("AMQP_URL", amqp.as_str()),
                ("OUTBOX_LEADER_CHECK", "1s"),
                ("OUTBOX_POLL_INTERVAL", "1s"),
            ],
        );
        wait_ready(&relay).await;
        // A NAT that forgets flows idle for 3 s: the pool's connections and the broker
        // connection (heartbeats every 5 s) go silent; the lease (and on PostgreSQL the
        // listener), which hear from the leader every second, stay alive.
        dbp.freeze_idle(Duration::from_secs(3));
        mq.freeze_idle(Duration::from_secs(3));
        eventually(
            "the quiet spell to freeze flows to both services",
            Duration::from_secs(30),
            || async { dbp.frozen_flows() > 0 && mq.frozen_flows() > 0 },
        )
        .await;
        let committed = Instant::now();
        let ids = commit_rows(&db, &queue, 300, 10).await;
        let received = queue
            .wait_for_distinct(ids.len(), Duration::from_secs(90))
            .await;
        println!(
            "300 rows committed after the quiet spell delivered {:?} after the commit began",
            committed.elapsed()
        );
        let got: HashSet<String> = received.iter().map(|m| m.message_id.clone()).collect();
        assert_eq!(got, ids);
        assert_first_arrivals_in_order(&received);

        let asked = Instant::now();
        let status = relay.terminate();
        assert_eq!(status.code(), Some(0), "{}", relay.log_text());
        // OUTBOX_SHUTDOWN_GRACE (10 s) and 1 s to close the broker connection.
        assert!(
            asked.elapsed() < Duration::from_secs(11),
            "SIGTERM took {:?}",
            asked.elapsed()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn when_the_leaders_host_vanishes_a_standby_takes_over_within_the_bound(
        backend: Backend,
    ) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let dbp = db_proxy(&db).await;
        let mq = Proxy::start(MQ.parse().unwrap()).await;
        let amqp = amqp_through(&mq);
        // Default leadership timings: the bound is the documented one.
        let timings = [
            ("OUTBOX_LEADER_CHECK", "1s"),
            ("OUTBOX_POLL_INTERVAL", "1s"),
        ];
        let mut env = vec![("AMQP_URL", amqp.as_str())];
        env.extend(timings);
        let old = Relay::start(&through(&db, &dbp), &db.table, &env);
        wait_ready(&old).await;
        let standby = Relay::start(&db.url, &db.table, &timings);
        eventually(
            "the standby to stand by",
            Duration::from_secs(20),
            || async {
                let (code, body) = standby.get("/readyz").await;
                code == 200 && body.contains("standby")
            },
        )
        .await;
        let mut ids = commit_rows(&db, &queue, 100, 10).await;
        queue
            .wait_for_distinct(ids.len(), Duration::from_secs(30))
            .await;

        // The host vanishes: every flow, open and new, goes silent; nothing is closed.
        dbp.freeze_all();
        mq.freeze_all();
        let vanished = Instant::now();
        for seq in 100..200 {
            let key = format!("k{}", seq % 10);
            ids.insert(
                db.insert(&queue.name, Some(&key), json!({"key": key, "seq": seq}))
                    .await,
            );
        }
        eventually(
            "the standby to lead within 15 s",
            Duration::from_secs(15),
            || async { standby.is_leader().await },
        )
        .await;
        let takeover = vanished.elapsed();
        let received = queue
            .wait_for_distinct(ids.len(), Duration::from_secs(60))
            .await;
        assert_first_arrivals_in_order(&received);
        assert_eq!(
            old.metric("outbox_leader").await,
            Some(0.0),
            "the old leader still claims the table"
        );

        // The host comes back: its late frames arrive; it must find it leads no more.
        dbp.thaw();
        mq.thaw();
        let more = commit_rows(&db, &queue, 50, 10).await;
        ids.extend(more);
        let received = queue
            .wait_for_distinct(ids.len(), Duration::from_secs(60))
            .await;
        eventually("the table to be empty", Duration::from_secs(30), || async {
            db.count("true").await == 0
        })
        .await;
        let leaders = [old.is_leader().await, standby.is_leader().await];
        assert_eq!(leaders, [false, true], "exactly the standby leads");
        let got: HashSet<String> = received.iter().map(|m| m.message_id.clone()).collect();
        assert_eq!(got, ids);
        println!("takeover {takeover:?} after the leader's host vanished");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_frozen_at_start_is_reported_not_ready_then_used(backend: Backend) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let dbp = db_proxy(&db).await;
        dbp.freeze_all();
        let relay = Relay::start(
            &through(&db, &dbp),
            &db.table,
            &[
                ("OUTBOX_CONNECT_TIMEOUT", "2s"),
                ("OUTBOX_QUERY_TIMEOUT", "2s"),
            ],
        );
        eventually(
            "/readyz to say the database is unreachable",
            Duration::from_secs(30),
            || async {
                let (code, body) = relay.get("/readyz").await;
                code == 503 && body.contains("database unreachable")
            },
        )
        .await;
        assert_eq!(relay.get("/healthz").await.0, 200, "waiting is not a stall");
        let id = db.insert(&queue.name, None, json!({"after": "thaw"})).await;
        dbp.thaw();
        let m = queue.wait_for(1, Duration::from_secs(60)).await;
        assert_eq!(m[0].message_id, id);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_down_for_30_s_costs_under_5_percent_of_a_core(backend: Backend) {
        cpu_while_the_database_is_unreachable(backend, |p| p.refuse(true), |p| p.refuse(false))
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_frozen_for_30_s_costs_under_5_percent_of_a_core(backend: Backend) {
        cpu_while_the_database_is_unreachable(backend, Proxy::freeze_all, Proxy::thaw).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unroutable_rows_published_around_a_confirm_timeout_go_dead_never_sent(
        backend: Backend,
    ) {
        let (db, queue, mq, _relay) = relay_behind_broker_proxy(
            backend,
            &[
                ("OUTBOX_CONFIRM_TIMEOUT", "1s"),
                ("OUTBOX_MAX_ATTEMPTS", "3"),
                ("OUTBOX_BACKOFF_MIN", "100ms"),
                ("OUTBOX_BACKOFF_MAX", "300ms"),
            ],
        )
        .await;
        let (mut routed, mut unroutable) = (HashSet::new(), HashSet::new());
        for episode in 0..4 {
            for seq in 0..250 {
                if seq % 5 == 0 {
                    unroutable.insert(db.insert("nowhere", None, json!({"seq": seq})).await);
                } else {
                    routed.insert(db.insert(&queue.name, None, json!({"seq": seq})).await);
                }
            }
            // Confirms stop for longer than the timeout while publishes are in flight; then
            // the broker answers everything it held, returns included.
            mq.freeze_all();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            mq.thaw();
            println!("episode {episode}: frozen 1.5 s with a 1 s confirm timeout");
        }
        queue
            .wait_for_distinct(routed.len(), Duration::from_secs(60))
            .await;
        eventually(
            "every unroutable row to go dead",
            Duration::from_secs(60),
            || async { db.count("state = 'dead'").await == unroutable.len() as i64 },
        )
        .await;
        let left = db.message_ids().await;
        assert!(
            unroutable.is_subset(&left),
            "an unroutable row was marked sent"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishes_awaiting_a_silent_brokers_confirm_are_counted_until_it_answers(
        backend: Backend,
    ) {
        let (db, queue, mq, relay) =
            relay_behind_broker_proxy(backend, &[("OUTBOX_POLL_INTERVAL", "1s")]).await;
        const UNCONFIRMED: &str = "outbox_unconfirmed_publishes";
        assert_eq!(relay.metric(UNCONFIRMED).await, Some(0.0));
        // The broker goes silent: the publishes leave, and no confirm comes back.
        mq.freeze_all();
        let ids = commit_rows(&db, &queue, 20, 20).await;
        eventually(
            "the 20 publishes to await their confirms",
            Duration::from_secs(5),
            || async { relay.metric(UNCONFIRMED).await == Some(20.0) },
        )
        .await;
        mq.thaw();
        queue
            .wait_for_distinct(ids.len(), Duration::from_secs(30))
            .await;
        eventually(
            "no publish left awaiting a confirm",
            Duration::from_secs(10),
            || async { relay.metric(UNCONFIRMED).await == Some(0.0) },
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn healthz_fails_when_the_leaders_pool_is_frozen_with_rows_pending(backend: Backend) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let dbp = db_proxy(&db).await;
        let relay = Relay::start(
            &through(&db, &dbp),
            &db.table,
            &[
                ("OUTBOX_STALL_TIMEOUT", "4s"),
                ("OUTBOX_CONNECT_TIMEOUT", "2s"),
                ("OUTBOX_QUERY_TIMEOUT", "2s"),
            ],
        );
        wait_ready(&relay).await;
        assert_eq!(relay.get("/healthz").await.0, 200);
        // The pool's connections freeze once idle, and so does every new one; the lease and
        // (on PostgreSQL) the listener, busy every 200 ms, go on.
        dbp.freeze_idle(Duration::from_secs(1));
        dbp.freeze_new();
        eventually("the pool to freeze", Duration::from_secs(20), || async {
            dbp.frozen_flows() > 0
        })
        .await;
        let ids = commit_rows(&db, &queue, 10, 2).await;
        eventually("/healthz to fail", Duration::from_secs(30), || async {
            relay.get("/healthz").await.0 == 503
        })
        .await;
        let (_, why) = relay.get("/healthz").await;
        assert!(why.contains("held pending rows"), "{why}");
        assert!(relay.is_leader().await, "the lease should have held");
        dbp.thaw();
        let received = queue
            .wait_for_distinct(ids.len(), Duration::from_secs(60))
            .await;
        assert_eq!(received.len(), ids.len());
        eventually(
            "/healthz to pass again",
            Duration::from_secs(20),
            || async { relay.get("/healthz").await.0 == 200 },
        )
        .await;
    }
}
