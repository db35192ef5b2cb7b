//! The library's error type.

/// What can go wrong in the library.
///
/// Each variant's message describes this layer; the cause is the `source`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A database query or connection failed.
    #[error("database error")]
    Database(#[source] sqlx::Error),
    /// The AMQP connection or channel failed.
    #[error("broker error")]
    Broker(#[source] lapin::Error),
    /// A table name is not a plain SQL identifier.
    #[error(
        "invalid table name {0:?}: use 1-48 letters, digits or underscores, not starting with a digit"
    )]
    InvalidTable(String),
    /// A URL names a scheme this build does not support.
    #[error("unsupported database URL scheme {0:?} (expected postgres:// or mysql://)")]
    UnsupportedDatabase(String),
    /// A message could not be encoded.
    #[error("message could not be encoded")]
    Json(#[source] serde_json::Error),
    /// The database did not answer in time.
    #[error("no answer from the database within {0:?}")]
    Timeout(std::time::Duration),
    /// Another relay has led the table since this one's term began: its marks change nothing.
    #[error("this relay no longer leads the table")]
    LeaseLost,
}

impl Error {
    /// Whether trying the same operation again later may succeed.
    ///
    /// Lost connections, timeouts, deadlocks and serialization failures are retryable;
    /// a bad table name, a constraint violation or bad SQL is not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Database(e) => is_retryable_db(e),
            Error::Broker(_) | Error::Timeout(_) => true,
            Error::InvalidTable(_)
            | Error::UnsupportedDatabase(_)
            | Error::Json(_)
            | Error::LeaseLost => false,
        }
    }
}

/// Whether a database error is worth retrying (lost connection, deadlock, serialization).
pub(crate) fn is_retryable_db(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        // 40001 serialization failure, 40P01 deadlock (PostgreSQL); 1213 deadlock and 1205
        // lock wait timeout (MySQL); class 08 connection exceptions; 57P01 admin shutdown.
        sqlx::Error::Database(db) => {
            matches!(
                db.code().as_deref(),
                Some("40001" | "40P01" | "57P01" | "57P02" | "57P03" | "1213" | "1205")
            ) || db.code().is_some_and(|c| c.starts_with("08"))
        }
        _ => false,
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Database(e)
    }
}

impl From<lapin::Error> for Error {
    fn from(e: lapin::Error) -> Self {
        Error::Broker(e)
    }
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
