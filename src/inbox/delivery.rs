//! Deliveries: dedupe and apply in one transaction (a batch at a time), retry, dead-letter, ack.

use std::collections::HashSet;
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
    /// `INSERT ... ON CONFLICT DO NOTHING` of one message id into the inbox table.
    record: SqlStr,
    /// The same for many ids, returning those inserted now.
    record_many: SqlStr,
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
        let t = &config.table;
        let record = format!(
            "INSERT INTO {t}_inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
        );
        let record_many = format!(
            "INSERT INTO {t}_inbox (consumer, message_id) SELECT $1, unnest($2::text[])
             ON CONFLICT DO NOTHING RETURNING message_id"
        );
        Context {
            pool,
            consumer: config.consumer.clone(),
            record: AssertSqlSafe(record).into_sql_str(),
            record_many: AssertSqlSafe(record_many).into_sql_str(),
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

    /// Applies a batch of deliveries in one transaction and acks them together. If anything
    /// in the batch fails, the transaction is rolled back and each delivery is applied on
    /// its own, so a failing message retries and dead-letters alone.
    pub(super) async fn process(&self, deliveries: Vec<Delivery>, dead: &Arc<Mutex<Channel>>) {
        let mut parsed = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match self.parse(&delivery) {
                Ok(message) => parsed.push((delivery, message)),
                Err(reason) => {
                    let verdict = Verdict::Dead {
                        reason,
                        attempts: 0,
                    };
                    self.settle(delivery, verdict, dead).await;
                }
            }
        }
        let mut first_failed = None;
        if parsed.len() > 1 {
            match self.apply_batch(&parsed).await {
                Ok(fresh) => {
                    let acks = parsed.into_iter().zip(fresh).map(|((delivery, _), fresh)| {
                        let verdict = if fresh {
                            Verdict::Applied
                        } else {
                            Verdict::Duplicate
                        };
                        self.settle(delivery, verdict, dead)
                    });
                    futures_util::future::join_all(acks).await;
                    return;
                }
                Err((failed, e)) => {
                    tracing::debug!(consumer = %self.consumer, error = %e, "batch rolled back: applying its messages one by one");
                    // The message whose handler failed has had its first attempt.
                    if let Some(at) = failed.filter(|_| !e.is_transient()) {
                        self.count_failure(&parsed[at].1, &e, 1);
                        first_failed = Some(at);
                    }
                }
            }
        }
        for (at, (delivery, message)) in parsed.into_iter().enumerate() {
            let failures = u32::from(first_failed == Some(at));
            let verdict = self.verdict(&message, failures).await;
            self.settle(delivery, verdict, dead).await;
        }
    }

    fn count_failure(&self, message: &Incoming<T>, error: &ApplyError, attempt: u32) {
        metrics::counter!(m::INBOX_HANDLER_FAILURES, "consumer" => self.consumer.clone())
            .increment(1);
        tracing::warn!(consumer = %self.consumer, message_id = %message.message_id, attempt, %error, "handler failed");
    }

    /// Counts the verdict, dead-letters if so, and acks.
    async fn settle(&self, delivery: Delivery, verdict: Verdict, dead: &Arc<Mutex<Channel>>) {
        let label = ("consumer", self.consumer.clone());
        match verdict {
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

    /// The message id and decoded body, or why the delivery can never be applied.
    fn parse(&self, delivery: &Delivery) -> Result<Incoming<T>, String> {
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .filter(|s| !s.is_empty())
            .ok_or("delivery has no message_id: it cannot be deduplicated")?;
        let body = serde_json::from_slice::<T>(&delivery.data)
            .map_err(|e| format!("body is not the expected JSON: {e}"))?;
        Ok(Incoming {
            message_id,
            message_type: delivery.properties.kind().as_ref().map(|s| s.to_string()),
            routing_key: delivery.routing_key.to_string(),
            redelivered: delivery.redelivered,
            body,
        })
    }

    /// Applies one message, retrying transient failures without counting and handler
    /// failures up to `max_attempts` (`failures` of them happened already).
    async fn verdict(&self, message: &Incoming<T>, mut failures: u32) -> Verdict {
        let mut delays = self.retry.build();
        if failures > 0 {
            tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(1))).await;
        }
        loop {
            match self.apply(message).await {
                Ok(true) => return Verdict::Applied,
                Ok(false) => return Verdict::Duplicate,
                Err(e) if e.is_transient() => {
                    tracing::debug!(consumer = %self.consumer, message_id = %message.message_id, error = %e, "transient failure: retrying");
                }
                Err(e) => {
                    failures += 1;
                    self.count_failure(message, &e, failures);
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

    /// Records every message of the batch in one statement and runs the handler for those
    /// not recorded before, all in one transaction; says for each whether it was applied
    /// (the first delivery of an id applies it, any other is a duplicate). An error names
    /// the message whose handler failed, if one did.
    async fn apply_batch(
        &self,
        batch: &[(Delivery, Incoming<T>)],
    ) -> Result<Vec<bool>, (Option<usize>, ApplyError)> {
        let database = |e| (None, ApplyError::Database(e));
        let mut tx = self.pool.begin().await.map_err(database)?;
        let ids: Vec<&str> = batch.iter().map(|(_, m)| m.message_id.as_str()).collect();
        let mut fresh: HashSet<String> = sqlx::query_scalar(self.record_many.clone())
            .bind(&self.consumer)
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await
            .map_err(database)?
            .into_iter()
            .collect();
        let mut applied = Vec::with_capacity(batch.len());
        for (at, (_, message)) in batch.iter().enumerate() {
            let is_fresh = fresh.remove(&message.message_id);
            if is_fresh {
                self.handler
                    .handle(&mut tx, message)
                    .await
                    .map_err(|e| (Some(at), ApplyError::Handler(e)))?;
            }
            applied.push(is_fresh);
        }
        tx.commit().await.map_err(database)?;
        Ok(applied)
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
