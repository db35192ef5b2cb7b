//! Writing messages into the outbox inside the caller's transaction.
//!
//! The caller passes its own transaction (or any executor): the rows commit or roll back
//! with its business rows, which is the whole point of an outbox.

use std::future::Future;

use sqlx::{AssertSqlSafe, Executor};

use crate::{Message, Result, TableName};

/// A database the outbox can be written to.
pub trait Backend: sqlx::Database {
    /// Inserts `messages` into `table`, in order, through `executor`.
    fn insert<'c, E>(
        executor: E,
        table: &TableName,
        messages: &[Message],
    ) -> impl Future<Output = Result<()>> + Send
    where
        E: Executor<'c, Database = Self>;
}

/// Writes one message into the default `outbox` table through `executor`
/// (normally `&mut *tx`, the caller's open transaction).
pub async fn enqueue<'c, E>(executor: E, message: &Message) -> Result<()>
where
    E: Executor<'c>,
    E::Database: Backend,
{
    enqueue_all(
        executor,
        &TableName::default(),
        std::slice::from_ref(message),
    )
    .await
}

/// Writes `messages` into `table` in one statement, in order (their ids increase in order).
pub async fn enqueue_all<'c, E>(executor: E, table: &TableName, messages: &[Message]) -> Result<()>
where
    E: Executor<'c>,
    E::Database: Backend,
{
    if messages.is_empty() {
        return Ok(());
    }
    E::Database::insert(executor, table, messages).await
}

#[cfg(feature = "postgres")]
impl Backend for sqlx::Postgres {
    async fn insert<'c, E>(executor: E, table: &TableName, messages: &[Message]) -> Result<()>
    where
        E: Executor<'c, Database = Self>,
    {
        let sql = format!(
            "INSERT INTO {table}
                (message_id, exchange, routing_key, ordering_key, message_type, payload, headers)
             SELECT m::uuid, e, r, o, t, p::jsonb, h::jsonb
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::text[]) WITH ORDINALITY AS x(m, e, r, o, t, p, h, n)
             ORDER BY n"
        );
        let column = |f: fn(&Message) -> Option<String>| messages.iter().map(f).collect::<Vec<_>>();
        sqlx::query(AssertSqlSafe(sql))
            .bind(column(|m| Some(m.message_id.to_string())))
            .bind(column(|m| Some(m.exchange.clone())))
            .bind(column(|m| Some(m.routing_key.clone())))
            .bind(column(|m| m.ordering_key.clone()))
            .bind(column(|m| m.message_type.clone()))
            .bind(column(|m| Some(m.payload.to_string())))
            .bind(column(|m| {
                Some(serde_json::Value::Object(m.headers.clone()).to_string())
            }))
            .execute(executor)
            .await?;
        Ok(())
    }
}
