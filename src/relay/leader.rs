//! The leader's loop: claim ahead -> publish -> confirm -> mark.
//!
//! Only the leader publishes, so which rows it holds lives here, in memory: claims are plain
//! reads ([`Store::claim`]) and a row is held from its claim until its mark commits, so it is
//! never claimed twice. A claim and a mark may run at once while the loop keeps publishing:
//! the window of unconfirmed publishes is refilled from rows claimed ahead as confirms
//! arrive, so the database work overlaps the broker's, and a slow commit of marks delays no
//! publish. A mark that changes what claims may return (a failure, or the success of a
//! retried row, which releases its key) runs alone.
//!
//! Claims walk the table in id order from a floor: normally just above the highest id
//! claimed, so a claim never rereads the rows in flight. The floor drops when rows below it
//! may have become claimable: a late commit (the notification names its smallest id), a
//! failed row whose retry fell due, a key released by its failed row's success, a lost
//! notification connection (then the leader polls from 0).
//!
//! Order per key: a key has at most one publish unconfirmed. Its later rows wait here and
//! the next one is published as soon as the broker confirms the one before; a row that fails
//! drops the rows of its key held behind it, and the claim holds back every row behind a
//! failed one (dead, or waiting to retry) until that row is sent.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::{Nodes, Outcome, Pipeline, PublishError, Publisher, reconnect_backoff};
use crate::config::RelayConfig;
use crate::message::OutboxRow;
use crate::metrics as m;
use crate::store::{Failure, Inserts, Store};
use crate::{Health, Result};

/// How long a confirmed row may wait for its mark while more confirms are coming. Marks are
/// off the publishing path, so this only trades commits per second against rows held.
const MARK_DELAY: Duration = Duration::from_millis(25);

/// How long to wait before retrying a database operation that failed.
const DATABASE_RETRY: Duration = Duration::from_millis(500);

/// A database operation in progress.
type Operation = Pin<Box<dyn Future<Output = Done> + Send>>;

/// What a database operation came back with.
enum Done {
    /// A claim of at most `limit` rows from the floor.
    Claimed {
        limit: usize,
        rows: Result<Vec<OutboxRow>>,
    },
    /// A mark of these confirmed and failed rows.
    Marked {
        sent: Vec<i64>,
        failed: Vec<Failure>,
        released: Option<i64>,
        result: Result<()>,
    },
}

/// The state of one leadership term.
pub(super) struct Leader<S> {
    /// The table.
    store: S,
    /// Knobs.
    config: RelayConfig,
    /// Shared state for gauges and `/readyz`.
    health: Arc<Health>,
    /// Committed rows, as the database reports them.
    inserts: Arc<Inserts>,
    /// The broker's nodes, tried in turn.
    nodes: Nodes,
    /// The open publishing connection and its publish task, if any.
    publisher: Option<(Arc<Publisher>, Pipeline)>,
    /// Bounds unconfirmed publishes to `OUTBOX_MAX_IN_FLIGHT`.
    window: Arc<Semaphore>,
    /// Where publish tasks report.
    outcomes_tx: mpsc::UnboundedSender<Outcome>,
    /// Read by the loop.
    outcomes: mpsc::UnboundedReceiver<Outcome>,
    /// Rows claimed and not yet marked, whatever their stage: never claimed again while here.
    held: HashSet<i64>,
    /// Rows that may be published now, in claim order.
    ready: VecDeque<OutboxRow>,
    /// Keys with a row ready or unconfirmed, and the rows of that key waiting behind it.
    keys: HashMap<String, VecDeque<OutboxRow>>,
    /// Keys whose failed row is not yet marked, with that row: claims drop their rows.
    failing: HashMap<String, i64>,
    /// Claims start at this id.
    floor: i64,
    /// The highest id claimed this term.
    top: i64,
    /// Rows may be claimable at or above the floor.
    dirty: bool,
    /// Confirmed rows waiting for their mark.
    sent: Vec<i64>,
    /// Failed attempts waiting for their mark.
    failed: Vec<Failure>,
    /// The smallest confirmed row that had failed before: its mark releases its key's later
    /// rows, which the claims skipped.
    released: Option<i64>,
    /// When the oldest unwritten mark arrived.
    first_mark_at: Option<Instant>,
    /// No database operation before this (after one failed).
    database_retry_at: Option<Instant>,
    /// A mark that changes what claims return is running: no claim starts meanwhile.
    exclusive_mark: bool,
    /// When to look at the whole table if notifications are not arriving.
    poll_at: Instant,
}

