//! The AMQP side: connecting over a list of cluster nodes, a confirm-mode channel, publishes
//! that resolve to "confirmed and routed" or a reason, and the broker's blocked events.

mod pipeline;
mod properties;
mod tls;

#[cfg(test)]
pub(crate) use pipeline::{Confirm, settle};
pub use pipeline::{Outcome, Pipeline, Report};
pub use tls::{AmqpTls, ClientIdentity, check_certificates, check_private_key, describe};

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::tcp::AMQPUriTcpExt;
use lapin::types::FieldTable;
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties, Event, ExchangeKind};
use tokio::sync::{Mutex, watch};

use crate::message::OutboxRow;

/// Heartbeat asked for when the URL sets none: a dead peer is noticed within ~20 s.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// Largest frame asked for when the URL sets none. lapin keeps two buffers of 32 frames per
/// connection, 4 MiB each at RabbitMQ's default of 128 KiB; at 32 KiB they take 1 MiB, and a
/// message above that is simply sent in several frames.
const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

/// Why a publish did not end in a routed, confirmed message.
#[derive(Debug, Clone, PartialEq)]
pub enum PublishError {
    /// The broker nacked the message.
    Nack,
    /// The message was returned: no queue is bound for it.
    Unroutable(String),
    /// The target exchange does not exist (or may not be used).
    Rejected(String),
    /// No confirm came within the confirm timeout.
    Timeout,
    /// The connection or channel failed: not the row's fault.
    Connection(String),
    /// The row cannot be published as written (bad headers, over-long names).
    BadRow(String),
}

impl PublishError {
    /// The `reason` label of `outbox_publish_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::Nack => "nack",
            PublishError::Unroutable(_) => "unroutable",
            PublishError::Rejected(_) => "rejected",
            PublishError::Timeout => "timeout",
            PublishError::Connection(_) => "connection",
            PublishError::BadRow(_) => "bad_row",
        }
    }
}

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishError::Nack => f.write_str("nacked by the broker"),
            PublishError::Unroutable(text) => {
                write!(f, "unroutable: returned by the broker ({text})")
            }
            PublishError::Rejected(text) => write!(f, "rejected by the broker: {text}"),
            PublishError::Timeout => f.write_str("no publisher confirm before the timeout"),
            PublishError::Connection(text) => write!(f, "connection lost: {text}"),
            PublishError::BadRow(text) => write!(f, "bad row: {text}"),
        }
    }
}

/// The cluster's nodes, tried in turn: after a lost connection the next node comes first.
#[derive(Debug, Clone)]
pub struct Nodes {
    /// The `AMQP_URL` entries, in order.
    urls: Vec<String>,
    /// How `amqps://` connections verify the broker and present this client.
    tls: AmqpTls,
    /// Where the next connection attempt starts.
    next: usize,
    /// The largest body the broker takes: `OUTBOX_MAX_MESSAGE_SIZE`, or less once a broker
    /// refused a body by its `max_message_size` (shared by every connection).
    max_message_size: Arc<AtomicUsize>,
}

impl Nodes {
    /// The node list (must not be empty); bodies over `max_message_size` bytes are bad rows.
    pub fn new(urls: Vec<String>, tls: AmqpTls, max_message_size: usize) -> Self {
        assert!(!urls.is_empty(), "at least one AMQP URL");
        Nodes {
            urls,
            tls,
            next: 0,
            max_message_size: Arc::new(AtomicUsize::new(max_message_size)),
        }
    }

    /// Tries every node once, starting with the one after the last connected; returns the
    /// first publisher that opens.
    pub async fn connect(&mut self, timeout: Duration) -> Result<Arc<Publisher>, String> {
        let mut last_error = String::new();
        for _ in 0..self.urls.len() {
            let at = self.next;
            self.next = (at + 1) % self.urls.len();
            let url = &self.urls[at];
            let max_size = self.max_message_size.clone();
            match tokio::time::timeout(timeout, Publisher::open(url, &self.tls, max_size)).await {
                Ok(Ok(publisher)) => {
                    tracing::info!(node = %crate::config::redact(url), "connected to the broker");
                    return Ok(publisher);
                }
                Ok(Err(e)) => last_error = describe(&e),
                Err(_) => last_error = format!("no answer within {timeout:?}"),
            }
            tracing::warn!(node = %crate::config::redact(url), error = %last_error, "broker node unavailable");
        }
        Err(last_error)
    }
}

