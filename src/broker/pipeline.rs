//! One task per connection that starts every publish and settles every confirm.
//!
//! Two lapin behaviours shape it. A publish takes its delivery tag and queues its frames in
//! its first poll, so two tasks publishing on one channel from two threads can put frames
//! on the wire in another order than their tags; here every publish is polled by this one
//! task. And a `basic.return` is handed to whichever confirm completes next, not to the
//! returned message's own: here returns are matched to rows by message id. RabbitMQ sends a
//! message's return before its ack, so its carrier completes no later than the message's own
//! confirm; settling every confirm that is ready at once, returns first, sees it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::Confirmation;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{PublishError, Publisher, closed};
use crate::message::OutboxRow;
use crate::telemetry::PublishSpan;

/// What a connection's publish task reports.
#[derive(Debug)]
pub enum Report {
    /// What became of one published row.
    Outcome(Outcome),
    /// Connection `conn` was given up: it closed or failed, or a confirm did not come in
    /// time while the broker was not blocking it. The task has dropped every confirm it
    /// awaited and reports nothing more: never trust a channel one of whose confirms was
    /// dropped, as a return riding on it would be lost and its message taken as routed.
    Lost {
        /// The connection.
        conn: u64,
        /// Why: [`PublishError::Timeout`] or [`PublishError::Connection`].
        reason: PublishError,
    },
}

/// What became of one published row.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The connection it was published on.
    pub conn: u64,
    /// The row.
    pub id: i64,
    /// Confirmed and routed, or why not.
    pub result: Result<(), PublishError>,
}

/// The handle of a connection's publish task; dropping it stops the task at once, dropping
/// whatever it awaits (nothing it would report is trusted after that).
pub struct Pipeline {
    /// Rows to publish.
    jobs: mpsc::UnboundedSender<Arc<OutboxRow>>,
    /// The task, aborted on drop.
    task: tokio::task::AbortHandle,
}

