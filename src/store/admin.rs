//! Storage of the administrative operations: tiers, overrides, tier limits,
//! the filtered usage listing, the summary and the audit trail.
//!
//! Each change is one call of a stored function, hence one statement and one
//! transaction; the summary, the one multi-statement transaction, runs in a
//! task of its own.

use std::time::SystemTime;

use deadpool_postgres::Object;
use tokio_postgres::{types::Type, IsolationLevel, Row};

use super::{sql, usage_from_row, Store, StoreError};
use crate::usage::{
    admin::{
        AuditEvent, EventFilter, LimitOverride, ListOrder, Summary, TierLimitChange, TierSummary,
        UsageFilter, UsageKey, UserChange, NEAR_LIMIT,
    },
    Caller, Usage,
};

/// How many users the summary names.
const TOP_USERS: i64 = 10;

/// One page of [`Store::list_all`].
#[derive(Debug, Clone)]
pub struct UsagePage {
    /// The rows of this page, in the listing's order.
    pub usages: Vec<Usage>,
    /// The key of the last row when more rows may follow.
    pub next: Option<UsageKey>,
}

/// One page of [`Store::list_events`].
#[derive(Debug, Clone)]
pub struct EventPage {
    /// The events of this page, newest first.
    pub events: Vec<AuditEvent>,
    /// The id of the last event when more may follow.
    pub next: Option<i64>,
}

impl Store {
    /// Moves a user to `tier`, creating its row if needed.
    pub async fn set_tier(
        &self,
        user_id: &str,
        feature: &str,
        tier: &str,
        caller: &Caller,
    ) -> Result<UserChange, StoreError> {
        let client = self.connection().await?;
        let row = self
            .query_one(
                &client,
                sql::SET_TIER,
                &[
                    (&user_id, Type::TEXT),
                    (&feature, Type::TEXT),
                    (&tier, Type::TEXT),
                    (&caller.actor, Type::TEXT),
                    (&caller.request_id, Type::TEXT),
                ],
            )
            .await?;
        user_change(user_id, feature, &row)
    }

    /// Sets a user's limit override, creating its row if needed.
    pub async fn set_override(
        &self,
        user_id: &str,
        feature: &str,
        limit: &LimitOverride,
        caller: &Caller,
    ) -> Result<UserChange, StoreError> {
        let client = self.connection().await?;
        let row = self
            .query_one(
                &client,
                sql::SET_OVERRIDE,
                &[
                    (&user_id, Type::TEXT),
                    (&feature, Type::TEXT),
                    (&limit.usage_limit, Type::INT8),
                    (&limit.expires_at, Type::TIMESTAMPTZ),
                    (&limit.reason, Type::TEXT),
                    (&caller.actor, Type::TEXT),
                    (&caller.request_id, Type::TEXT),
                ],
            )
            .await?;
        user_change(user_id, feature, &row)
    }

    /// Removes a user's limit override, if it has one.
    pub async fn clear_override(
        &self,
        user_id: &str,
        feature: &str,
        reason: Option<&str>,
        caller: &Caller,
    ) -> Result<UserChange, StoreError> {
        let client = self.connection().await?;
        let row = self
            .query_one(
                &client,
                sql::CLEAR_OVERRIDE,
                &[
                    (&user_id, Type::TEXT),
                    (&feature, Type::TEXT),
                    (&reason, Type::TEXT),
                    (&caller.actor, Type::TEXT),
                    (&caller.request_id, Type::TEXT),
                ],
            )
            .await?;
        user_change(user_id, feature, &row)
    }

    /// Sets the limit of `tier` (creating the tier when new) for every user
    /// of that tier, in one transaction.
    pub async fn set_tier_limit(
        &self,
        tier: &str,
        feature: &str,
        usage_limit: Option<i64>,
        reason: Option<&str>,
        caller: &Caller,
    ) -> Result<TierLimitChange, StoreError> {
        let client = self.connection().await?;
        let row = self
            .query_one(
                &client,
                sql::SET_TIER_LIMIT,
                &[
                    (&tier, Type::TEXT),
                    (&feature, Type::TEXT),
                    (&usage_limit, Type::INT8),
                    (&reason, Type::TEXT),
                    (&caller.actor, Type::TEXT),
                    (&caller.request_id, Type::TEXT),
                ],
            )
            .await?;

        let changed = match row.try_get::<_, &str>("outcome")? {
            "changed" => true,
            "unchanged" => false,
            "unknown_feature" => return Err(StoreError::UnknownFeature(feature.to_owned())),
            other => return Err(StoreError::UnexpectedOutcome(other.to_owned())),
        };
        Ok(TierLimitChange {
            tier: tier.to_owned(),
            feature: feature.to_owned(),
            usage_limit,
            changed,
            users_updated: row.try_get("users_updated")?,
        })
    }