/// Opens an AMQP connection to `url`, asking for a 10 s heartbeat (so a dead peer is noticed)
/// and 32 KiB frames (so its buffers stay small) unless the URL sets them. Callers bound it
/// with a timeout: a node that is shutting down can accept a TCP connection and never answer.
/// An `amqps://` URL verifies the broker's certificate and host name with `tls`, and never
/// falls back to plain text.
pub async fn connect(url: &str, tls: &AmqpTls) -> Result<Connection, lapin::Error> {
    let mut uri: AMQPUri = url
        .parse()
        .map_err(|e: String| lapin::Error::from(std::io::Error::other(e)))?;
    uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
    uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
    tls.choose_mechanism(url, &mut uri);
    let runtime = lapin::runtime::default_runtime()?;
    let options = ConnectionProperties::default();
    match tls.private_ca_connector()? {
        Some(connector) if uri.scheme == AMQPScheme::AMQPS => {
            let open = async move |uri: AMQPUri, runtime| {
                let tcp = AMQPUri {
                    scheme: AMQPScheme::AMQP,
                    ..uri.clone()
                };
                let stream = tcp.connect_async(&runtime).await?;
                Ok(stream.into_rustls(&connector, &uri.authority.host).await?)
            };
            Connection::connector(uri, runtime, open, options).await
        }
        _ => Connection::connect_uri_with_config(uri, options, tls.lapin_config(), runtime).await,
    }
}

