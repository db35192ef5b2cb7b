//! Secrets and the HTTP side: URLs and the admin token read from mounted files, no secret in
//! any output of a run that fails in several ways, and an HTTP server that a slow, greedy or
//! non-reading client cannot hold.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A file of the test's own holding `text` and a trailing newline, as a mounted secret has.
fn secret_file(text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(unique("secret"));
    std::fs::write(&path, format!("{text}\n")).unwrap();
    path
}

/// A RabbitMQ user with a password, deleted when dropped.
struct BrokerUser {
    name: String,
}

impl BrokerUser {
    fn new(password: &str) -> Self {
        let name = unique("user");
        rabbitmqctl(&["add_user", &name, password]);
        rabbitmqctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]);
        BrokerUser { name }
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        rabbitmqctl(&["delete_user", &self.name]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_and_the_admin_token_are_read_from_files_and_both_forms_are_refused() {
    let db = Db::new(Backend::Postgres).await;
    let queue = TestQueue::new().await;
    let db_file = secret_file(&db.url);
    let amqp_file = secret_file(&amqp_url());
    let token_file = secret_file("file-token");

    let status = outbox_bin()
        .args(["status", "--json"])
        .env("DATABASE_URL_FILE", &db_file)
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");

    let relay = Relay::start(
        "",
        &db.table,
        &[
            ("DATABASE_URL", ""),
            ("AMQP_URL", ""),
            ("DATABASE_URL_FILE", db_file.to_str().unwrap()),
            ("AMQP_URL_FILE", amqp_file.to_str().unwrap()),
            ("OUTBOX_ADMIN_TOKEN_FILE", token_file.to_str().unwrap()),
        ],
    );
    let id = db.insert(&queue.name, None, json!({"from": "files"})).await;
    let got = queue.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got[0].message_id, id);
    let (code, _) = http_post_json(relay.http, "/api/dead/retry", "file-token", "{}").await;
    assert_ne!(code, 401, "the token from the file is accepted");

    for (name, value, file) in [
        ("DATABASE_URL", db.url.clone(), &db_file),
        ("AMQP_URL", amqp_url(), &amqp_file),
        ("OUTBOX_ADMIN_TOKEN", "t".into(), &token_file),
    ] {
        let both = outbox_bin()
            .arg("relay")
            .env("DATABASE_URL_FILE", &db_file)
            .env("AMQP_URL_FILE", &amqp_file)
            .env(name, &value)
            .env(format!("{name}_FILE"), file)
            .output()
            .unwrap();
        assert_eq!(both.status.code(), Some(2), "{name}: {both:?}");
        let stderr = String::from_utf8_lossy(&both.stderr);
        assert!(
            stderr.contains(&format!("{name}: set it or {name}_FILE, not both")),
            "{stderr}"
        );
    }
}

