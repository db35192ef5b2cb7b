//! Helpers shared by the integration tests: a database per test (on either backend, see
//! `db.rs`; an inbox consumer on it, `inbox.rs`), an exchange and queue per test, the real
//! `outbox` binary as a child process, and deadline-based waits.
#![allow(dead_code)]

pub mod broker_alarm;
pub mod browser;
pub mod db;
pub mod inbox;
pub mod mapping;
pub mod otlp;
pub mod proxy;
pub mod workload;

#[allow(unused_imports)] // not every test file uses each of them
pub use crate::{for_store, on_both_backends};
#[allow(unused_imports)]
pub use broker_alarm::{BrokerSettings, rabbitmqctl};
#[allow(unused_imports)]
pub use browser::Browser;
#[allow(unused_imports)]
pub use db::{Backend, Db, DbHandle, Pool, Row, ServiceTx, TestStore};
#[allow(unused_imports)]
pub use inbox::{Arg, HandlerTx};
#[allow(unused_imports)]
pub use proxy::Proxy;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use outbox::TableName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The server the test databases are created on (`OUTBOX_TEST_PG`).
pub fn pg_server() -> String {
    std::env::var("OUTBOX_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// The broker the tests use (`OUTBOX_TEST_AMQP`).
pub fn amqp_url() -> String {
    std::env::var("OUTBOX_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

const START_HINT: &str =
    "start the services with `scripts/services.sh` (it installs them if missing)";

/// A unique name for this test's database, exchange and queue.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// Waits until `check` holds, polling every 50 ms; panics naming `what` at the deadline.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A received message.
#[derive(Debug, Clone)]
pub struct Received {
    pub message_id: String,
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: serde_json::Value,
}

/// A queue of its own, consumed into memory. Queues expire 10 minutes after the test.
pub struct TestQueue {
    pub name: String,
    pub channel: lapin::Channel,
    pub received: Arc<Mutex<Vec<Received>>>,
    _conn: Connection,
}

impl TestQueue {
    /// A durable queue bound to nothing yet; messages on the default exchange with routing key
    /// = `name` reach it. `bind(exchange, key)` adds routes.
    pub async fn new() -> Self {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "RabbitMQ is not reachable at {} ({e}): {START_HINT}",
                    amqp_url()
                )
            });
        let channel = conn.create_channel().await.unwrap();
        let name = unique("q");
        let mut args = FieldTable::default();
        args.insert("x-expires".into(), AMQPValue::LongInt(600_000));
        channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let mut consumer = channel
            .basic_consume(
                name.as_str().into(),
                "test".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let sink = received.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                sink.lock().unwrap().push(Received {
                    message_id: d
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                    routing_key: d.routing_key.to_string(),
                    body: serde_json::from_slice(&d.data).unwrap_or(serde_json::Value::Null),
                    properties: d.properties,
                });
            }
        });
        TestQueue {
            name,
            channel,
            received,
            _conn: conn,
        }
    }

    /// A direct exchange of its own (auto-deleted with its last binding).
    pub async fn exchange(&self) -> String {
        self.exchange_of(ExchangeKind::Direct).await
    }

    /// An exchange of `kind` of its own (auto-deleted with its last binding).
    pub async fn exchange_of(&self, kind: ExchangeKind) -> String {
        let name = unique("x");
        self.channel
            .exchange_declare(
                name.as_str().into(),
                kind,
                ExchangeDeclareOptions {
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        name
    }

    pub async fn bind(&self, exchange: &str, key: &str) {
        self.channel
            .queue_bind(
                self.name.as_str().into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Waits until `n` distinct message ids have arrived (duplicates do not count).
    pub async fn wait_for_distinct(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let distinct = || {
            self.received()
                .iter()
                .map(|m| m.message_id.clone())
                .collect::<std::collections::HashSet<_>>()
                .len()
        };
        eventually(
            &format!("{n} distinct messages on {}", self.name),
            timeout,
            || async { distinct() >= n },
        )
        .await;
        self.received()
    }

    /// Waits until `n` messages have arrived.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        eventually(
            &format!("{n} messages on {}", self.name),
            timeout,
            || async { self.count() >= n },
        )
        .await;
        self.received()
    }
}

/// Whether the queue `name` exists (a passive declare, on a channel of its own).
pub async fn queue_exists(name: &str) -> bool {
    let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await else {
        return false;
    };
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let exists = match conn.create_channel().await {
        Ok(ch) => ch
            .queue_declare(name.into(), passive, FieldTable::default())
            .await
            .is_ok(),
        Err(_) => false,
    };
    let _ = conn.close(0, "done".into()).await;
    exists
}

/// Runs `scripts/<script> teardown` when dropped, even when the test fails, unless the
/// variable `keep` is set (to look at what the script started).
pub struct Teardown {
    pub script: &'static str,
    pub keep: &'static str,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if std::env::var_os(self.keep).is_none() {
            script(self.script, &["teardown"]);
        }
    }
}

