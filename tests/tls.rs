//! TLS, with a CA made at test time (`scripts/test-certs.sh`): a RabbitMQ node with a TLS
//! listener (`scripts/rabbitmq-tls.sh`) and PostgreSQL serving the CA's certificate
//! ([`PgTls`]). With the right CA the relay publishes over `amqps://` (logging in with its
//! client certificate: EXTERNAL) from PostgreSQL over `verify-full`, and an inbox consumer
//! reads over `amqps://`; with the wrong CA (even when the broker's CA is among the system's
//! roots: `OUTBOX_AMQP_CA_FILE` replaces them) or a host name the certificate does not name,
//! nothing connects and the log says why. MySQL: a MariaDB of the test's own requiring TLS
//! (`scripts/mariadb-node.sh`) is reached over `ssl-mode=VERIFY_IDENTITY` by the CLI, the
//! library and the relay, never with the wrong CA; `ssl-mode=VERIFY_CA` against a server
//! without TLS fails rather than falling back to plain text.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use outbox::broker::AmqpTls;
use outbox::inbox::{ConsumerConfig, Handler, HandlerError, Incoming, QueueType, consume};
use serde_json::json;
use sqlx::{Connection as _, PgConnection, Postgres};
use tokio_util::sync::CancellationToken;

/// The TLS node's AMQPS port; its plain one (for setting up) is 5690.
const AMQPS: u16 = 5691;

fn tls_node(args: &[&str]) -> String {
    script("rabbitmq-tls.sh", args)
}

