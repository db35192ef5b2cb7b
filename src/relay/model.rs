//! A model test of the leader's core: random interleavings of claims, confirms, nacks,
//! returns, confirm timeouts, reconnects (with late outcomes from old connections), late
//! commits, failures, dead rows, `dead retry` and loss of leadership, against an in-memory
//! table and broker that behave as PostgreSQL and lapin do. After every step the invariants
//! are checked; at the end the world heals and every committed row must be sent or dead.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::leader::{Action, Leader};
use crate::broker::{Confirm, Outcome, PublishError, Report, settle};
use crate::config::RelayConfig;
use crate::message::OutboxRow;
use crate::store::{Budget, Claimed, Failure, Lookout};

const MAX_ATTEMPTS: u32 = 3;
const KEYS: u8 = 3;
/// Payload sizes, by row id: a claim of three rows may overrun the byte bound, and the
/// largest row alone does.
const PAYLOAD_BYTES: [usize; 4] = [2, 10, 30, 60];
/// The relay's byte bound here.
const MAX_BYTES: usize = 60;
/// The largest row's text: held rows may exceed the bound by one row at most.
const LARGEST_ROW: usize = 100;

fn config() -> RelayConfig {
    RelayConfig {
        batch_size: 2,
        max_in_flight: 3,
        max_in_flight_bytes: MAX_BYTES,
        poll_interval: Duration::from_secs(1),
        max_attempts: MAX_ATTEMPTS,
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        shutdown_grace: Duration::from_secs(5),
        ..RelayConfig::new(vec!["amqp://model".into()])
    }
}

/// One thing that happens in the world.
#[derive(Debug, Clone)]
enum Step {
    /// A service commits a row (or, if `late`, takes its id now and commits later).
    Insert {
        key: Option<u8>,
        routable: bool,
        late: bool,
    },
    /// The oldest late row of one key (or of no key) commits.
    CommitLate(u8),
    /// The leader's running claim (0), mark (1), connection attempt (2) or look at the
    /// table (3, which also proves its lease) completes.
    Complete { which: u8, ok: bool },
    /// The broker takes the next `n` publishes of a connection, returns the unroutable
    /// ones and acks them all with one multiple ack.
    Process { conn: u8, n: u8 },
    /// The broker nacks the next publish of a connection.
    Nack { conn: u8 },
    /// The publish task's confirm timeout drops the oldest waiting confirm of a connection.
    Timeout { conn: u8 },
    /// A connection dies.
    Kill { conn: u8 },
    /// Reports of publish tasks reach the leader.
    Receive(u8),
    /// A resource alarm starts or ends.
    Block(bool),
    /// Time passes.
    Advance(u16),
    /// The leader's look at the table answers.
    LeaseCheck,
    /// An operator runs `outbox dead retry --all`.
    DeadRetry,
    /// Notifications: 0 arrive, 1 are silently lost, 2 are lost and the listener knows it.
    Listener(u8),
    /// The leader's look fails: it loses its lease, and another relay becomes leader.
    LoseLease,
    /// The old leader (if any) makes progress.
    Zombie(u8),
    /// SIGTERM: the leader drains and stops, and another relay leads.
    Stop,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (proptest::option::of(0..KEYS), proptest::bool::weighted(0.85), proptest::bool::weighted(0.15))
            .prop_map(|(key, routable, late)| Step::Insert { key, routable, late }),
        2 => any::<u8>().prop_map(Step::CommitLate),
        10 => (0..4u8, proptest::bool::weighted(0.9)).prop_map(|(which, ok)| Step::Complete { which, ok }),
        8 => (any::<u8>(), 1..4u8).prop_map(|(conn, n)| Step::Process { conn, n }),
        1 => any::<u8>().prop_map(|conn| Step::Nack { conn }),
        1 => any::<u8>().prop_map(|conn| Step::Timeout { conn }),
        1 => any::<u8>().prop_map(|conn| Step::Kill { conn }),
        8 => (1..6u8).prop_map(Step::Receive),
        1 => any::<bool>().prop_map(Step::Block),
        3 => (1..3000u16).prop_map(Step::Advance),
        2 => Just(Step::LeaseCheck),
        1 => Just(Step::DeadRetry),
        1 => (0..3u8).prop_map(Step::Listener),
        1 => Just(Step::LoseLease),
        2 => any::<u8>().prop_map(Step::Zombie),
        1 => Just(Step::Stop),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Pending,
    Sent,
    Dead,
}

