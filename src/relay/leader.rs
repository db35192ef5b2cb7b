//! The leader's bookkeeping, without I/O: which rows it holds, what to claim, publish and
//! mark next. [`super::driver`] runs the database and broker work it asks for and feeds the
//! results back; the model test drives it directly against an in-memory table and broker.
//!
//! Only the leader publishes, so which rows it holds lives here, in memory: claims are plain
//! reads and a row is held from its claim until its mark commits, so it is never claimed
//! twice. A claim and a mark may run at once while publishing goes on: the window of
//! unconfirmed publishes is refilled from rows claimed ahead as confirms arrive. A mark that
//! changes what claims may return (a failure, or the success of a retried row, which
//! releases its key) runs alone.
//!
//! Claims walk the table in id order from a floor: normally just above the highest id
//! claimed, so a claim never rereads the rows in flight. The floor drops when rows below it
//! may have become claimable: a late commit (the notification names its smallest id), a
//! failed row whose retry fell due, a key released by its failed row's success, or no
//! notifications arriving (then the leader claims from 0 every poll interval while rows are
//! pending, and polls adaptively: again at once after a claim that found rows, after waits
//! that double up to the poll interval after one that found none).
//!
//! Order per key: a key has at most one publish unconfirmed. Its later rows wait here and
//! the next one is published as soon as the broker confirms the one before; a row that fails
//! drops the rows of its key held behind it, and the claim holds back every row behind a
//! failed one (dead, or waiting to retry) until that row is sent.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBuilder};

use super::marks::Marks;
use super::rows::Rows;
use crate::broker::{Outcome, PublishError};
use crate::config::RelayConfig;
use crate::message::OutboxRow;
use crate::metrics as m;
use crate::store::{Claimed, Failure, Lookout};

/// Without notifications, the first wait before claiming again after a claim found nothing;
/// it doubles after each empty claim up to `OUTBOX_POLL_INTERVAL`, when the looks take over.
const QUICK_POLL: Duration = Duration::from_millis(5);

/// How long to wait before retrying a database operation that failed.
const DATABASE_RETRY: Duration = Duration::from_millis(500);

/// What the driver is asked to do next.
#[derive(Debug)]
pub(crate) enum Action {
    /// Read up to `limit` claimable rows with ids from `from` up, skipping `skip` (every
    /// row held), while they fit in `bytes`.
    Claim {
        limit: usize,
        from: i64,
        skip: Vec<i64>,
        bytes: usize,
    },
    /// Record confirmed rows as sent and failed attempts, in one transaction.
    Mark {
        sent: Vec<i64>,
        failed: Vec<Failure>,
    },
    /// Open a broker connection; report it with [`Leader::connected`] or
    /// [`Leader::connect_failed`].
    Connect,
    /// Publish `row` on connection `conn`.
    Publish { conn: u64, row: Arc<OutboxRow> },
    /// Stop using connection `conn` and close it.
    Retire { conn: u64 },
    /// Look at the table on the lease's connection; report it with [`Leader::looked`].
    Look,
}

/// The broker connection, as the leader sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Broker {
    /// No connection; the next attempt is due at this time.
    Down { retry_at: Instant },
    /// An attempt is running.
    Connecting,
    /// Connection `conn` is open.
    Up { conn: u64 },
}

