//! The chaos suite: while a producer keeps committing rows over many ordering keys, the relay
//! is SIGKILLed, its broker connection is cut and then frozen (nothing closed), the database
//! is slowed down, the broker and the database server (PostgreSQL or MariaDB) are restarted,
//! and the database connections are frozen. After each fault: every committed row
//! delivered and applied; at the end first deliveries in order per key, effects exactly
//! once, and the relay's memory bounded.
//!
//! It restarts the shared broker and database, so it is the only test in this file (cargo
//! runs test files one after another), once per backend, the two taking turns.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::workload::Workload;
use common::*;
use outbox::inbox::QueueType;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} could not run ({e})"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pg_version() -> String {
    let versions = std::fs::read_dir("/etc/postgresql")
        .expect("a Debian PostgreSQL cluster (scripts/services.sh)");
    versions
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .max()
        .unwrap()
}

/// Restarts the database server the test runs on, and waits until it accepts connections.
async fn restart_database(backend: Backend) {
    match backend {
        Backend::Postgres => run(
            "pg_ctlcluster",
            &[
                "--skip-systemctl-redirect",
                &pg_version(),
                "main",
                "restart",
            ],
        ),
        Backend::Mysql => {
            run("mariadb-admin", &["-uroot", "shutdown"]);
            run(
                "start-stop-daemon",
                &[
                    "--start",
                    "--oknodo",
                    "--background",
                    "--exec",
                    "/usr/sbin/mariadbd",
                ],
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(backend.addr())
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the database server did not come back within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Both backends' chaos tests restart shared services: they take turns.
static SERIALLY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn peak_rss_mib(relay: &Relay) -> f64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", relay.child.id())).unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok());
    kb.unwrap_or(0.0) / 1024.0
}

on_both_backends! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn every_fault_is_survived_without_loss_reordering_or_double_effects(backend: Backend) {
        let _turn = SERIALLY.lock().await;
        let w = Workload::start(backend, &[amqp_url()], QueueType::Quorum, true).await;
        let amqp_proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
        let db_proxy = Proxy::start(backend.addr()).await;
        let db_url = w.db.url_at(db_proxy.addr);
        let amqp = format!("amqp://guest:guest@{}/%2f", amqp_proxy.addr);
        let env = [
            ("AMQP_URL", amqp.as_str()),
            ("OUTBOX_CONFIRM_TIMEOUT", "3s"),
            ("OUTBOX_CONNECT_TIMEOUT", "2s"),
            ("OUTBOX_BACKOFF_MIN", "200ms"),
            ("OUTBOX_BACKOFF_MAX", "1s"),
        ];
        let mut relay = Relay::start(&db_url, &w.db.table, &env);
        w.converge("warm-up").await;

        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            relay.kill9();
            relay = Relay::start(&db_url, &w.db.table, &env);
        }
        w.converge("relay SIGKILLed three times").await;

        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            amqp_proxy.sever();
        }
        w.converge("broker connection cut twice mid-publish").await;

        amqp_proxy.freeze_all();
        tokio::time::sleep(Duration::from_secs(6)).await;
        amqp_proxy.thaw();
        w.converge("broker connection frozen for 6 s, nothing closed")
            .await;

        db_proxy.delay(Duration::from_millis(30));
        tokio::time::sleep(Duration::from_secs(5)).await;
        db_proxy.delay(Duration::ZERO);
        w.converge("database slowed by 30 ms per packet for 5 s")
            .await;

        run("rabbitmqctl", &["stop_app"]);
        tokio::time::sleep(Duration::from_secs(2)).await;
        run("rabbitmqctl", &["start_app"]);
        w.converge("broker restarted (stop_app / start_app)").await;

        restart_database(backend).await;
        w.converge("database server restarted").await;

        db_proxy.freeze_all();
        tokio::time::sleep(Duration::from_secs(8)).await;
        db_proxy.thaw();
        w.converge("database connections frozen for 8 s, nothing closed")
            .await;

        let rss = peak_rss_mib(&relay);
        let totals = w.finish().await;
        println!("{totals:?}, relay peak RSS {rss:.1} MiB");
        assert!(rss > 0.0 && rss < 128.0, "relay peak RSS {rss:.1} MiB");
    }
}
