//! One task per connection that starts every publish and settles every confirm.
//!
//! Two lapin behaviours shape it. A publish takes its delivery tag and queues its frames in
//! its first poll, so two tasks publishing on one channel from two threads can put frames
//! on the wire in another order than their tags; here every publish is polled by this one
//! task. And a `basic.return` is handed to whichever confirm completes next, not to the
//! returned message's own: here returns are matched to rows by message id. RabbitMQ sends a
//! message's return before its ack, so its carrier completes no later than the message's own
//! confirm; settling every confirm that is ready at once, returns first, sees it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use lapin::Confirmation;
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::{PublishError, Publisher};
use crate::message::OutboxRow;

/// What became of one published row.
#[derive(Debug)]
pub struct Outcome {
    /// The row.
    pub row: OutboxRow,
    /// Confirmed and routed, or why not.
    pub result: Result<(), PublishError>,
}

/// A row to publish, holding its place in the in-flight window until it is settled.
type Job = (OutboxRow, OwnedSemaphorePermit);

/// The sending side of a connection's publish task; dropping it lets the task finish what
/// is in flight and end.
pub struct Pipeline {
    /// Rows to publish.
    jobs: mpsc::UnboundedSender<Job>,
}

impl Pipeline {
    /// Starts the publish task for `publisher`; outcomes go to `outcomes`.
    pub fn start(
        publisher: Arc<Publisher>,
        app_id: Option<String>,
        timeout: Duration,
        outcomes: mpsc::UnboundedSender<Outcome>,
    ) -> Self {
        let (jobs, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(publisher, app_id.map(Arc::from), timeout, rx, outcomes));
        Pipeline { jobs }
    }

    /// Queues `row` for publishing.
    pub fn publish(&self, row: OutboxRow, permit: OwnedSemaphorePermit) {
        // The task ends only after this sender is dropped.
        let _ = self.jobs.send((row, permit));
    }
}

async fn run(
    publisher: Arc<Publisher>,
    app_id: Option<Arc<str>>,
    timeout: Duration,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    outcomes: mpsc::UnboundedSender<Outcome>,
) {
    let mut in_flight = FuturesUnordered::new();
    let mut returned = HashMap::new();
    let mut open = true;
    loop {
        tokio::select! {
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let mut ready = vec![done];
                while let Some(Some(more)) = in_flight.next().now_or_never() {
                    ready.push(more);
                }
                settle(ready, &mut returned, &outcomes);
            }
            job = jobs.recv(), if open => match job {
                Some((row, permit)) => {
                    let (publisher, app_id) = (publisher.clone(), app_id.clone());
                    in_flight.push(async move {
                        let confirmation = publisher.publish(&row, app_id.as_deref(), timeout).await;
                        (row, permit, confirmation)
                    });
                }
                None => open = false,
            },
            else => break,
        }
    }
}

/// Records every return carried by `ready`, then gives each row its verdict.
fn settle(
    ready: Vec<(
        OutboxRow,
        OwnedSemaphorePermit,
        Result<Confirmation, PublishError>,
    )>,
    returned: &mut HashMap<String, String>,
    outcomes: &mpsc::UnboundedSender<Outcome>,
) {
    for (_, _, confirmation) in &ready {
        if let Ok(Confirmation::Ack(Some(message)) | Confirmation::Nack(Some(message))) =
            confirmation
        {
            let id = message
                .delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            returned.insert(id, message.reply_text.to_string());
        }
    }
    for (row, permit, confirmation) in ready {
        let was_returned = returned.remove(&row.message_id);
        let result = match confirmation {
            Err(e) => Err(e),
            Ok(Confirmation::Nack(_)) => Err(PublishError::Nack),
            Ok(Confirmation::NotRequested) => Err(PublishError::Connection(
                "publisher confirms are off".into(),
            )),
            Ok(Confirmation::Ack(_)) => match was_returned {
                Some(reply) => Err(PublishError::Unroutable(reply)),
                None => Ok(()),
            },
        };
        drop(permit);
        let _ = outcomes.send(Outcome { row, result });
    }
}
