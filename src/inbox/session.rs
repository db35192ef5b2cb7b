//! One consumer connection at a time: topology, the delivery stream, reconnection, and the
//! inbox purge.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, Consumer, ExchangeKind};
use serde::de::DeserializeOwned;
use sqlx::Pool;
use tokio_util::sync::CancellationToken;

use super::batches::Batches;
use super::database::Database;
use super::dead_letter::DeadLetters;
use super::delivery::Context;
use super::{ConsumerConfig, Handler, QueueType};
use crate::broker::{closed, connect, describe, reconnect_backoff};
use crate::config::redact;

/// Inbox rows deleted per statement.
const PURGE_BATCH: u64 = 1000;

/// Consumes until `shutdown`, reconnecting (with backoff, over the nodes) whenever the
/// connection is lost. Unacked deliveries at shutdown are redelivered by the broker.
///
/// `pool` is PostgreSQL's or MySQL's; the handler writes through a transaction of it.
pub async fn consume<T, H, DB>(
    pool: Pool<DB>,
    config: ConsumerConfig,
    handler: H,
    shutdown: CancellationToken,
) where
    DB: Database,
    T: DeserializeOwned + Send + Sync + 'static,
    H: Handler<T, DB>,
{
    let purge = tokio::spawn(purge_inbox(pool.clone(), config.clone(), shutdown.clone()));
    let ctx = Arc::new(Context::new(pool, &config, handler, shutdown.clone()));
    let mut backoff = reconnect_backoff();
    let mut next = 0;
    while !shutdown.is_cancelled() {
        let url = &config.amqp_urls[next % config.amqp_urls.len()];
        next += 1;
        let opened =
            tokio::time::timeout(config.connect_timeout, Session::open(url, &config)).await;
        match opened.unwrap_or_else(|_| Err(timed_out())) {
            Ok(session) => {
                tracing::info!(consumer = %config.consumer, queue = %config.queue, node = %redact(url), "consuming");
                backoff = reconnect_backoff();
                // After a lost connection, the next node in the list is tried first.
                session.consume(&ctx, &config, &shutdown).await;
            }
            Err(e) => {
                tracing::warn!(consumer = %config.consumer, node = %redact(url), error = %describe(&e), "consumer connection failed: retrying");
                let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        }
    }
    purge.abort();
}

/// The error of a broker operation that got no answer within the connect timeout.
fn timed_out() -> lapin::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no answer within the connect timeout",
    )
    .into()
}

/// The consuming connection, and a second one for dead letters (publishing connections are
/// blocked during alarms; acks must not be).
struct Session {
    /// Deliveries and acks.
    conn: Connection,
    /// The consuming channel.
    channel: Channel,
    /// Dead letters, on their own connection.
    dead: DeadLetters,
}

impl Session {
    /// Connects, declares the topology and opens the dead-letter connection; the caller
    /// bounds all of it with the connect timeout.
    async fn open(url: &str, config: &ConsumerConfig) -> Result<Self, lapin::Error> {
        let conn = connect(url, &config.tls).await?;
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(config.prefetch, BasicQosOptions::default())
            .await?;
        declare(&channel, config).await?;
        let dead = DeadLetters::open(url, config).await?;
        Ok(Session {
            conn,
            channel,
            dead,
        })
    }

    /// Handles deliveries until either connection is lost or `shutdown`; in-flight
    /// deliveries finish first (at shutdown they stop retrying).
    async fn consume<DB, T, H>(
        self,
        ctx: &Arc<Context<DB, T, H>>,
        config: &ConsumerConfig,
        shutdown: &CancellationToken,
    ) where
        DB: Database,
        T: DeserializeOwned + Send + Sync + 'static,
        H: Handler<T, DB>,
    {
        if let Some(consumer) = self.start(config).await {
            let concurrency = config.concurrency.max(1);
            let deliveries = Box::pin(consumer.take_until(self.ended(config, shutdown)));
            let body = |d: &Result<Delivery, lapin::Error>| d.as_ref().map_or(0, |d| d.data.len());
            Batches::new(deliveries, config.batch, config.prefetch_bytes / concurrency, body)
                .for_each_concurrent(concurrency, |chunk| async {
                    let mut deliveries = Vec::with_capacity(chunk.len());
                    for delivery in chunk {
                        match delivery {
                            Ok(delivery) => deliveries.push(delivery),
                            Err(e) => tracing::warn!(consumer = %config.consumer, error = %e, "delivery stream failed"),
                        }
                    }
                    ctx.process(deliveries, &self.dead).await;
                })
                .await;
        }
        self.close(config).await;
    }

