//! A TCP proxy in front of one service, for faults: `sever` cuts every open flow at once,
//! `delay` slows every chunk down, and the
//! freezes emulate a NAT that forgot a flow or a host that vanished: `freeze_idle` freezes
//! flows once they go quiet, `freeze_all` freezes every flow, `freeze_open` the flows open
//! now, `freeze_new` the flows opened from then on, and `thaw` lets through what they held. `refuse` plays a service that is
//! down.
//!
//! A frozen flow passes nothing in either direction, not even a close, and closes nothing:
//! both peers see silence, as behind a NAT that drops their packets. It holds by no longer
//! reading: at most one chunk waits in the proxy, the rest in the kernel's buffers, so a peer
//! that keeps writing ends up blocked, as on a dead path. Unlike a dead path, the proxy's
//! kernel still acknowledges what the peers send, so TCP keepalives and `TCP_USER_TIMEOUT`
//! never fire: only the peers' own heartbeats and timeouts notice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// A fault proxy listening on `addr` and forwarding every connection (a flow) to one target.
pub struct Proxy {
    /// Where clients connect instead of the target.
    pub addr: SocketAddr,
    /// The faults in force and the open flows, shared with the flows' tasks.
    shared: Arc<Shared>,
}

/// What the proxy and its flows share.
struct Shared {
    /// The faults and the flows under one lock, so every decision sees one consistent picture.
    state: Mutex<State>,
    /// Signalled on every change of the faults, so held flows look again instead of polling.
    changed: watch::Sender<()>,
}

/// The faults in force and the open flows.
#[derive(Default)]
struct State {
    /// How long each data chunk waits before it passes (`delay`).
    delay: Duration,
    /// Which flows freeze (`freeze_idle`, `freeze_all`, `thaw`).
    freeze: Freeze,
    /// Flows accepted from now on start frozen (`freeze_new`).
    freeze_new: bool,
    /// Connections are closed as soon as they are accepted (`refuse`): a service that is down.
    refuse: bool,
    /// The open flows, by id.
    flows: HashMap<u64, Flow>,
    /// The id the next accepted flow gets.
    next_id: u64,
}

/// Which flows freeze.
#[derive(Clone, Copy, Default)]
enum Freeze {
    /// None.
    #[default]
    Off,
    /// Those quiet for a while.
    Idle {
        /// How long a flow may stay quiet.
        limit: Duration,
        /// When this started: quiet time counts from here or the flow's last byte, the later.
        since: Instant,
    },
    /// All of them, open and new.
    All,
}

/// One flow: a client connection and, once it may connect, its connection to the target.
struct Flow {
    /// When a byte last passed in either direction, or when the flow was accepted.
    last: Instant,
    /// Frozen until `thaw`. Set lazily, whenever the flow or `frozen_flows` looks.
    frozen: bool,
    /// Ends the flow's task, closing both its sockets (`sever`).
    task: Option<AbortHandle>,
}

impl Flow {
    /// Whether the flow is frozen under `freeze` at `now`; once frozen it stays so until thawed.
    fn frozen(&mut self, freeze: Freeze, now: Instant) -> bool {
        match freeze {
            Freeze::Off => {}
            Freeze::Idle { limit, since } => {
                self.frozen |= now.duration_since(self.last.max(since)) >= limit
            }
            Freeze::All => self.frozen = true,
        }
        self.frozen
    }
}

impl State {
    /// Whether flow `id` must hold what it has (data, its end, or its connection to the
    /// target).
    fn holds(&mut self, id: u64) -> bool {
        let freeze = self.freeze;
        self.flows
            .get_mut(&id)
            .is_some_and(|f| f.frozen(freeze, Instant::now()))
    }

    /// Switches to `freeze`, keeping frozen the flows the previous rule had frozen.
    fn refreeze(&mut self, freeze: Freeze) {
        let now = Instant::now();
        for flow in self.flows.values_mut() {
            flow.frozen(self.freeze, now);
        }
        self.freeze = freeze;
    }

    /// Stops freezing and unfreezes every flow.
    fn thaw(&mut self) {
        self.freeze = Freeze::Off;
        self.freeze_new = false;
        for flow in self.flows.values_mut() {
            flow.frozen = false;
        }
    }
}

impl Shared {
    /// Changes the faults and wakes the held flows to look again.
    fn update(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.state.lock().unwrap());
        self.changed.send_replace(());
    }

    /// Waits until flow `id` may pass what it has.
    async fn wait(&self, id: u64) {
        let mut changed = self.changed.subscribe();
        while self.state.lock().unwrap().holds(id) {
            let _ = changed.changed().await;
        }
    }

    /// The delay each data chunk waits now.
    fn delay(&self) -> Duration {
        self.state.lock().unwrap().delay
    }

    /// Records that bytes just passed on flow `id`.
    fn touch(&self, id: u64) {
        if let Some(flow) = self.state.lock().unwrap().flows.get_mut(&id) {
            flow.last = Instant::now();
        }
    }
}