/// Runs SQL statements one by one with `psql` as the server's superuser.
fn psql(statements: &[&str]) {
    let mut cmd = Command::new("psql");
    cmd.arg(format!("{}/postgres", pg_server()))
        .args(["-v", "ON_ERROR_STOP=1", "-q"]);
    for sql in statements {
        cmd.args(["-c", sql]);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("psql could not run ({e}): install postgresql-client"));
    assert!(
        out.status.success(),
        "psql {statements:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of a setting, as a new session sees it.
fn psql_show(setting: &str) -> String {
    let out = Command::new("psql")
        .arg(format!("{}/postgres", pg_server()))
        .args(["-Atc", &format!("SHOW {setting}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// PostgreSQL serving the test CA's server certificate (`ALTER SYSTEM`, reload); put back
/// when dropped, even when the test fails. Plain connections go on working meanwhile.
struct PgTls {
    /// A copy of the certificate and key that the postgres user can read.
    dir: PathBuf,
}

impl PgTls {
    fn switch(certs: &Path) -> Self {
        let dir = PathBuf::from("/var/lib/postgresql").join(unique("outbox_tls"));
        std::fs::create_dir_all(&dir).unwrap();
        let (uid, gid) = postgres_ids();
        for file in ["server.pem", "server.key", "."] {
            let to = dir.join(file);
            if file != "." {
                std::fs::copy(certs.join(file), &to).unwrap();
            }
            std::os::unix::fs::chown(&to, Some(uid), Some(gid)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        let key = std::fs::Permissions::from_mode(0o600);
        std::fs::set_permissions(dir.join("server.key"), key).unwrap();
        let guard = PgTls { dir };
        psql(&[
            &format!(
                "ALTER SYSTEM SET ssl_cert_file = '{}/server.pem'",
                guard.dir.display()
            ),
            &format!(
                "ALTER SYSTEM SET ssl_key_file = '{}/server.key'",
                guard.dir.display()
            ),
            "ALTER SYSTEM SET ssl = on",
            "SELECT pg_reload_conf()",
        ]);
        // The reload is asynchronous: a new session sees the new file once it took effect.
        let cert = format!("{}/server.pem", guard.dir.display());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while psql_show("ssl_cert_file") != cert {
            assert!(
                std::time::Instant::now() < deadline,
                "PostgreSQL did not reload"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        guard
    }
}

impl Drop for PgTls {
    fn drop(&mut self) {
        psql(&[
            "ALTER SYSTEM RESET ssl_cert_file",
            "ALTER SYSTEM RESET ssl_key_file",
            "ALTER SYSTEM RESET ssl",
            "SELECT pg_reload_conf()",
        ]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The postgres user's uid and gid.
fn postgres_ids() -> (u32, u32) {
    let id = |flag| {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    (id("-u"), id("-g"))
}

/// `db`'s URL verifying the server's certificate and host name against `ca`.
fn verify_full(db: &Db, ca: &Path) -> String {
    format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        db.url,
        ca.display()
    )
}

/// A channel on the TLS node's plain listener, for setting up.
async fn plain_channel() -> (Connection, lapin::Channel) {
    let url = "amqp://guest:guest@127.0.0.1:5690/%2f";
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    (conn, channel)
}

/// Whether the queue `name` exists on the TLS node.
async fn queue_on_tls_node(name: &str) -> bool {
    let (conn, channel) = plain_channel().await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = channel.queue_declare(name.into(), passive, FieldTable::default());
    let exists = declared.await.is_ok();
    let _ = conn.close(200, "done".into()).await;
    exists
}

/// An exchange of its own on the TLS node.
async fn exchange_on_tls_node() -> String {
    let (conn, channel) = plain_channel().await;
    let name = unique("x");
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
    name
}

/// Records the message ids it is given.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<HashSet<String>>>);

impl Handler<serde_json::Value, Postgres> for Seen {
    async fn handle(
        &self,
        _tx: &mut PgConnection,
        message: &Incoming<serde_json::Value>,
    ) -> Result<(), HandlerError> {
        self.0.lock().unwrap().insert(message.message_id.clone());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_and_consumer_verify_the_broker_and_postgresql() {
    tls_node(&["start"]);
    // Stops the TLS node and deletes its data.
    let _teardown = Teardown {
        script: "rabbitmq-tls.sh",
        keep: "OUTBOX_KEEP_TLS_NODE",
    };
    let certs = PathBuf::from(tls_node(&["certs"]));
    let _pg = PgTls::switch(&certs);
    delivered_with_the_right_ca(&certs).await;
    refused_with_the_wrong_ca_host_name_or_an_expired_certificate(&certs).await;
}

/// The relay publishes over amqps (EXTERNAL, with its client certificate) from PostgreSQL
/// over verify-full; an inbox consumer reads over amqps with a password.
async fn delivered_with_the_right_ca(certs: &Path) {
    let db = Db::new(Backend::Postgres).await;
    let ca = certs.join("ca.pem");
    let exchange = exchange_on_tls_node().await;
    let mut config = ConsumerConfig::new(
        vec![format!("amqps://guest:guest@localhost:{AMQPS}/%2f")],
        "tls",
        unique("tls_inbox"),
    );
    config.tls = AmqpTls {
        ca: Some(std::fs::read_to_string(&ca).unwrap()),
        client: None,
    };
    config.bindings = vec![(exchange.clone(), "k".into())];
    config.queue_type = QueueType::Classic;
    config.queue_ttl = Some(Duration::from_secs(600));
    let queue = config.queue.clone();
    let seen = Seen::default();
    let stop = CancellationToken::new();
    let pool = db.pg().clone();
    let consumer = tokio::spawn(consume(pool, config, seen.clone(), stop.clone()));
    let database_url = verify_full(&db, &ca);
    for command in ["migrate", "status"] {
        let out = db
            .outbox()
            .env("DATABASE_URL", &database_url)
            .arg(command)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "outbox {command} over verify-full: {out:?}"
        );
    }
    let (cert, key) = (certs.join("client.pem"), certs.join("client.key"));
    let _relay = Relay::start(
        &database_url,
        &db.table,
        &[
            ("AMQP_URL", &format!("amqps://localhost:{AMQPS}/%2f")),
            ("OUTBOX_AMQP_CA_FILE", ca.to_str().unwrap()),
            ("OUTBOX_AMQP_CLIENT_CERT", cert.to_str().unwrap()),
            ("OUTBOX_AMQP_CLIENT_KEY", key.to_str().unwrap()),
        ],
    );
    // The consumer's queue must exist before rows go out (mandatory publishes).
    eventually("the consumer's queue", Duration::from_secs(30), || {
        queue_on_tls_node(&queue)
    })
    .await;
    let mut ids = HashSet::new();
    for n in 0..5 {
        ids.insert(
            db.insert_row(&Row::new("k", json!({"n": n})).exchange(&exchange))
                .await,
        );
    }
    eventually(
        "every row consumed over amqps",
        Duration::from_secs(30),
        || async { *seen.0.lock().unwrap() == ids },
    )
    .await;
    let connections = tls_node(&["ctl", "list_connections", "user", "auth_mechanism"]);
    assert!(
        connections
            .lines()
            .any(|l| l.contains("outbox-relay") && l.contains("EXTERNAL")),
        "the relay did not log in with its certificate: {connections}"
    );
    stop.cancel();
    consumer.await.unwrap();
}

/// `openssl s_server` presenting `expired.pem`; killed when dropped.
struct ExpiredPeer {
    child: std::process::Child,
    port: u16,
}

impl ExpiredPeer {
    fn start(certs: &Path) -> Self {
        let port = free_port();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-accept"])
            .arg(port.to_string())
            .arg("-cert")
            .arg(certs.join("expired.pem"))
            .arg("-key")
            .arg(certs.join("expired.key"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("openssl runs (scripts/services.sh installs it)");
        ExpiredPeer { child, port }
    }
}

impl Drop for ExpiredPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A relay whose CA did not sign the broker's certificate, that reaches the broker by a
/// name its certificate does not hold, or that is shown an expired certificate, never
/// connects, says why and stays not ready; so does a database URL with the wrong CA.
async fn refused_with_the_wrong_ca_host_name_or_an_expired_certificate(certs: &Path) {
    let db = Db::new(Backend::Postgres).await;
    let (ca, wrong) = (certs.join("ca.pem"), certs.join("wrong-ca.pem"));
    db.insert_row(&Row::new("k", json!({"n": 1}))).await;
    // The system's roots: the host's, or what SSL_CERT_FILE and SSL_CERT_DIR name (an empty
    // value unsets a variable). With the broker's CA among them, OUTBOX_AMQP_CA_FILE must
    // still replace them.
    let ca_text = ca.to_str().unwrap();
    let host_roots: &[(&str, &str)] = &[];
    let ca_in_roots: &[(&str, &str)] = &[("SSL_CERT_FILE", ca_text), ("SSL_CERT_DIR", "")];
    // A TLS peer presenting a certificate of the right CA and name that has expired.
    let expired = ExpiredPeer::start(certs);
    let cases = [
        ("localhost", AMQPS, &wrong, host_roots, "unknown CA"),
        ("localhost", AMQPS, &wrong, ca_in_roots, "unknown CA"),
        ("127.0.0.2", AMQPS, &ca, host_roots, "host name mismatch"),
        ("localhost", expired.port, &ca, host_roots, "expired"),
    ];
    for (host, port, ca, roots, reason) in cases {
        let url = format!("amqps://guest:guest@{host}:{port}/%2f");
        let mut env = vec![
            ("AMQP_URL", url.as_str()),
            ("OUTBOX_AMQP_CA_FILE", ca.to_str().unwrap()),
        ];
        env.extend_from_slice(roots);
        let relay = Relay::start(&db.url, &db.table, &env);
        eventually(reason, Duration::from_secs(30), || async {
            relay.log_text().contains(reason)
        })
        .await;
        let (code, body) = relay.get("/readyz").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("broker not connected"), "{body}");
        let log = relay.log_text();
        assert!(!log.contains("connected to the broker"), "{log}");
        assert!(
            log.contains("TLS: the broker's certificate was refused"),
            "{log}"
        );
    }
    assert_eq!(db.count("state = 'pending'").await, 1);
    let status = db
        .outbox()
        .env("DATABASE_URL", verify_full(&db, &wrong))
        .arg("status")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(1), "{stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
}

/// MariaDB requiring TLS with the test CA's certificate (a server of the test's own, as the
/// machine's serves none): over `ssl-mode=VERIFY_IDENTITY` with the right CA, `outbox
/// migrate`, `outbox status`, the library's enqueue and the relay all work and the row is
/// delivered; with the wrong CA nothing connects and the error names the certificate; and a
/// URL that asks to verify a server without TLS (the machine's MariaDB) fails rather than
/// falling back to plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_over_verify_identity_delivers_and_never_falls_back_to_plain_text() {
    let certs = std::env::temp_dir().join(unique("certs"));
    script("test-certs.sh", &[certs.to_str().unwrap()]);
    let node = MariadbNode::tls(&certs);
    let url = |ca: &str, mode: &str| {
        let ca = certs.join(ca);
        format!(
            "mysql://root@localhost:{}/outbox?ssl-mode={mode}&ssl-ca={}",
            node.port,
            ca.display()
        )
    };
    let outbox = |url: &str, args: &[&str]| {
        let out = outbox_bin().args(args).env("DATABASE_URL", url).output();
        let out = out.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stderr)
    };
    let verified = url("ca.pem", "VERIFY_IDENTITY");
    assert_eq!(outbox(&verified, &["migrate"]), (Some(0), String::new()));
    let (code, stderr) = outbox(&verified, &["status"]);
    assert_eq!(code, Some(0), "{stderr}");
    // The server refuses plain text; the wrong CA is refused by the client.
    let plain = format!(
        "mysql://root@127.0.0.1:{}/outbox?ssl-mode=DISABLED",
        node.port
    );
    let (code, stderr) = outbox(&plain, &["status"]);
    assert_eq!(code, Some(1), "plain text was let in: {stderr}");
    let (code, stderr) = outbox(&url("wrong-ca.pem", "VERIFY_IDENTITY"), &["status"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");

    let queue = TestQueue::new().await;
    let message = outbox::Message::new(&queue.name, &json!({"over": "tls"})).unwrap();
    let mut conn = sqlx::MySqlConnection::connect(&verified).await.unwrap();
    outbox::enqueue(&mut conn, &message).await.unwrap();
    let _relay = Relay::start(&verified, &outbox::TableName::default(), &[]);
    let received = queue.wait_for(1, Duration::from_secs(30)).await;
    assert_eq!(received[0].message_id, message.message_id.to_string());

    // The machine's MariaDB serves no TLS: asked to verify it, the binary fails, naming TLS.
    let db = Db::new(Backend::Mysql).await;
    let unverifiable = format!(
        "{}?ssl-mode=VERIFY_CA&ssl-ca={}",
        db.url,
        certs.join("ca.pem").display()
    );
    let (code, stderr) = outbox(&unverifiable, &["status"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.to_lowercase().contains("tls") || stderr.contains("SSL"),
        "{stderr}"
    );
    drop(node);
    let _ = std::fs::remove_dir_all(certs);
}
