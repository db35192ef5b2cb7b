//! Deliveries: dedupe and apply in one transaction (a batch at a time), retry, dead-letter, ack.

use std::collections::HashSet;
use std::marker::PhantomData;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use serde::de::DeserializeOwned;
use sqlx::Pool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::apply_error::{ApplyError, failed_earlier};
use super::database::{Database, Leased};
use super::dead_letter::DeadLetters;
use super::{ConsumerConfig, Handler, Incoming};
use crate::error::is_retryable_db;
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
    /// Shutdown came before it was applied: left unacked, the broker redelivers it.
    Abandoned,
}

/// What every delivery of one consumer shares.
pub(super) struct Context<DB: Database, T, H> {
    /// The service's database.
    pool: Pool<DB>,
    /// The consumer's name in the inbox.
    consumer: String,
    /// The inbox's statements on this backend.
    sql: DB::Statements,
    /// The service's handler.
    handler: H,
    /// Handler attempts before dead-lettering.
    max_attempts: u32,
    /// Bodies larger than this are dead-lettered unread.
    prefetch_bytes: usize,
    /// Retry delays.
    retry: ExponentialBuilder,
    /// One transaction at most, from acquiring its connection to its commit.
    transaction_timeout: Duration,
    /// Ends retries and their delays; unacked deliveries are then redelivered.
    shutdown: CancellationToken,
    /// The message body's type.
    _body: PhantomData<fn() -> T>,
}