/// A row of the outbox table.
#[derive(Debug, Clone)]
struct Row {
    key: Option<String>,
    routable: bool,
    committed: bool,
    state: State,
    attempts: u32,
    next_attempt_at: Instant,
}

/// The outbox table, with the semantics of the PostgreSQL store's statements.
#[derive(Default)]
struct Table {
    /// The leadership term, raised by each new leader; marks of another term change nothing.
    term: u64,
    rows: BTreeMap<i64, Row>,
    /// Late rows not yet committed, oldest first, by key (a service serializes one key's
    /// transactions, so a key's later rows commit after its earlier ones).
    uncommitted: BTreeMap<Option<String>, VecDeque<i64>>,
    /// Claims name the latest pending row of a row's key below the floor, held or not (as
    /// the MySQL store does), rather than the one just before the row (as PostgreSQL's does).
    previous_below_floor: bool,
}

impl Table {
    fn claim(&self, now: Instant, limit: usize, from: i64, skip: &[i64], bytes: usize) -> Claimed {
        let blocks = |id: i64, key: &str| {
            self.rows.range(..id).any(|(_, e)| {
                e.committed
                    && e.key.as_deref() == Some(key)
                    && (e.state == State::Dead || (e.state == State::Pending && e.attempts > 0))
            })
        };
        let rows = self
            .rows
            .range(from..)
            .filter(|(id, r)| {
                r.committed
                    && r.state == State::Pending
                    && r.next_attempt_at <= now
                    && !skip.contains(id)
                    && r.key.as_deref().is_none_or(|k| !blocks(**id, k))
            })
            .take(limit)
            .map(|(&id, r)| {
                let mut row = outbox_row(id, r);
                row.previous = self
                    .rows
                    .range(..id)
                    .filter(|(_, e)| {
                        e.committed
                            && e.state == State::Pending
                            && e.key.is_some()
                            && e.key == r.key
                    })
                    // The MySQL store looks below the floor only.
                    .filter(|(id, _)| !(self.previous_below_floor && **id >= from))
                    .map(|(&id, _)| id)
                    .next_back();
                row
            });
        let mut budget = Budget::new(bytes);
        for row in rows {
            if !budget.admit(row) {
                break;
            }
        }
        budget.claimed()
    }

    fn mark(&mut self, now: Instant, sent: &[i64], failed: &[Failure]) {
        for id in sent {
            self.rows.get_mut(id).expect("marked row exists").state = State::Sent;
        }
        for f in failed {
            let row = self.rows.get_mut(&f.id).expect("failed row exists");
            if row.state != State::Pending {
                continue;
            }
            row.attempts += 1;
            row.next_attempt_at = now + f.retry_in;
            if f.permanent || row.attempts >= MAX_ATTEMPTS {
                row.state = State::Dead;
            }
        }
    }

    fn lookout(&self, now: Instant) -> Lookout {
        let pending = || {
            self.rows
                .iter()
                .filter(|(_, r)| r.committed && r.state == State::Pending)
        };
        Lookout {
            last_pending: pending().map(|(&id, _)| id).next_back(),
            retry_due: pending().any(|(_, r)| r.attempts > 0 && r.next_attempt_at <= now),
            ..Lookout::default()
        }
    }
}

