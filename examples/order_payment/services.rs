//! The two services of the saga: their schemas and their inbox handlers.
//!
//! The order service writes an order and its `OrderCreated` in one transaction; the payment
//! service charges the customer and answers `PaymentSucceeded` or `PaymentFailed` in the
//! transaction that records the payment; the order service marks the order `PAID`, or
//! `CANCELLED` as the compensation. `payments.order_id` has no unique constraint on purpose:
//! exactly-once comes from the inbox alone.
//!
//! The order service keeps its data on PostgreSQL and the payment service on MySQL/MariaDB:
//! one saga across both backends, each service with its own outbox and inbox.

use outbox::Message;
use outbox::inbox::{Handler, HandlerError, Incoming};
use serde::{Deserialize, Serialize};
use sqlx::MySql;
use sqlx::mysql::MySqlConnection;
use sqlx::postgres::PgConnection;

pub const ORDERS_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS orders (
        id          BIGSERIAL PRIMARY KEY,
        customer_id BIGINT NOT NULL,
        amount      BIGINT NOT NULL,
        status      TEXT NOT NULL CHECK (status IN ('PENDING', 'PAID', 'CANCELLED')))";

/// MySQL/MariaDB.
pub const PAYMENTS_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS accounts (
        customer_id BIGINT PRIMARY KEY,
        balance     BIGINT NOT NULL) ENGINE = InnoDB;
    CREATE TABLE IF NOT EXISTS payments (
        id       BIGINT AUTO_INCREMENT PRIMARY KEY,
        order_id BIGINT NOT NULL,
        amount   BIGINT NOT NULL,
        status   VARCHAR(9) NOT NULL CHECK (status IN ('SUCCEEDED', 'FAILED'))) ENGINE = InnoDB";

#[derive(Debug, Serialize, Deserialize)]
pub struct OrderCreated {
    pub order_id: i64,
    pub customer_id: i64,
    pub amount: i64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PaymentResult {
    pub order_id: i64,
    pub amount: i64,
}

/// The order service's command: the order and its event commit together.
pub async fn place_order(
    tx: &mut PgConnection,
    exchange: &str,
    customer_id: i64,
    amount: i64,
) -> Result<i64, HandlerError> {
    let order_id: i64 = sqlx::query_scalar(
        "INSERT INTO orders (customer_id, amount, status) VALUES ($1, $2, 'PENDING') RETURNING id",
    )
    .bind(customer_id)
    .bind(amount)
    .fetch_one(&mut *tx)
    .await?;
    let event = Message::new(
        "order.created",
        &OrderCreated {
            order_id,
            customer_id,
            amount,
        },
    )?
    .exchange(exchange)
    .ordering_key(format!("order-{order_id}"))
    .message_type("OrderCreated");
    outbox::enqueue(tx, &event).await?;
    Ok(order_id)
}

/// The payment service's handler of `OrderCreated`, on MySQL.
#[derive(Clone)]
pub struct ChargeCustomer {
    /// Where payment results are published.
    pub exchange: String,
}

impl Handler<OrderCreated, MySql> for ChargeCustomer {
    async fn handle(
        &self,
        tx: &mut MySqlConnection,
        msg: &Incoming<OrderCreated>,
    ) -> Result<(), HandlerError> {
        let OrderCreated {
            order_id,
            customer_id,
            amount,
        } = msg.body;
        let balance: Option<i64> =
            sqlx::query_scalar("SELECT balance FROM accounts WHERE customer_id = ? FOR UPDATE")
                .bind(customer_id)
                .fetch_optional(&mut *tx)
                .await?;
        let paid = balance.is_some_and(|b| b >= amount);
        if paid {
            sqlx::query("UPDATE accounts SET balance = balance - ? WHERE customer_id = ?")
                .bind(amount)
                .bind(customer_id)
                .execute(&mut *tx)
                .await?;
        }
        let (status, key, kind) = match paid {
            true => ("SUCCEEDED", "payment.succeeded", "PaymentSucceeded"),
            false => ("FAILED", "payment.failed", "PaymentFailed"),
        };
        sqlx::query("INSERT INTO payments (order_id, amount, status) VALUES (?, ?, ?)")
            .bind(order_id)
            .bind(amount)
            .bind(status)
            .execute(&mut *tx)
            .await?;
        let reply = Message::new(key, &PaymentResult { order_id, amount })?
            .exchange(&self.exchange)
            .ordering_key(format!("order-{order_id}"))
            .message_type(kind);
        outbox::enqueue(tx, &reply).await?;
        Ok(())
    }
}

/// The order service's handler of payment results: paid, or cancelled (the compensation).
#[derive(Clone)]
pub struct SettleOrder;

impl Handler<PaymentResult> for SettleOrder {
    async fn handle(
        &self,
        tx: &mut PgConnection,
        msg: &Incoming<PaymentResult>,
    ) -> Result<(), HandlerError> {
        let status = match msg.message_type.as_deref() {
            Some("PaymentSucceeded") => "PAID",
            Some("PaymentFailed") => "CANCELLED",
            other => return Err(format!("unexpected message type {other:?}").into()),
        };
        sqlx::query("UPDATE orders SET status = $2 WHERE id = $1")
            .bind(msg.body.order_id)
            .bind(status)
            .execute(tx)
            .await?;
        Ok(())
    }
}