/// The state of one leadership term.
pub(crate) struct Leader {
    /// Knobs.
    config: RelayConfig,
    /// The rows held, from their claim until their mark.
    rows: Rows,
    /// Claims start at this id.
    floor: i64,
    /// Rows may be claimable at or above the floor.
    dirty: bool,
    /// The smallest id reported committed since the last claim started.
    committed_from: Option<i64>,
    /// Notifications of committed rows are arriving.
    listening: bool,
    /// The limit of the claim running, if one is.
    claiming: Option<usize>,
    /// The mean size of the rows of the last claim that found any (0 before one did).
    row_bytes: usize,
    /// The marks owed to the table.
    marks: Marks,
    /// No database operation before this (after one failed).
    database_retry_at: Option<Instant>,
    /// When to look at the whole table if notifications are not arriving.
    poll_at: Instant,
    /// The last look saw pending rows.
    pending_seen: bool,
    /// Without notifications: when to claim again after an empty claim, and the wait that
    /// led there (zero after a claim that found rows).
    quick_poll: (Option<Instant>, Duration),
    /// The broker connection.
    broker: Broker,
    /// The last connection number handed out.
    last_conn: u64,
    /// The broker blocks publishing (resource alarm).
    blocked: bool,
    /// Delays between connection attempts; reset when a confirm comes.
    reconnect: Box<dyn Iterator<Item = Duration> + Send>,
    /// Connections given up, to close.
    retiring: Vec<u64>,
    /// When the next look at the table is due.
    look_at: Instant,
    /// When the running look was sent, if one runs.
    looking: Option<Instant>,
    /// The lease is proven until then: the database ends a session silent for
    /// `OUTBOX_LEASE_TIMEOUT`, and this is half of that after the last look that answered.
    lease_until: Instant,
    /// Stopping: no claims and no publishes; the term ends at this deadline at the latest.
    stop_at: Option<Instant>,
    /// The term is over: nothing more to do but close the connection.
    finished: bool,
}

impl Leader {
    /// A new term whose lease was proven at `now`: nothing held, the whole table to look at.
    pub(crate) fn new(config: RelayConfig, now: Instant) -> Self {
        Leader {
            poll_at: now + config.poll_interval,
            pending_seen: true,
            quick_poll: (None, Duration::ZERO),
            look_at: now + config.look_interval(),
            looking: None,
            lease_until: now + config.lease_timeout / 2,
            config,
            rows: Rows::default(),
            floor: 0,
            dirty: true,
            committed_from: None,
            listening: false,
            claiming: None,
            row_bytes: 0,
            marks: Marks::default(),
            database_retry_at: None,
            broker: Broker::Down { retry_at: now },
            last_conn: 0,
            blocked: false,
            reconnect: Box::new(crate::broker::reconnect_backoff()),
            retiring: Vec::new(),
            stop_at: None,
            finished: false,
        }
    }

    /// The next thing to do at `now`, if any. Call until it returns `None`.
    pub(crate) fn poll_action(&mut self, now: Instant) -> Option<Action> {
        self.expire(now);
        if let Some(conn) = self.retiring.pop() {
            return Some(Action::Retire { conn });
        }
        if now >= self.lease_until && !self.finished {
            tracing::error!("leadership no longer proven: publishing stopped");
            self.finish();
        }
        if self.finished {
            return self.retiring.pop().map(|conn| Action::Retire { conn });
        }
        if self.looking.is_none() && now >= self.look_at {
            self.looking = Some(now);
            return Some(Action::Look);
        }
        if self.stop_at.is_some() {
            let retire = self.poll_stop(now);
            if retire.is_some() || self.finished {
                return retire;
            }
            return self.next_mark(now);
        }
        if let Broker::Down { retry_at } = self.broker
            && retry_at <= now
        {
            self.broker = Broker::Connecting;
            return Some(Action::Connect);
        }
        if let Some(publish) = self.next_publish() {
            return Some(publish);
        }
        if let Some(claim) = self.next_claim() {
            return Some(claim);
        }
        self.next_mark(now)
    }

