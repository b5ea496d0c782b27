//! Schema migrations, embedded in the binary from `migrations/`.

use anyhow::Context as _;
use deadpool_postgres::Pool;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Advisory lock key held while migrating, so that replicas starting together
/// apply each migration once: the others wait, then find nothing to do.
const MIGRATION_LOCK_KEY: i64 = 0x7573_6167_655f_6d31; // "usage_m1"

/// Applies every migration not yet applied, each in its own transaction, and
/// returns how many ran.
pub async fn run(pool: &Pool) -> anyhow::Result<usize> {
    let mut client = pool.get().await.context("connecting to run migrations")?;
    let client: &mut tokio_postgres::Client = &mut client;

    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .context("taking the migration lock")?;
    let report = embedded::migrations::runner().run_async(client).await;
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .context("releasing the migration lock")?;

    let report = report.context("applying migrations")?;
    Ok(report.applied_migrations().len())
}
