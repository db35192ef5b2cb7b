//! Leadership at the store: one lock per table as the database resolves it, a lease that the
//! database ends when its holder goes silent, and marks fenced by the leadership term.

mod common;

use std::time::Duration;

use common::*;
use outbox::store::postgres::PgStore;
use outbox::store::{Failure, Lease};
use outbox::{Store, StoreOptions, TableName};
use serde_json::json;

fn store_for(db: &TestDb, table: &str, lease_timeout: Duration) -> PgStore {
    PgStore::new(
        db.pool.clone(),
        StoreOptions {
            lease_timeout,
            ..StoreOptions::new(TableName::new(table).unwrap())
        },
    )
}

async fn row_id(db: &TestDb, message_id: &str) -> i64 {
    sqlx::query_scalar("SELECT id FROM outbox WHERE message_id = $1::uuid")
        .bind(message_id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_mark_written_by_a_relay_that_lost_the_table_changes_nothing() {
    let db = TestDb::new().await;
    let store = db.store();
    let mut old = store.lease().await.unwrap();
    let old_term = old.try_acquire().await.unwrap().expect("the table is free");
    let first = db.insert("q", Some("k"), json!({"seq": 1})).await;
    let second = db.insert("q", Some("k"), json!({"seq": 2})).await;
    let (first, second) = (row_id(&db, &first).await, row_id(&db, &second).await);

    // The old leader's session ends (its host vanished); a new leader takes the table and
    // records a failure of the first row, which holds its key back.
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'outbox relay lease' AND datname = current_database()")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut new = store.lease().await.unwrap();
    let new_term = new
        .try_acquire()
        .await
        .unwrap()
        .expect("the lock was released");
    assert!(new_term > old_term);
    let failure = Failure {
        id: first,
        error: "unroutable".into(),
        retry_in: Duration::from_secs(60),
        permanent: false,
    };
    store.mark(new_term, &[], &[failure], 10).await.unwrap();

    // The old leader's late mark, of both rows as sent, changes nothing.
    let late = store.mark(old_term, &[first, second], &[], 10).await;
    assert!(matches!(late, Err(outbox::Error::LeaseLost)), "{late:?}");
    assert_eq!(db.count("state = 'pending'").await, 2);
    assert_eq!(db.count("attempts = 1").await, 1);
    assert!(old.look().await.is_err(), "the old session is gone");
    new.look().await.unwrap();
}

#[tokio::test]
async fn the_lock_is_the_table_as_the_database_resolves_it() {
    let db = TestDb::new().await;
    let lower = store_for(&db, "outbox", Duration::from_secs(10));
    let upper = store_for(&db, "Outbox", Duration::from_secs(10));
    let mut a = lower.lease().await.unwrap();
    let mut b = upper.lease().await.unwrap();
    assert!(a.try_acquire().await.unwrap().is_some());
    assert_eq!(
        b.try_acquire().await.unwrap(),
        None,
        "OUTBOX_TABLE=Outbox and =outbox name one table: one leader"
    );
}

#[tokio::test]
async fn the_database_ends_a_silent_lease_and_releases_the_table() {
    let db = TestDb::new().await;
    let store = store_for(&db, "outbox", Duration::from_secs(1));
    let mut silent = store.lease().await.unwrap();
    assert!(silent.try_acquire().await.unwrap().is_some());
    // The holder says nothing more, as if its host had vanished.
    let mut standby = store.lease().await.unwrap();
    assert_eq!(standby.try_acquire().await.unwrap(), None);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while standby.try_acquire().await.unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the database did not end the silent lease within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(silent.look().await.is_err(), "the silent session was ended");
}