    /// `basic.consume` on the queue, within the connect timeout.
    async fn start(&self, config: &ConsumerConfig) -> Option<Consumer> {
        let tag = format!("{}-{}", config.consumer, uuid::Uuid::new_v4().simple());
        let consume = self.channel.basic_consume(
            config.queue.as_str().into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        );
        let started = tokio::time::timeout(config.connect_timeout, consume).await;
        match started.unwrap_or_else(|_| Err(timed_out())) {
            Ok(consumer) => Some(consumer),
            Err(e) => {
                tracing::warn!(consumer = %config.consumer, error = %e, "basic.consume failed");
                None
            }
        }
    }

    /// Resolves at shutdown, or when either connection closes (the session then reconnects).
    async fn ended(&self, config: &ConsumerConfig, shutdown: &CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = closed(&self.conn) => tracing::warn!(consumer = %config.consumer, "consumer connection closed: reconnecting"),
            _ = self.dead.closed() => tracing::warn!(consumer = %config.consumer, "dead-letter connection closed: reconnecting"),
        }
    }

    /// Closes both connections politely, within the connect timeout; unacked deliveries go
    /// back to the queue.
    async fn close(&self, config: &ConsumerConfig) {
        let consuming = self.conn.close(200, "consumer stopping".into());
        let both = futures_util::future::join(consuming, self.dead.close());
        let _ = tokio::time::timeout(config.connect_timeout, both).await;
    }
}

/// The queue, its dead-letter exchange and queue, and its bindings (within the connect
/// timeout, as all of [`Session::open`] is).
async fn declare(channel: &Channel, config: &ConsumerConfig) -> Result<(), lapin::Error> {
    let dead = config.dead_letter_queue();
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            dead.as_str().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
    let queue_options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(
            dead.as_str().into(),
            queue_options,
            queue_arguments(config, None),
        )
        .await?;
    channel
        .queue_bind(
            dead.as_str().into(),
            dead.as_str().into(),
            config.queue.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            config.queue.as_str().into(),
            queue_options,
            queue_arguments(config, Some(&dead)),
        )
        .await?;
    for (exchange, key) in &config.bindings {
        channel
            .queue_bind(
                config.queue.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

fn queue_arguments(config: &ConsumerConfig, dead_letter_exchange: Option<&str>) -> FieldTable {
    let mut args = FieldTable::default();
    let kind = match config.queue_type {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    };
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(kind)),
    );
    if let Some(dlx) = dead_letter_exchange {
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(dlx)),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(config.queue.as_str())),
        );
    }
    if let Some(ttl) = config.queue_ttl {
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(ttl.as_millis() as i64),
        );
    }
    args
}

/// Deletes this consumer's inbox rows older than the deduplication window, a bounded batch
/// per statement, every half window (between 1 s and 1 h).
async fn purge_inbox<DB: Database>(
    pool: Pool<DB>,
    config: ConsumerConfig,
    shutdown: CancellationToken,
) {
    let sql = DB::statements(&config);
    let every = (config.dedup_window / 2).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        while purge_batch(&pool, &sql, &config).await == PURGE_BATCH {}
    }
}

/// One purge statement within the transaction timeout (waiting for its connection has one
/// of its own); the rows it deleted (none if it failed). A connection that did not answer in
/// time is closed, not returned to the pool.
async fn purge_batch<DB: Database>(
    pool: &Pool<DB>,
    sql: &DB::Statements,
    config: &ConsumerConfig,
) -> u64 {
    let limit = config.transaction_timeout;
    let Ok(Ok(mut conn)) = tokio::time::timeout(limit, pool.acquire()).await else {
        return 0;
    };
    let window = config.dedup_window;
    let delete = DB::purge(&mut conn, sql, &config.consumer, window, PURGE_BATCH);
    match tokio::time::timeout(limit, delete).await {
        Ok(deleted) => deleted.unwrap_or(0),
        Err(_) => {
            conn.close_on_drop();
            tracing::warn!(consumer = %config.consumer, "inbox purge timed out");
            0
        }
    }
}