impl<DB, T, H> Context<DB, T, H>
where
    DB: Database,
    T: DeserializeOwned + Send + Sync + 'static,
    H: Handler<T, DB>,
{
    pub(super) fn new(
        pool: Pool<DB>,
        config: &ConsumerConfig,
        handler: H,
        shutdown: CancellationToken,
    ) -> Self {
        Context {
            pool,
            consumer: config.consumer.clone(),
            sql: DB::statements(config),
            handler,
            max_attempts: config.max_attempts.max(1),
            prefetch_bytes: config.prefetch_bytes,
            retry: ExponentialBuilder::default()
                .with_min_delay(config.retry_min)
                .with_max_delay(config.retry_max)
                .with_jitter()
                .without_max_times(),
            transaction_timeout: config.transaction_timeout,
            shutdown,
            _body: PhantomData,
        }
    }

    /// Applies a batch of deliveries in one transaction and acks them together. If anything
    /// in the batch fails, the transaction is rolled back and each delivery is applied on
    /// its own, so a failing message retries and dead-letters alone.
    pub(super) async fn process(&self, deliveries: Vec<Delivery>, dead: &DeadLetters) {
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
    async fn settle(&self, delivery: Delivery, verdict: Verdict, dead: &DeadLetters) {
        let label = ("consumer", self.consumer.clone());
        match verdict {
            Verdict::Applied => metrics::counter!(m::INBOX_HANDLED, &[label]).increment(1),
            Verdict::Duplicate => metrics::counter!(m::INBOX_DUPLICATES, &[label]).increment(1),
            Verdict::Dead { reason, attempts } => {
                if !self.dead_letter(&delivery, dead, &reason, attempts).await {
                    return;
                }
                metrics::counter!(m::INBOX_DEAD_LETTERED, &[label]).increment(1);
            }
            Verdict::Abandoned => {
                tracing::debug!(consumer = %self.consumer, "shutting down: delivery left for redelivery");
                return;
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

    /// Publishes the dead letter; if that fails, requeues the delivery and says so (`false`).
    async fn dead_letter(
        &self,
        delivery: &Delivery,
        dead: &DeadLetters,
        reason: &str,
        attempts: u32,
    ) -> bool {
        if let Err(e) = dead.send(delivery, reason, attempts).await {
            tracing::error!(consumer = %self.consumer, error = %e, "dead letter not published: message requeued");
            let requeue = BasicNackOptions {
                requeue: true,
                ..Default::default()
            };
            let _ = tokio::time::timeout(SETTLE_TIMEOUT, delivery.nack(requeue)).await;
            return false;
        }
        tracing::warn!(consumer = %self.consumer, queue = %dead.exchange(), %reason, attempts, "message dead-lettered");
        true
    }

    /// The message id and decoded body, or why the delivery can never be applied.
    fn parse(&self, delivery: &Delivery) -> Result<Incoming<T>, String> {
        if delivery.data.len() > self.prefetch_bytes {
            return Err(format!(
                "the body ({} bytes) is larger than the inbox takes (prefetch_bytes {})",
                delivery.data.len(),
                self.prefetch_bytes
            ));
        }
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
            traceparent: text_header(delivery, "traceparent"),
            tracestate: text_header(delivery, "tracestate"),
            body,
        })
    }

    /// Applies one message, retrying transient failures without counting and handler
    /// failures up to `max_attempts` (`failures` of them happened already); at shutdown it
    /// stops retrying and abandons the delivery.
    async fn verdict(&self, message: &Incoming<T>, mut failures: u32) -> Verdict {
        let mut delays = self.retry.build();
        if failures > 0 && !self.pause(&mut delays).await {
            return Verdict::Abandoned;
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
            if !self.pause(&mut delays).await {
                return Verdict::Abandoned;
            }
        }
    }

    /// Waits out the next retry delay; `false` if shutdown came first.
    async fn pause(&self, delays: &mut impl Iterator<Item = Duration>) -> bool {
        let delay = delays.next().unwrap_or(Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep(delay) => !self.shutdown.is_cancelled(),
            _ = self.shutdown.cancelled() => false,
        }
    }

    /// Records the message and runs the handler in one transaction, within the transaction
    /// timeout (waiting for the connection has one of its own); `false` if it was recorded
    /// already (nothing is run).
    async fn apply(&self, message: &Incoming<T>) -> Result<bool, ApplyError> {
        let mut conn = self.acquire().await?;
        let work = async {
            let applied = self.apply_in(&mut conn, message).await;
            conn.reset(&self.sql).await;
            applied
        };
        // Out of time, `conn` is dropped without its reset, so it is closed (see `Leased`).
        let outcome = tokio::time::timeout(self.transaction_timeout, work).await;
        outcome.unwrap_or(Err(ApplyError::Timeout(self.transaction_timeout)))
    }

    async fn apply_in(
        &self,
        conn: &mut DB::Connection,
        message: &Incoming<T>,
    ) -> Result<bool, ApplyError> {
        let mut tx = DB::begin(conn, &self.sql)
            .await
            .map_err(ApplyError::Database)?;
        let fresh = DB::record(&mut tx, &self.sql, &self.consumer, &message.message_id)
            .await
            .map_err(ApplyError::Database)?;
        if !fresh {
            return Ok(false);
        }
        self.handler
            .handle(&mut tx, message)
            .instrument(self.span(message))
            .await
            .map_err(ApplyError::Handler)?;
        self.check_recorded(&mut tx, std::slice::from_ref(&message.message_id))
            .await?;
        tx.commit().await.map_err(ApplyError::Database)?;
        Ok(true)
    }

    /// Records every message of the batch and runs the handler for those not recorded
    /// before, all in one transaction within the transaction timeout; says for each whether
    /// it was applied (the first delivery of an id applies it, any other is a duplicate). An
    /// error names the message whose handler failed, if one did.
    async fn apply_batch(
        &self,
        batch: &[(Delivery, Incoming<T>)],
    ) -> Result<Vec<bool>, (Option<usize>, ApplyError)> {
        let mut conn = self.acquire().await.map_err(|e| (None, e))?;
        let work = async {
            let applied = self.apply_batch_in(&mut conn, batch).await;
            conn.reset(&self.sql).await;
            applied
        };
        let outcome = tokio::time::timeout(self.transaction_timeout, work).await;
        outcome.unwrap_or(Err((None, ApplyError::Timeout(self.transaction_timeout))))
    }

    async fn apply_batch_in(
        &self,
        conn: &mut DB::Connection,
        batch: &[(Delivery, Incoming<T>)],
    ) -> Result<Vec<bool>, (Option<usize>, ApplyError)> {
        let database = |e| (None, ApplyError::Database(e));
        let mut tx = DB::begin(conn, &self.sql).await.map_err(database)?;
        let mut distinct = HashSet::new();
        let ids: Vec<&str> = batch
            .iter()
            .map(|(_, m)| m.message_id.as_str())
            .filter(|id| distinct.insert(*id))
            .collect();
        let mut fresh = DB::record_all(&mut tx, &self.sql, &self.consumer, &ids)
            .await
            .map_err(database)?;
        let recorded: Vec<String> = fresh.iter().cloned().collect();
        let mut applied = Vec::with_capacity(batch.len());
        for (at, (_, message)) in batch.iter().enumerate() {
            let is_fresh = fresh.remove(&message.message_id);
            if is_fresh {
                let handled = self.handler.handle(&mut tx, message);
                handled.instrument(self.span(message)).await.map_err(|e| {
                    // The transaction was aborted by an earlier statement, perhaps another handler's.
                    if failed_earlier::<DB>(&e) {
                        (None, ApplyError::Aborted)
                    } else {
                        (Some(at), ApplyError::Handler(e))
                    }
                })?;
            }
            applied.push(is_fresh);
        }
        self.check_recorded(&mut tx, &recorded)
            .await
            .map_err(|e| (None, e))?;
        tx.commit().await.map_err(database)?;
        Ok(applied)
    }

    /// The span the handler runs in: a child of the message's trace.
    fn span(&self, message: &Incoming<T>) -> tracing::Span {
        crate::telemetry::process_span(
            &self.consumer,
            &message.message_id,
            &message.routing_key,
            message.traceparent.as_deref(),
            message.tracestate.as_deref(),
        )
    }

    /// Before COMMIT: the transaction is alive and still holds the `ids` it recorded (each
    /// once). A handler that swallowed an SQL error leaves a PostgreSQL transaction aborted
    /// (its COMMIT rolls back, yet reports success); on MySQL a deadlock (or a lock wait
    /// timeout, with `innodb_rollback_on_timeout`) rolls the whole transaction back while the
    /// handler's later statements still run. Either way the message must not be acked.
    async fn check_recorded(
        &self,
        tx: &mut DB::Connection,
        ids: &[String],
    ) -> Result<(), ApplyError> {
        match DB::count_recorded(tx, &self.sql, &self.consumer, ids).await {
            Ok(n) if n == ids.len() as i64 => Ok(()),
            Err(e) if is_retryable_db(&e) => Err(ApplyError::Database(e)),
            _ => Err(ApplyError::Aborted),
        }
    }

    /// A connection for one transaction, within the transaction timeout (the transaction
    /// then has its own); none once shutdown has come (a database that is down would hold
    /// the consumer that long).
    async fn acquire(&self) -> Result<Leased<DB>, ApplyError> {
        let acquire = tokio::time::timeout(self.transaction_timeout, self.pool.acquire());
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => Err(ApplyError::Stopped),
            acquired = acquire => match acquired {
                Ok(conn) => conn.map(Leased::new).map_err(ApplyError::Database),
                Err(_) => Err(ApplyError::Timeout(self.transaction_timeout)),
            },
        }
    }
}

/// A header of `delivery` that holds text.
fn text_header(delivery: &Delivery, name: &str) -> Option<String> {
    match delivery.properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}
