//! The relay's live state, shared by its loops, the gauges and the HTTP endpoints.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Notify;

use crate::metrics as m;
use crate::store::{Lookout, Stats};

/// What the relay knows about itself right now. Every setter keeps its gauge in step.
#[derive(Debug)]
pub struct Health {
    /// `OUTBOX_STALL_TIMEOUT`: how long the leader may hold work without progress, or a
    /// loop go without a turn, before `/healthz` fails.
    stall_timeout: Duration,
    /// When the leader last made progress (a mark written) or had nothing to do.
    progress_at: Mutex<Instant>,
    /// When the relay's current loop (standby or leader) last turned.
    turned_at: Mutex<Instant>,
    /// The last database round trip succeeded.
    database_ok: AtomicBool,
    /// An AMQP connection is open.
    broker_connected: AtomicBool,
    /// The broker's reason for blocking our publishing connection (`None` = not blocked).
    blocked: Mutex<Option<String>>,
    /// This instance holds the table's leadership.
    leader: AtomicBool,
    /// The last figures read from the table.
    stats: Mutex<Stats>,
    /// The leader's last look saw pending rows (their count is then read separately).
    pending_seen: AtomicBool,
    /// Signalled when the broker becomes blocked or unblocked, so waits end at once.
    pub(crate) broker_changed: Notify,
    /// Signalled by `POST /wake`: a service committed rows, the leader claims at once.
    pub(crate) woken: Notify,
    /// The broker node of the last connection opened (URL redacted), for the status page.
    broker_node: Mutex<Option<String>>,
}

/// A snapshot for `/readyz` and the status page.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// `ready`, `standby`, or `not ready`.
    pub status: &'static str,
    /// The database answered the last query.
    pub database: bool,
    /// An AMQP connection is open.
    pub broker_connected: bool,
    /// The broker's blocking reason (memory or disk alarm), if blocked.
    pub broker_blocked: Option<String>,
    /// This instance publishes.
    pub leader: bool,
    /// Table figures.
    pub stats: Stats,
}

impl Default for Health {
    fn default() -> Self {
        Health::new(Duration::from_secs(300))
    }
}

impl Health {
    /// A relay's state; `/healthz` fails after `stall_timeout` without progress.
    pub fn new(stall_timeout: Duration) -> Self {
        Health {
            stall_timeout,
            progress_at: Mutex::new(Instant::now()),
            turned_at: Mutex::new(Instant::now()),
            database_ok: AtomicBool::default(),
            broker_connected: AtomicBool::default(),
            blocked: Mutex::default(),
            leader: AtomicBool::default(),
            stats: Mutex::default(),
            pending_seen: AtomicBool::default(),
            broker_changed: Notify::default(),
            woken: Notify::default(),
            broker_node: Mutex::default(),
        }
    }

    /// The leader made progress (a mark was written), or has nothing to do.
    pub fn progressed(&self) {
        *self.progress_at.lock().expect("health lock") = Instant::now();
    }

    /// A service committed rows: the leader looks for them now, not at its next poll
    /// (`POST /wake`). Wakes that come while a claim runs count once.
    pub fn wake(&self) {
        self.woken.notify_one();
    }

    /// The relay's loop turned: it is not stuck in a wait.
    pub fn turned(&self) {
        *self.turned_at.lock().expect("health lock") = Instant::now();
    }

    /// Why the relay is stuck, if it is: its loop has not turned for the stall timeout, or
    /// it leads and has held work that long without progress while the broker is not
    /// blocking it. A liveness probe then restarts it.
    pub fn stalled(&self) -> Option<String> {
        let limit = self.stall_timeout;
        let turned = self.turned_at.lock().expect("health lock").elapsed();
        if turned > limit {
            return Some(format!(
                "the relay's loop has not turned for {}s (OUTBOX_STALL_TIMEOUT is {}s)",
                turned.as_secs(),
                limit.as_secs()
            ));
        }
        let idle = self.progress_at.lock().expect("health lock").elapsed();
        let working = self.is_leader() && self.blocked().is_none();
        (working && idle > limit).then(|| {
            format!(
                "the leader has held pending rows for {}s without publishing or marking any (OUTBOX_STALL_TIMEOUT is {}s); {} rows pending, database reachable: {}, broker connected: {}",
                idle.as_secs(),
                limit.as_secs(),
                self.stats.lock().expect("health lock").pending,
                self.database_ok.load(Ordering::Relaxed),
                self.broker_connected.load(Ordering::Relaxed),
            )
        })
    }

