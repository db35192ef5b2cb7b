//! The schema, on both backends: `outbox migrate` and its history, `OUTBOX_TABLE`, the
//! contract's columns and minimal insert, the migration files applied by a plain client, and
//! retention of sent rows.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::json;

/// The files of `migrations/<backend>`, in the order they apply, with their text.
fn migration_files(backend: Backend) -> Vec<(PathBuf, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(backend.scheme());
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let sql = std::fs::read_to_string(&p).unwrap();
            (p, sql)
        })
        .collect()
}

/// Fails the test with the command's output unless it succeeded; returns its stdout.
fn succeeded(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The tables `outbox migrate` makes for the outbox table `table`, in sorted order.
fn tables_of(table: &str) -> Vec<String> {
    ["", "_inbox", "_leader", "_schema_history"]
        .map(|suffix| format!("{table}{suffix}"))
        .to_vec()
}

/// Checks that the history of `table` records each migration file once.
async fn assert_history(db: &Db, table: &str) {
    let sql = format!("SELECT count(*) FROM {table}_schema_history");
    let files = migration_files(db.backend).len() as i64;
    assert_eq!(db.scalar(&sql).await, files, "{table}'s history");
}

/// The service's columns as CONTRACT.md section 1 lists them: name, type, nullable.
fn contract_columns(backend: Backend) -> [(&'static str, &'static str, &'static str); 7] {
    let (uuid, text, json) = match backend {
        Backend::Postgres => ("uuid", "text", "jsonb"),
        Backend::Mysql => ("char(36)", "varchar(255)", "json"),
    };
    [
        ("message_id", uuid, "NO"),
        ("exchange", text, "NO"),
        ("routing_key", text, "NO"),
        ("ordering_key", text, "YES"),
        ("message_type", text, "YES"),
        ("payload", json, "NO"),
        ("headers", json, "NO"),
    ]
}

on_both_backends! {
    #[tokio::test]
    async fn migrate_twice_changes_nothing_and_keeps_its_own_history_table(backend: Backend) {
        let db = Db::with_table(backend, "billing_outbox").await; // migrated once by the helper
        let before = db.schema().await;
        let again = succeeded(db.run_outbox(&["migrate"]));
        assert!(again.contains("up to date"), "{again}");
        assert_eq!(
            db.schema().await,
            before,
            "a second migrate changed the schema"
        );
        assert_eq!(db.tables().await, tables_of("billing_outbox"));
        assert_history(&db, "billing_outbox").await;
        assert_eq!(
            db.scalar("SELECT count(*) FROM billing_outbox_leader")
                .await,
            1
        );

        let bad = db
            .outbox()
            .env("OUTBOX_TABLE", "x-y")
            .arg("migrate")
            .output()
            .unwrap();
        assert_eq!(bad.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&bad.stderr).contains("OUTBOX_TABLE"));
    }

    #[tokio::test]
    async fn outbox_table_names_every_object_and_is_taken_in_lower_case(backend: Backend) {
        let db = Db::with_table(backend, "billing_outbox").await;
        // A second outbox table in the same database, named in mixed case.
        let second = |args: &[&str]| {
            let mut cmd = db.outbox();
            succeeded(
                cmd.env("OUTBOX_TABLE", "Audit_Outbox")
                    .args(args)
                    .output()
                    .unwrap(),
            )
        };
        second(&["migrate"]);
        let both = [tables_of("audit_outbox"), tables_of("billing_outbox")].concat();
        assert_eq!(
            db.tables().await,
            both,
            "not named after Audit_Outbox in lower case"
        );
        assert_history(&db, "audit_outbox").await;
        // Indexes, triggers and functions: each table has its own, named after it.
        let objects = db.object_names().await;
        let named_after = |t: &str| objects.iter().filter(|o| o.starts_with(t)).count();
        assert_eq!(
            named_after("audit_outbox") + named_after("billing_outbox"),
            objects.len(),
            "an object is not named after its table: {objects:?}"
        );
        assert!(named_after("audit_outbox") > 0, "{objects:?}");
        assert_eq!(
            named_after("audit_outbox"),
            named_after("billing_outbox"),
            "{objects:?}"
        );
        // The other commands take the name as `migrate` did.
        db.execute("INSERT INTO audit_outbox (routing_key, payload) VALUES ('k', '{}')")
            .await;
        let status: serde_json::Value =
            serde_json::from_str(&second(&["status", "--json"])).unwrap();
        assert_eq!(status["pending"], json!(1), "{status}");
    }

    #[tokio::test]
    async fn the_contracts_minimal_insert_works_as_written(backend: Backend) {
        let db = Db::new(backend).await;
        let columns = db.columns("outbox").await;
        let contract = contract_columns(backend);
        let service: Vec<(&str, &str, &str)> = columns
            .iter()
            .filter(|c| contract.iter().any(|k| k.0 == c.0))
            .map(|(name, kind, null)| (name.as_str(), kind.as_str(), null.as_str()))
            .collect();
        assert_eq!(
            service, contract,
            "the service's columns are not the contract's"
        );
        db.execute(
            "INSERT INTO outbox (exchange, routing_key, ordering_key, message_type, payload)
             VALUES ('orders', 'order.created', 'order-42', 'OrderCreated', '{\"order_id\": 42}')",
        )
        .await;
        let ids = db.message_ids().await;
        assert_eq!(ids.len(), 1);
        for id in &ids {
            uuid::Uuid::parse_str(id).unwrap_or_else(|e| panic!("message_id {id}: {e}"));
        }
        let out = succeeded(db.run_outbox(&["status", "--json"]));
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(status["pending"], json!(1));
        assert_eq!(status["dead"], json!(0));
        assert!(status["oldest_pending_age_seconds"].as_f64().unwrap() >= 0.0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_migration_files_applied_twice_by_a_plain_client_give_a_working_schema(
        backend: Backend,
    ) {
        let db = Db::unmigrated(backend, "outbox").await;
        // As any migration tool would: each file as plain SQL text, in order; then again.
        for round in 1..=2 {
            for (path, sql) in migration_files(backend) {
                db.pool.try_execute(&sql).await.unwrap_or_else(|e| {
                    panic!(
                        "{} did not apply as plain SQL (round {round}): {e}",
                        path.display()
                    )
                });
            }
        }
        assert_eq!(
            db.tables().await,
            ["outbox", "outbox_inbox", "outbox_leader"]
        );
        assert_eq!(db.scalar("SELECT count(*) FROM outbox_leader").await, 1);

        let queue = TestQueue::new().await;
        let mut relay = Relay::start(&db.url, &db.table, &[]);
        let id = db
            .insert(&queue.name, Some("k"), json!({"plain": true}))
            .await;
        let got = queue.wait_for(1, Duration::from_secs(20)).await;
        assert_eq!(got[0].message_id, id);
        eventually("the row to be marked", Duration::from_secs(10), || async {
            db.count("state = 'pending'").await == 0
        })
        .await;
        relay.terminate();

        // `outbox migrate` over it adds its history and changes nothing else.
        let before = db.schema().await;
        succeeded(db.run_outbox(&["migrate"]));
        let after: Vec<String> = db
            .schema()
            .await
            .into_iter()
            .filter(|line| !line.contains("outbox_schema_history"))
            .collect();
        assert_eq!(
            after, before,
            "`outbox migrate` changed the schema the files made"
        );
        assert_history(&db, "outbox").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sent_rows_are_kept_for_the_retention_then_purged(backend: Backend) {
        let db = Db::new(backend).await;
        let queue = TestQueue::new().await;
        let _relay = Relay::start(&db.url, &db.table, &[("OUTBOX_RETENTION", "3s")]);
        for i in 0..10 {
            db.insert(&queue.name, None, json!({"i": i})).await;
        }
        queue.wait_for(10, Duration::from_secs(20)).await;
        eventually(
            "rows to be marked sent",
            Duration::from_secs(10),
            || async { db.count("state = 'sent' AND sent_at IS NOT NULL").await == 10 },
        )
        .await;
        eventually(
            "sent rows to be purged after the retention",
            Duration::from_secs(20),
            || async { db.count("1 = 1").await == 0 },
        )
        .await;
    }
}
