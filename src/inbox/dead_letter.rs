//! The dead-letter publisher: its own connection (publishing connections are blocked during
//! alarms; acks must not be) and a confirm-mode channel, reopened whenever it is closed.

use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, LongString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::Mutex;

use super::ConsumerConfig;
use crate::broker::{closed, connect};

/// How long one dead letter may take: reopening the channel, publishing, the confirm.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// Publishes dead letters one at a time, so a return or a failure is unambiguous.
pub(super) struct DeadLetters {
    /// The dead-letter connection; when it is gone the session ends and reconnects.
    conn: Connection,
    /// The confirm-mode channel, replaced by a new one when it has closed.
    channel: Mutex<Channel>,
    /// The dead-letter exchange, `<queue>.dead`.
    exchange: String,
    /// The routing key of dead letters: the queue's name.
    routing_key: String,
    /// The consumer's name, in the `x-outbox-consumer` header.
    consumer: String,
}

impl DeadLetters {
    /// Connects to `url`; the caller bounds it with the connect timeout.
    pub(super) async fn open(url: &str, config: &ConsumerConfig) -> Result<Self, lapin::Error> {
        let conn = connect(url, &config.tls).await?;
        let channel = confirm_channel(&conn).await?;
        Ok(DeadLetters {
            conn,
            channel: Mutex::new(channel),
            exchange: config.dead_letter_queue(),
            routing_key: config.queue.clone(),
            consumer: config.consumer.clone(),
        })
    }

    /// The dead-letter exchange.
    pub(super) fn exchange(&self) -> &str {
        &self.exchange
    }

    /// Resolves once the dead-letter connection is no longer open.
    pub(super) async fn closed(&self) {
        closed(&self.conn).await
    }

    /// Closes the connection politely (the caller bounds it).
    pub(super) async fn close(&self) {
        let _ = self.conn.close(200, "consumer stopping".into()).await;
    }

    /// Publishes a copy of `delivery` with the reason and attempts in its headers and waits
    /// for the confirm, all within [`PUBLISH_TIMEOUT`].
    pub(super) async fn send(
        &self,
        delivery: &Delivery,
        reason: &str,
        attempts: u32,
    ) -> Result<(), String> {
        let props = self.properties(delivery, reason, attempts);
        tokio::time::timeout(PUBLISH_TIMEOUT, self.publish(delivery, props))
            .await
            .unwrap_or_else(|_| Err("no confirm from the dead-letter queue in time".into()))
    }

    async fn publish(&self, delivery: &Delivery, props: BasicProperties) -> Result<(), String> {
        let mut channel = self.channel.lock().await;
        self.reopen(&mut channel).await?;
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let confirm = channel
            .basic_publish(
                self.exchange.as_str().into(),
                self.routing_key.as_str().into(),
                options,
                &delivery.data,
                props,
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            other => Err(format!("dead-letter queue refused the message: {other:?}")),
        }
    }

    /// Replaces a closed channel (a channel-level error, a failed publish) with a new one on
    /// the same connection. Fails if the connection itself is gone: the session then ends.
    async fn reopen(&self, channel: &mut Channel) -> Result<(), String> {
        if channel.status().connected() {
            return Ok(());
        }
        if !self.conn.status().connected() {
            return Err("the dead-letter connection is closed".into());
        }
        *channel = confirm_channel(&self.conn)
            .await
            .map_err(|e| format!("the dead-letter channel could not be reopened: {e}"))?;
        tracing::info!(consumer = %self.consumer, exchange = %self.exchange, "dead-letter channel reopened");
        Ok(())
    }

    /// The delivery's properties, with the reason, the attempts, the consumer and the
    /// original routing key added to its headers.
    fn properties(&self, delivery: &Delivery, reason: &str, attempts: u32) -> BasicProperties {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s));
        headers.insert("x-outbox-error".into(), text(reason));
        headers.insert(
            "x-outbox-attempts".into(),
            AMQPValue::LongLongInt(attempts.into()),
        );
        headers.insert("x-outbox-consumer".into(), text(&self.consumer));
        headers.insert(
            "x-outbox-routing-key".into(),
            text(delivery.routing_key.as_str()),
        );
        delivery.properties.clone().with_headers(headers)
    }
}

/// A new channel on `conn` in confirm mode.
async fn confirm_channel(conn: &Connection) -> Result<Channel, lapin::Error> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}
