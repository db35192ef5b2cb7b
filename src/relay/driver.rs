//! The leader's I/O: runs what [`Leader`] asks for (claims, marks, broker connections,
//! publishes) and feeds back what came of it. All decisions are the core's.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::leader::{Action, Leader};
use crate::broker::{Nodes, Pipeline, Publisher, Report};
use crate::config::RelayConfig;
use crate::store::{Claimed, Inserts, Lease, Lookout, Store};
use crate::{Health, Result};

/// How long closing a broker connection may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// A database or broker operation in progress.
type Running<T> = Option<Pin<Box<dyn Future<Output = T> + Send>>>;

/// One leadership term's I/O.
pub(super) struct Driver<S: Store> {
    /// The table.
    store: S,
    /// The connection that holds leadership (lent to a look while it runs).
    lease: Option<S::Lease>,
    /// The term: every mark carries it.
    term: i64,
    /// Knobs.
    config: RelayConfig,
    /// Shared state for gauges and `/readyz`.
    health: Arc<Health>,
    /// Committed rows, as the database reports them.
    inserts: Arc<Inserts>,
    /// The decisions.
    core: Leader,
    /// `outbox_unconfirmed_publishes`, and the figure it was last set to.
    unconfirmed: (metrics::Gauge, usize),
    /// The broker's nodes, tried in turn (lent to a connection attempt while it runs).
    nodes: Option<Nodes>,
    /// Open connections and their publish tasks, by number.
    publishers: HashMap<u64, (Arc<Publisher>, Pipeline)>,
    /// The current connection's blocking by the broker.
    blocked: Option<watch::Receiver<Option<String>>>,
    /// Where publish tasks report.
    reports_tx: mpsc::UnboundedSender<Report>,
    /// Read by the loop.
    reports: mpsc::UnboundedReceiver<Report>,
    /// The claim running.
    claim: Running<Result<Claimed>>,
    /// The mark running.
    mark: Running<Result<()>>,
    /// The connection attempt running, which hands the node list back.
    connect: Running<(Nodes, Result<Arc<Publisher>, String>)>,
    /// The look at the table running, which hands the lease back.
    look: Running<(S::Lease, Result<Lookout>)>,
}

impl<S: Store> Driver<S> {
    pub(super) fn new(
        store: S,
        config: RelayConfig,
        health: Arc<Health>,
        inserts: Arc<Inserts>,
        lease: S::Lease,
        term: i64,
    ) -> Self {
        let (reports_tx, reports) = mpsc::unbounded_channel();
        Driver {
            lease: Some(lease),
            term,
            nodes: Some(Nodes::new(
                config.amqp_urls.clone(),
                config.amqp_tls.clone(),
                config.max_message_size,
            )),
            core: Leader::new(config.clone(), Instant::now().into_std()),
            unconfirmed: (metrics::gauge!(crate::metrics::UNCONFIRMED), 0),
            store,
            config,
            health,
            inserts,
            publishers: HashMap::new(),
            blocked: None,
            reports_tx,
            reports,
            claim: None,
            mark: None,
            connect: None,
            look: None,
        }
    }

