//! Storage: the connection pool, migrations, and one named SQL statement per
//! operation.
//!
//! Every statement lives in a file under `src/store/sql/` so that the
//! benchmark can hand the very same SQL to `pgbench`. Reserve and Release are
//! each a single statement and so a single round trip: a call cancelled by its
//! client never leaves a transaction open or a change half-applied.

mod admin;
pub mod backfill;
mod batches;
pub mod catalogue;
mod check;
mod coalesce;
mod error;
pub mod holds;
mod job_lock;
mod ledger;
pub mod migrate;
mod pool;
pub mod reconcile;
mod statements;
mod turns;

use std::{sync::Arc, time::Instant};

use deadpool_postgres::{Object, Pool};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::Row;

pub use admin::{EventPage, UsagePage};
pub use check::{CheckOptions, IdleTransaction, LimitBreach, ProductDiscrepancy, Violation};
pub use error::StoreError;
pub use holds::{EventFilter, StoredEvent};
pub use pool::{connect_pool, statement_mode};
pub(crate) use statements::Connection;
pub use statements::StatementMode;

use crate::usage::{Caller, ReleaseOutcome, ReserveAction, ReserveOutcome, Usage};

/// The SQL of each operation, as sent to PostgreSQL.
pub mod sql {
    /// See `sql/reserve.sql`.
    pub const RESERVE: &str = include_str!("sql/reserve.sql");
    /// See `sql/release.sql`.
    pub const RELEASE: &str = include_str!("sql/release.sql");
    /// See `sql/get.sql`.
    pub const GET: &str = include_str!("sql/get.sql");
    /// See `sql/get_many.sql`.
    pub const GET_MANY: &str = include_str!("sql/get_many.sql");
    /// See `sql/write_batch.sql`.
    pub const WRITE_BATCH: &str = include_str!("sql/write_batch.sql");
    /// See `sql/list_all.sql`.
    pub const LIST_ALL: &str = include_str!("sql/list_all.sql");
    /// See `sql/feature_exists.sql`.
    pub const FEATURE_EXISTS: &str = include_str!("sql/feature_exists.sql");
    /// See `sql/check.sql`.
    pub const CHECK: &str = include_str!("sql/check.sql");
    /// See `sql/list_all_by_usage.sql`.
    pub const LIST_ALL_BY_USAGE: &str = include_str!("sql/list_all_by_usage.sql");
    /// See `sql/set_tier.sql`.
    pub const SET_TIER: &str = include_str!("sql/set_tier.sql");
    /// See `sql/set_override.sql`.
    pub const SET_OVERRIDE: &str = include_str!("sql/set_override.sql");
    /// See `sql/clear_override.sql`.
    pub const CLEAR_OVERRIDE: &str = include_str!("sql/clear_override.sql");
    /// See `sql/set_tier_limit.sql`.
    pub const SET_TIER_LIMIT: &str = include_str!("sql/set_tier_limit.sql");
    /// See `sql/summary_tiers.sql`.
    pub const SUMMARY_TIERS: &str = include_str!("sql/summary_tiers.sql");
    /// See `sql/summary_refusals.sql`.
    pub const SUMMARY_REFUSALS: &str = include_str!("sql/summary_refusals.sql");
    /// See `sql/list_events_user.sql`.
    pub const LIST_EVENTS_USER: &str = include_str!("sql/list_events_user.sql");
    /// See `sql/list_events.sql`.
    pub const LIST_EVENTS: &str = include_str!("sql/list_events.sql");
    /// See `sql/check_products.sql`.
    pub const CHECK_PRODUCTS: &str = include_str!("sql/check_products.sql");
    /// See `sql/check_limits.sql`.
    pub const CHECK_LIMITS: &str = include_str!("sql/check_limits.sql");
    /// See `sql/check_idle.sql`.
    pub const CHECK_IDLE: &str = include_str!("sql/check_idle.sql");
    /// See `sql/held_slots.sql`.
    pub const HELD_SLOTS: &str = include_str!("sql/held_slots.sql");
    /// See `sql/usage_by_user.sql`.
    pub const USAGE_BY_USER: &str = include_str!("sql/usage_by_user.sql");
    /// See `sql/catalogue_columns.sql`.
    pub const CATALOGUE_COLUMNS: &str = include_str!("sql/catalogue_columns.sql");
    /// See `sql/catalogue_live_products.sql`.
    pub const CATALOGUE_LIVE_PRODUCTS: &str = include_str!("sql/catalogue_live_products.sql");
    /// See `sql/catalogue_users_after.sql`.
    pub const CATALOGUE_USERS_AFTER: &str = include_str!("sql/catalogue_users_after.sql");
    /// See `sql/catalogue_count_users.sql`.
    pub const CATALOGUE_COUNT_USERS: &str = include_str!("sql/catalogue_count_users.sql");
    /// See `sql/ledger_usage.sql`.
    pub const LEDGER_USAGE: &str = include_str!("sql/ledger_usage.sql");
    /// See `sql/ledger_default_limit.sql`.
    pub const LEDGER_DEFAULT_LIMIT: &str = include_str!("sql/ledger_default_limit.sql");
    /// See `sql/ledger_lock.sql`.
    pub const LEDGER_LOCK: &str = include_str!("sql/ledger_lock.sql");
    /// See `sql/ledger_create_users.sql`.
    pub const LEDGER_CREATE_USERS: &str = include_str!("sql/ledger_create_users.sql");
    /// See `sql/ledger_slots.sql`.
    pub const LEDGER_SLOTS: &str = include_str!("sql/ledger_slots.sql");
    /// See `sql/ledger_audited.sql`.
    pub const LEDGER_AUDITED: &str = include_str!("sql/ledger_audited.sql");
    /// See `sql/ledger_add_slots.sql`.
    pub const LEDGER_ADD_SLOTS: &str = include_str!("sql/ledger_add_slots.sql");
    /// See `sql/ledger_remove_slots.sql`.
    pub const LEDGER_REMOVE_SLOTS: &str = include_str!("sql/ledger_remove_slots.sql");
    /// See `sql/ledger_set_counters.sql`.
    pub const LEDGER_SET_COUNTERS: &str = include_str!("sql/ledger_set_counters.sql");
    /// See `sql/ledger_audit.sql`.
    pub const LEDGER_AUDIT: &str = include_str!("sql/ledger_audit.sql");
    /// See `sql/backfill_checkpoint_get.sql`.
    pub const BACKFILL_CHECKPOINT_GET: &str = include_str!("sql/backfill_checkpoint_get.sql");
    /// See `sql/backfill_checkpoint_set.sql`.
    pub const BACKFILL_CHECKPOINT_SET: &str = include_str!("sql/backfill_checkpoint_set.sql");
    /// See `sql/backfill_checkpoint_clear.sql`.
    pub const BACKFILL_CHECKPOINT_CLEAR: &str = include_str!("sql/backfill_checkpoint_clear.sql");
}

