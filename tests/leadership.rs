//! Leadership at the store: one lock per table as the database resolves it, a lease that the
//! database ends when its holder goes silent, and marks fenced by the leadership term; on
//! both backends, each test body generic over the backend's store type.

mod common;

use std::time::Duration;

use common::*;
use outbox::store::{Failure, Lease};
use outbox::{StoreOptions, TableName};
use serde_json::json;

fn store_for<S: TestStore>(db: &Db, table: &str, lease_timeout: Duration) -> S {
    S::open(
        db,
        StoreOptions {
            lease_timeout,
            ..StoreOptions::new(TableName::new(table).unwrap())
        },
    )
}

async fn fenced_marks<S: TestStore>(db: &Db) {
    let store = S::open(db, db.store_options());
    let mut old = store.lease().await.unwrap();
    let old_term = old.try_acquire().await.unwrap().expect("the table is free");
    let first = db.insert("q", Some("k"), json!({"seq": 1})).await;
    let second = db.insert("q", Some("k"), json!({"seq": 2})).await;
    let (first, second) = (db.row_id(&first).await, db.row_id(&second).await);

    // The old leader's session ends (its host vanished); a new leader takes the table and
    // records a failure of the first row, which holds its key back.
    db.end_lease_sessions().await;
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

/// `OUTBOX_TABLE=Outbox` and `=outbox` name one table, as PostgreSQL folds unquoted names
/// (the MySQL store takes the name in lower case likewise): one leader. The same table in
/// another database of the same server has a leader of its own (MySQL's named locks are
/// server-wide).
async fn one_lock_per_table<S: TestStore>(db: &Db, other: &Db) {
    let lower: S = store_for(db, "outbox", Duration::from_secs(10));
    let upper: S = store_for(db, "Outbox", Duration::from_secs(10));
    let elsewhere: S = store_for(other, "outbox", Duration::from_secs(10));
    let mut a = lower.lease().await.unwrap();
    let mut b = upper.lease().await.unwrap();
    let mut c = elsewhere.lease().await.unwrap();
    assert!(a.try_acquire().await.unwrap().is_some());
    assert_eq!(
        b.try_acquire().await.unwrap(),
        None,
        "OUTBOX_TABLE=Outbox and =outbox name one table: one leader"
    );
    assert!(
        c.try_acquire().await.unwrap().is_some(),
        "the table of another database has a leader of its own"
    );
}

async fn silent_lease_ended<S: TestStore>(db: &Db) {
    let store: S = store_for(db, "outbox", Duration::from_secs(1));
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

on_both_backends! {
    #[tokio::test]
    async fn a_mark_written_by_a_relay_that_lost_the_table_changes_nothing(backend: Backend) {
        let db = Db::new(backend).await;
        for_store!(backend, |S| fenced_marks::<S>(&db).await);
    }

    #[tokio::test]
    async fn the_lock_is_the_table_as_the_database_resolves_it(backend: Backend) {
        let (db, other) = (Db::new(backend).await, Db::new(backend).await);
        for_store!(backend, |S| one_lock_per_table::<S>(&db, &other).await);
    }

    #[tokio::test]
    async fn the_database_ends_a_silent_lease_and_releases_the_table(backend: Backend) {
        let db = Db::new(backend).await;
        for_store!(backend, |S| silent_lease_ended::<S>(&db).await);
    }
}