/// Runs `scripts/<name>` with `args` (they need bash and root); its output, trimmed.
/// Panics with the script's output when it fails.
pub fn script(name: &str, args: &[&str]) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name);
    let out = Command::new(&path).args(args).output().unwrap_or_else(|e| {
        panic!(
            "{} could not run ({e}): it needs bash, as root",
            path.display()
        )
    });
    assert!(
        out.status.success(),
        "{name} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The demo binary that `cargo test` builds beside the tests.
pub fn demo_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join("order_payment");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test` (it builds the examples)",
        bin.display()
    );
    bin
}

/// The `outbox` binary.
pub fn outbox_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_outbox"))
}

/// A free local port (bound once and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A MariaDB server of the test's own (`scripts/mariadb-node.sh`): a one-node Galera cluster
/// or one that requires TLS; stopped and its data deleted when dropped.
pub struct MariadbNode {
    dir: String,
    /// Its SQL port on 127.0.0.1.
    pub port: u16,
}

impl MariadbNode {
    /// A one-node Galera cluster.
    pub fn galera() -> Self {
        Self::start("galera", &free_port().to_string())
    }

    /// A server that requires TLS, with `certs`' server certificate (`scripts/test-certs.sh`).
    pub fn tls(certs: &std::path::Path) -> Self {
        Self::start("tls", certs.to_str().unwrap())
    }

    fn start(kind: &str, arg: &str) -> Self {
        let dir = std::env::temp_dir()
            .join(unique("mariadb"))
            .display()
            .to_string();
        let port = free_port();
        let node = MariadbNode { dir, port };
        script(
            "mariadb-node.sh",
            &["start", &node.dir, &port.to_string(), kind, arg],
        );
        node
    }
}

impl Drop for MariadbNode {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/mariadb-node.sh");
        let _ = Command::new(script).args(["stop", &self.dir]).status();
    }
}

/// An `outbox relay` child process with its own HTTP port; killed when dropped.
pub struct Relay {
    pub child: Child,
    pub http: SocketAddr,
    pub log: PathBuf,
}

impl Relay {
    /// Starts a relay on `database_url`, with fast test timings unless `env` overrides them
    /// (an empty value unsets the variable).
    pub fn start(database_url: &str, table: &TableName, env: &[(&str, &str)]) -> Self {
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = std::env::temp_dir().join(format!("{}.log", unique("relay")));
        let mut cmd = outbox_bin();
        cmd.arg("relay")
            .env("DATABASE_URL", database_url)
            .env("AMQP_URL", amqp_url())
            .env("OUTBOX_TABLE", table.as_str())
            .env("OUTBOX_HTTP_ADDR", http.to_string())
            .env("OUTBOX_LEADER_CHECK", "200ms")
            .env("OUTBOX_POLL_INTERVAL", "200ms")
            .env("RUST_LOG", "info,sqlx=warn,lapin::returned_messages=error")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            match v.is_empty() {
                true => cmd.env_remove(k),
                false => cmd.env(k, v),
            };
        }
        Relay {
            child: cmd.spawn().unwrap(),
            http,
            log,
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path).await
    }

    /// The value of an unlabelled metric, if present.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await;
        body.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    }

    pub async fn is_leader(&self) -> bool {
        self.metric("outbox_leader").await == Some(1.0)
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        self.child.wait().unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A minimal HTTP GET; (0, "") when nothing answers.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, &[], "").await
}

/// A minimal HTTP POST without a body; (0, "") when nothing answers.
pub async fn http_post(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "POST", path, &[], "").await
}

/// A minimal HTTP/1.1 request with `headers` and `body`, on a connection of its own;
/// (0, "") when nothing answers. The body is read by its `Content-Length` (chromedriver
/// keeps connections open), else to the end.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    if s.write_all(request.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    read_response(&mut s).await.unwrap_or_default()
}

/// The status and body of one HTTP response.
async fn read_response(s: &mut tokio::net::TcpStream) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0; 8192];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = s.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok())?;
    let length = head.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    while length.is_none_or(|len| buf.len() < head_end + len) {
        match s.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    Some((code, String::from_utf8_lossy(&buf[head_end..]).into_owned()))
}
