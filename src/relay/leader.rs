//! The leader's loop: claim -> publish -> confirm -> mark.
//!
//! Claims are plain reads ([`Store::claim`]); which rows are in flight lives here, in memory,
//! because only the leader publishes. Claimed rows go to the connection's [`Pipeline`],
//! which publishes them, waits for their confirms (with a timeout) and reports an
//! [`Outcome`] each; a semaphore bounds the unconfirmed publishes. Outcomes are marked in one transaction per loop turn, and a row leaves the
//! in-flight set only once its mark is committed, so it is never claimed twice.
//!
//! Order per key: the claim never returns a row whose key has an earlier unsent row, and an
//! in-flight row is still unsent, so a key has at most one publish in flight and a failed
//! row (pending with backoff, or dead) holds back only the rest of its own key.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::Health;
use crate::broker::{Nodes, Outcome, Pipeline, PublishError, Publisher, reconnect_backoff};
use crate::config::RelayConfig;
use crate::metrics as m;
use crate::store::{Failure, Store};

/// How long a confirmed row may wait for its mark while more confirms are coming.
const MARK_DELAY: Duration = Duration::from_millis(5);

/// The state of one leadership term.
pub(super) struct Leader<S> {
    /// The table.
    store: S,
    /// Knobs.
    config: RelayConfig,
    /// Shared state for gauges and `/readyz`.
    health: Arc<Health>,
    /// Notified when rows are committed.
    wake: Arc<Notify>,
    /// The broker's nodes, tried in turn.
    nodes: Nodes,
    /// The open publishing connection and its publish task, if any.
    publisher: Option<(Arc<Publisher>, Pipeline)>,
    /// Rows claimed and not yet marked: never claimed again while here.
    in_flight: HashSet<i64>,
    /// Bounds unconfirmed publishes to `OUTBOX_MAX_IN_FLIGHT`.
    window: Arc<Semaphore>,
    /// Where publish tasks report.
    outcomes_tx: mpsc::UnboundedSender<Outcome>,
    /// Read by the loop.
    outcomes: mpsc::UnboundedReceiver<Outcome>,
    /// Confirmed rows waiting for their mark.
    sent: Vec<i64>,
    /// Failed attempts waiting for their mark.
    failed: Vec<Failure>,
    /// When the oldest unwritten mark arrived.
    first_mark_at: Option<Instant>,
    /// Rows may be claimable: a notification, the poll interval, a full claim, or marks
    /// that released the next rows of their keys.
    dirty: bool,
}

impl<S: Store> Leader<S> {
    pub(super) fn new(
        store: S,
        config: RelayConfig,
        health: Arc<Health>,
        wake: Arc<Notify>,
    ) -> Self {
        let (outcomes_tx, outcomes) = mpsc::unbounded_channel();
        Leader {
            nodes: Nodes::new(config.amqp_urls.clone()),
            window: Arc::new(Semaphore::new(config.max_in_flight)),
            store,
            config,
            health,
            wake,
            publisher: None,
            in_flight: HashSet::new(),
            outcomes_tx,
            outcomes,
            sent: Vec::new(),
            failed: Vec::new(),
            first_mark_at: None,
            dirty: true,
        }
    }

    /// Publishes until `stop`, then drains within the grace period.
    ///
    /// Claims and marks are batched: a claim waits until half the window (or a batch) is
    /// free, so the database work of one half overlaps the confirms of the other; marks wait
    /// for a batch, an idle window, or `MARK_DELAY`, whichever comes first.
    pub(super) async fn run(mut self, stop: &CancellationToken) {
        let mut reconnect = reconnect_backoff();
        while !stop.is_cancelled() {
            self.collect();
            if self.mark_due() && !self.flush().await {
                self.wait(stop).await;
                continue;
            }
            if !self.connected() {
                if self.connect(&mut reconnect, stop).await {
                    reconnect = reconnect_backoff();
                    self.dirty = true;
                }
                continue;
            }
            if self.dirty && self.claim_due() {
                let (claimed, limit) = self.claim_and_publish().await;
                self.dirty = limit > 0 && claimed == limit;
                if self.dirty {
                    continue;
                }
            }
            self.wait(stop).await;
        }
        self.drain().await;
    }

    /// Unconfirmed publishes right now.
    fn outstanding(&self) -> usize {
        self.config.max_in_flight - self.window.available_permits()
    }