fn outbox_row(id: i64, r: &Row) -> OutboxRow {
    OutboxRow {
        id,
        message_id: format!("m{id}"),
        exchange: String::new(),
        routing_key: if r.routable { "routed" } else { "nowhere" }.into(),
        ordering_key: r.key.clone(),
        message_type: None,
        payload: format!("\"{}\"", "x".repeat(PAYLOAD_BYTES[id as usize % 4])),
        headers: "{}".into(),
        created_at: 0.0,
        attempts: r.attempts as i32,
        previous: None,
    }
}

/// A publish at the broker, in delivery-tag order.
struct Publish {
    row: Arc<OutboxRow>,
    /// Its confirm future is still polled by the publish task.
    alive: bool,
}

/// One AMQP connection with its confirm channel, as lapin sees it.
#[derive(Default)]
struct Connection {
    /// Publishes the broker has not settled yet.
    unsettled: VecDeque<Publish>,
    /// Returns waiting for the next ack, which carries them (lapin's `ReturnedMessages`).
    waiting_returns: VecDeque<(String, String)>,
    /// The publish task's map of returns by message id.
    returned: HashMap<String, String>,
    /// The leader asked to retire it.
    retired: bool,
    /// The broker still holds it open.
    open: bool,
    /// Its publish task runs (it stops when it gives the connection up or is retired).
    task: bool,
}

/// One relay's leadership term and the I/O the model runs for it.
struct Node {
    core: Leader,
    /// Its term.
    term: u64,
    /// A look at the table runs.
    look: bool,
    /// The running claim's answer, read when it started.
    claim: Option<Claimed>,
    /// The running mark.
    mark: Option<(Vec<i64>, Vec<Failure>)>,
    connecting: bool,
    /// Reports of publish tasks not yet received.
    reports: VecDeque<Report>,
    /// Its connections, by number.
    conns: BTreeMap<u64, Connection>,
    /// The connection the core last opened.
    current: Option<u64>,
}

impl Node {
    fn new(now: Instant, term: u64) -> Self {
        Node {
            core: Leader::new(config(), now),
            term,
            look: false,
            claim: None,
            mark: None,
            connecting: false,
            reports: VecDeque::new(),
            conns: BTreeMap::new(),
            current: None,
        }
    }

    fn pick_conn(&self, pick: u8) -> Option<u64> {
        let open: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.open)
            .map(|(&n, _)| n)
            .collect();
        (!open.is_empty()).then(|| open[pick as usize % open.len()])
    }
}

/// What the broker received, for the invariants.
#[derive(Default)]
struct Received {
    /// Rows acked as routed at least once.
    routed: HashSet<i64>,
    /// Per key, the rows in the order of their first routed arrival.
    first: HashMap<String, Vec<i64>>,
    /// Failures the leader received that were the row's own doing.
    own_faults: HashMap<i64, u32>,
}

struct World {
    /// The store has notifications (PostgreSQL) or not (MySQL).
    notifications: bool,
    now: Instant,
    table: Table,
    leader: Node,
    zombie: Option<Node>,
    received: Received,
    /// Notifications reach the leader.
    notify: bool,
    /// The listener knows it is connected.
    listening: bool,
    blocked: bool,
}

impl World {
    fn new(notifications: bool) -> Self {
        let now = Instant::now();
        World {
            notifications,
            now,
            table: Table {
                previous_below_floor: !notifications,
                ..Table::default()
            },
            leader: Node::new(now, 0),
            zombie: None,
            received: Received::default(),
            notify: notifications,
            listening: notifications,
            blocked: false,
        }
    }