/// A flow's entry in the shared state, removed when the flow's task ends or is aborted.
struct Registration {
    /// The state holding the entry.
    shared: Arc<Shared>,
    /// The flow's id.
    id: u64,
}

impl Registration {
    fn new(shared: &Arc<Shared>) -> Self {
        let mut state = shared.state.lock().unwrap();
        let id = state.next_id;
        state.next_id += 1;
        let flow = Flow {
            last: Instant::now(),
            frozen: state.freeze_new,
            task: None,
        };
        state.flows.insert(id, flow);
        Registration {
            shared: shared.clone(),
            id,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().flows.remove(&self.id);
    }
}

impl Proxy {
    /// Starts a proxy to `target` on a free local port.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            changed: watch::Sender::new(()),
        });
        tokio::spawn(accept(listener, target, shared.clone()));
        Proxy { addr, shared }
    }

    /// Closes every flow open through the proxy; new ones are still accepted.
    pub fn sever(&self) {
        let tasks: Vec<AbortHandle> = (self.shared.state.lock().unwrap().flows.values_mut())
            .filter_map(|flow| flow.task.take())
            .collect();
        for task in tasks {
            task.abort();
        }
    }

    /// Delays every data chunk by `d` (zero: pass freely again).
    pub fn delay(&self, d: Duration) {
        self.shared.update(|s| s.delay = d);
    }

    /// From now on, freezes every flow, open or new, once no byte passed on it for `limit`
    /// (quiet time before this call does not count).
    pub fn freeze_idle(&self, limit: Duration) {
        let since = Instant::now();
        self.shared
            .update(|s| s.refreeze(Freeze::Idle { limit, since }));
    }

    /// Freezes every flow, open and new; new ones are accepted but not connected to the target.
    pub fn freeze_all(&self) {
        self.shared.update(|s| s.refreeze(Freeze::All));
    }

    /// Freezes every flow open now; new ones pass.
    pub fn freeze_open(&self) {
        self.shared.update(|s| {
            for flow in s.flows.values_mut() {
                flow.frozen = true;
            }
        });
    }

    /// Freezes every flow accepted from now on; open ones are left alone.
    pub fn freeze_new(&self) {
        self.shared.update(|s| s.freeze_new = true);
    }

    /// A service that is down (`true`): every open flow is cut and new connections are
    /// closed as soon as they are accepted; `false` accepts them again.
    pub fn refuse(&self, refuse: bool) {
        self.shared.update(|s| s.refuse = refuse);
        if refuse {
            self.sever();
        }
    }

    /// Stops freezing: frozen flows pass what they held and carry on.
    pub fn thaw(&self) {
        self.shared.update(State::thaw);
    }

    /// How many open flows are frozen now.
    pub fn frozen_flows(&self) -> usize {
        let mut state = self.shared.state.lock().unwrap();
        let (freeze, now) = (state.freeze, Instant::now());
        let flows = state.flows.values_mut();
        flows
            .map(|flow| flow.frozen(freeze, now))
            .filter(|&f| f)
            .count()
    }

    /// How many flows are open through the proxy.
    pub fn open_flows(&self) -> usize {
        self.shared.state.lock().unwrap().flows.len()
    }
}

/// Accepts clients, each into a flow of its own.
async fn accept(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    while let Ok((client, _)) = listener.accept().await {
        if shared.state.lock().unwrap().refuse {
            continue;
        }
        let registration = Registration::new(&shared);
        let id = registration.id;
        let task = tokio::spawn(flow(client, target, registration)).abort_handle();
        if let Some(flow) = shared.state.lock().unwrap().flows.get_mut(&id) {
            flow.task = Some(task);
        }
    }
}

/// Connects to the target (once not frozen) and pumps both ways until either side ends.
async fn flow(client: TcpStream, target: SocketAddr, me: Registration) {
    let (shared, id) = (&*me.shared, me.id);
    shared.wait(id).await;
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        _ = pump(client_read, server_write, shared, id) => {}
        _ = pump(server_read, client_write, shared, id) => {}
    }
}

/// Passes what `from` reads to `to`, chunk by chunk, each once the faults allow; returns at
/// the end of the stream or on an error.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, shared: &Shared, id: u64) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await.unwrap_or(0);
        let delay = shared.delay();
        if n > 0 && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        shared.wait(id).await;
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        shared.touch(id);
    }
}