    /// Enough of the window is free for a claim worth its query.
    fn claim_due(&self) -> bool {
        let half = (self.config.max_in_flight / 2).clamp(1, self.config.batch_size);
        self.window.available_permits() >= half || self.outstanding() == 0
    }

    /// The marks waiting are a batch, the window is idle, or the oldest has waited long enough.
    fn mark_due(&self) -> bool {
        let waiting = self.sent.len() + self.failed.len();
        waiting >= self.config.batch_size
            || (waiting > 0 && self.outstanding() == 0)
            || self
                .first_mark_at
                .is_some_and(|t| t.elapsed() >= MARK_DELAY)
    }

    /// The publisher is open; a broken one is dropped (its rows come back as connection failures).
    fn connected(&mut self) -> bool {
        if self.publisher.as_ref().is_some_and(|(p, _)| !p.is_open()) {
            tracing::warn!("broker connection lost: reconnecting");
            self.drop_publisher();
        }
        self.publisher.is_some()
    }

    /// Forgets the connection; its publish task ends once its publishes have settled (they
    /// come back as failures and are published again on the next connection).
    fn drop_publisher(&mut self) {
        if let Some((publisher, _)) = self.publisher.take() {
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(5), publisher.close()).await
            });
        }
        self.health.set_broker_connected(false);
        self.health.set_blocked(None);
    }

    /// One pass over the nodes; on failure waits the next backoff step. Returns whether connected.
    async fn connect(
        &mut self,
        backoff: &mut impl Iterator<Item = Duration>,
        stop: &CancellationToken,
    ) -> bool {
        match self
            .nodes
            .connect(self.config.connect_timeout, &self.health)
            .await
        {
            Ok(publisher) => {
                let pipeline = Pipeline::start(
                    publisher.clone(),
                    self.config.app_id.clone(),
                    self.config.confirm_timeout,
                    self.outcomes_tx.clone(),
                );
                self.publisher = Some((publisher, pipeline));
                self.health.set_blocked(None);
                self.health.set_broker_connected(true);
                true
            }
            Err(error) => {
                tracing::warn!(%error, "no broker node reachable: retrying");
                let delay = backoff.next().unwrap_or(Duration::from_secs(5));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => {}
                }
                false
            }
        }
    }

    /// Claims what the window allows and hands the rows to the publish task; returns
    /// (claimed, limit).
    async fn claim_and_publish(&mut self) -> (usize, usize) {
        let Some((_, pipeline)) = &self.publisher else {
            return (0, 0);
        };
        if self.health.blocked().is_some() {
            return (0, 0);
        }
        let limit = self.config.batch_size.min(self.window.available_permits());
        if limit == 0 {
            return (0, 0);
        }
        let exclude: Vec<i64> = self.in_flight.iter().copied().collect();
        let rows = match self.store.claim(limit, &exclude).await {
            Ok(rows) => rows,
            Err(e) => {
                self.database_failed(&e);
                return (0, limit);
            }
        };
        self.health.set_database_ok(true);
        let claimed = rows.len();
        for row in rows {
            let permit = self
                .window
                .clone()
                .try_acquire_owned()
                .expect("claim is bounded by free permits");
            self.in_flight.insert(row.id);
            pipeline.publish(row, permit);
        }
        (claimed, limit)
    }

    /// Waits for something to do: an outcome, a mark falling due, a notification, a broker
    /// change, the poll interval.
    async fn wait(&mut self, stop: &CancellationToken) {
        let mark_at = self
            .first_mark_at
            .map(|t| tokio::time::Instant::from_std(t + MARK_DELAY));
        tokio::select! {
            Some(outcome) = self.outcomes.recv() => self.record(outcome),
            _ = tokio::time::sleep_until(mark_at.unwrap_or_else(tokio::time::Instant::now)), if mark_at.is_some() => {}
            _ = self.wake.notified() => self.dirty = true,
            _ = self.health.broker_changed.notified() => self.dirty = true,
            _ = tokio::time::sleep(self.config.poll_interval) => self.dirty = true,
            _ = stop.cancelled() => {}
        }
    }

    /// Takes every outcome already reported.
    fn collect(&mut self) {
        while let Ok(outcome) = self.outcomes.try_recv() {
            self.record(outcome);
        }
    }

    /// Sorts one outcome into the marks to write (or releases the row at once).
    fn record(&mut self, Outcome { row, result }: Outcome) {
        let error = match result {
            Ok(()) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                metrics::histogram!(m::PUBLISH_LATENCY).record((now - row.created_at).max(0.0));
                self.first_mark_at.get_or_insert_with(Instant::now);
                self.sent.push(row.id);
                return;
            }
            Err(error) => error,
        };
        metrics::counter!(m::PUBLISH_FAILURES, "reason" => error.reason()).increment(1);
        let suspect = match error {
            // A broker that is not blocking us confirms or nacks every publish: silence means
            // the connection is gone, perhaps half-open.
            PublishError::Timeout => self.health.blocked().is_none(),
            // After a quorum queue's leader moves, a channel can keep being nacked while a new
            // one is not (seen with RabbitMQ 3.10 when a cluster node stops).
            PublishError::Nack => true,
            _ => false,
        };
        if suspect && self.publisher.is_some() {
            tracing::warn!(%error, "publishing on a new connection");
            self.drop_publisher();
        }
        let not_the_rows_fault = matches!(error, PublishError::Connection(_))
            || (error == PublishError::Timeout && self.health.blocked().is_some());
        if not_the_rows_fault {
            // No attempt is counted: the row is claimable again once a connection is open.
            tracing::debug!(message_id = %row.message_id, %error, "publish interrupted; will publish again");
            self.in_flight.remove(&row.id);
            self.dirty = true;
            return;
        }
        let attempt = row.attempts as u32 + 1;
        let permanent = matches!(error, PublishError::BadRow(_));
        let dead = permanent || attempt >= self.config.max_attempts;
        tracing::warn!(
            message_id = %row.message_id, exchange = %row.exchange, routing_key = %row.routing_key,
            ordering_key = row.ordering_key.as_deref(), attempt, dead, %error, "publish failed"
        );
        self.first_mark_at.get_or_insert_with(Instant::now);
        self.failed.push(Failure {
            id: row.id,
            error: error.to_string(),
            retry_in: retry_delay(attempt, &self.config),
            permanent,
        });
    }

    /// Writes the pending marks in one transaction; returns false (keeping them) if it failed.
    async fn flush(&mut self) -> bool {
        if self.sent.is_empty() && self.failed.is_empty() {
            return true;
        }
        if let Err(e) = self
            .store
            .mark(&self.sent, &self.failed, self.config.max_attempts)
            .await
        {
            self.database_failed(&e);
            return false;
        }
        metrics::counter!(m::PUBLISHED).increment(self.sent.len() as u64);
        for id in self
            .sent
            .drain(..)
            .chain(self.failed.drain(..).map(|f| f.id))
        {
            self.in_flight.remove(&id);
        }
        // The next rows of the keys just marked may now be claimed.
        self.first_mark_at = None;
        self.dirty = true;
        true
    }

    fn database_failed(&self, e: &crate::Error) {
        self.health.set_database_ok(false);
        tracing::warn!(error = %e, source = ?std::error::Error::source(e), "database unavailable: retrying");
    }

    /// Stops claiming; waits up to the grace period for outstanding confirms, marks them,
    /// and names what it had to abandon (those rows stay pending and are published again).
    async fn drain(mut self) {
        let deadline = tokio::time::Instant::now() + self.config.shutdown_grace;
        while self.outstanding() > 0 {
            match tokio::time::timeout_at(deadline, self.outcomes.recv()).await {
                Ok(Some(outcome)) => self.record(outcome),
                _ => break,
            }
        }
        self.collect();
        let outstanding = self.outstanding();
        if !self.flush().await {
            tracing::warn!(
                rows = self.sent.len() + self.failed.len(),
                "could not record the last confirms: those rows will be published again"
            );
        }
        if outstanding > 0 {
            tracing::warn!(
                rows = outstanding,
                "stopped with publishes unconfirmed: those rows stay pending and will be published again"
            );
        }
        if let Some((publisher, _)) = self.publisher.take() {
            publisher.close().await;
        }
        self.health.set_broker_connected(false);
    }
}

/// The delay before attempt `attempt + 1` of a failed row: exponential from
/// `OUTBOX_BACKOFF_MIN`, jittered, never above `OUTBOX_BACKOFF_MAX`.
fn retry_delay(attempt: u32, config: &RelayConfig) -> Duration {
    ExponentialBuilder::default()
        .with_min_delay(config.backoff_min)
        .with_max_delay(config.backoff_max)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(attempt.saturating_sub(1) as usize)
        .unwrap_or(config.backoff_max)
        .min(config.backoff_max)
}