    fn apply(&mut self, step: &Step) {
        match *step {
            Step::Insert {
                key,
                routable,
                late,
            } => self.insert(key.map(|k| format!("k{k}")), routable, late),
            Step::CommitLate(pick) => {
                let keys: Vec<_> = self.table.uncommitted.keys().cloned().collect();
                if !keys.is_empty() {
                    self.commit_late(&keys[pick as usize % keys.len()].clone());
                }
            }
            Step::Complete { which, ok } => complete(
                &mut self.leader,
                &mut self.table,
                &mut self.received,
                self.now,
                which,
                ok,
            ),
            Step::Process { conn, n } => self.process(conn, n),
            Step::Nack { conn } => self.nack(conn),
            Step::Timeout { conn } => {
                if let Some(n) = self.leader.pick_conn(conn) {
                    timeout(&mut self.leader, n);
                }
            }
            Step::Kill { conn } => {
                if let Some(n) = self.leader.pick_conn(conn) {
                    kill(&mut self.leader, n);
                }
            }
            Step::Receive(n) => receive(&mut self.leader, &mut self.received, self.now, n),
            Step::Block(blocked) => self.blocked = blocked,
            Step::Advance(ms) => {
                self.now += Duration::from_millis(ms.into());
                self.leader.core.handle_timeout(self.now);
            }
            Step::LeaseCheck => complete(
                &mut self.leader,
                &mut self.table,
                &mut self.received,
                self.now,
                3,
                true,
            ),
            Step::DeadRetry => self.dead_retry(),
            Step::Listener(mode) => self.listener(mode),
            Step::LoseLease => self.lose_lease(),
            Step::Zombie(n) => self.zombie_step(n),
            Step::Stop => self.leader.core.stop(self.now),
        }
        self.run_actions();
    }

    fn insert(&mut self, key: Option<String>, routable: bool, late: bool) {
        let id = self.table.rows.keys().next_back().map_or(1, |id| id + 1);
        let waiting = self
            .table
            .uncommitted
            .get(&key)
            .is_some_and(|q| !q.is_empty());
        self.table.rows.insert(
            id,
            Row {
                key: key.clone(),
                routable,
                committed: false,
                state: State::Pending,
                attempts: 0,
                next_attempt_at: self.now,
            },
        );
        if late || (waiting && key.is_some()) {
            self.table.uncommitted.entry(key).or_default().push_back(id);
        } else {
            self.commit(id);
        }
    }

    fn commit_late(&mut self, key: &Option<String>) {
        let queue = self.table.uncommitted.get_mut(key).expect("picked");
        let id = queue.pop_front().expect("not empty");
        if queue.is_empty() {
            self.table.uncommitted.remove(key);
        }
        self.commit(id);
    }

    fn commit(&mut self, id: i64) {
        let row = self.table.rows.get_mut(&id).expect("row");
        row.committed = true;
        row.next_attempt_at = self.now;
        if self.notify {
            self.leader.core.committed(id);
        }
    }

    /// A listener that comes back asks for the whole table: what was committed meanwhile
    /// was not notified.
    fn listener(&mut self, mode: u8) {
        if !self.notifications {
            return;
        }
        if mode == 0 && !self.notify {
            self.leader.core.committed(0);
        }
        self.notify = mode == 0;
        self.listening = mode != 2;
    }

    fn dead_retry(&mut self) {
        for row in self.table.rows.values_mut() {
            if row.state == State::Dead {
                row.state = State::Pending;
                row.attempts = 0;
                row.next_attempt_at = self.now;
            }
        }
        if self.notify {
            self.leader.core.committed(0);
        }
    }

    fn process(&mut self, pick: u8, n: u8) {
        if let Some(conn) = self.leader.pick_conn(pick)
            && !(self.blocked && Some(conn) == self.leader.current)
        {
            process(&mut self.leader, &mut self.received, conn, n);
        }
    }

    fn nack(&mut self, pick: u8) {
        let Some(conn) = self.leader.pick_conn(pick) else {
            return;
        };
        let c = self.leader.conns.get_mut(&conn).expect("picked");
        if let Some(p) = c.unsettled.pop_front() {
            let carried = c.waiting_returns.pop_front();
            if p.alive {
                report(
                    &mut self.leader,
                    conn,
                    vec![(p.row, Confirm::Nack(carried))],
                );
            }
        }
    }

