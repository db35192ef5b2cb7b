//! Why an attempt to apply a delivery failed, and whether that is the message's fault.

use std::time::Duration;

use super::HandlerError;
use super::database::Backend;
use crate::error::is_retryable_db;

/// Why an attempt failed.
pub(super) enum ApplyError {
    /// The inbox's own statements failed.
    Database(sqlx::Error),
    /// The handler returned an error.
    Handler(HandlerError),
    /// The handler returned success, but the transaction no longer held its inbox records.
    Aborted,
    /// The transaction did not finish within `transaction_timeout`.
    Timeout(Duration),
    /// Shutdown came while waiting for a connection: nothing was attempted.
    Stopped,
}

impl ApplyError {
    /// Not the message's fault (a lost connection, a deadlock, a lock wait that timed out,
    /// on either backend): retried without counting an attempt.
    pub(super) fn is_transient(&self) -> bool {
        match self {
            ApplyError::Database(e) => is_retryable_db(e),
            ApplyError::Handler(e) => {
                if let Some(e) = e.downcast_ref::<sqlx::Error>() {
                    return is_retryable_db(e);
                }
                match e.downcast_ref::<crate::Error>() {
                    Some(crate::Error::Database(e)) => is_retryable_db(e),
                    Some(e) => e.is_retryable(),
                    None => false,
                }
            }
            ApplyError::Aborted => false,
            ApplyError::Timeout(_) | ApplyError::Stopped => true,
        }
    }
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Database(e) => write!(f, "inbox database error: {e}"),
            ApplyError::Handler(e) => write!(f, "handler failed: {e}"),
            ApplyError::Aborted => {
                f.write_str("the handler swallowed a database error: the transaction was aborted")
            }
            ApplyError::Timeout(limit) => {
                write!(f, "the inbox transaction did not finish within {limit:?}")
            }
            ApplyError::Stopped => f.write_str("shutting down: not attempted"),
        }
    }
}

/// An earlier statement of the transaction failed (PostgreSQL's "current transaction is
/// aborted"), so the handler that reports it is not necessarily the one to blame.
pub(super) fn failed_earlier<DB: Backend>(e: &HandlerError) -> bool {
    e.downcast_ref::<sqlx::Error>()
        .is_some_and(DB::failed_earlier)
}