/// A user whose counter disagrees with its ledger or its audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discrepancy {
    /// The user.
    pub user_id: String,
    /// The feature.
    pub feature: String,
    /// What the counter says.
    pub current_usage: i64,
    /// Slots in the ledger.
    pub slots: i64,
    /// Sum of the audit trail's deltas.
    pub audited: i64,
}

/// Access to the counters, the ledger and the audit trail.
///
/// Writes may use every connection of the pool: each waits mostly for its
/// commit's WAL flush, and the more commits are in flight, the more of them
/// one flush makes durable. Reads only use the CPUs, so at most
/// [`reads_in_flight`] of them (ListAll and the like) run at once; more would
/// only make PostgreSQL switch between them, and would take connections the
/// writes can use.
///
/// Reserves and Releases go to PostgreSQL at most [`batches_in_flight`]
/// statements at a time from this process (unless configured otherwise),
/// and so do Gets; the calls that arrive meanwhile are sent together, as one
/// statement, when one of those ends. See [`coalesce`] for how.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    statements: StatementMode,
    reads: Arc<Semaphore>,
    turns: Arc<turns::UserTurns>,
    writes: Arc<coalesce::Coalescer<batches::Writes>>,
    gets: Arc<coalesce::Coalescer<batches::Gets>>,
}

impl Store {
    /// A store over `pool`.
    pub fn new(pool: Pool) -> Self {
        let reads = read_limit(&pool);
        let in_flight = batches_in_flight();
        Self {
            writes: lanes(&pool, "write", in_flight, batches::MAX_BATCH),
            gets: lanes(&pool, "get", in_flight, batches::MAX_BATCH),
            pool,
            statements: StatementMode::default(),
            reads: Arc::new(Semaphore::new(reads)),
            turns: Arc::new(turns::UserTurns::default()),
        }
    }

    /// A store over `pool`, sending its statements as `args` say.
    pub fn configured(pool: Pool, args: &crate::config::DatabaseArgs) -> Self {
        Self::new(pool)
            .with_statement_mode(statement_mode(args))
            .with_batches(
                args.db_batches_in_flight.unwrap_or_else(batches_in_flight),
                args.db_batch_max,
            )
    }

    /// The same store, sending its statements in `mode`.
    pub fn with_statement_mode(self, mode: StatementMode) -> Self {
        Self {
            statements: mode,
            ..self
        }
    }

