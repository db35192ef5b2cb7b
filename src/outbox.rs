//! Writing messages into the outbox inside the caller's transaction.
//!
//! The caller passes its own open transaction (`&mut *tx`) or connection: the rows commit
//! or roll back with its business rows, which is the whole point of an outbox.

use std::future::Future;

use sqlx::AssertSqlSafe;

use crate::{Message, Result, TableName};

/// A database connection the outbox can be written through.
///
/// Implemented for the connection types of the supported backends; a transaction derefs to
/// its connection, so `&mut *tx` is what callers pass.
pub trait Backend: Send {
    /// Inserts `messages` into `table`, in order.
    fn insert<'a>(
        &'a mut self,
        table: &'a TableName,
        messages: &'a [Message],
    ) -> impl Future<Output = Result<()>> + Send + 'a;
}

/// Writes one message into the default `outbox` table through `conn` (normally `&mut *tx`,
/// the caller's open transaction).
pub async fn enqueue<C: Backend + ?Sized>(conn: &mut C, message: &Message) -> Result<()> {
    conn.insert(&TableName::default(), std::slice::from_ref(message))
        .await
}

/// Writes `messages` into `table` in one statement, in order (their ids increase in order).
pub async fn enqueue_all<C: Backend + ?Sized>(
    conn: &mut C,
    table: &TableName,
    messages: &[Message],
) -> Result<()> {
    if messages.is_empty() {
        return Ok(());
    }
    conn.insert(table, messages).await
}

/// The row's headers as JSON, with the current span's trace context as its `traceparent`
/// unless the message names one.
fn headers_json(message: &Message) -> String {
    let mut headers = message.headers.clone();
    crate::telemetry::fill_trace_headers(&mut headers);
    serde_json::Value::Object(headers).to_string()
}

#[cfg(feature = "postgres")]
impl Backend for sqlx::PgConnection {
    async fn insert(&mut self, table: &TableName, messages: &[Message]) -> Result<()> {
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
            .bind(column(|m| Some(headers_json(m))))
            .execute(self)
            .await?;
        Ok(())
    }
}

#[cfg(feature = "mysql")]
impl Backend for sqlx::MySqlConnection {
    async fn insert(&mut self, table: &TableName, messages: &[Message]) -> Result<()> {
        let mut sql = format!(
            "INSERT INTO {table}
                (message_id, exchange, routing_key, ordering_key, message_type, payload, headers)
             VALUES "
        );
        for i in 0..messages.len() {
            sql.push_str(if i == 0 {
                "(?, ?, ?, ?, ?, ?, ?)"
            } else {
                ", (?, ?, ?, ?, ?, ?, ?)"
            });
        }
        // Persistent only for one message: each batch length would be another statement.
        let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(messages.len() == 1);
        for m in messages {
            query = query
                .bind(m.message_id.to_string())
                .bind(&m.exchange)
                .bind(&m.routing_key)
                .bind(&m.ordering_key)
                .bind(&m.message_type)
                .bind(m.payload.to_string())
                .bind(headers_json(m));
        }
        query.execute(self).await?;
        Ok(())
    }
}