    /// When [`Leader::poll_action`] may have something new to do, events aside.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let mark = self.marks.due_at().filter(|_| self.may_mark());
        let connect = match self.broker {
            Broker::Down { retry_at } if self.stop_at.is_none() => Some(retry_at),
            _ => None,
        };
        let look = Some(self.look_at).filter(|_| self.looking.is_none());
        [
            mark,
            self.database_retry_at,
            Some(self.poll_at),
            self.quick_poll.0,
            connect,
            self.stop_at,
            look,
            Some(self.lease_until),
        ]
        .into_iter()
        .flatten()
        .min()
        .filter(|_| !self.finished)
    }

    /// The term is over: stopped and its last mark written or tried.
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// Nothing to do: nothing held, and nothing more to claim as far as it knows.
    pub(crate) fn is_idle(&self) -> bool {
        self.rows.len() == 0 && !self.dirty && self.claiming.is_none()
    }

    /// Unconfirmed publishes right now.
    pub(crate) fn outstanding(&self) -> usize {
        self.rows.unconfirmed()
    }

    /// Rows committed with ids from `from` up (0: look at the whole table).
    pub(crate) fn committed(&mut self, from: i64) {
        self.committed_from = Some(self.committed_from.map_or(from, |f| f.min(from)));
    }

    /// Whether notifications of committed rows are arriving.
    pub(crate) fn set_listening(&mut self, listening: bool) {
        self.listening = listening;
    }

    /// The broker blocks (or unblocks) publishing.
    pub(crate) fn set_blocked(&mut self, blocked: bool) {
        self.blocked = blocked;
    }

    /// Whether a broker connection is open.
    pub(crate) fn is_connected(&self) -> bool {
        matches!(self.broker, Broker::Up { .. })
    }

    /// Stops the term: no more claims or publishes; outstanding confirms are awaited until
    /// the grace period ends, then the last mark is written.
    pub(crate) fn stop(&mut self, now: Instant) {
        if self.stop_at.is_none() {
            self.stop_at = Some(now + self.config.shutdown_grace);
        }
    }

    /// Connection attempt done: connection `conn` is open.
    pub(crate) fn connected(&mut self) -> u64 {
        self.last_conn += 1;
        self.broker = Broker::Up {
            conn: self.last_conn,
        };
        self.blocked = false;
        self.last_conn
    }

    /// Connection attempt done: no node answered.
    pub(crate) fn connect_failed(&mut self, now: Instant) {
        self.broker = Broker::Down {
            retry_at: now + self.next_reconnect_delay(),
        };
    }

    /// Connection `conn` was given up by its publish task (closed, failed, or silent): its
    /// unconfirmed rows go out first on the next connection, without counting an attempt.
    pub(crate) fn connection_lost(&mut self, now: Instant, conn: u64, reason: PublishError) {
        if self.broker != (Broker::Up { conn }) {
            return;
        }
        let unconfirmed = self.rows.unconfirmed();
        m::record_failures(reason.reason(), unconfirmed as u64);
        tracing::warn!(%reason, unconfirmed, "broker connection given up: publishing again on a new one");
        self.give_up(now, conn);
    }

    /// A look at the table came back: an answer proves the lease (half the lease timeout
    /// from when the look was sent), an error means it is lost.
    pub(crate) fn looked(&mut self, now: Instant, lookout: Result<Lookout, ()>) {
        let sent = self.looking.take().expect("a look was running");
        self.look_at = now + self.config.look_interval();
        match lookout {
            Ok(lookout) => {
                self.lease_until = sent + self.config.lease_timeout / 2;
                self.seen(&lookout);
            }
            Err(()) if !self.finished => {
                tracing::error!(
                    "leadership lost (its database session is gone): publishing stopped"
                );
                self.finish();
            }
            Err(()) => {}
        }
    }

    /// A mark was refused: another relay has taken the table since this term began.
    pub(crate) fn fenced(&mut self) {
        if !self.finished {
            tracing::error!("another relay leads the table now: publishing stopped");
            self.finish();
        }
    }

    /// The regular look at the table: pending rows above the floor are claimed (their
    /// notification may never have come; a row of theirs committed late below the floor is
    /// then found through them), and a retry that fell due asks for the whole table.
    fn seen(&mut self, lookout: &Lookout) {
        self.pending_seen = lookout.last_pending.is_some();
        if lookout.last_pending.is_some_and(|id| id >= self.floor) {
            self.dirty = true;
        }
        if lookout.retry_due {
            self.committed(0);
        }
    }

    /// A claim came back.
    pub(crate) fn claimed(&mut self, now: Instant, claimed: Result<Claimed, ()>) {
        let limit = self.claiming.take().expect("a claim was running");
        let Ok(Claimed { rows, cut }) = claimed else {
            self.database_failed(now);
            return;
        };
        if !rows.is_empty() {
            self.row_bytes = rows.iter().map(OutboxRow::bytes).sum::<usize>() / rows.len();
        }
        let full = rows.len() == limit || cut;
        let last = rows.last().map(|r| r.id);
        let mut missed = None;
        for row in rows {
            if let Some(previous) = self.rows.take(row) {
                missed = Some(missed.map_or(previous, |m: i64| m.min(previous)));
            }
        }
        // Everything claimable from the floor up to here is now held, but for the rows
        // before a row left behind.
        self.floor = match (full, last) {
            (true, Some(last)) => last + 1,
            _ => self.rows.top() + 1,
        };
        self.dirty = full;
        if let Some(previous) = missed {
            self.floor = self.floor.min(previous);
            self.dirty = true;
        }
        if !self.listening {
            self.poll_adaptively(now, last.is_some());
        }
    }

    /// Without notifications: claims again at once after a claim that found rows, and after
    /// one that found none, after a wait that doubles up to `OUTBOX_POLL_INTERVAL` (then the
    /// looks, which see any new pending row, take over).
    fn poll_adaptively(&mut self, now: Instant, found: bool) {
        if found {
            self.dirty = true;
            self.quick_poll = (None, Duration::ZERO);
            return;
        }
        let wait = match self.quick_poll.1 {
            Duration::ZERO => QUICK_POLL,
            wait => (wait * 2).min(self.config.poll_interval),
        };
        let next = (wait < self.config.poll_interval).then(|| now + wait);
        self.quick_poll = (next, wait);
    }

    /// The running mark came back.
    pub(crate) fn marked(&mut self, now: Instant, ok: bool) {
        if !ok {
            self.database_failed(now);
            self.marks.failed_to_write(now);
            return;
        }
        let mark = self.marks.written();
        m::record_published(mark.sent.len() as u64);
        self.rows.marked(&mark.sent, &mark.failed);
        if let Some(id) = mark.released {
            self.floor = self.floor.min(id);
            self.dirty = true;
        }
    }

    /// Time passed: timers that fell due take effect.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        self.expire(now);
        if self.quick_poll.0.is_some_and(|at| now >= at) {
            self.quick_poll.0 = None;
            self.dirty = true;
        }
        if now >= self.poll_at {
            self.poll_at = now + self.config.poll_interval;
            // Rows committed late below the floor have no notification to announce them.
            if !self.listening && self.pending_seen {
                self.floor = 0;
                self.dirty = true;
            }
        }
    }

    /// Sorts one outcome: a confirm releases its key's next row; a failure is marked and
    /// drops its key's rows held behind it. An outcome from a connection already given up
    /// is late: its row was put back when the connection was.
    pub(crate) fn outcome(&mut self, now: Instant, Outcome { conn, id, result }: Outcome) {
        if self.broker != (Broker::Up { conn }) {
            return;
        }
        let Some(row) = self.rows.settled(id) else {
            return;
        };
        let error = match result {
            Ok(()) => return self.confirmed(now, row),
            Err(error) => error,
        };
        m::record_failures(error.reason(), 1);
        let nacked = error == PublishError::Nack;
        self.fail(now, &row, error);
        if nacked {
            // After a quorum queue's leader moves, a channel can keep being nacked while a new
            // one is not (seen with RabbitMQ 3.10 when a cluster node stops).
            tracing::warn!("nacked by the broker: publishing on a new connection");
            self.give_up(now, conn);
        }
    }

    /// Stops using connection `conn`: its unconfirmed rows are put back at the front, in id
    /// order, and the next connection is opened after a backoff step.
    fn give_up(&mut self, now: Instant, conn: u64) {
        self.retiring.push(conn);
        self.broker = Broker::Down {
            retry_at: now + self.next_reconnect_delay(),
        };
        self.blocked = false;
        self.rows.unpublish();
    }

    /// The wait before the next connection attempt; the steps grow until a confirm comes.
    fn next_reconnect_delay(&mut self) -> Duration {
        self.reconnect.next().unwrap_or(Duration::from_secs(5))
    }

    fn confirmed(&mut self, now: Instant, row: Arc<OutboxRow>) {
        self.reconnect = Box::new(crate::broker::reconnect_backoff());
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        m::record_latency((epoch - row.created_at).max(0.0));
        self.marks.sent(now, row.id, row.attempts > 0);
        self.rows.confirmed(&row);
    }

    /// Records a failed attempt of `row`: its key's rows held behind it are dropped (claims
    /// find them again once it is sent).
    fn fail(&mut self, now: Instant, row: &OutboxRow, error: PublishError) {
        let attempt = row.attempts as u32 + 1;
        let permanent = matches!(error, PublishError::BadRow(_));
        let dead = permanent || attempt >= self.config.max_attempts;
        tracing::warn!(
            message_id = %row.message_id, exchange = %row.exchange, routing_key = %row.routing_key,
            ordering_key = row.ordering_key.as_deref(), attempt, dead, %error, "publish failed"
        );
        self.rows.failed(row);
        let failure = Failure {
            id: row.id,
            error: error.to_string(),
            retry_in: retry_delay(attempt, row.id, &self.config),
            permanent,
        };
        self.marks.failed(now, failure);
    }

    /// Clears timers that have passed.
    fn expire(&mut self, now: Instant) {
        if self.database_retry_at.is_some_and(|t| t <= now) {
            self.database_retry_at = None;
        }
    }

    /// While stopping: once every confirm has come and been marked, or the grace period is
    /// over, the term is finished.
    fn poll_stop(&mut self, now: Instant) -> Option<Action> {
        let stop_at = self.stop_at?;
        let drained =
            self.outstanding() == 0 && self.marks.waiting() == 0 && !self.marks.is_running();
        if !drained && now < stop_at {
            return None;
        }
        if self.outstanding() > 0 {
            tracing::warn!(
                rows = self.outstanding(),
                "stopped with publishes unconfirmed: those rows stay pending and will be published again"
            );
        }
        if self.marks.waiting() > 0 || self.marks.is_running() {
            tracing::warn!(
                rows = self.marks.waiting(),
                "could not record the last confirms: those rows will be published again"
            );
        }
        self.finish();
        self.retiring.pop().map(|conn| Action::Retire { conn })
    }

    /// Ends the term: the connection is closed and nothing more is done (a mark written now
    /// could come after another leader's, and would change nothing: its term fences it).
    fn finish(&mut self) {
        self.finished = true;
        if let Broker::Up { conn } = self.broker {
            self.retiring.push(conn);
            self.broker = Broker::Connecting;
        }
    }

    /// A row to publish, if one is ready, the window has room and the broker takes it (a
    /// publish sent while blocked would only wait).
    fn next_publish(&mut self) -> Option<Action> {
        let Broker::Up { conn } = self.broker else {
            return None;
        };
        if self.blocked || self.rows.unconfirmed() >= self.config.max_in_flight {
            return None;
        }
        let row = self.rows.publish()?;
        Some(Action::Publish { conn, row })
    }

    /// Rows held at most: the window, as many again claimed ahead (so that each key's next
    /// row is at hand when its confirm comes), and two batches of confirms being marked.
    fn capacity(&self) -> usize {
        2 * self.config.max_in_flight + 2 * self.config.batch_size
    }

    /// A claim of what room allows from the floor, if rows may be claimable and the broker
    /// takes them.
    fn next_claim(&mut self) -> Option<Action> {
        if self.claiming.is_some() {
            return None;
        }
        if let Some(from) = self.committed_from.take() {
            // Below the floor only if committed late (or the whole table is asked for).
            self.floor = self.floor.min(from);
            self.dirty = true;
        }
        let room = self.capacity().saturating_sub(self.rows.len());
        let worth_it = room >= self.config.batch_size / 2 || self.rows.none_ready();
        // A mark that changes what claims return goes first (claims would starve it).
        let exclusive = self.marks.exclusive();
        let full = self.rows.bytes() >= self.config.max_in_flight_bytes;
        if !self.dirty || room == 0 || full || !worth_it || self.blocked || exclusive {
            return None;
        }
        if self.database_retry_at.is_some() {
            return None;
        }
        // What the held rows leave of OUTBOX_MAX_IN_FLIGHT_BYTES, and as many rows as it
        // held of the last claim's size (a claim that stops at its budget wastes the rest).
        let bytes = self
            .config
            .max_in_flight_bytes
            .saturating_sub(self.rows.bytes());
        let fit = bytes / self.row_bytes.max(1);
        let limit = room.min(self.config.batch_size).min(fit.max(1));
        let from = self.floor;
        let skip = self.rows.held();
        self.claiming = Some(limit);
        Some(Action::Claim {
            limit,
            from,
            skip,
            bytes,
        })
    }

    /// The mark to start now, if any: a batch of confirms, or fewer once the window is idle
    /// or the oldest has waited `MARK_DELAY`. One that changes what claims return waits for
    /// the running claim.
    fn next_mark(&mut self, now: Instant) -> Option<Action> {
        if self.marks.waiting() == 0 || !self.may_mark() {
            return None;
        }
        let idle = self.outstanding() == 0 && self.rows.none_ready();
        let due = self.marks.due_at().is_some_and(|t| now >= t);
        let batch = self.marks.waiting() >= self.config.batch_size;
        (batch || idle || due).then(|| self.mark())
    }

    /// A mark may start now: none runs, no database retry waits, and one that changes what
    /// claims return does not overlap a claim.
    fn may_mark(&self) -> bool {
        !self.marks.is_running()
            && self.database_retry_at.is_none()
            && !(self.marks.exclusive() && self.claiming.is_some())
    }

    /// A mark of every confirm and failure waiting.
    fn mark(&mut self) -> Action {
        let (sent, failed) = self.marks.start();
        Action::Mark { sent, failed }
    }

    fn database_failed(&mut self, now: Instant) {
        self.database_retry_at = Some(now + DATABASE_RETRY);
    }
}

#[cfg(test)]
impl Leader {
    /// Panics unless every row is in one place at most, and only if held.
    pub(crate) fn check_consistency(&self) {
        self.rows.check_consistency();
    }

    /// The text of the rows held, in bytes.
    pub(crate) fn held_bytes(&self) -> usize {
        self.rows.bytes()
    }
}

/// The delay before attempt `attempt + 1` of a failed row: exponential from
/// `OUTBOX_BACKOFF_MIN`, jittered (by a generator seeded with the row, so the same row and
/// attempt always wait the same), never above `OUTBOX_BACKOFF_MAX`.
fn retry_delay(attempt: u32, id: i64, config: &RelayConfig) -> Duration {
    ExponentialBuilder::default()
        .with_min_delay(config.backoff_min)
        .with_max_delay(config.backoff_max)
        .with_jitter()
        .with_jitter_seed(id as u64 ^ u64::from(attempt).rotate_left(32))
        .without_max_times()
        .build()
        .nth(attempt.saturating_sub(1) as usize)
        .unwrap_or(config.backoff_max)
        .min(config.backoff_max)
}