/// A relay whose first broker node refuses its password, whose database URL carries its
/// password in the user info, percent-encoded and as `?password=`, with an admin token and
/// a row that cannot be routed: nothing it prints or serves holds a secret or the payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_payload_appears_in_any_output() {
    let db = Db::new(Backend::Mysql).await;
    let db_password = format!("db@pw/{}", unique("s"));
    let mq_password = unique("mqpw");
    let token = unique("token");
    let marker = unique("payload");
    let user = BrokerUser::new(&mq_password);
    let mut db_url = url::Url::parse(&db.url_with_password(&db_password).await).unwrap();
    db_url
        .query_pairs_mut()
        .append_pair("password", &db_password);
    let good = format!("amqp://{}:{mq_password}@127.0.0.1:5672/%2f", user.name);
    let refused = format!(
        "amqp://{}:wrong-{mq_password}@127.0.0.1:5672/%2f",
        user.name
    );
    let mut relay = Relay::start(
        db_url.as_str(),
        &db.table,
        &[
            ("AMQP_URL", &format!("{refused},{good}")),
            ("OUTBOX_ADMIN_TOKEN", &token),
            ("OUTBOX_MAX_ATTEMPTS", "1"),
            ("RUST_LOG", "debug,lapin=info,sqlx=info"),
        ],
    );
    let nowhere = unique("nowhere");
    let id = db.insert(&nowhere, None, json!({"secret": marker})).await;
    eventually(
        "the unroutable row dead",
        Duration::from_secs(30),
        || async {
            db.count(&format!("message_id = '{id}' AND state = 'dead'"))
                .await
                == 1
        },
    )
    .await;

    let mut outputs = Vec::new();
    for path in [
        "/",
        "/readyz",
        "/healthz",
        "/metrics",
        "/api/status",
        "/api/dead",
    ] {
        outputs.push((path.to_owned(), relay.get(path).await.1));
    }
    for args in [
        &["status", "--json"][..],
        &["dead", "list", "--json"],
        &["dead", "list"],
    ] {
        let out = outbox_bin()
            .args(args)
            .env("DATABASE_URL", db_url.as_str())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        outputs.push((format!("{args:?}"), format!("{out:?}")));
    }
    let bad = outbox_bin()
        .arg("relay")
        .env("DATABASE_URL", db_url.as_str())
        .env("AMQP_URL", format!("{good},not a url"))
        .env("OUTBOX_TABLE", "bad table")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    outputs.push(("bad configuration".into(), format!("{bad:?}")));
    relay.terminate();
    outputs.push(("relay log".into(), relay.log_text()));
    assert!(
        outputs[outputs.len() - 1]
            .1
            .contains("broker node unavailable"),
        "the refused node was tried: {}",
        outputs[outputs.len() - 1].1
    );

    let encoded: String = url::form_urlencoded::byte_serialize(db_password.as_bytes()).collect();
    for secret in [&db_password, &encoded, &mq_password, &token, &marker] {
        for (what, text) in &outputs {
            assert!(
                !text.contains(secret.as_str()),
                "{what} shows {secret:?}:\n{text}"
            );
        }
    }
}

/// A client that sends its headers slowly is cut off; a body past 64 KiB is refused on
/// every endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_greedy_client_cannot_hold_the_http_side() {
    let db = Db::new(Backend::Postgres).await;
    let relay = Relay::start(&db.url, &db.table, &[("OUTBOX_ADMIN_TOKEN", "t")]);
    eventually("the HTTP side", Duration::from_secs(20), || async {
        relay.get("/healthz").await.0 == 200
    })
    .await;

    let mut slow = tokio::net::TcpStream::connect(relay.http).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), slow.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "a client that never ends its headers is still connected after 15 s"
    );
    println!(
        "unfinished headers: connection closed after {:?}",
        started.elapsed()
    );

    let body = "x".repeat(100 * 1024);
    for path in ["/wake", "/api/dead/retry"] {
        let (code, _) = http_post_json(relay.http, path, "t", &body).await;
        assert_eq!(code, 413, "{path}");
    }
}

/// A client that asks for many responses and reads none is cut off once a write has waited
/// 10 s, rather than holding its connection and the responses forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off() {
    let db = Db::new(Backend::Postgres).await;
    let relay = Relay::start(&db.url, &db.table, &[]);
    eventually("the HTTP side", Duration::from_secs(20), || async {
        relay.get("/healthz").await.0 == 200
    })
    .await;
    let guide = relay.get("/docs/operations.md").await.1.len();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut client = socket.connect(relay.http).await.unwrap();
    let port = client.local_addr().unwrap().port();
    // 500 pipelined requests for the operations guide: far more than the socket buffers
    // hold, so the server's writes stall.
    let requests = "GET /docs/operations.md HTTP/1.1\r\nHost: x\r\n\r\n".repeat(500);
    client.write_all(requests.as_bytes()).await.unwrap();
    let started = Instant::now();
    eventually(
        "the server to close a connection whose client reads nothing",
        Duration::from_secs(30),
        || async { !established(port) },
    )
    .await;
    println!(
        "a client reading nothing: cut off after {:?}",
        started.elapsed()
    );
    let mut read = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut read)).await;
    assert!(
        read.len() < 500 * guide,
        "the whole answer arrived ({} bytes)",
        read.len()
    );
}

/// Whether this machine has an established TCP connection from local port `port`.
fn established(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let local_port = fields[1].rsplit(':').next().unwrap();
        u16::from_str_radix(local_port, 16) == Ok(port) && fields[3] == "01"
    })
}

/// A POST with a JSON body and a bearer token; (status, body).
async fn http_post_json(
    addr: std::net::SocketAddr,
    path: &str,
    token: &str,
    body: &str,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(request.as_bytes()).await;
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer).await;
    let code = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, answer)
}