impl<S: Store> Leader<S> {
    pub(super) fn new(
        store: S,
        config: RelayConfig,
        health: Arc<Health>,
        inserts: Arc<Inserts>,
    ) -> Self {
        let (outcomes_tx, outcomes) = mpsc::unbounded_channel();
        Leader {
            nodes: Nodes::new(config.amqp_urls.clone()),
            window: Arc::new(Semaphore::new(config.max_in_flight)),
            poll_at: Instant::now() + config.poll_interval,
            store,
            config,
            health,
            inserts,
            publisher: None,
            outcomes_tx,
            outcomes,
            held: HashSet::new(),
            ready: VecDeque::new(),
            keys: HashMap::new(),
            failing: HashMap::new(),
            floor: 0,
            top: 0,
            dirty: true,
            sent: Vec::new(),
            failed: Vec::new(),
            released: None,
            first_mark_at: None,
            database_retry_at: None,
            exclusive_mark: false,
        }
    }

    /// Publishes until `stop`, then drains within the grace period.
    pub(super) async fn run(mut self, stop: &CancellationToken) {
        let mut reconnect = reconnect_backoff();
        let mut claiming: Option<Operation> = None;
        let mut marking: Option<Operation> = None;
        while !stop.is_cancelled() {
            self.collect();
            if !self.connected() {
                // Record what the last connection confirmed before waiting for the next one.
                for operation in [claiming.take(), marking.take()].into_iter().flatten() {
                    self.done(operation.await);
                }
                self.mark_waiting().await;
                if self.connect(&mut reconnect, stop).await {
                    reconnect = reconnect_backoff();
                }
                continue;
            }
            self.publish_ready();
            if self.database_retry_at.is_some_and(|t| t <= Instant::now()) {
                self.database_retry_at = None;
            }
            if claiming.is_none() {
                claiming = self.claim();
            }
            if marking.is_none() {
                marking = self.next_mark(claiming.is_some());
            }
            let wake_at = self.wake_at(marking.is_some());
            tokio::select! {
                done = async { claiming.as_mut().expect("checked").await }, if claiming.is_some() => {
                    claiming = None;
                    self.done(done);
                }
                done = async { marking.as_mut().expect("checked").await }, if marking.is_some() => {
                    marking = None;
                    self.done(done);
                }
                Some(outcome) = self.outcomes.recv() => self.record(outcome),
                _ = self.inserts.notified() => {}
                _ = self.health.broker_changed.notified() => {}
                _ = tokio::time::sleep_until(wake_at) => self.timers(),
                _ = stop.cancelled() => {}
            }
        }
        for operation in [claiming, marking].into_iter().flatten() {
            self.done(operation.await);
        }
        self.drain().await;
    }

    /// Unconfirmed publishes right now.
    fn outstanding(&self) -> usize {
        self.config.max_in_flight - self.window.available_permits()
    }

