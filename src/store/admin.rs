//! Storage of the administrative operations: tiers, overrides, tier limits,
//! the filtered usage listing, the summary and the audit trail.
//!
//! Each change is one call of a stored function, hence one statement and one
//! transaction; the summary, the one multi-statement transaction, runs in a
//! task of its own.

use std::time::SystemTime;

use deadpool_postgres::Pool;
use tokio_postgres::{IsolationLevel, Row};

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
        let statement = client.prepare_cached(sql::SET_TIER).await?;
        let row = client
            .query_one(
                &statement,
                &[&user_id, &feature, &tier, &caller.actor, &caller.request_id],
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
        let statement = client.prepare_cached(sql::SET_OVERRIDE).await?;
        let row = client
            .query_one(
                &statement,
                &[
                    &user_id,
                    &feature,
                    &limit.usage_limit,
                    &limit.expires_at,
                    &limit.reason,
                    &caller.actor,
                    &caller.request_id,
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
        let statement = client.prepare_cached(sql::CLEAR_OVERRIDE).await?;
        let row = client
            .query_one(
                &statement,
                &[
                    &user_id,
                    &feature,
                    &reason,
                    &caller.actor,
                    &caller.request_id,
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
        let statement = client.prepare_cached(sql::SET_TIER_LIMIT).await?;
        let row = client
            .query_one(
                &statement,
                &[
                    &tier,
                    &feature,
                    &usage_limit,
                    &reason,
                    &caller.actor,
                    &caller.request_id,
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
                let statement = client.prepare_cached(sql::LIST_ALL).await?;
                let after = after.map_or("", |key| key.user_id.as_str());
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
                    &feature,
                    &tier,
                    &filter.min_utilization,
                    &filter.over_limit_only,
                    &after,
                    &limit,
                ];
                client.query(&statement, &params).await?
            }
            ListOrder::CurrentUsageDesc => {
                let statement = client.prepare_cached(sql::LIST_ALL_BY_USAGE).await?;
                let (usage, user) =
                    after.map_or((i64::MAX, ""), |k| (k.current_usage, k.user_id.as_str()));
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
                    &feature,
                    &tier,
                    &filter.min_utilization,
                    &filter.over_limit_only,
                    &usage,
                    &user,
                    &limit,
                ];
                client.query(&statement, &params).await?
            }
        };
        if rows.is_empty() {
            ensure_feature(&client, feature).await?;
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
        let task = tokio::spawn(read_summary(self.pool.clone(), feature.to_owned()));
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
                let statement = client.prepare_cached(sql::LIST_EVENTS_USER).await?;
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
                    &user_id,
                    &feature,
                    &actions,
                    &filter.since,
                    &filter.until,
                    &before,
                    &limit,
                ];
                client.query(&statement, &params).await?
            }
            None => {
                let statement = client.prepare_cached(sql::LIST_EVENTS).await?;
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
                    &feature,
                    &actions,
                    &filter.since,
                    &filter.until,
                    &before,
                    &limit,
                ];
                client.query(&statement, &params).await?
            }
        };
        if rows.is_empty() {
            ensure_feature(&client, feature).await?;
        }

        let events = rows
            .iter()
            .map(event_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let full_page = events.len() as i64 == limit;
        let next = full_page.then(|| events.last().map(|e| e.id)).flatten();
        Ok(EventPage { events, next })
    }
}

/// The summary's three reads, in one repeatable-read, read-only transaction.
async fn read_summary(pool: Pool, feature: String) -> Result<Summary, StoreError> {
    let mut client = pool.get().await?;
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;

    let statement = tx.prepare_cached(sql::SUMMARY_TIERS).await?;
    let (near_num, near_den) = NEAR_LIMIT;
    let rows = tx
        .query(&statement, &[&feature, &near_num, &near_den])
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

    let statement = tx.prepare_cached(sql::SUMMARY_REFUSALS).await?;
    let refusals = tx.query_one(&statement, &[&feature]).await?;

    let statement = tx.prepare_cached(sql::LIST_ALL_BY_USAGE).await?;
    let no_tier: Option<&str> = None;
    let no_utilization: Option<f64> = None;
    let top = tx
        .query(
            &statement,
            &[
                &feature,
                &no_tier,
                &no_utilization,
                &false,
                &i64::MAX,
                &"",
                &TOP_USERS,
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

/// Fails with [`StoreError::UnknownFeature`] unless `feature` exists: an
/// empty page of an unknown feature is a mistake worth reporting.
async fn ensure_feature(
    client: &deadpool_postgres::Client,
    feature: &str,
) -> Result<(), StoreError> {
    let exists = client.prepare_cached(sql::FEATURE_EXISTS).await?;
    let known: bool = client.query_one(&exists, &[&feature]).await?.try_get(0)?;
    if known {
        Ok(())
    } else {
        Err(StoreError::UnknownFeature(feature.to_owned()))
    }
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
