//! The advisory lock that lets a long job (a backfill, a reconciliation of
//! every user) run only once at a time per database.

use std::future::Future;

use deadpool_postgres::Object;
use tokio_postgres::types::Type;
use tracing::debug;

use super::{backfill::BACKFILL_LOCK_KEY, reconcile::RECONCILE_LOCK_KEY, Store, StoreError};

/// Every key a job locks, for the checks that tell a job's lock from a
/// transaction left open by mistake.
pub(crate) const KEYS: [i64; 2] = [BACKFILL_LOCK_KEY, RECONCILE_LOCK_KEY];

/// Runs `job` while holding the advisory lock `key`, or returns `None` at
/// once when another job holds it.
///
/// The lock is transaction-scoped, held by a transaction left open on a
/// connection of its own until `job` ends. A session-scoped lock would not do
/// behind a pooler in transaction mode: the session that took it goes back to
/// the pooler's pool, keeps the lock, and may be handed to the next job (which
/// then takes it again) while the unlock lands on another session. An open
/// transaction keeps its server connection, and its lock ends with it: at the
/// end of `job`, or, when the caller gives up on this future, with the
/// rollback that dropping the transaction sends.
///
/// The transaction writes nothing and, at read committed, keeps no snapshot
/// between statements, so it holds back no vacuum; it does show as
/// `idle in transaction` for as long as the job runs (`usage-service check`
/// knows these keys), and a server-side `idle_in_transaction_session_timeout`
/// shorter than the job would end it and free the lock early.
pub(crate) async fn run_alone<T, E>(
    store: &Store,
    key: i64,
    job: impl Future<Output = Result<T, E>>,
) -> Result<Option<T>, E>
where
    E: From<StoreError>,
{
    let mut client = store.pool().get().await.map_err(StoreError::from)?;
    let tx = client.transaction().await.map_err(StoreError::from)?;
    let locked: bool = store
        .query_one(
            &tx,
            "SELECT pg_try_advisory_xact_lock($1)",
            &[(&key, Type::INT8)],
        )
        .await?
        .try_get(0)
        .map_err(StoreError::from)?;
    if !locked {
        return Ok(None);
    }

    let result = job.await;

    if let Err(err) = tx.commit().await {
        // The job's own transactions are committed or not whatever happens
        // here; a connection that cannot commit is not given back.
        debug!(cause = %err, key, "ending the job lock's transaction failed");
        drop(Object::take(client));
    }
    result.map(Some)
}