    /// Up to `limit` users matching `filter`, strictly after `after` in the
    /// filter's order.
    pub async fn list_all(
        &self,
        filter: &UsageFilter,
        after: Option<&UsageKey>,
        limit: i64,
    ) -> Result<UsagePage, StoreError> {
        let _turn = self.read_turn().await;
        let client = self.connection().await?;
        let feature = filter.feature.as_str();
        let tier = filter.tier.as_deref();
        let rows = match filter.order {
            ListOrder::UserId => {
                let after = after.map_or("", |key| key.user_id.as_str());
                self.query(
                    &client,
                    sql::LIST_ALL,
                    &[
                        (&feature, Type::TEXT),
                        (&tier, Type::TEXT),
                        (&filter.min_utilization, Type::FLOAT8),
                        (&filter.over_limit_only, Type::BOOL),
                        (&after, Type::TEXT),
                        (&limit, Type::INT8),
                    ],
                )
                .await?
            }
            ListOrder::CurrentUsageDesc => {
                let (usage, user) =
                    after.map_or((i64::MAX, ""), |k| (k.current_usage, k.user_id.as_str()));
                self.query(
                    &client,
                    sql::LIST_ALL_BY_USAGE,
                    &[
                        (&feature, Type::TEXT),
                        (&tier, Type::TEXT),
                        (&filter.min_utilization, Type::FLOAT8),
                        (&filter.over_limit_only, Type::BOOL),
                        (&usage, Type::INT8),
                        (&user, Type::TEXT),
                        (&limit, Type::INT8),
                    ],
                )
                .await?
            }
        };
        if rows.is_empty() {
            self.ensure_feature(&client, feature).await?;
        }

        let usages = usages_from_rows(feature, &rows)?;
        let full_page = usages.len() as i64 == limit;
        let next = full_page
            .then(|| usages.last())
            .flatten()
            .map(|last| UsageKey {
                current_usage: last.current_usage,
                user_id: last.user_id.clone(),
            });
        Ok(UsagePage { usages, next })
    }

    /// Per-tier figures, recent refusals and the heaviest users of
    /// `feature`, all read from one snapshot so that they agree with each
    /// other. The read-only transaction runs in a task of its own, so a
    /// caller that goes away cannot leave it open.
    pub async fn summary(&self, feature: &str) -> Result<Summary, StoreError> {
        let task = tokio::spawn(read_summary(self.clone(), feature.to_owned()));
        match task.await {
            Ok(result) => result,
            Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
            Err(err) => Err(StoreError::Unavailable(format!("summary task: {err}"))),
        }
    }

