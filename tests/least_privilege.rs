//! The relay runs with the least privileges the README documents. In the database: a user
//! (a role on PostgreSQL) of its own that may only read, update and delete the outbox table
//! and read and update `<table>_leader`; under it the relay delivers, `outbox status` reads
//! and `outbox dead retry` releases a dead row, while a business table stays out of its
//! reach. At the broker: a user of its own, on a vhost of its own, with write permission on
//! the target exchange and the default exchange (`amq.default`) only.

mod common;

use std::time::Duration;

use common::*;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::json;

/// What the relay's database user is granted: nothing more.
const RELAY_GRANTS: [(&str, &str); 2] = [
    ("SELECT, UPDATE, DELETE", "outbox"),
    ("SELECT, UPDATE", "outbox_leader"),
];

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_relay_needs_only_its_documented_grants(backend: Backend) {
        let db = Db::new(backend).await;
        db.execute("CREATE TABLE orders (id INT PRIMARY KEY)").await;
        let url = db.url_with_grants(&RELAY_GRANTS).await;
        let queue = TestQueue::new().await;
        let exchange = unique("x");
        let env = [("OUTBOX_MAX_ATTEMPTS", "1")];
        let relay = Relay::start(&url, &db.table, &env);
        let dead = db.insert_row(&Row::new("k", json!({"dead": true})).exchange(&exchange)).await;
        eventually("a dead row", Duration::from_secs(30), || async {
            db.count("state = 'dead'").await == 1
        })
        .await;
        let delivered = db.insert(&queue.name, None, json!({"n": 1})).await;
        queue.wait_for_distinct(1, Duration::from_secs(30)).await;

        let as_relay = |args: &[&str]| db.outbox().env("DATABASE_URL", &url).args(args).output().unwrap();
        let status = as_relay(&["status", "--json"]);
        assert!(status.status.success(), "status: {status:?}");
        queue.channel
            .exchange_declare(exchange.as_str().into(), ExchangeKind::Direct, auto_delete(), FieldTable::default())
            .await
            .unwrap();
        queue.bind(&exchange, "k").await;
        let retry = as_relay(&["dead", "retry", "--all"]);
        assert!(retry.status.success(), "dead retry: {retry:?}");
        let ids: Vec<String> = queue.wait_for_distinct(2, Duration::from_secs(30)).await
            .into_iter().map(|m| m.message_id).collect();
        assert!(ids.contains(&dead) && ids.contains(&delivered), "{ids:?}");
        assert!(relay.log_text().contains("connected to the broker"));

        let business = Pool::connect(backend, &url, 1).await;
        let denied = business.try_rows::<(i32,)>("SELECT id FROM orders").await;
        assert!(denied.is_err(), "the relay's user reads a business table");
    }
}

fn auto_delete() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        auto_delete: true,
        ..Default::default()
    }
}

/// A vhost and a user of this test on the shared broker, deleted when dropped.
struct BrokerUser {
    vhost: String,
    user: String,
}

impl BrokerUser {
    /// The user may write to exchanges matching `write` and neither configure nor read;
    /// guest may do everything on the vhost, to set it up.
    fn create(write: &str) -> Self {
        let (vhost, user) = (unique("vhost"), unique("relay"));
        rabbitmqctl(&["add_vhost", &vhost]);
        let guard = BrokerUser { vhost, user };
        let v = guard.vhost.as_str();
        rabbitmqctl(&["add_user", &guard.user, "relay-password"]);
        rabbitmqctl(&["set_permissions", "-p", v, &guard.user, "^$", write, "^$"]);
        rabbitmqctl(&["set_permissions", "-p", v, "guest", ".*", ".*", ".*"]);
        guard
    }

    fn url(&self, user: &str, password: &str) -> String {
        format!("amqp://{user}:{password}@127.0.0.1:5672/{}", self.vhost)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_vhost", &self.vhost]);
        rabbitmqctl(&["delete_user", &self.user]);
    }
}

/// How many messages are ready in `queue`.
async fn ready(channel: &Channel, queue: &str) -> u32 {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = channel.queue_declare(queue.into(), passive, FieldTable::default());
    declared.await.map(|q| q.message_count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_needs_only_write_on_its_exchanges() {
    let db = Db::new(Backend::Postgres).await;
    let (exchange, queue) = (unique("x"), unique("q"));
    // Rows for the default exchange need write on amq.default.
    let broker = BrokerUser::create(&format!("^(amq\\.default|{exchange})$"));
    let conn = Connection::connect(
        &broker.url("guest", "guest"),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Direct,
            auto_delete(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let url = broker.url(&broker.user, "relay-password");
    let relay = Relay::start(&db.url, &db.table, &[("AMQP_URL", &url)]);
    for n in 0..3 {
        db.insert_row(&Row::new("k", json!({"n": n})).exchange(&exchange))
            .await;
    }
    db.insert(&queue, None, json!({"default exchange": true}))
        .await;
    eventually("four messages routed", Duration::from_secs(30), || async {
        ready(&channel, &queue).await == 4
    })
    .await;
    eventually("every row marked sent", Duration::from_secs(10), || async {
        db.count("state = 'pending'").await == 0
    })
    .await;
    let log = relay.log_text();
    assert!(!log.contains("ACCESS_REFUSED"), "{log}");
    let _ = conn.close(200, "done".into()).await;
}
