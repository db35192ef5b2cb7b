//! The broker's resource alarms, raised for real with `rabbitmqctl`: the relay notices
//! `connection.blocked`, stops claiming, reports it, and resumes without loss.
//!
//! The alarms are broker-wide, so this file holds one test that raises them in turn, once
//! per backend (they take turns: see `SERIALLY`); its guard puts the
//! broker's settings back even when an assertion fails. The inbox consumer keeps its records
//! in the relay's database, on either backend.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::json;

/// Applies each message by counting it.
#[derive(Clone)]
struct Count;

impl<DB: outbox::inbox::Database> outbox::inbox::Handler<serde_json::Value, DB> for Count
where
    DB::Connection: HandlerTx,
{
    async fn handle(
        &self,
        tx: &mut DB::Connection,
        _msg: &outbox::inbox::Incoming<serde_json::Value>,
    ) -> Result<(), outbox::inbox::HandlerError> {
        tx.run("UPDATE consumed SET n = n + 1", &[]).await?;
        Ok(())
    }
}

/// A queue that the inbox consumer declared (and left), holding 50 messages published before
/// the alarm: the consumer is started again during the alarm and must apply them all.
async fn backlog_for_the_alarm(db: &Db, round: usize) -> outbox::inbox::ConsumerConfig {
    db.execute("CREATE TABLE IF NOT EXISTS consumed (n BIGINT NOT NULL)")
        .await;
    db.execute("DELETE FROM consumed").await;
    db.execute("INSERT INTO consumed VALUES (0)").await;
    let mut config = outbox::inbox::ConsumerConfig::new(
        vec![amqp_url()],
        format!("alarm-{round}"),
        unique("alarm_inbox"),
    );
    config.queue_ttl = Some(Duration::from_secs(600));
    let stop = tokio_util::sync::CancellationToken::new();
    db.pool.consume(config.clone(), Count, stop.clone());
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    // A fresh channel per look: a passive declare of a missing queue closes its channel.
    let depth = |consumers: u32, messages: u32| {
        let (conn, queue) = (&conn, config.queue.clone());
        async move {
            let Ok(channel) = conn.create_channel().await else {
                return false;
            };
            let passive = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            match channel
                .queue_declare(queue.as_str().into(), passive, Default::default())
                .await
            {
                Ok(q) => q.consumer_count() == consumers && q.message_count() == messages,
                Err(_) => false,
            }
        }
    };
    eventually(
        "the consumer to declare its queue",
        Duration::from_secs(20),
        || depth(1, 0),
    )
    .await;
    stop.cancel();
    eventually("the consumer to leave", Duration::from_secs(20), || {
        depth(0, 0)
    })
    .await;
    for i in 0..50 {
        let props = lapin::BasicProperties::default().with_message_id(format!("m-{i}").into());
        channel
            .basic_publish(
                "".into(),
                config.queue.as_str().into(),
                Default::default(),
                b"{}",
                props,
            )
            .await
            .unwrap();
    }
    eventually("the backlog to be queued", Duration::from_secs(20), || {
        depth(0, 50)
    })
    .await;
    config
}

/// A relay of its own, blocked by the alarm with publishes waiting: SIGTERM stops it within
/// the grace period (plus a second to close its connection), and the rows it could not get
/// confirmed stay pending.
async fn sigterm_while_blocked_exits_within_the_grace_period(backend: Backend) {
    let db = Db::new(backend).await;
    let queue = TestQueue::new().await;
    let mut relay = Relay::start(&db.url, &db.table, &[("OUTBOX_SHUTDOWN_GRACE", "2s")]);
    for seq in 0..5 {
        db.insert(&queue.name, None, json!({"seq": seq})).await;
    }
    eventually(
        "the second relay to be blocked",
        Duration::from_secs(30),
        || async { relay.metric("outbox_broker_blocked").await == Some(1.0) },
    )
    .await;
    let asked = std::time::Instant::now();
    let status = relay.terminate();
    let took = asked.elapsed();
    assert_eq!(status.code(), Some(0), "{}", relay.log_text());
    assert!(
        took < Duration::from_secs(4),
        "SIGTERM during the alarm took {took:?}"
    );
    assert_eq!(
        db.count("state = 'pending'").await,
        5,
        "a row was marked without a confirm"
    );
    println!("SIGTERM during the memory alarm: exited 0 after {took:?}");
}

