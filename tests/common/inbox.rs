//! An inbox consumer on a test database of either backend: a test's handler is written once,
//! for any `DB` whose connection is a [`HandlerTx`], and [`Pool::consume`] runs it on the
//! backend of the pool it is given.

use std::future::Future;

use outbox::inbox::{ConsumerConfig, Handler, consume};
use serde::de::DeserializeOwned;
use sqlx::mysql::MySqlConnection;
use sqlx::postgres::PgConnection;
use sqlx::{AssertSqlSafe, MySql, Postgres};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::db::{Backend, Pool};

/// A value a handler's statement binds.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Text(&'a str),
    Int(i64),
}

/// The inbox transaction a test's handler writes through, on either backend:
/// `impl<DB: Database> Handler<T, DB> for H where DB::Connection: HandlerTx` serves both.
/// It is an outbox connection too: `outbox::enqueue(tx, ..)` works on it.
pub trait HandlerTx: outbox::outbox::Backend {
    /// The backend the transaction is on, for what only one of them does.
    const BACKEND: Backend;

    /// Runs one statement written with `?` placeholders (PostgreSQL gets `$1`, `$2`, ...;
    /// a `?` is always a placeholder).
    fn run(
        &mut self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> impl Future<Output = Result<(), sqlx::Error>> + Send;
}

impl HandlerTx for PgConnection {
    const BACKEND: Backend = Backend::Postgres;

    async fn run(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<(), sqlx::Error> {
        let numbered: String = sql
            .split('?')
            .enumerate()
            .map(|(i, part)| match i {
                0 => part.to_owned(),
                _ => format!("${i}{part}"),
            })
            .collect();
        let mut query = sqlx::query(AssertSqlSafe(numbered));
        for arg in args {
            query = match *arg {
                Arg::Text(s) => query.bind(s.to_owned()),
                Arg::Int(n) => query.bind(n),
            };
        }
        query.execute(self).await.map(drop)
    }
}

impl HandlerTx for MySqlConnection {
    const BACKEND: Backend = Backend::Mysql;

    async fn run(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<(), sqlx::Error> {
        let mut query = sqlx::query(AssertSqlSafe(sql.to_owned()));
        for arg in args {
            query = match *arg {
                Arg::Text(s) => query.bind(s.to_owned()),
                Arg::Int(n) => query.bind(n),
            };
        }
        query.execute(self).await.map(drop)
    }
}

impl Pool {
    /// Starts an inbox consumer on this pool with `handler`, which serves both backends; the
    /// task ends when `consume` returns, after `stop` is cancelled.
    pub fn consume<T, H>(
        &self,
        config: ConsumerConfig,
        handler: H,
        stop: CancellationToken,
    ) -> JoinHandle<()>
    where
        T: DeserializeOwned + Send + Sync + 'static,
        H: Handler<T, Postgres> + Handler<T, MySql>,
    {
        match self {
            Pool::Pg(p) => {
                tokio::spawn(consume::<T, H, Postgres>(p.clone(), config, handler, stop))
            }
            Pool::My(p) => tokio::spawn(consume::<T, H, MySql>(p.clone(), config, handler, stop)),
        }
    }
}