    fn lose_lease(&mut self) {
        if self.leader.look {
            complete(
                &mut self.leader,
                &mut self.table,
                &mut self.received,
                self.now,
                3,
                false,
            );
        }
    }

    /// A leader whose term is over gives way to a new one, with a new term.
    fn succeed(&mut self) {
        if !self.leader.core.is_finished() {
            return;
        }
        self.table.term += 1;
        let old = std::mem::replace(&mut self.leader, Node::new(self.now, self.table.term));
        self.zombie = Some(old);
        self.blocked = false;
    }

    /// After the old leader's term ended, what it had sent still arrives: its publishes at
    /// the broker, its last mark at the database (where its term fences it).
    fn zombie_step(&mut self, n: u8) {
        let Some(zombie) = self.zombie.as_mut() else {
            return;
        };
        if let Some((sent, failed)) = zombie.mark.take()
            && zombie.term == self.table.term
        {
            self.table.mark(self.now, &sent, &failed);
        }
        if let Some(conn) = zombie.pick_conn(n) {
            process(zombie, &mut self.received, conn, n % 4);
        }
        let action = zombie.core.poll_action(self.now);
        assert!(
            action.is_none(),
            "a leader whose term is over still acts: {action:?}"
        );
    }

    fn run_actions(&mut self) {
        let spun = run_node(
            &mut self.leader,
            &self.table,
            self.now,
            self.blocked,
            self.listening,
        );
        assert!(
            !spun,
            "the leader would spin: its next timer is already due"
        );
        check(&self.leader);
        if self.leader.core.is_finished() {
            self.succeed();
            self.run_actions();
        }
    }

    /// Lets everything heal and settle; then every committed row is sent or dead.
    fn heal(&mut self) {
        self.listener(0);
        self.blocked = false;
        while !self.table.uncommitted.is_empty() {
            let key = self.table.uncommitted.keys().next().cloned().expect("some");
            self.commit_late(&key);
        }
        for _ in 0..400 {
            for which in 0..4 {
                complete(
                    &mut self.leader,
                    &mut self.table,
                    &mut self.received,
                    self.now,
                    which,
                    true,
                );
            }
            let conns: Vec<u64> = self.leader.conns.keys().copied().collect();
            for conn in conns {
                if self.leader.conns[&conn].retired {
                    kill(&mut self.leader, conn);
                }
            }
            for pick in 0..4 {
                self.process(pick, 8);
            }
            receive(&mut self.leader, &mut self.received, self.now, u8::MAX);
            self.zombie_step(0);
            self.zombie_step(1);
            self.now += Duration::from_millis(300);
            self.leader.core.handle_timeout(self.now);
            self.run_actions();
        }
        // A row behind a dead row of its key waits for `dead retry`, by design.
        let behind_dead = |id: i64, key: &Option<String>| {
            key.is_some()
                && self
                    .table
                    .rows
                    .range(..id)
                    .any(|(_, e)| e.key == *key && e.state == State::Dead)
        };
        let stuck: Vec<i64> = self
            .table
            .rows
            .iter()
            .filter(|(id, r)| r.state == State::Pending && !behind_dead(**id, &r.key))
            .map(|(&id, _)| id)
            .collect();
        assert!(stuck.is_empty(), "rows never sent nor dead: {stuck:?}");
    }
}

/// Runs the node's actions until it has none; says whether it would then spin (its next
/// timer already due with nothing to do).
fn run_node(node: &mut Node, table: &Table, now: Instant, blocked: bool, listening: bool) -> bool {
    for round in 0..2 {
        node.core.set_blocked(blocked);
        node.core.set_listening(listening);
        while let Some(action) = node.core.poll_action(now) {
            execute(node, table, action, now);
        }
        match node.core.poll_timeout() {
            Some(at) if at <= now && round == 0 => node.core.handle_timeout(now),
            Some(at) if at <= now => return true,
            _ => return false,
        }
    }
    false
}

