//! Components that can be killed and restarted, and the chaos that does it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};
use serde::Serialize;
use sqlx::{MySqlPool, PgPool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

type Starter = Arc<dyn Fn(CancellationToken) -> JoinHandle<()> + Send + Sync>;

/// A relay or consumer running as a task.
pub struct Component {
    pub name: &'static str,
    start: Starter,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Component {
    pub fn start<F, Fut>(name: &'static str, run: F) -> Self
    where
        F: Fn(CancellationToken) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let start: Starter = Arc::new(move |stop| tokio::spawn(run(stop)));
        let stop = CancellationToken::new();
        let task = start(stop.clone());
        Component {
            name,
            start,
            stop,
            task,
        }
    }

    /// Like SIGKILL: nothing in flight is finished or acknowledged. (The token ends the
    /// helper tasks, such as the relay's hold on its leadership lock.)
    pub fn kill(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }

    pub fn restart(&mut self) {
        self.stop = CancellationToken::new();
        self.task = (self.start)(self.stop.clone());
    }

    /// A clean stop.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ChaosCounts {
    pub relay_kills: u32,
    pub consumer_kills: u32,
    pub duplicates_injected: u32,
}

/// Kills and restarts components at random moments and publishes sent messages again.
pub struct Chaos {
    stop: CancellationToken,
    task: JoinHandle<(Vec<Component>, ChaosCounts)>,
}

impl Chaos {
    pub fn start(components: Vec<Component>, dbs: [ServiceDb; 2], channel: Channel) -> Self {
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(components, dbs, channel, stop.clone()));
        Chaos { stop, task }
    }

    /// Stops the chaos with every component running again.
    pub async fn stop(self) -> (Vec<Component>, ChaosCounts) {
        self.stop.cancel();
        self.task.await.expect("chaos task")
    }
}

async fn run(
    mut components: Vec<Component>,
    dbs: [ServiceDb; 2],
    channel: Channel,
    stop: CancellationToken,
) -> (Vec<Component>, ChaosCounts) {
    let mut counts = ChaosCounts::default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mut seed = (nanos as u64) | 1;
    let mut random = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    while !stop.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(50 + random(250))).await;
        match random(3) {
            0 | 1 => {
                let c = &mut components[random(4) as usize];
                c.kill();
                if c.name.contains("relay") {
                    counts.relay_kills += 1;
                } else {
                    counts.consumer_kills += 1;
                }
                tokio::time::sleep(Duration::from_millis(20 + random(300))).await;
                c.restart();
            }
            _ => counts.duplicates_injected += republish(&dbs[random(2) as usize], &channel).await,
        }
    }
    (components, counts)
}

/// A service's database, on either backend.
pub enum ServiceDb {
    Postgres(PgPool),
    Mysql(MySqlPool),
}

type SentRow = (String, String, String, Option<String>, String);

impl ServiceDb {
    /// Up to three sent rows, at random.
    async fn sent_rows(&self) -> Vec<SentRow> {
        let rows =
            match self {
                ServiceDb::Postgres(pool) => sqlx::query_as(
                    "SELECT message_id::text, exchange, routing_key, message_type, payload::text
                     FROM outbox WHERE state = 'sent' ORDER BY random() LIMIT 3",
                )
                .fetch_all(pool)
                .await,
                ServiceDb::Mysql(pool) => {
                    sqlx::query_as(
                        "SELECT message_id, exchange, routing_key, message_type,
                            CAST(payload AS CHAR)
                     FROM outbox WHERE state = 'sent' ORDER BY RAND() LIMIT 3",
                    )
                    .fetch_all(pool)
                    .await
                }
            };
        rows.unwrap_or_default()
    }
}

/// Publishes up to three sent rows again, with their message ids: what a relay does when it
/// dies between the broker's confirm and its mark.
async fn republish(db: &ServiceDb, channel: &Channel) -> u32 {
    let rows = db.sent_rows().await;
    let mut sent = 0;
    for (id, exchange, key, kind, payload) in rows {
        let mut props = BasicProperties::default()
            .with_message_id(id.into())
            .with_delivery_mode(2);
        if let Some(kind) = kind {
            props = props.with_type(kind.into());
        }
        let published = channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                payload.as_bytes(),
                props,
            )
            .await;
        sent += u32::from(published.is_ok());
    }
    sent
}