    /// Records whether the database answered.
    pub fn set_database_ok(&self, ok: bool) {
        self.database_ok.store(ok, Ordering::Relaxed);
    }

    /// Records whether an AMQP connection is open.
    pub fn set_broker_connected(&self, connected: bool) {
        self.broker_connected.store(connected, Ordering::Relaxed);
        metrics::gauge!(m::BROKER_CONNECTED).set(f64::from(u8::from(connected)));
        self.broker_changed.notify_waiters();
    }

    /// Records a `connection.blocked` (with the broker's reason) or `unblocked` (`None`).
    pub fn set_blocked(&self, reason: Option<String>) {
        let changed = {
            let mut blocked = self.blocked.lock().expect("health lock");
            let changed = *blocked != reason;
            *blocked = reason.clone();
            changed
        };
        if changed {
            match &reason {
                Some(reason) => {
                    tracing::warn!(%reason, "broker blocked publishing: claiming stops")
                }
                None => tracing::warn!("broker unblocked publishing: claiming resumes"),
            }
        }
        metrics::gauge!(m::BROKER_BLOCKED).set(f64::from(u8::from(reason.is_some())));
        self.broker_changed.notify_waiters();
    }

    /// The broker's blocking reason, if it blocks us now.
    pub fn blocked(&self) -> Option<String> {
        self.blocked.lock().expect("health lock").clone()
    }

    /// Records whether this instance leads (a new term counts as progress).
    pub fn set_leader(&self, leader: bool) {
        self.progressed();
        self.leader.store(leader, Ordering::Relaxed);
        metrics::gauge!(m::LEADER).set(f64::from(u8::from(leader)));
    }

    /// Whether this instance leads.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// Records fresh table figures.
    pub fn set_stats(&self, stats: Stats) {
        metrics::gauge!(m::PENDING).set(stats.pending as f64);
        metrics::gauge!(m::OLDEST_PENDING_AGE).set(stats.oldest_pending_age_seconds);
        metrics::gauge!(m::DEAD).set(stats.dead as f64);
        *self.stats.lock().expect("health lock") = stats;
    }

    /// Records what the leader's look saw: every figure but the pending count, which is
    /// known only when nothing is pending.
    pub fn set_lookout(&self, lookout: &Lookout) {
        let pending_seen = lookout.last_pending.is_some();
        self.pending_seen.store(pending_seen, Ordering::Relaxed);
        let mut stats = self.stats.lock().expect("health lock").clone();
        if !pending_seen {
            stats.pending = 0;
        }
        stats.oldest_pending_age_seconds = lookout.oldest_pending_age_seconds;
        stats.dead = lookout.dead;
        self.set_stats(stats);
    }

    /// Whether the leader's last look saw pending rows.
    pub fn pending_seen(&self) -> bool {
        self.pending_seen.load(Ordering::Relaxed)
    }

    /// Records the node of the connection just opened (its URL redacted).
    pub fn set_broker_node(&self, node: String) {
        *self.broker_node.lock().expect("health lock") = Some(node);
    }

    /// The node of the last connection opened, if any.
    pub fn broker_node(&self) -> Option<String> {
        self.broker_node.lock().expect("health lock").clone()
    }

    /// The state as `/readyz` judges it.
    pub fn snapshot(&self) -> Snapshot {
        let database = self.database_ok.load(Ordering::Relaxed);
        let broker_connected = self.broker_connected.load(Ordering::Relaxed);
        let broker_blocked = self.blocked();
        let leader = self.leader.load(Ordering::Relaxed);
        let status = match (database, leader) {
            (false, _) => "not ready",
            (true, false) => "standby",
            (true, true) if broker_connected && broker_blocked.is_none() => "ready",
            (true, true) => "not ready",
        };
        Snapshot {
            status,
            database,
            broker_connected,
            broker_blocked,
            leader,
            stats: self.stats.lock().expect("health lock").clone(),
        }
    }
}