/// The alarms are broker-wide: the backends' tests take turns.
static SERIALLY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_and_disk_alarms_block_the_relay_which_reports_and_resumes_without_loss(
        backend: Backend,
    ) {
        let _turn = SERIALLY.lock().await;
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let relay = Relay::start(&db.url, &db.table, &[("OUTBOX_CONFIRM_TIMEOUT", "5s")]);
        eventually("the relay to be ready", Duration::from_secs(20), || async {
            relay.get("/readyz").await.0 == 200
        })
        .await;
        let settings = BrokerSettings::save();
        let mut ids = HashSet::new();

        let alarms: [(&str, &[&str]); 2] = [
            ("memory", &["set_vm_memory_high_watermark", "0.000001"]),
            ("disk", &["set_disk_free_limit", "100000GB"]),
        ];
        for (round, (resource, raise)) in alarms.into_iter().enumerate() {
            let backlog = backlog_for_the_alarm(&db, round).await;
            rabbitmqctl(raise);
            // RabbitMQ tells a connection it is blocked when it next publishes.
            for seq in 0..20 {
                ids.insert(
                    db.insert(&queue.name, Some("k"), json!({"round": round, "seq": seq}))
                        .await,
                );
            }
            eventually(
                &format!("{resource} alarm to be reported"),
                Duration::from_secs(30),
                || async { relay.metric("outbox_broker_blocked").await == Some(1.0) },
            )
            .await;
            if resource == "memory" {
                sigterm_while_blocked_exits_within_the_grace_period(backend).await;
            }
            let (code, body) = relay.get("/readyz").await;
            assert_eq!(code, 503, "{body}");
            assert!(
                body.contains("broker blocked publishing") && body.contains(resource),
                "{body}"
            );
            let (_, status) = relay.get("/api/status").await;
            let status: serde_json::Value = serde_json::from_str(&status).unwrap();
            assert_eq!(
                status["alarm"]["kind"],
                json!(resource),
                "status page does not show the alarm: {status}"
            );

            // An inbox consumer, on its own connections, drains its queue during the alarm.
            let stop = tokio_util::sync::CancellationToken::new();
            db.pool.consume(backlog.clone(), Count, stop.clone());
            eventually(
                "the inbox consumer to apply its backlog during the alarm",
                Duration::from_secs(30),
                || async { db.scalar("SELECT n FROM consumed").await == 50 },
            )
            .await;
            stop.cancel();
            assert_eq!(
                relay.metric("outbox_broker_blocked").await,
                Some(1.0),
                "the alarm ended too soon to prove anything"
            );

            // Rows committed during the alarm wait.
            for seq in 20..40 {
                ids.insert(
                    db.insert(&queue.name, Some("k"), json!({"round": round, "seq": seq}))
                        .await,
                );
            }
            settings.restore();
            eventually("the relay to resume", Duration::from_secs(30), || async {
                relay.metric("outbox_broker_blocked").await == Some(0.0)
                    && relay.get("/readyz").await.0 == 200
            })
            .await;
            queue
                .wait_for_distinct(ids.len(), Duration::from_secs(60))
                .await;
        }
        let got: HashSet<String> = queue.received().into_iter().map(|m| m.message_id).collect();
        assert_eq!(got, ids);
        let log = relay.log_text();
        assert!(
            log.matches("broker blocked publishing").count() >= 2,
            "one warning per change expected:\n{log}"
        );
    }
}
