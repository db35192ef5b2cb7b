//! The metric names of the contract, and their descriptions.

/// Rows not yet sent and not dead.
pub const PENDING: &str = "outbox_pending_messages";
/// Age of the oldest pending row.
pub const OLDEST_PENDING_AGE: &str = "outbox_oldest_pending_age_seconds";
/// Rows confirmed and marked sent.
pub const PUBLISHED: &str = "outbox_published_total";
/// Failed attempts, by `reason`.
pub const PUBLISH_FAILURES: &str = "outbox_publish_failures_total";
/// Rows in the dead state.
pub const DEAD: &str = "outbox_dead_messages";
/// An AMQP connection is open.
pub const BROKER_CONNECTED: &str = "outbox_broker_connected";
/// The broker blocks our publishing connection.
pub const BROKER_BLOCKED: &str = "outbox_broker_blocked";
/// This instance leads.
pub const LEADER: &str = "outbox_leader";
/// Row creation to broker confirm.
pub const PUBLISH_LATENCY: &str = "outbox_publish_latency_seconds";
/// Publishes awaiting their confirm (added to the contract's metrics).
pub const UNCONFIRMED: &str = "outbox_unconfirmed_publishes";

/// Inbox: messages applied, by `consumer`.
pub const INBOX_HANDLED: &str = "outbox_inbox_handled_total";
/// Inbox: duplicates acked without running the handler, by `consumer`.
pub const INBOX_DUPLICATES: &str = "outbox_inbox_duplicates_total";
/// Inbox: failed handler attempts, by `consumer`.
pub const INBOX_HANDLER_FAILURES: &str = "outbox_inbox_handler_failures_total";
/// Inbox: messages sent to the dead-letter queue, by `consumer`.
pub const INBOX_DEAD_LETTERED: &str = "outbox_inbox_dead_lettered_total";

/// Counts `n` rows confirmed and marked sent.
pub(crate) fn record_published(n: u64) {
    metrics::counter!(PUBLISHED).increment(n);
    crate::tally::published(n);
}

/// Counts `n` failed attempts for `reason`.
pub(crate) fn record_failures(reason: &'static str, n: u64) {
    metrics::counter!(PUBLISH_FAILURES, "reason" => reason).increment(n);
    crate::tally::failed(reason, n);
}

/// Records one row's creation-to-confirm latency.
pub(crate) fn record_latency(seconds: f64) {
    metrics::histogram!(PUBLISH_LATENCY).record(seconds);
    crate::tally::latency(seconds);
}

/// Registers every metric with its help text and sets the gauges to zero, so that
/// `/metrics` lists them all from the start.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram, gauge};
    describe_gauge!(PENDING, "rows not yet sent and not dead");
    describe_gauge!(
        OLDEST_PENDING_AGE,
        Unit::Seconds,
        "age of the oldest pending row"
    );
    describe_counter!(PUBLISHED, "rows confirmed by the broker and marked sent");
    describe_counter!(PUBLISH_FAILURES, "failed publish attempts by reason");
    describe_gauge!(DEAD, "rows in the dead state");
    describe_gauge!(BROKER_CONNECTED, "an AMQP connection is open");
    describe_gauge!(
        BROKER_BLOCKED,
        "the broker blocks this relay's publishing connection"
    );
    describe_gauge!(LEADER, "this relay instance holds the table's leadership");
    describe_gauge!(
        UNCONFIRMED,
        "publishes sent and awaiting the broker's confirm (at most OUTBOX_MAX_IN_FLIGHT)"
    );
    describe_histogram!(
        PUBLISH_LATENCY,
        Unit::Seconds,
        "row creation to broker confirm"
    );
    for g in [
        PENDING,
        OLDEST_PENDING_AGE,
        DEAD,
        BROKER_CONNECTED,
        BROKER_BLOCKED,
        LEADER,
        UNCONFIRMED,
    ] {
        gauge!(g).set(0.0);
    }
    metrics::counter!(PUBLISHED).absolute(0);
}
