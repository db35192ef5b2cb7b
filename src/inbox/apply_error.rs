//! Why an attempt to apply a delivery failed, and whether that is the message's fault.

use std::time::Duration;

use super::HandlerError;
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
    /// Not the message's fault: retried without counting an attempt.
    pub(super) fn is_transient(&self) -> bool {
        match self {
            ApplyError::Database(e) => is_retryable_db(e),
            ApplyError::Handler(e) => {
                e.downcast_ref::<sqlx::Error>().is_some_and(is_retryable_db)
                    || e.downcast_ref::<crate::Error>()
                        .is_some_and(crate::Error::is_retryable)
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

/// PostgreSQL's "current transaction is aborted": an earlier statement of the transaction
/// failed, so the handler that reports it is not necessarily the one to blame.
pub(super) fn failed_earlier(e: &HandlerError) -> bool {
    e.downcast_ref::<sqlx::Error>()
        .and_then(|e| e.as_database_error())
        .is_some_and(|db| db.code().as_deref() == Some("25P02"))
}