    /// Publishes until `stop`, then drains within the grace period.
    pub(super) async fn run(mut self, stop: &CancellationToken) {
        let mut stopping = false;
        loop {
            self.core.set_listening(self.inserts.listening());
            let now = Instant::now().into_std();
            while let Some(action) = self.core.poll_action(now) {
                self.execute(action);
            }
            if self.core.is_finished() {
                break;
            }
            self.count_unconfirmed(self.core.outstanding());
            self.health.turned();
            if self.core.is_idle() {
                self.health.progressed();
            }
            let wake = self.core.poll_timeout().map(Instant::from_std);
            tokio::select! {
                rows = poll(&mut self.claim), if self.claim.is_some() => {
                    self.claim = None;
                    let rows = self.database(rows);
                    self.core.claimed(Instant::now().into_std(), rows);
                }
                done = poll(&mut self.mark), if self.mark.is_some() => {
                    self.mark = None;
                    self.marked(done);
                }
                (lease, lookout) = poll(&mut self.look), if self.look.is_some() => {
                    self.look = None;
                    self.lease = Some(lease);
                    self.looked(lookout);
                }
                (nodes, opened) = poll(&mut self.connect), if self.connect.is_some() => {
                    self.connect = None;
                    self.nodes = Some(nodes);
                    self.connected(opened);
                }
                Some(report) = self.reports.recv() => self.report(report),
                _ = self.inserts.notified() => {
                    if let Some(from) = self.inserts.take() {
                        self.core.committed(from);
                    }
                }
                // A service's nudge: the whole table, as a late commit may be below the floor.
                _ = self.health.woken.notified() => self.core.committed(0),
                Some(reason) = blocking(&mut self.blocked) => {
                    self.core.set_blocked(reason.is_some());
                    self.health.set_blocked(reason);
                }
                _ = sleep_until(wake) => self.core.handle_timeout(Instant::now().into_std()),
                _ = stop.cancelled(), if !stopping => {
                    stopping = true;
                    self.core.stop(Instant::now().into_std());
                }
            }
        }
        self.count_unconfirmed(0);
        for (publisher, _) in self.publishers.into_values() {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, publisher.close()).await;
        }
        self.health.set_broker_connected(false);
    }

    /// Sets `outbox_unconfirmed_publishes` when the figure changed.
    fn count_unconfirmed(&mut self, outstanding: usize) {
        if outstanding != self.unconfirmed.1 {
            self.unconfirmed.0.set(outstanding as f64);
            self.unconfirmed.1 = outstanding;
        }
    }

    /// Starts what the core asks for.
    fn execute(&mut self, action: Action) {
        match action {
            Action::Claim {
                limit,
                from,
                skip,
                bytes,
            } => {
                let store = self.store.clone();
                self.claim = Some(Box::pin(async move {
                    store.claim(limit, from, &skip, bytes).await
                }));
            }
            Action::Mark { sent, failed } => {
                let store = self.store.clone();
                let (term, max_attempts) = (self.term, self.config.max_attempts);
                self.mark = Some(Box::pin(async move {
                    store.mark(term, &sent, &failed, max_attempts).await
                }));
            }
            Action::Look => {
                let mut lease = self.lease.take().expect("one look at a time");
                // Half the lease timeout: the core gives the lease up at that point anyway.
                let limit = self.config.lease_timeout / 2;
                self.look = Some(Box::pin(async move {
                    let looked = tokio::time::timeout(limit, lease.look()).await;
                    (lease, looked.unwrap_or(Err(crate::Error::Timeout(limit))))
                }));
            }
            Action::Connect => {
                let mut nodes = self.nodes.take().expect("one connection attempt at a time");
                let timeout = self.config.connect_timeout;
                self.connect = Some(Box::pin(async move {
                    let opened = nodes.connect(timeout).await;
                    (nodes, opened)
                }));
            }
            Action::Publish { conn, row } => {
                if let Some((_, pipeline)) = self.publishers.get(&conn) {
                    pipeline.publish(row);
                }
            }
            Action::Retire { conn } => self.retire(conn),
        }
    }

    /// A connection attempt came back.
    fn connected(&mut self, opened: Result<Arc<Publisher>, String>) {
        match opened {
            Ok(publisher) => {
                let conn = self.core.connected();
                let pipeline = Pipeline::start(
                    publisher.clone(),
                    conn,
                    self.config.app_id.clone(),
                    self.config.confirm_timeout,
                    self.reports_tx.clone(),
                );
                self.blocked = Some(publisher.blocked());
                self.health.set_broker_node(publisher.node().to_owned());
                self.publishers.insert(conn, (publisher, pipeline));
                self.health.set_blocked(None);
                self.health.set_broker_connected(true);
            }
            Err(error) => {
                tracing::warn!(%error, "no broker node reachable: retrying");
                self.core.connect_failed(Instant::now().into_std());
            }
        }
    }

    /// Stops connection `conn`'s publish task and closes the connection in the background.
    fn retire(&mut self, conn: u64) {
        if let Some((publisher, _pipeline)) = self.publishers.remove(&conn) {
            tokio::spawn(
                async move { tokio::time::timeout(CLOSE_TIMEOUT, publisher.close()).await },
            );
        }
        self.health.set_broker_connected(false);
        self.health.set_blocked(None);
    }

    fn report(&mut self, report: Report) {
        let now = Instant::now().into_std();
        match report {
            Report::Outcome(outcome) => self.core.outcome(now, outcome),
            Report::Lost { conn, reason } => {
                self.core.connection_lost(now, conn, reason);
                if !self.core.is_connected() {
                    self.health.set_broker_connected(false);
                    self.health.set_blocked(None);
                }
            }
        }
    }

    /// A mark came back; one fenced by a newer term means another relay leads.
    fn marked(&mut self, done: Result<()>) {
        let now = Instant::now().into_std();
        if let Err(crate::Error::LeaseLost) = done {
            self.core.marked(now, false);
            self.core.fenced();
            return;
        }
        let ok = self.database(done).is_ok();
        if ok {
            self.health.progressed();
        }
        self.core.marked(now, ok);
    }

    /// A look came back: the core learns whether the lease holds, the gauges what it saw.
    fn looked(&mut self, lookout: Result<Lookout>) {
        let now = Instant::now().into_std();
        match lookout {
            Ok(lookout) => {
                self.health.set_database_ok(true);
                self.health.set_lookout(&lookout);
                self.core.looked(now, Ok(lookout));
            }
            Err(e) => {
                tracing::warn!(error = %e, "the look at the table on the lease connection failed");
                self.core.looked(now, Err(()));
            }
        }
    }

    /// Records whether the database answered; the error becomes the core's "failed".
    fn database<T>(&self, result: Result<T>) -> Result<T, ()> {
        self.health.set_database_ok(result.is_ok());
        result.map_err(|e| {
            tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "database unavailable: retrying");
        })
    }
}

/// The output of the operation in `slot` (which the caller checked is running).
async fn poll<T>(slot: &mut Running<T>) -> T {
    slot.as_mut().expect("checked").await
}

/// The next change of the current connection's blocking, or never without one.
async fn blocking(blocked: &mut Option<watch::Receiver<Option<String>>>) -> Option<Option<String>> {
    if let Some(rx) = blocked
        && rx.changed().await.is_ok()
    {
        return Some(rx.borrow_and_update().clone());
    }
    std::future::pending().await
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
