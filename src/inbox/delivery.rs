//! One delivery: dedupe and apply in one transaction, retry, dead-letter, ack.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::Channel;
use lapin::Confirmation;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, LongString};
use serde::de::DeserializeOwned;
use sqlx::{AssertSqlSafe, PgPool, SqlSafeStr, SqlStr};
use tokio::sync::Mutex;

use super::{ConsumerConfig, Handler, HandlerError, Incoming};
use crate::metrics as m;

/// How long an ack or nack may take before the connection is presumed gone.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// What became of a delivery.
enum Verdict {
    /// The handler's effects are committed.
    Applied,
    /// Its message id was recorded already: acked without running the handler.
    Duplicate,
    /// It goes to the dead-letter queue.
    Dead { reason: String, attempts: u32 },
}

/// Why an attempt failed.
enum ApplyError {
    Database(sqlx::Error),
    Handler(HandlerError),
}

impl ApplyError {
    /// Not the message's fault: retried without counting an attempt.
    fn is_transient(&self) -> bool {
        match self {
            ApplyError::Database(e) => crate::error::is_retryable_db(e),
            ApplyError::Handler(e) => {
                e.downcast_ref::<sqlx::Error>()
                    .is_some_and(crate::error::is_retryable_db)
                    || e.downcast_ref::<crate::Error>()
                        .is_some_and(crate::Error::is_retryable)
            }
        }
    }
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Database(e) => write!(f, "inbox database error: {e}"),
            ApplyError::Handler(e) => write!(f, "handler failed: {e}"),
        }
    }
}

/// What every delivery of one consumer shares.
pub(super) struct Context<T, H> {
    /// The service's database.
    pool: PgPool,
    /// The consumer's name in the inbox.
    consumer: String,
    /// `INSERT ... ON CONFLICT DO NOTHING` into the inbox table.
    record: SqlStr,
    /// The service's handler.
    handler: H,
    /// Handler attempts before dead-lettering.
    max_attempts: u32,
    /// Retry delays.
    retry: ExponentialBuilder,
    /// The queue (the dead letters' routing key).
    queue: String,
    /// The dead-letter exchange.
    dead_exchange: String,
    _body: PhantomData<fn() -> T>,
}