    /// Up to `limit` audit rows matching `filter`, newest first, with ids
    /// below `before`.
    pub async fn list_events(
        &self,
        filter: &EventFilter,
        before: Option<i64>,
        limit: i64,
    ) -> Result<EventPage, StoreError> {
        let client = self.connection().await?;
        let feature = filter.feature.as_str();
        let actions: Option<Vec<&str>> = (!filter.actions.is_empty())
            .then(|| filter.actions.iter().map(|a| a.as_str()).collect());
        let before = before.unwrap_or(i64::MAX);
        let rows = match filter.user_id.as_deref() {
            Some(user_id) => {
                self.query(
                    &client,
                    sql::LIST_EVENTS_USER,
                    &[
                        (&user_id, Type::TEXT),
                        (&feature, Type::TEXT),
                        (&actions, Type::TEXT_ARRAY),
                        (&filter.since, Type::TIMESTAMPTZ),
                        (&filter.until, Type::TIMESTAMPTZ),
                        (&before, Type::INT8),
                        (&limit, Type::INT8),
                    ],
                )
                .await?
            }
            None => {
                self.query(
                    &client,
                    sql::LIST_EVENTS,
                    &[
                        (&feature, Type::TEXT),
                        (&actions, Type::TEXT_ARRAY),
                        (&filter.since, Type::TIMESTAMPTZ),
                        (&filter.until, Type::TIMESTAMPTZ),
                        (&before, Type::INT8),
                        (&limit, Type::INT8),
                    ],
                )
                .await?
            }
        };
        if rows.is_empty() {
            self.ensure_feature(&client, feature).await?;
        }

        let events = rows
            .iter()
            .map(event_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let full_page = events.len() as i64 == limit;
        let next = full_page.then(|| events.last().map(|e| e.id)).flatten();
        Ok(EventPage { events, next })
    }

    /// Fails with [`StoreError::UnknownFeature`] unless `feature` exists: an
    /// empty page of an unknown feature is a mistake worth reporting.
    async fn ensure_feature(&self, client: &Object, feature: &str) -> Result<(), StoreError> {
        let known: bool = self
            .query_one(client, sql::FEATURE_EXISTS, &[(&feature, Type::TEXT)])
            .await?
            .try_get(0)?;
        if known {
            Ok(())
        } else {
            Err(StoreError::UnknownFeature(feature.to_owned()))
        }
    }
}

/// The summary's three reads, in one repeatable-read, read-only transaction.
async fn read_summary(store: Store, feature: String) -> Result<Summary, StoreError> {
    let mut client = store.pool().get().await?;
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;

    let (near_num, near_den) = NEAR_LIMIT;
    let rows = store
        .query(
            &tx,
            sql::SUMMARY_TIERS,
            &[
                (&feature, Type::TEXT),
                (&near_num, Type::INT8),
                (&near_den, Type::INT8),
            ],
        )
        .await?;
    if rows.is_empty() {
        return Err(StoreError::UnknownFeature(feature));
    }
    let tiers = rows
        .iter()
        .map(|row| {
            Ok(TierSummary {
                tier: row.try_get("tier")?,
                usage_limit: row.try_get("usage_limit")?,
                users: row.try_get("users")?,
                slots: row.try_get("slots")?,
                users_at_limit: row.try_get("users_at_limit")?,
                users_near_limit: row.try_get("users_near_limit")?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;

    let refusals = store
        .query_one(&tx, sql::SUMMARY_REFUSALS, &[(&feature, Type::TEXT)])
        .await?;

    let no_tier: Option<&str> = None;
    let no_utilization: Option<f64> = None;
    let top = store
        .query(
            &tx,
            sql::LIST_ALL_BY_USAGE,
            &[
                (&feature, Type::TEXT),
                (&no_tier, Type::TEXT),
                (&no_utilization, Type::FLOAT8),
                (&false, Type::BOOL),
                (&i64::MAX, Type::INT8),
                (&"", Type::TEXT),
                (&TOP_USERS, Type::INT8),
            ],
        )
        .await?;
    let top_users = usages_from_rows(&feature, &top)?;
    tx.commit().await?;

    Ok(Summary {
        feature,
        tiers,
        refusals_last_24h: refusals.try_get("last_24h")?,
        refusals_last_7d: refusals.try_get("last_7d")?,
        top_users,
        computed_at: refusals.try_get::<_, SystemTime>("computed_at")?,
    })
}

/// Reads the answer of a stored function changing one user.
fn user_change(user_id: &str, feature: &str, row: &Row) -> Result<UserChange, StoreError> {
    let usage = || usage_from_row(user_id, feature, row);
    match row.try_get::<_, &str>("outcome")? {
        "changed" => Ok(UserChange::Changed(usage()?)),
        "unchanged" => Ok(UserChange::Unchanged(usage()?)),
        "unknown_tier" => Ok(UserChange::UnknownTier(usage()?)),
        "unknown_feature" => Err(StoreError::UnknownFeature(feature.to_owned())),
        other => Err(StoreError::UnexpectedOutcome(other.to_owned())),
    }
}

/// Reads rows with a `user_id` column besides the usage columns.
fn usages_from_rows(feature: &str, rows: &[Row]) -> Result<Vec<Usage>, StoreError> {
    rows.iter()
        .map(|row| {
            let user_id: String = row.try_get("user_id")?;
            usage_from_row(&user_id, feature, row)
        })
        .collect()
}

/// Reads one `usage_events` row.
fn event_from_row(row: &Row) -> Result<AuditEvent, StoreError> {
    Ok(AuditEvent {
        id: row.try_get("id")?,
        occurred_at: row.try_get("occurred_at")?,
        user_id: row.try_get("user_id")?,
        feature: row.try_get("feature_name")?,
        product_id: row.try_get("product_id")?,
        action: row.try_get("action")?,
        delta: row.try_get("delta")?,
        usage_before: row.try_get("usage_before")?,
        usage_after: row.try_get("usage_after")?,
        actor: row.try_get("actor")?,
        request_id: row.try_get("request_id")?,
        old_value: row.try_get("old_value")?,
        new_value: row.try_get("new_value")?,
        reason: row.try_get("reason")?,
        tier: row.try_get("tier")?,
    })
}