/// Starts what the core asks for; a claim reads the table now.
fn execute(node: &mut Node, table: &Table, action: Action, now: Instant) {
    match action {
        Action::Claim {
            limit,
            from,
            skip,
            bytes,
        } => {
            node.claim = Some(table.claim(now, limit, from, &skip, bytes));
        }
        Action::Mark { sent, failed } => node.mark = Some((sent, failed)),
        Action::Connect => node.connecting = true,
        Action::Look => node.look = true,
        Action::Publish { conn, row } => {
            let twice = node
                .conns
                .values()
                .flat_map(|c| &c.unsettled)
                .any(|p| p.alive && p.row.id == row.id);
            assert!(
                !twice,
                "row {} published while its last publish awaits a confirm",
                row.id
            );
            let c = node
                .conns
                .get_mut(&conn)
                .expect("published on a connection");
            if c.open {
                c.unsettled.push_back(Publish { row, alive: true });
            } else {
                let outcome = Outcome {
                    conn,
                    id: row.id,
                    result: Err(PublishError::Connection("closed".into())),
                };
                node.reports.push_back(Report::Outcome(outcome));
            }
        }
        Action::Retire { conn } => {
            if let Some(c) = node.conns.get_mut(&conn) {
                c.retired = true;
                stop_task(c);
            }
        }
    }
}

/// Completes the node's running claim (0), mark (1) or connection attempt (2).
fn complete(
    node: &mut Node,
    table: &mut Table,
    received: &mut Received,
    now: Instant,
    which: u8,
    ok: bool,
) {
    match which {
        0 => {
            if let Some(rows) = node.claim.take() {
                node.core.claimed(now, if ok { Ok(rows) } else { Err(()) });
            }
        }
        1 => {
            if let Some((sent, failed)) = node.mark.take() {
                if ok && node.term == table.term {
                    check_mark(table, received, &sent, &failed);
                    table.mark(now, &sent, &failed);
                }
                node.core.marked(now, ok);
            }
        }
        3 => {
            if std::mem::take(&mut node.look) {
                let lookout = table.lookout(now);
                node.core
                    .looked(now, if ok { Ok(lookout) } else { Err(()) });
            }
        }
        _ => {
            if std::mem::take(&mut node.connecting) {
                if ok {
                    let conn = node.core.connected();
                    node.conns.insert(
                        conn,
                        Connection {
                            open: true,
                            task: true,
                            ..Default::default()
                        },
                    );
                    node.current = Some(conn);
                } else {
                    node.core.connect_failed(now);
                }
            }
        }
    }
}

/// A mark must record only what the broker said: sent rows were acked as routed, and no
/// row is charged more attempts than the failures that were its own doing.
fn check_mark(table: &Table, received: &Received, sent: &[i64], failed: &[Failure]) {
    for id in sent {
        assert!(
            received.routed.contains(id),
            "row {id} marked sent without a routed ack"
        );
    }
    for f in failed {
        let charged = table.rows[&f.id].attempts + 1;
        let own = received.own_faults.get(&f.id).copied().unwrap_or(0);
        assert!(
            charged <= own || table.rows[&f.id].state != State::Pending,
            "row {} charged attempt {charged} with {own} failures of its own",
            f.id
        );
    }
}

/// The broker settles the next `n` publishes of a connection: the unroutable ones are
/// returned, then one multiple ack covers them all. lapin hands each waiting return to the
/// next ack it processes, whether or not that confirm is still awaited.
fn process(node: &mut Node, received: &mut Received, conn: u64, n: u8) {
    let c = node.conns.get_mut(&conn).expect("picked");
    let taken: Vec<Publish> = (0..n).map_while(|_| c.unsettled.pop_front()).collect();
    for p in &taken {
        if p.row.routing_key != "routed" {
            c.waiting_returns
                .push_back((p.row.message_id.clone(), "NO_ROUTE".into()));
        } else if received.routed.insert(p.row.id)
            && let Some(key) = &p.row.ordering_key
        {
            let first = received.first.entry(key.clone()).or_default();
            assert!(
                first.last().is_none_or(|&last| last < p.row.id),
                "key {key}: row {} first arrived after row {:?}",
                p.row.id,
                first.last()
            );
            first.push(p.row.id);
        }
    }
    let mut ready = Vec::new();
    for p in taken {
        let carried = c.waiting_returns.pop_front();
        if p.alive {
            ready.push((p.row, Confirm::Ack(carried)));
        }
    }
    report(node, conn, ready);
}