/// The broker's `max_message_size` from the reason it closed a channel for, if that was it
/// (`PRECONDITION_FAILED - message size 5242880 is larger than configured max size 4194304`).
fn refused_size(reason: &str) -> Option<usize> {
    let (_, after) = reason.split_once("larger than configured max size ")?;
    let digits = after.split(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse().ok()
}

/// Delays between reconnection attempts: capped at 5 s, jittered, endless; callers take a
/// fresh one after each success.
pub(crate) fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Resolves once `conn` is no longer open. A node that shuts down cleanly closes its
/// connections without an error, and lapin then ends no consumer stream: consumers watch this.
pub async fn closed(conn: &Connection) {
    while conn.status().connected() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One AMQP connection with a confirm-mode channel for publishing.
pub struct Publisher {
    /// The connection; its events report blocking.
    conn: Connection,
    /// The confirm-mode channel every row is published on.
    channel: Channel,
    /// A second channel for passive exchange checks, which close their channel on failure.
    check: Mutex<Option<Channel>>,
    /// Exchanges known to exist on this connection.
    known_exchanges: std::sync::Mutex<HashSet<String>>,
    /// The broker's reason for blocking this connection (`None` = not blocked).
    blocked: watch::Receiver<Option<String>>,
    /// The node's URL, redacted.
    node: String,
    /// The largest body the broker takes (see [`Nodes`]).
    max_message_size: Arc<AtomicUsize>,
}

impl Publisher {
    async fn open(
        url: &str,
        tls: &AmqpTls,
        max_message_size: Arc<AtomicUsize>,
    ) -> Result<Arc<Self>, lapin::Error> {
        let conn = connect(url, tls).await?;
        let (blocked_tx, blocked) = watch::channel(None);
        tokio::spawn(watch_events(conn.events_listener(), blocked_tx));
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Arc::new(Publisher {
            conn,
            channel,
            check: Mutex::new(None),
            known_exchanges: Default::default(),
            blocked,
            node: crate::config::redact(url),
            max_message_size,
        }))
    }

    /// The node this connection is to (its URL, redacted).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Follows the broker's blocking of this connection: its reason, or `None`.
    pub fn blocked(&self) -> watch::Receiver<Option<String>> {
        self.blocked.clone()
    }

    /// The AMQP connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The connection and the publishing channel are both open.
    pub fn is_open(&self) -> bool {
        self.conn.status().connected() && self.channel.status().connected()
    }

    /// Closes the connection politely (best effort).
    pub async fn close(&self) {
        let _ = self.conn.close(200, "outbox relay stopping".into()).await;
    }

    /// Publishes `row` as the contract maps it and waits for its confirm. Unbounded: the
    /// [`Pipeline`] gives up the whole connection when a confirm is late.
    ///
    /// A returned message rides on the confirmation, but lapin attaches it to whichever
    /// confirm completes next, not necessarily this row's: [`Pipeline`] matches returns to
    /// rows by message id.
    async fn publish(
        &self,
        row: &OutboxRow,
        app_id: Option<&str>,
    ) -> Result<Confirmation, PublishError> {
        // 0 would be "no limit".
        let frame_max = match self.conn.configuration().frame_max() {
            0 => usize::MAX,
            n => n as usize,
        };
        let props = properties::properties(row, app_id, frame_max).map_err(PublishError::BadRow)?;
        let max_size = self.max_message_size.load(Ordering::Relaxed);
        if row.payload.len() > max_size {
            return Err(PublishError::BadRow(format!(
                "the body ({} bytes) is larger than the broker takes (max_message_size {max_size} bytes)",
                row.payload.len()
            )));
        }
        self.check_exchange(&row.exchange).await?;
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let confirm = async {
            self.channel
                .basic_publish(
                    row.exchange.as_str().into(),
                    row.routing_key.as_str().into(),
                    options,
                    row.payload.as_bytes(),
                    props,
                )
                .await?
                .await
        };
        confirm.await.map_err(|e| {
            let reason = e.to_string();
            // RabbitMQ closes the channel over a body past its max_message_size: the rows in
            // flight go out again on the next connection, and this one is then a bad row.
            if let Some(max) = refused_size(&reason) {
                self.max_message_size.fetch_min(max, Ordering::Relaxed);
            }
            PublishError::Connection(reason)
        })
    }

    /// Publishing to a missing exchange would close the shared channel and fail every row in
    /// flight; a passive declare on a side channel blames only the rows that target it.
    async fn check_exchange(&self, exchange: &str) -> Result<(), PublishError> {
        if exchange.is_empty()
            || self
                .known_exchanges
                .lock()
                .expect("exchanges lock")
                .contains(exchange)
        {
            return Ok(());
        }
        let mut check = self.check.lock().await;
        if self
            .known_exchanges
            .lock()
            .expect("exchanges lock")
            .contains(exchange)
        {
            return Ok(());
        }
        let channel = match check.as_ref().filter(|c| c.status().connected()) {
            Some(channel) => channel.clone(),
            None => {
                let channel = self
                    .conn
                    .create_channel()
                    .await
                    .map_err(|e| PublishError::Connection(e.to_string()))?;
                check.insert(channel).clone()
            }
        };
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        match channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Direct,
                passive,
                FieldTable::default(),
            )
            .await
        {
            Ok(()) => {
                self.known_exchanges
                    .lock()
                    .expect("exchanges lock")
                    .insert(exchange.to_owned());
                Ok(())
            }
            Err(e) if e.is_amqp_soft_error() => Err(PublishError::Rejected(e.to_string())),
            Err(e) => Err(PublishError::Connection(e.to_string())),
        }
    }
}

/// Follows the connection's blocked/unblocked events until it closes.
async fn watch_events(
    events: impl futures_util::Stream<Item = Event> + Send + 'static,
    blocked: watch::Sender<Option<String>>,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            Event::ConnectionBlocked(reason) => {
                blocked.send_replace(Some(reason));
            }
            Event::ConnectionUnblocked => {
                blocked.send_replace(None);
            }
            Event::Error(e) => tracing::warn!(error = %e, "broker connection error"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::refused_size;

    #[test]
    fn the_broker_s_max_message_size_is_read_from_its_refusal() {
        let reason = "protocol error: AMQP soft error: PRECONDITION_FAILED - message size \
                      5242880 is larger than configured max size 4194304";
        assert_eq!(refused_size(reason), Some(4_194_304));
        assert_eq!(refused_size("NOT_FOUND - no exchange 'x'"), None);
    }
}
