//! The sidecar as a process: leadership and failover, SIGKILL and SIGTERM, bad
//! configuration, and a database that is down at start; on both backends.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_of_two_relays_leads_and_the_other_takes_over_after_sigkill(backend: Backend) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let mut relays = [
            Relay::start(&db.url, &db.table, &[]),
            Relay::start(&db.url, &db.table, &[]),
        ];

        eventually("one relay to lead", Duration::from_secs(20), || async {
            relays[0].is_leader().await || relays[1].is_leader().await
        })
        .await;
        let leader = if relays[0].is_leader().await { 0 } else { 1 };
        let standby = 1 - leader;
        assert!(!relays[standby].is_leader().await, "two leaders");
        eventually(
            "the standby to report itself ready as a standby",
            Duration::from_secs(10),
            || async {
                let (code, body) = relays[standby].get("/readyz").await;
                code == 200 && body.contains("standby")
            },
        )
        .await;

        let mut ids = HashSet::new();
        for seq in 0..100 {
            ids.insert(db.insert(&queue.name, Some("k"), json!({"seq": seq})).await);
        }
        queue.wait_for(100, Duration::from_secs(30)).await;

        relays[leader].kill9();
        let killed = Instant::now();
        for seq in 100..200 {
            ids.insert(db.insert(&queue.name, Some("k"), json!({"seq": seq})).await);
        }
        eventually(
            "the standby to take over",
            Duration::from_secs(10),
            || async { relays[standby].is_leader().await },
        )
        .await;
        let takeover = killed.elapsed();
        queue
            .wait_for_distinct(ids.len(), Duration::from_secs(30))
            .await;
        let received = queue.received();
        let delivered: HashSet<String> = received.iter().map(|m| m.message_id.clone()).collect();
        assert_eq!(delivered, ids);
        // First deliveries in order; a row confirmed but not yet marked when the leader died is
        // published again by the next leader (a duplicate, allowed).
        let mut first = HashSet::new();
        let seqs: Vec<i64> = received
            .iter()
            .filter(|m| first.insert(m.message_id.clone()))
            .map(|m| m.body["seq"].as_i64().unwrap())
            .collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "order of key k broken across failover: {seqs:?}"
        );
        println!("takeover after SIGKILL: {takeover:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigkill_in_the_middle_of_a_backlog_loses_nothing(backend: Backend) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let rows: Vec<Row> = (1..=20000)
            .map(|i| {
                let key = format!("k{}", i % 50);
                Row::new(&queue.name, json!({"key": key, "seq": i})).key(&key)
            })
            .collect();
        db.insert_rows(&rows).await;
        let all: HashSet<String> = db.message_ids().await;

        let mut relay = Relay::start(&db.url, &db.table, &[("OUTBOX_BATCH_SIZE", "200")]);
        eventually(
            "a part of the backlog to be delivered",
            Duration::from_secs(30),
            || async { queue.count() >= 1000 },
        )
        .await;
        relay.kill9();
        let at_kill = queue.count();
        assert!(
            at_kill < 20000,
            "the relay finished before it could be killed"
        );
        let _relay = Relay::start(&db.url, &db.table, &[]);

        queue
            .wait_for_distinct(all.len(), Duration::from_secs(120))
            .await;
        eventually("the table to drain", Duration::from_secs(10), || async {
            db.count("true").await == 0
        })
        .await;
        let received = queue.received();
        let delivered: HashSet<String> = received.iter().map(|m| m.message_id.clone()).collect();
        assert_eq!(delivered, all);
        // First deliveries in order per key.
        let mut first = HashSet::new();
        let mut last_seq = std::collections::HashMap::new();
        for m in &received {
            if first.insert(m.message_id.clone()) {
                let seq = m.body["seq"].as_i64().unwrap();
                let prev = last_seq.insert(m.body["key"].as_str().unwrap().to_owned(), seq);
                assert!(
                    prev.is_none_or(|p| p < seq),
                    "key order broken at seq {seq}"
                );
            }
        }
        println!(
            "killed after {at_kill} deliveries; {} duplicates after restart",
            received.len() - all.len()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_stops_claiming_drains_and_exits_0(backend: Backend) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let rows: Vec<Row> = (1..=20000)
            .map(|i| Row::new(&queue.name, json!({"seq": i})))
            .collect();
        db.insert_rows(&rows).await;
        let all: HashSet<String> = db.message_ids().await;
        let mut relay = Relay::start(&db.url, &db.table, &[]);
        eventually(
            "a part of the backlog to be delivered",
            Duration::from_secs(30),
            || async { queue.count() >= 500 },
        )
        .await;
        let status = relay.terminate();
        assert_eq!(status.code(), Some(0), "{}", relay.log_text());

        let remaining: HashSet<String> = db.message_ids().await;
        assert!(
            !remaining.is_empty(),
            "the relay drained everything before the signal"
        );
        // Every row marked sent (deleted) had been confirmed, so it must reach the queue.
        let marked: Vec<&String> = all.difference(&remaining).collect();
        eventually(
            "every marked row to be in the queue",
            Duration::from_secs(10),
            || async {
                let got: HashSet<String> =
                    queue.received().into_iter().map(|m| m.message_id).collect();
                marked.iter().all(|id| got.contains(*id))
            },
        )
        .await;
    }

    #[tokio::test]
    async fn bad_configuration_exits_2_naming_each_variable_without_passwords(backend: Backend) {
        let database_url = format!("{}://app:db-s3cret@{}/x", backend.scheme(), backend.addr());
        let out = outbox_bin()
            .arg("relay")
            .env("DATABASE_URL", database_url)
            .env(
                "AMQP_URL",
                "amqp://app:mq-hunter2@127.0.0.1:5672/%2f,http://app:mq-hunter2@x",
            )
            .env("OUTBOX_BATCH_SIZE", "lots")
            .env("OUTBOX_TABLE", "outbox; DROP TABLE x")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        for name in ["AMQP_URL", "OUTBOX_BATCH_SIZE", "OUTBOX_TABLE"] {
            assert!(
                stderr.lines().any(|l| l.contains(name)),
                "{name} not named: {stderr}"
            );
        }
        assert!(
            !stderr.contains("s3cret") && !stderr.contains("hunter2"),
            "password printed: {stderr}"
        );

        let missing = outbox_bin()
            .arg("relay")
            .env_remove("DATABASE_URL")
            .env_remove("AMQP_URL")
            .output()
            .unwrap();
        assert_eq!(missing.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&missing.stderr);
        assert!(
            stderr.contains("DATABASE_URL") && stderr.contains("AMQP_URL"),
            "{stderr}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_down_at_start_is_retried_and_reported_not_ready(backend: Backend) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        // The relay's database address answers nothing until the test opens a proxy there.
        let port = free_port();
        // The password is there to prove it is never logged (PostgreSQL's trust authentication
        // ignores it; on MySQL it is a user of this test's).
        let with_password = db.url_with_password("pw-s3cret").await;
        let user = url::Url::parse(&with_password)
            .unwrap()
            .username()
            .to_owned();
        let server = backend.addr();
        let url = with_password.replace(&server.to_string(), &format!("127.0.0.1:{port}"));
        assert_ne!(url, with_password, "test server URL must name {server}");
        let mut relay = Relay::start(&url, &db.table, &[]);

        eventually("/healthz to answer", Duration::from_secs(20), || async {
            relay.get("/healthz").await.0 == 200
        })
        .await;
        let (code, body) = relay.get("/readyz").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("database unreachable"), "{body}");
        assert!(
            relay.child.try_wait().unwrap().is_none(),
            "the relay exited: {}",
            relay.log_text()
        );
        assert!(
            relay.log_text().contains(&format!("{user}:***@")),
            "log does not show the redacted URL"
        );
        assert!(
            !relay.log_text().contains("pw-s3cret"),
            "log shows the password"
        );

        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(server).await {
                        let _ = copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        let id = db
            .insert(&queue.name, None, json!({"after": "outage"}))
            .await;
        eventually("/readyz to turn 200", Duration::from_secs(30), || async {
            relay.get("/readyz").await.0 == 200
        })
        .await;
        let m = queue.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(m[0].message_id, id);
    }
}
