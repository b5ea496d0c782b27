//! The consistency checks that every fault test ends with, and that operators
//! run with `usage-service check`: one implementation for both.
//!
//! * counter = ledger = sum of audit deltas, per user and feature;
//! * each product's audit rows alternate +1/-1 and agree with the ledger, so
//!   no product is counted twice (products repaired by a backfill or a
//!   reconciliation excepted);
//! * no user's usage rose past the limit in force (a user above it after a
//!   downgrade is allowed, as long as it did not grow there);
//! * no session of the database sits `idle in transaction`;
//! * optionally, the Jepsen-style bounds of a client's [`History`].

use std::{fmt, time::Duration};

use tokio_postgres::types::Type;

use super::{job_lock, sql, Discrepancy, Store, StoreError};
use crate::usage::history::{History, HistoryViolation, Observed};

/// How strict [`Store::check`] is.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// A session counts as left `idle in transaction` once it has been so for
    /// this long; zero reports every such session.
    pub idle_in_transaction_after: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            idle_in_transaction_after: Duration::from_secs(1),
        }
    }
}

/// A user whose usage grew past the limit in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitBreach {
    /// The user.
    pub user_id: String,
    /// The feature.
    pub feature: String,
    /// The user's tier.
    pub tier: String,
    /// Usage now.
    pub current_usage: i64,
    /// The limit in force now.
    pub usage_limit: i64,
    /// The first audit row that took the user past it.
    pub event_id: i64,
    /// The usage that row recorded.
    pub usage_after: i64,
}

/// A product whose audit rows count it twice or disagree with the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductDiscrepancy {
    /// The user.
    pub user_id: String,
    /// The feature.
    pub feature: String,
    /// The product.
    pub product_id: String,
    /// Lowest running sum of its audit deltas (should be 0 or 1).
    pub lowest: i64,
    /// Highest running sum of its audit deltas (should be 0 or 1).
    pub highest: i64,
    /// Sum of its audit deltas.
    pub audited: i64,
    /// Whether the ledger holds a slot for it.
    pub held: bool,
}

/// A session left inside an open transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct IdleTransaction {
    /// Its backend process id.
    pub pid: i32,
    /// The `application_name` it connected with.
    pub application_name: String,
    /// `idle in transaction` or `idle in transaction (aborted)`.
    pub state: String,
    /// How long it has been idle.
    pub idle_seconds: f64,
    /// The start of its last statement.
    pub query: String,
}

/// One broken rule, as found by [`Store::check`] or [`Store::check_history`].
#[derive(Debug, Clone, PartialEq)]
pub enum Violation {
    /// Counter, ledger and audit trail disagree for a user.
    Counter(Discrepancy),
    /// A product counted twice, or audited differently from the ledger.
    Product(ProductDiscrepancy),
    /// A user's usage grew past its limit.
    Limit(LimitBreach),
    /// A session left `idle in transaction`.
    IdleInTransaction(IdleTransaction),
    /// The database contradicts what a client was told.
    History(HistoryViolation),
}

impl Store {
    /// Every violation of the rules above (all but the client history);
    /// empty when the data is consistent. Reads every table: meant for tests,
    /// benchmarks and operators, not for the hot path.
    pub async fn check(&self, options: &CheckOptions) -> Result<Vec<Violation>, StoreError> {
        let mut violations: Vec<Violation> = self
            .check_invariants()
            .await?
            .into_iter()
            .map(Violation::Counter)
            .collect();
        let client = self.connection().await?;

        for row in self.query(&client, sql::CHECK_PRODUCTS, &[]).await? {
            violations.push(Violation::Product(ProductDiscrepancy {
                user_id: row.try_get("user_id")?,
                feature: row.try_get("feature_name")?,
                product_id: row.try_get("product_id")?,
                lowest: row.try_get("lowest")?,
                highest: row.try_get("highest")?,
                audited: row.try_get("audited")?,
                held: row.try_get("held")?,
            }));
        }

        for row in self.query(&client, sql::CHECK_LIMITS, &[]).await? {
            violations.push(Violation::Limit(LimitBreach {
                user_id: row.try_get("user_id")?,
                feature: row.try_get("feature_name")?,
                tier: row.try_get("tier")?,
                current_usage: row.try_get("current_usage")?,
                usage_limit: row.try_get("usage_limit")?,
                event_id: row.try_get("event_id")?,
                usage_after: row.try_get("usage_after")?,
            }));
        }

        let idle_after = options.idle_in_transaction_after.as_secs_f64();
        let job_locks = job_lock::KEYS.as_slice();
        for row in self
            .query(
                &client,
                sql::CHECK_IDLE,
                &[(&idle_after, Type::FLOAT8), (&job_locks, Type::INT8_ARRAY)],
            )
            .await?
        {
            violations.push(Violation::IdleInTransaction(IdleTransaction {
                pid: row.try_get("pid")?,
                application_name: row.try_get("application_name")?,
                state: row.try_get("state")?,
                idle_seconds: row.try_get("idle_seconds")?,
                query: row.try_get("query")?,
            }));
        }
        Ok(violations)
    }

    /// The ledger and counters of `feature` as they are now.
    pub async fn observe(&self, feature: &str) -> Result<Observed, StoreError> {
        let client = self.connection().await?;
        let mut observed = Observed::default();
        for row in self
            .query(&client, sql::HELD_SLOTS, &[(&feature, Type::TEXT)])
            .await?
        {
            observed
                .slots
                .insert((row.try_get("user_id")?, row.try_get("product_id")?));
        }
        for row in self
            .query(&client, sql::USAGE_BY_USER, &[(&feature, Type::TEXT)])
            .await?
        {
            observed
                .usage
                .insert(row.try_get("user_id")?, row.try_get("current_usage")?);
        }
        Ok(observed)
    }

    /// Every way the ledger of `feature` contradicts what `history`'s client
    /// was told: lost slots, stray slots, usage outside the bounds.
    pub async fn check_history(
        &self,
        feature: &str,
        history: &History,
    ) -> Result<Vec<Violation>, StoreError> {
        let observed = self.observe(feature).await?;
        Ok(history
            .verify(&observed)
            .into_iter()
            .map(Violation::History)
            .collect())
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Counter(d) => write!(
                f,
                "counter mismatch: user {:?} feature {:?} current_usage={} slots={} audited={}",
                d.user_id, d.feature, d.current_usage, d.slots, d.audited
            ),
            Self::Product(p) => write!(
                f,
                "product miscounted: user {:?} feature {:?} product {:?} running sum {}..={} audited={} held={}",
                p.user_id, p.feature, p.product_id, p.lowest, p.highest, p.audited, p.held
            ),
            Self::Limit(b) => write!(
                f,
                "limit exceeded: user {:?} feature {:?} tier {:?} reached {} (audit row {}) over limit {}, holds {} now",
                b.user_id, b.feature, b.tier, b.usage_after, b.event_id, b.usage_limit, b.current_usage
            ),
            Self::IdleInTransaction(t) => write!(
                f,
                "idle in transaction: pid {} application {:?} state {:?} for {:.1}s, last query {:?}",
                t.pid, t.application_name, t.state, t.idle_seconds, t.query
            ),
            Self::History(h) => h.fmt(f),
        }
    }
}