impl Pipeline {
    /// Starts the publish task of connection `conn`; what becomes of its rows goes to
    /// `reports`. A confirm that has not come `timeout` after its publish (not counting
    /// time the broker blocked the connection) gives the connection up.
    pub fn start(
        publisher: Arc<Publisher>,
        conn: u64,
        app_id: Option<String>,
        timeout: Duration,
        reports: mpsc::UnboundedSender<Report>,
    ) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        let task = Task {
            publisher,
            conn,
            app_id: app_id.map(Arc::from),
            timeout,
            reports,
        };
        let task = tokio::spawn(task.run(rx)).abort_handle();
        Pipeline { jobs, task }
    }

    /// Queues `row` for publishing.
    pub fn publish(&self, row: Arc<OutboxRow>) {
        // After a loss the task is gone and the row was reported with the connection.
        let _ = self.jobs.send(row);
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One connection's publish task.
struct Task {
    /// The connection and its confirm-mode channel.
    publisher: Arc<Publisher>,
    /// The connection's number, on every report.
    conn: u64,
    /// The AMQP `app_id` property.
    app_id: Option<Arc<str>>,
    /// How long a confirm may take while the broker does not block the connection.
    timeout: Duration,
    /// Where outcomes go.
    reports: mpsc::UnboundedSender<Report>,
}

/// The publishes awaiting their confirm, in the order they were sent.
type Sent = BTreeMap<u64, Instant>;

/// The spans of the publishes awaiting their confirm, by row (only while exporting).
type Spans = HashMap<i64, PublishSpan>;

impl Task {
    async fn run(self, mut jobs: mpsc::UnboundedReceiver<Arc<OutboxRow>>) {
        let mut in_flight = FuturesUnordered::new();
        let mut sent = Sent::new();
        let mut returned = HashMap::new();
        let mut spans = Spans::new();
        let mut blocked = self.publisher.blocked();
        let mut unblocked_at = Instant::now();
        let lost = closed(self.publisher.connection());
        tokio::pin!(lost);
        let reason = loop {
            let deadline = match blocked.borrow().is_some() {
                true => None,
                false => sent
                    .values()
                    .next()
                    .map(|&at| at.max(unblocked_at) + self.timeout),
            };
            tokio::select! {
                Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                    let mut ready = vec![done];
                    while let Some(Some(more)) = in_flight.next().now_or_never() {
                        ready.push(more);
                    }
                    if let Some(reason) = self.settle(ready, &mut sent, &mut returned, &mut spans) {
                        break reason;
                    }
                }
                job = jobs.recv() => match job {
                    Some(row) => {
                        let seq = sent.last_key_value().map_or(0, |(&s, _)| s + 1);
                        sent.insert(seq, Instant::now());
                        if let Some(span) = PublishSpan::start(&row) {
                            spans.insert(row.id, span);
                        }
                        let (publisher, app_id) = (self.publisher.clone(), self.app_id.clone());
                        in_flight.push(async move {
                            let confirm = publisher.publish(&row, app_id.as_deref()).await;
                            (seq, row, Confirm::from(confirm))
                        });
                    }
                    None => return,
                },
                Ok(()) = blocked.changed() => {
                    if blocked.borrow().is_none() {
                        unblocked_at = Instant::now();
                    }
                }
                _ = &mut lost => break PublishError::Connection("connection closed".into()),
                _ = sleep_until(deadline) => break PublishError::Timeout,
            }
        };
        for span in spans.into_values() {
            span.end(&Err(reason.clone()));
        }
        let _ = self.reports.send(Report::Lost {
            conn: self.conn,
            reason,
        });
    }

    /// Reports the verdicts of the confirms that are ready; returns the connection's
    /// failure if one of them shows it.
    fn settle(
        &self,
        ready: Vec<(u64, Arc<OutboxRow>, Confirm)>,
        sent: &mut Sent,
        returned: &mut HashMap<String, String>,
        spans: &mut Spans,
    ) -> Option<PublishError> {
        let mut failure = None;
        let mut verdicts = Vec::with_capacity(ready.len());
        for (seq, row, confirm) in ready {
            sent.remove(&seq);
            match confirm {
                Confirm::Failed(e @ PublishError::Connection(_)) => failure = Some(e),
                confirm => verdicts.push((row, confirm)),
            }
        }
        for outcome in settle(self.conn, verdicts, returned) {
            if let Some(span) = spans.remove(&outcome.id) {
                span.end(&outcome.result);
            }
            let _ = self.reports.send(Report::Outcome(outcome));
        }
        failure
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A publish's confirmation as the pipeline reads it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Confirm {
    /// The broker acked; the confirmation carried this return (message id, reply text), which
    /// may be another message's.
    Ack(Option<(String, String)>),
    /// The broker nacked; the same about a carried return.
    Nack(Option<(String, String)>),
    /// No confirmation: why.
    Failed(PublishError),
}

impl From<Result<Confirmation, PublishError>> for Confirm {
    fn from(confirmation: Result<Confirmation, PublishError>) -> Self {
        let carried = |message: Option<lapin::message::BasicReturnMessage>| {
            message.map(|m| {
                let id = m
                    .delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string());
                (id.unwrap_or_default(), m.reply_text.to_string())
            })
        };
        match confirmation {
            Ok(Confirmation::Ack(message)) => Confirm::Ack(carried(message)),
            Ok(Confirmation::Nack(message)) => Confirm::Nack(carried(message)),
            Ok(Confirmation::NotRequested) => Confirm::Failed(PublishError::Connection(
                "publisher confirms are off".into(),
            )),
            Err(e) => Confirm::Failed(e),
        }
    }
}

/// Gives each confirmation that is ready its verdict, after recording every return they
/// carry (a return rides on whichever confirm lapin completes next, not always its own).
pub(crate) fn settle(
    conn: u64,
    ready: Vec<(Arc<OutboxRow>, Confirm)>,
    returned: &mut HashMap<String, String>,
) -> Vec<Outcome> {
    for (_, confirm) in &ready {
        if let Confirm::Ack(Some((id, reply))) | Confirm::Nack(Some((id, reply))) = confirm {
            returned.insert(id.clone(), reply.clone());
        }
    }
    ready
        .into_iter()
        .map(|(row, confirm)| {
            let was_returned = returned.remove(&row.message_id);
            let result = match confirm {
                Confirm::Failed(e) => Err(e),
                Confirm::Nack(_) => Err(PublishError::Nack),
                Confirm::Ack(_) => match was_returned {
                    Some(reply) => Err(PublishError::Unroutable(reply)),
                    None => Ok(()),
                },
            };
            Outcome {
                conn,
                id: row.id,
                result,
            }
        })
        .collect()
}