impl<T, H> Context<T, H>
where
    T: DeserializeOwned + Send + Sync + 'static,
    H: Handler<T>,
{
    pub(super) fn new(pool: PgPool, config: &ConsumerConfig, handler: H) -> Self {
        let record = format!(
            "INSERT INTO {}_inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            config.table
        );
        Context {
            pool,
            consumer: config.consumer.clone(),
            record: AssertSqlSafe(record).into_sql_str(),
            handler,
            max_attempts: config.max_attempts.max(1),
            retry: ExponentialBuilder::default()
                .with_min_delay(config.retry_min)
                .with_max_delay(config.retry_max)
                .with_jitter()
                .without_max_times(),
            queue: config.queue.clone(),
            dead_exchange: config.dead_letter_queue(),
            _body: PhantomData,
        }
    }

    /// Applies (or skips, or dead-letters) one delivery, then acks it.
    pub(super) async fn process(&self, delivery: Delivery, dead: &Arc<Mutex<Channel>>) {
        let label = ("consumer", self.consumer.clone());
        match self.verdict(&delivery).await {
            Verdict::Applied => metrics::counter!(m::INBOX_HANDLED, &[label]).increment(1),
            Verdict::Duplicate => metrics::counter!(m::INBOX_DUPLICATES, &[label]).increment(1),
            Verdict::Dead { reason, attempts } => {
                // Bounded: during a resource alarm the dead-letter connection is blocked.
                let publish = self.dead_letter(&delivery, dead, &reason, attempts);
                let published = tokio::time::timeout(2 * SETTLE_TIMEOUT, publish)
                    .await
                    .unwrap_or_else(
                        |_| Err("no confirm from the dead-letter queue in time".into()),
                    );
                if let Err(e) = published {
                    tracing::error!(consumer = %self.consumer, error = %e, "dead letter not published: message requeued");
                    let requeue = BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    };
                    let _ = tokio::time::timeout(SETTLE_TIMEOUT, delivery.nack(requeue)).await;
                    return;
                }
                tracing::warn!(consumer = %self.consumer, queue = %self.dead_exchange, %reason, attempts, "message dead-lettered");
                metrics::counter!(m::INBOX_DEAD_LETTERED, &[label]).increment(1);
            }
        }
        // On a connection that just died an ack may never complete: bounded, so the session
        // can end and reconnect. The broker redelivers what was not acked; the inbox skips it.
        match tokio::time::timeout(SETTLE_TIMEOUT, delivery.ack(BasicAckOptions::default())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "ack failed: the broker redelivers and the inbox skips it")
            }
            Err(_) => {
                tracing::debug!("ack timed out: the broker redelivers and the inbox skips it")
            }
        }
    }

    async fn verdict(&self, delivery: &Delivery) -> Verdict {
        let Some(message_id) = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .filter(|s| !s.is_empty())
        else {
            return Verdict::Dead {
                reason: "delivery has no message_id: it cannot be deduplicated".into(),
                attempts: 0,
            };
        };
        let body = match serde_json::from_slice::<T>(&delivery.data) {
            Ok(body) => body,
            Err(e) => {
                return Verdict::Dead {
                    reason: format!("body is not the expected JSON: {e}"),
                    attempts: 0,
                };
            }
        };
        let message = Incoming {
            message_id,
            message_type: delivery.properties.kind().as_ref().map(|s| s.to_string()),
            routing_key: delivery.routing_key.to_string(),
            redelivered: delivery.redelivered,
            body,
        };
        let (mut failures, mut delays) = (0, self.retry.build());
        loop {
            match self.apply(&message).await {
                Ok(true) => return Verdict::Applied,
                Ok(false) => return Verdict::Duplicate,
                Err(e) if e.is_transient() => {
                    tracing::debug!(consumer = %self.consumer, message_id = %message.message_id, error = %e, "transient failure: retrying");
                }
                Err(e) => {
                    failures += 1;
                    metrics::counter!(m::INBOX_HANDLER_FAILURES, "consumer" => self.consumer.clone()).increment(1);
                    tracing::warn!(consumer = %self.consumer, message_id = %message.message_id, attempt = failures, error = %e, "handler failed");
                    if failures >= self.max_attempts {
                        return Verdict::Dead {
                            reason: e.to_string(),
                            attempts: failures,
                        };
                    }
                }
            }
            tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(1))).await;
        }
    }

    /// Records the message and runs the handler in one transaction; `false` if it was
    /// recorded already (nothing is run).
    async fn apply(&self, message: &Incoming<T>) -> Result<bool, ApplyError> {
        let mut tx = self.pool.begin().await.map_err(ApplyError::Database)?;
        let fresh = sqlx::query(self.record.clone())
            .bind(&self.consumer)
            .bind(&message.message_id)
            .execute(&mut *tx)
            .await
            .map_err(ApplyError::Database)?
            .rows_affected()
            == 1;
        if !fresh {
            return Ok(false);
        }
        self.handler
            .handle(&mut tx, message)
            .await
            .map_err(ApplyError::Handler)?;
        tx.commit().await.map_err(ApplyError::Database)?;
        Ok(true)
    }

    /// Publishes a copy to the dead-letter exchange with the reason and attempts in its
    /// headers, waiting for the confirm. One at a time: returns are then unambiguous.
    async fn dead_letter(
        &self,
        delivery: &Delivery,
        dead: &Mutex<Channel>,
        reason: &str,
        attempts: u32,
    ) -> Result<(), String> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            "x-outbox-error".into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        headers.insert(
            "x-outbox-attempts".into(),
            AMQPValue::LongLongInt(attempts.into()),
        );
        headers.insert(
            "x-outbox-consumer".into(),
            AMQPValue::LongString(LongString::from(self.consumer.as_str())),
        );
        headers.insert(
            "x-outbox-routing-key".into(),
            AMQPValue::LongString(LongString::from(delivery.routing_key.as_str())),
        );
        let props = delivery.properties.clone().with_headers(headers);
        let channel = dead.lock().await;
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let confirm = channel
            .basic_publish(
                self.dead_exchange.as_str().into(),
                self.queue.as_str().into(),
                options,
                &delivery.data,
                props,
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            other => Err(format!("dead-letter queue refused the message: {other:?}")),
        }
    }
}
