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
    /// The database refuses something the relay needs (e.g. Galera and `GET_LOCK`).
    #[error("unsupported database: {0}")]
    Unsupported(&'static str),
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
            | Error::LeaseLost
            | Error::Unsupported(_) => false,
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
        // 40001 serialization failure (a MySQL deadlock too), 40P01 deadlock and 57P0x
        // shutdowns (PostgreSQL); class 08 connection exceptions.
        sqlx::Error::Database(db) => {
            matches!(
                db.code().as_deref(),
                Some("40001" | "40P01" | "57P01" | "57P02" | "57P03")
            ) || db.code().is_some_and(|c| c.starts_with("08"))
                || is_retryable_mysql(db.as_ref())
        }
        _ => false,
    }
}

/// MySQL's transient errors, by number: 1205 lock wait timeout, 1213 deadlock, 1053 server
/// shutdown, 1927 connection killed, 4031 session ended by the server for idleness.
#[cfg(feature = "mysql")]
fn is_retryable_mysql(db: &dyn sqlx::error::DatabaseError) -> bool {
    db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .is_some_and(|e| matches!(e.number(), 1205 | 1213 | 1053 | 1927 | 4031))
}

#[cfg(not(feature = "mysql"))]
fn is_retryable_mysql(_: &dyn sqlx::error::DatabaseError) -> bool {
    false
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
