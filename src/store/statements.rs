//! How statements reach PostgreSQL: prepared once per connection, or sent
//! unnamed for poolers that cannot keep prepared statements.

use deadpool_postgres::{Object, StatementCache, Transaction};
use tokio_postgres::{
    types::{ToSql, Type},
    Client, Row,
};

use super::StoreError;

/// How the store sends its statements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StatementMode {
    /// Each statement is prepared once per connection and reused: the
    /// default, and the fastest when the service talks to PostgreSQL or to a
    /// pooler that keeps prepared statements (PgBouncer 1.21 or later with
    /// `max_prepared_statements` set).
    #[default]
    Prepared,
    /// Each call parses, binds and executes the unnamed statement in a
    /// single round trip, so nothing outlives the call on the server
    /// connection: needed behind a pooler in transaction mode that hands
    /// each transaction a different server connection and does not track
    /// prepared statements (PgBouncer before 1.21).
    Unnamed,
}

/// A parameter and its PostgreSQL type (types are given, never inferred, so
/// that the unnamed form needs no round trip to describe the statement).
pub(crate) type Param<'a> = (&'a (dyn ToSql + Sync), Type);

/// Where statements can be sent: a pooled connection, or a transaction open
/// on one. Both reach the same driver client (a transaction's statements are
/// sent through it too) and the same cache of the connection's prepared
/// statements.
pub(crate) trait Connection: Sync {
    /// The driver's client of the connection.
    fn client(&self) -> &Client;

    /// The statements already prepared on the connection.
    fn statement_cache(&self) -> &StatementCache;
}

impl Connection for Object {
    fn client(&self) -> &Client {
        self
    }

    fn statement_cache(&self) -> &StatementCache {
        &self.statement_cache
    }
}

impl Connection for Transaction<'_> {
    fn client(&self) -> &Client {
        tokio_postgres::Transaction::client(self)
    }

    fn statement_cache(&self) -> &StatementCache {
        &self.statement_cache
    }
}

/// Runs `sql` with `params` in the given mode.
pub(crate) async fn query(
    conn: &impl Connection,
    mode: StatementMode,
    sql: &str,
    params: &[Param<'_>],
) -> Result<Vec<Row>, StoreError> {
    Ok(query_unclassified(conn, mode, sql, params).await?)
}

/// Like [`query`], with the driver's error as it is, for callers that look at
/// it before it is classified.
pub(crate) async fn query_unclassified(
    conn: &impl Connection,
    mode: StatementMode,
    sql: &str,
    params: &[Param<'_>],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    let client = conn.client();
    match mode {
        StatementMode::Prepared => {
            let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
            let statement = conn
                .statement_cache()
                .prepare_typed(client, sql, &types)
                .await?;
            let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
            client.query(&statement, &values).await
        }
        StatementMode::Unnamed => client.query_typed(sql, params).await,
    }
}

/// The one row of a statement that returns exactly one.
pub(crate) fn exactly_one(mut rows: Vec<Row>) -> Result<Row, StoreError> {
    match rows.len() {
        1 => Ok(rows.remove(0)),
        n => Err(StoreError::UnexpectedOutcome(format!(
            "{n} rows where one was expected"
        ))),
    }
}
