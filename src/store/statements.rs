//! How statements reach PostgreSQL: prepared once per connection, or sent
//! unnamed for poolers that cannot keep prepared statements.

use deadpool_postgres::Client;
use tokio_postgres::{
    types::{ToSql, Type},
    Row,
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

/// Runs `sql` with `params` in the given mode.
pub(crate) async fn query(
    client: &Client,
    mode: StatementMode,
    sql: &str,
    params: &[Param<'_>],
) -> Result<Vec<Row>, StoreError> {
    Ok(query_unclassified(client, mode, sql, params).await?)
}

/// Like [`query`], with the driver's error as it is, for callers that look at
/// it before it is classified.
pub(crate) async fn query_unclassified(
    client: &Client,
    mode: StatementMode,
    sql: &str,
    params: &[Param<'_>],
) -> Result<Vec<Row>, tokio_postgres::Error> {
    match mode {
        StatementMode::Prepared => {
            let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
            let statement = client.prepare_typed_cached(sql, &types).await?;
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