    /// Rows held at most: the window, as many again claimed ahead (so that each key's next
    /// row is at hand when its confirm comes), and two batches of confirms being marked.
    fn capacity(&self) -> usize {
        2 * self.config.max_in_flight + 2 * self.config.batch_size
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

    /// Hands ready rows to the publish task while the window has room and the broker is not
    /// blocking us (a publish sent while blocked would only wait).
    fn publish_ready(&mut self) {
        let Some((_, pipeline)) = &self.publisher else {
            return;
        };
        if self.health.blocked().is_some() {
            return;
        }
        while !self.ready.is_empty() {
            let Ok(permit) = self.window.clone().try_acquire_owned() else {
                return;
            };
            let row = self.ready.pop_front().expect("not empty");
            pipeline.publish(row, permit);
        }
    }

    /// The mark to start now, if any: a batch of confirms, or fewer once the window is idle
    /// or the oldest has waited `MARK_DELAY`. One that changes what claims return waits for
    /// the running claim.
    fn next_mark(&mut self, claiming: bool) -> Option<Operation> {
        let waiting = self.marks_waiting();
        if waiting == 0 || self.database_retry_at.is_some() {
            return None;
        }
        let idle = self.outstanding() == 0 && self.ready.is_empty();
        let due = self
            .first_mark_at
            .is_some_and(|t| t.elapsed() >= MARK_DELAY);
        let exclusive = !self.failed.is_empty() || self.released.is_some();
        (waiting >= self.config.batch_size || idle || due)
            .then_some(())
            .filter(|_| !(exclusive && claiming))
            .map(|_| self.mark())
    }

    /// A claim of what room allows from the floor, if rows may be claimable and the broker
    /// takes them.
    fn claim(&mut self) -> Option<Operation> {
        if let Some(from) = self.inserts.take() {
            // Below the floor only if committed late (or the whole table is asked for).
            self.floor = self.floor.min(from);
            self.dirty = true;
        }
        let room = self.capacity().saturating_sub(self.held.len());
        let worth_it = room >= self.config.batch_size / 2 || self.ready.is_empty();
        let blocked = self.health.blocked().is_some();
        // A mark that changes what claims return goes first (claims would starve it).
        let exclusive = self.exclusive_mark || !self.failed.is_empty() || self.released.is_some();
        if !self.dirty || room == 0 || !worth_it || blocked || exclusive {
            return None;
        }
        if self.database_retry_at.is_some() {
            return None;
        }
        let limit = room.min(self.config.batch_size);
        let from = self.floor;
        let skip: Vec<i64> = self.held.iter().copied().filter(|&id| id >= from).collect();
        let store = self.store.clone();
        Some(Box::pin(async move {
            let rows = store.claim(limit, from, &skip).await;
            Done::Claimed { limit, rows }
        }))
    }

    /// Confirms and failures waiting for their mark.
    fn marks_waiting(&self) -> usize {
        self.sent.len() + self.failed.len()
    }

    /// Marks what is waiting now, without waiting for a batch (a failed mark keeps them).
    async fn mark_waiting(&mut self) {
        if self.marks_waiting() > 0 {
            let mark = self.mark();
            self.done(mark.await);
        }
    }

    /// A mark of every confirm and failure waiting.
    fn mark(&mut self) -> Operation {
        let sent = std::mem::take(&mut self.sent);
        let failed = std::mem::take(&mut self.failed);
        let released = self.released.take();
        self.exclusive_mark = !failed.is_empty() || released.is_some();
        self.first_mark_at = None;
        let store = self.store.clone();
        let max_attempts = self.config.max_attempts;
        Box::pin(async move {
            let result = store.mark(&sent, &failed, max_attempts).await;
            Done::Marked {
                sent,
                failed,
                released,
                result,
            }
        })
    }

    /// Takes in what a database operation came back with.
    fn done(&mut self, done: Done) {
        match done {
            Done::Claimed { limit, rows } => match rows {
                Ok(rows) => {
                    self.health.set_database_ok(true);
                    let full = rows.len() == limit;
                    let last = rows.last().map(|r| r.id);
                    for row in rows {
                        self.take(row);
                    }
                    // Everything claimable from the floor up to here is now held.
                    self.floor = match (full, last) {
                        (true, Some(last)) => last + 1,
                        _ => self.top + 1,
                    };
                    self.dirty = full;
                }
                Err(e) => self.database_failed(&e),
            },
            Done::Marked {
                mut sent,
                mut failed,
                released,
                result,
            } => match result {
                Ok(()) => {
                    self.exclusive_mark = false;
                    metrics::counter!(m::PUBLISHED).increment(sent.len() as u64);
                    for id in sent.iter().chain(failed.iter().map(|f| &f.id)) {
                        self.held.remove(id);
                    }
                    // Their failures are in the table now: the claims hold their keys back.
                    self.failing
                        .retain(|_, id| !failed.iter().any(|f| f.id == *id));
                    if let Some(id) = released {
                        self.floor = self.floor.min(id);
                        self.dirty = true;
                    }
                }
                Err(e) => {
                    self.exclusive_mark = false;
                    self.database_failed(&e);
                    sent.append(&mut self.sent);
                    failed.append(&mut self.failed);
                    self.sent = sent;
                    self.failed = failed;
                    self.released = self.released.min(released).or(released);
                    self.first_mark_at.get_or_insert_with(Instant::now);
                }
            },
        }
    }

    /// Holds a claimed row: ready if its key has nothing ahead, else behind its key's rows.
    fn take(&mut self, row: OutboxRow) {
        self.top = self.top.max(row.id);
        let Some(key) = &row.ordering_key else {
            self.held.insert(row.id);
            self.ready.push_back(row);
            return;
        };
        if self.failing.contains_key(key) {
            // Claimed before the failure was marked: found again once its key is released.
            return;
        }
        self.held.insert(row.id);
        match self.keys.get_mut(key) {
            Some(behind) => {
                // Normally the last; a row committed late goes among the others by id.
                let at = behind.partition_point(|r| r.id < row.id);
                behind.insert(at, row);
            }
            None => {
                self.keys.insert(key.clone(), VecDeque::new());
                self.ready.push_back(row);
            }
        }
    }

    /// The next row of a confirmed row's key becomes ready.
    fn release_key(&mut self, key: &str) {
        match self.keys.get_mut(key).and_then(VecDeque::pop_front) {
            Some(next) => self.ready.push_back(next),
            None => {
                self.keys.remove(key);
            }
        }
    }

    /// The earliest of the timers: the poll, a database retry, and while no mark runs, a
    /// mark falling due.
    fn wake_at(&self, marking: bool) -> Instant {
        let mark = self
            .first_mark_at
            .map(|t| t + MARK_DELAY)
            .filter(|_| !marking);
        [mark, self.database_retry_at, Some(self.poll_at)]
            .into_iter()
            .flatten()
            .min()
            .expect("the poll is always set")
    }

    /// Without notifications, looks at the whole table every poll interval.
    fn timers(&mut self) {
        let now = Instant::now();
        if now >= self.poll_at {
            self.poll_at = now + self.config.poll_interval;
            if !self.inserts.listening() {
                self.floor = 0;
                self.dirty = true;
            }
        }
    }

    /// Takes every outcome already reported.
    fn collect(&mut self) {
        while let Ok(outcome) = self.outcomes.try_recv() {
            self.record(outcome);
        }
    }

    /// Sorts one outcome: a confirm releases its key's next row; a failure of the row's own
    /// making is marked and drops its key's rows held behind it; an interruption puts the row
    /// back to be published first.
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
                if row.attempts > 0 {
                    self.released = Some(self.released.map_or(row.id, |r| r.min(row.id)));
                }
                if let Some(key) = &row.ordering_key {
                    self.release_key(key);
                }
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
            // No attempt is counted; its key stays taken, so it goes out first again.
            tracing::debug!(message_id = %row.message_id, %error, "publish interrupted; will publish again");
            self.ready.push_front(row);
            return;
        }
        let attempt = row.attempts as u32 + 1;
        let permanent = matches!(error, PublishError::BadRow(_));
        let dead = permanent || attempt >= self.config.max_attempts;
        tracing::warn!(
            message_id = %row.message_id, exchange = %row.exchange, routing_key = %row.routing_key,
            ordering_key = row.ordering_key.as_deref(), attempt, dead, %error, "publish failed"
        );
        if let Some(key) = &row.ordering_key {
            for behind in self.keys.remove(key).into_iter().flatten() {
                self.held.remove(&behind.id);
            }
            self.failing.insert(key.clone(), row.id);
        }
        self.first_mark_at.get_or_insert_with(Instant::now);
        self.failed.push(Failure {
            id: row.id,
            error: error.to_string(),
            retry_in: retry_delay(attempt, &self.config),
            permanent,
        });
    }

    fn database_failed(&mut self, e: &crate::Error) {
        self.health.set_database_ok(false);
        self.database_retry_at = Some(Instant::now() + DATABASE_RETRY);
        tracing::warn!(error = %e, source = ?std::error::Error::source(e), "database unavailable: retrying");
    }

    /// Stops publishing; waits up to the grace period for outstanding confirms, marks them,
    /// and names what it had to abandon (those rows stay pending and are published again).
    async fn drain(mut self) {
        let deadline = Instant::now() + self.config.shutdown_grace;
        while self.outstanding() > 0 {
            match tokio::time::timeout_at(deadline, self.outcomes.recv()).await {
                Ok(Some(outcome)) => self.record(outcome),
                _ => break,
            }
        }
        self.collect();
        let outstanding = self.outstanding();
        self.mark_waiting().await;
        if self.marks_waiting() > 0 {
            tracing::warn!(
                rows = self.marks_waiting(),
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