    /// The same store, with at most `in_flight` statements of writes, and
    /// as many of Gets, in PostgreSQL at once (at most the pool's size), each
    /// sending at most `max` queued calls (1: every call alone).
    pub fn with_batches(self, in_flight: usize, max: usize) -> Self {
        Self {
            writes: lanes(&self.pool, "write", in_flight, max),
            gets: lanes(&self.pool, "get", in_flight, max),
            ..self
        }
    }

    /// Runs one of the store's statements on `conn` (a pooled connection or
    /// a transaction), in the store's mode. Every statement goes this way, so
    /// that behind a pooler none leaves a prepared statement behind.
    pub(crate) async fn query(
        &self,
        conn: &impl Connection,
        sql: &str,
        params: &[statements::Param<'_>],
    ) -> Result<Vec<Row>, StoreError> {
        statements::query(conn, self.statements, sql, params).await
    }

    /// Like [`Store::query`], for a statement returning exactly one row.
    pub(crate) async fn query_one(
        &self,
        conn: &impl Connection,
        sql: &str,
        params: &[statements::Param<'_>],
    ) -> Result<Row, StoreError> {
        statements::exactly_one(self.query(conn, sql, params).await?)
    }

    /// Runs a statement that may safely be sent twice, on a pooled
    /// connection.
    ///
    /// A connection that PostgreSQL closed while it sat idle in the pool (a
    /// restart, an administrator's `pg_terminate_backend`) is only found out
    /// when a statement is sent on it. The connection is then thrown away and
    /// the statement sent once more on a new one, so that the first calls
    /// after such an event do not fail for nothing. Only Reserve, Release and
    /// Get come this way: a product holds at most one slot, so if the first
    /// attempt did reach the database, the second finds its slot (Reserve
    /// answers `already_held`, Release `was_held = false`) and changes nothing.
    /// The one trace such a repeat can leave is a second `denied` audit row
    /// for a refusal.
    async fn query_repeatable(
        &self,
        sql: &str,
        params: &[statements::Param<'_>],
    ) -> Result<Vec<Row>, StoreError> {
        let client = self.connection().await?;
        match statements::query_unclassified(&client, self.statements, sql, params).await {
            Err(err) if error::is_broken_connection(&err) => {
                tracing::debug!(cause = %err, "pooled connection was broken; sending again");
                drop(Object::take(client));
                let client = self.connection().await?;
                self.query(&client, sql, params).await
            }
            result => Ok(result?),
        }
    }

    /// Like [`Store::query_repeatable`], for a statement returning exactly
    /// one row.
    async fn query_one_repeatable(
        &self,
        sql: &str,
        params: &[statements::Param<'_>],
    ) -> Result<Row, StoreError> {
        statements::exactly_one(self.query_repeatable(sql, params).await?)
    }

    /// The pool, for health checks and background jobs.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Waits until fewer than [`reads_in_flight`] reads are running.
    pub(crate) async fn read_turn(&self) -> SemaphorePermit<'_> {
        self.reads
            .acquire()
            .await
            .expect("the semaphore lives as long as the store and is never closed")
    }

    /// Waits until fewer than [`turns::PER_USER`] writes of this process for
    /// the same user and feature are running, for at most the pool's wait
    /// timeout.
    pub(crate) async fn write_turn(
        &self,
        user_id: &str,
        feature: &str,
    ) -> Result<turns::Turn<'_>, StoreError> {
        let wait = self.pool.timeouts().wait;
        self.turns.take(user_id, feature, wait).await
    }

    /// Sends one Reserve or Release, alone or with the calls queued beside
    /// it.
    async fn write(&self, call: batches::WriteCall) -> Result<Row, StoreError> {
        let wait = self.pool.timeouts().wait;
        self.writes
            .submit(&batches::Writes(self.clone()), (), call, wait)
            .await
    }

    /// A pooled connection, timing the wait for it.
    pub(crate) async fn connection(&self) -> Result<Object, StoreError> {
        let started = Instant::now();
        let client = self.pool.get().await;
        crate::metrics::record_pool_wait(started.elapsed());
        Ok(client?)
    }

    /// Takes a slot for `product_id` unless the user is at its limit.
    /// With `hold`, the slot is pending for that long: it must be confirmed
    /// or it is freed.
    pub async fn reserve(
        &self,
        user_id: &str,
        feature: &str,
        product_id: &str,
        action: ReserveAction,
        hold: Option<std::time::Duration>,
        caller: &Caller,
    ) -> Result<ReserveOutcome, StoreError> {
        let hold_secs = hold.map(|ttl| ttl.as_secs_f64());
        let call =
            batches::WriteCall::reserve(user_id, feature, product_id, action, hold_secs, caller);
        let row = self.write(call).await?;

        let outcome: &str = row.try_get("outcome")?;
        let usage = || usage_from_row(user_id, feature, &row);
        match outcome {
            "reserved" => Ok(ReserveOutcome::Reserved(usage()?)),
            "already_held" => Ok(ReserveOutcome::AlreadyHeld(usage()?)),
            "denied" => Ok(ReserveOutcome::Denied(usage()?)),
            "unknown_feature" => Err(StoreError::UnknownFeature(feature.to_owned())),
            other => Err(StoreError::UnexpectedOutcome(other.to_owned())),
        }
    }

    /// Frees the slot `product_id` holds, if it holds one.
    pub async fn release(
        &self,
        user_id: &str,
        feature: &str,
        product_id: &str,
        caller: &Caller,
    ) -> Result<ReleaseOutcome, StoreError> {
        let call = batches::WriteCall::release(user_id, feature, product_id, caller);
        let row = self.write(call).await?;

        let outcome: &str = row.try_get("outcome")?;
        let usage = || usage_from_row(user_id, feature, &row);
        match outcome {
            "released" => Ok(ReleaseOutcome::Released(usage()?)),
            "not_held" => Ok(ReleaseOutcome::NotHeld(usage()?)),
            "unknown_feature" => Err(StoreError::UnknownFeature(feature.to_owned())),
            other => Err(StoreError::UnexpectedOutcome(other.to_owned())),
        }
    }

    /// The usage of one user; a user never seen has zero usage at the
    /// feature's default tier.
    pub async fn get(&self, user_id: &str, feature: &str) -> Result<Usage, StoreError> {
        let key = (user_id.to_owned(), feature.to_owned());
        let wait = self.pool.timeouts().wait;
        self.gets
            .submit(&batches::Gets(self.clone()), (), key, wait)
            .await
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("pool", &self.pool.status())
            .field("statements", &self.statements)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Every user whose counter, ledger and audit trail disagree; empty when
    /// the invariant holds. Reads everything: meant for tests, benchmarks and
    /// operators, not for the hot path.
    pub async fn check_invariants(&self) -> Result<Vec<Discrepancy>, StoreError> {
        let client = self.connection().await?;
        let rows = self.query(&client, sql::CHECK, &[]).await?;
        rows.iter()
            .map(|row| {
                Ok(Discrepancy {
                    user_id: row.try_get("user_id")?,
                    feature: row.try_get("feature_name")?,
                    current_usage: row.try_get("current_usage")?,
                    slots: row.try_get("slots")?,
                    audited: row.try_get("audited")?,
                })
            })
            .collect()
    }
}

/// Most reads run at once: a few per CPU, enough to keep PostgreSQL's CPUs busy
/// while some calls are on the network.
pub fn reads_in_flight() -> usize {
    crate::config::available_cpus() * 4
}

/// Statements of coalesced calls in flight, per kind, unless configured
/// otherwise (`--db-batches-in-flight`): one per CPU. Each statement keeps a
/// CPU of PostgreSQL busy and costs more than the calls it carries, so fewer
/// statements with more calls each serve more calls. On 2 CPUs, spread
/// Reserves and Releases ran at about 3,000 operations per second with 4
/// writes in flight, 3,600 with 2 and 3,900 with 1; Gets at about 20,000 per
/// second with 2 in flight and 12,000 with 8 (`usage-bench`).
pub fn batches_in_flight() -> usize {
    crate::config::available_cpus()
}

/// Reads (ListAll and the like) allowed to run at once on `pool`.
fn read_limit(pool: &Pool) -> usize {
    reads_in_flight().min(pool.status().max_size).max(1)
}

/// The lane of one kind of call, with `in_flight` statements at a time (at
/// most the pool's size) of at most `max_batch` calls each.
fn lanes<B: coalesce::Batch>(
    pool: &Pool,
    kind: &'static str,
    in_flight: usize,
    max_batch: usize,
) -> Arc<coalesce::Coalescer<B>> {
    let at_once = in_flight.min(pool.status().max_size).max(1);
    Arc::new(coalesce::Coalescer::new(kind, at_once, max_batch))
}

/// Reads the `tier`, `current_usage` and `usage_limit` columns.
pub(crate) fn usage_from_row(user_id: &str, feature: &str, row: &Row) -> Result<Usage, StoreError> {
    Ok(Usage {
        user_id: user_id.to_owned(),
        feature: feature.to_owned(),
        tier: row.try_get("tier")?,
        current_usage: row.try_get("current_usage")?,
        usage_limit: row.try_get("usage_limit")?,
        pending: row.try_get("pending")?,
    })
}
