//! The connection pool.

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::config::DatabaseArgs;

/// How the configuration asks statements to be sent.
pub fn statement_mode(args: &DatabaseArgs) -> super::StatementMode {
    if args.db_unnamed_statements {
        super::StatementMode::Unnamed
    } else {
        super::StatementMode::Prepared
    }
}

/// Builds a pool from the configuration. Connections open lazily, so this
/// succeeds even while the database is down; every wait has a bound, so an
/// exhausted pool or an absent database fails a call quickly instead of
/// hanging it.
pub fn connect_pool(args: &DatabaseArgs) -> anyhow::Result<Pool> {
    use anyhow::Context as _;

    let mut pg: tokio_postgres::Config = args
        .database_url
        .parse()
        .with_context(|| format!("invalid DATABASE_URL {}", args.redacted_url()))?;
    pg.connect_timeout(args.db_connect_timeout);
    pg.application_name("usage-service");
    pg.options(format!(
        "-c statement_timeout={}",
        args.db_statement_timeout.as_millis()
    ));

    // Fast recycling only checks that the connection task is alive; a
    // connection that broke is noticed by the failing call and dropped then.
    let manager = Manager::from_config(
        pg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(args.db_pool_size)
        .wait_timeout(Some(args.db_pool_wait_timeout))
        .create_timeout(Some(args.db_connect_timeout))
        .recycle_timeout(Some(args.db_recycle_timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .context("building the connection pool")
}