/// The publish task stops: every confirm it awaited is dropped.
fn stop_task(c: &mut Connection) {
    c.task = false;
    for p in &mut c.unsettled {
        p.alive = false;
    }
}

/// A confirm is late: the publish task gives the connection up.
fn timeout(node: &mut Node, conn: u64) {
    let c = node.conns.get_mut(&conn).expect("picked");
    if c.task && c.unsettled.iter().any(|p| p.alive) {
        stop_task(c);
        let reason = PublishError::Timeout;
        node.reports.push_back(Report::Lost { conn, reason });
    }
}

/// A connection dies: its publish task gives it up.
fn kill(node: &mut Node, conn: u64) {
    let c = node.conns.get_mut(&conn).expect("picked");
    if !c.open {
        return;
    }
    c.open = false;
    c.unsettled.clear();
    if c.task {
        stop_task(c);
        let reason = PublishError::Connection("killed".into());
        node.reports.push_back(Report::Lost { conn, reason });
    }
}

/// The publish task settles what is ready, as the real one does.
fn report(node: &mut Node, conn: u64, ready: Vec<(Arc<OutboxRow>, Confirm)>) {
    let c = node.conns.get_mut(&conn).expect("reporting connection");
    for outcome in settle(conn, ready, &mut c.returned) {
        node.reports.push_back(Report::Outcome(outcome));
    }
}

/// Up to `n` reports reach the core.
fn receive(node: &mut Node, received: &mut Received, now: Instant, n: u8) {
    for _ in 0..n {
        let Some(report) = node.reports.pop_front() else {
            return;
        };
        match report {
            Report::Outcome(outcome) => {
                let own = match &outcome.result {
                    Err(
                        PublishError::Unroutable(_)
                        | PublishError::Rejected(_)
                        | PublishError::BadRow(_),
                    ) => true,
                    Err(PublishError::Nack) => node.current == Some(outcome.conn),
                    _ => false,
                };
                if own {
                    *received.own_faults.entry(outcome.id).or_default() += 1;
                }
                node.core.outcome(now, outcome);
            }
            Report::Lost { conn, reason } => node.core.connection_lost(now, conn, reason),
        }
    }
}

/// The core's own bookkeeping is consistent and within its bounds.
fn check(node: &Node) {
    assert!(
        node.core.outstanding() <= config().max_in_flight,
        "{} unconfirmed publishes, window {}",
        node.core.outstanding(),
        config().max_in_flight
    );
    assert!(
        node.core.held_bytes() <= MAX_BYTES + LARGEST_ROW,
        "{} bytes held, bound {MAX_BYTES}",
        node.core.held_bytes()
    );
    node.core.check_consistency();
}

/// Runs `steps` in a world whose store has notifications or not, then lets it heal.
fn run(notifications: bool, steps: &[Step]) {
    let mut world = World::new(notifications);
    world.run_actions();
    for step in steps {
        world.apply(step);
    }
    world.heal();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, max_shrink_iters: 20000, ..ProptestConfig::default() })]

    #[test]
    fn the_leader_keeps_its_promises(steps in proptest::collection::vec(step(), 1..120)) {
        run(true, &steps);
    }

    #[test]
    fn the_leader_keeps_its_promises_without_notifications(steps in proptest::collection::vec(step(), 1..120)) {
        run(false, &steps);
    }
}
