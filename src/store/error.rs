//! What can go wrong talking to the database, classified for the transport.

use deadpool_postgres::PoolError;
use tokio_postgres::error::SqlState;

/// A failure of the storage layer.
///
/// The transport maps [`StoreError::UnknownFeature`] to `INVALID_ARGUMENT`,
/// [`StoreError::Unavailable`] and [`StoreError::Contention`] to
/// `UNAVAILABLE` (safe to retry: Reserve and Release are idempotent) and
/// everything else to `INTERNAL`. The cause is logged server-side, never
/// sent to the caller.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request names a feature that has no row in `features`.
    #[error("unknown feature {0:?}")]
    UnknownFeature(String),

    /// The database could not be reached, a connection broke, the pool had no
    /// connection free in time, or a statement ran out of time.
    #[error("database unavailable: {0}")]
    Unavailable(String),

    /// PostgreSQL gave up on the statement's transaction because of another
    /// one: a deadlock, a serialization failure, or a lock waited for longer
    /// than `lock_timeout`. Nothing was committed, and the database is
    /// there: the same work can be tried again at once, or in smaller parts.
    #[error("database contention: {0}")]
    Contention(String),

    /// A statement failed for a reason retrying will not fix. Its message
    /// carries PostgreSQL's own (tokio-postgres only says "db error").
    #[error("database error: {}{}", .0, server_message(.0))]
    Database(#[source] tokio_postgres::Error),

    /// A stored function answered with an outcome this code does not know:
    /// the schema and the binary disagree.
    #[error("unexpected outcome {0:?} from the database")]
    UnexpectedOutcome(String),
}

impl StoreError {
    /// True for failures worth retrying once the database is back.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Contention(_))
    }
}

impl From<PoolError> for StoreError {
    fn from(err: PoolError) -> Self {
        match err {
            PoolError::Backend(err) => err.into(),
            other => Self::Unavailable(other.to_string()),
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(err: tokio_postgres::Error) -> Self {
        if is_contention(&err) {
            Self::Contention(err.to_string())
        } else if is_transient(&err) {
            Self::Unavailable(err.to_string())
        } else {
            Self::Database(err)
        }
    }
}

/// `: <message> (SQLSTATE <code>)` for an error PostgreSQL reported, empty
/// otherwise.
fn server_message(err: &tokio_postgres::Error) -> String {
    err.as_db_error().map_or_else(String::new, |db| {
        format!(": {} (SQLSTATE {})", db.message(), db.code().code())
    })
}

/// True when `err` says the connection itself is gone (closed by the server,
/// the network, or an administrator's `pg_terminate_backend`), as opposed to a
/// statement that failed on a working connection.
pub(crate) fn is_broken_connection(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    match err.code() {
        // No SQLSTATE: the error came from the socket, not from a statement.
        None => true,
        Some(code) => {
            code.code().starts_with("08")
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
        }
    }
}

/// Connection failures and the errors PostgreSQL raises when it goes away, is
/// shutting down or cancels a statement: nothing was committed, and the same
/// call can succeed later.
fn is_transient(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    let Some(code) = err.code() else {
        // No SQLSTATE: the error came from the connection, not from a statement.
        return true;
    };
    let class = &code.code()[..2];
    class == "08" // connection exception
        || class == "57" // operator intervention: shutdown, terminated, cancelled
        || class == "53" // insufficient resources: too many connections
}

/// A transaction aborted because of other transactions, not because the
/// database is unwell.
fn is_contention(err: &tokio_postgres::Error) -> bool {
    err.code().is_some_and(|code| {
        *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::LOCK_NOT_AVAILABLE
    })
}
