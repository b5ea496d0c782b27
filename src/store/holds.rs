//! Checks, bulk reservations, holds and the event feed: the statements behind
//! Check, ReserveMany, ReleaseMany, Confirm, the hold sweep and WatchUsage.

use std::time::SystemTime;

use tokio_postgres::types::Type;

use super::{usage_from_row, Store, StoreError};
use crate::usage::{
    Caller, ConfirmOutcome, ReleaseManyOutcome, ReserveAction, ReserveManyOutcome, Usage,
};

/// The SQL of each operation, as sent to PostgreSQL.
pub mod sql {
    /// See `sql/check_quota.sql`.
    pub const CHECK_QUOTA: &str = include_str!("sql/check_quota.sql");
    /// See `sql/reserve_many.sql`.
    pub const RESERVE_MANY: &str = include_str!("sql/reserve_many.sql");
    /// See `sql/release_many.sql`.
    pub const RELEASE_MANY: &str = include_str!("sql/release_many.sql");
    /// See `sql/confirm.sql`.
    pub const CONFIRM: &str = include_str!("sql/confirm.sql");
    /// See `sql/expired_holds.sql`.
    pub const EXPIRED_HOLDS: &str = include_str!("sql/expired_holds.sql");
    /// See `sql/expire_holds.sql`.
    pub const EXPIRE_HOLDS: &str = include_str!("sql/expire_holds.sql");
    /// See `sql/events_ids.sql`.
    pub const EVENTS_IDS: &str = include_str!("sql/events_ids.sql");
    /// See `sql/events_by_id.sql`.
    pub const EVENTS_BY_ID: &str = include_str!("sql/events_by_id.sql");
    /// See `sql/events_max_id.sql`.
    pub const EVENTS_MAX_ID: &str = include_str!("sql/events_max_id.sql");
}

/// One row of the audit trail, as the event feed delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// The row's id.
    pub id: i64,
    /// When the change happened.
    pub occurred_at: SystemTime,
    /// The user.
    pub user_id: String,
    /// The feature.
    pub feature: String,
    /// What happened: reserve, release, hold, expire, ...
    pub action: String,
    /// The product, when the event concerns one.
    pub product_id: Option<String>,
    /// Change of usage.
    pub delta: i64,
    /// Usage before the change.
    pub usage_before: i64,
    /// Usage after the change.
    pub usage_after: i64,
    /// The limit in force after the change; `None` when unlimited.
    pub usage_limit: Option<i64>,
    /// Levels before and after, set only when the change crossed a threshold.
    pub levels: Option<(i16, i16)>,
}

/// Filters of the event feed.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only this user.
    pub user_id: Option<String>,
    /// Only this feature.
    pub feature: Option<String>,
    /// Only threshold crossings.
    pub thresholds_only: bool,
}

impl Store {
    /// Whether `quantity` slots could be reserved now, and the usage. Reads
    /// only; expired holds count as free.
    pub async fn check_quota(
        &self,
        user_id: &str,
        feature: &str,
        quantity: i64,
    ) -> Result<(bool, Usage), StoreError> {
        let client = self.connection().await?;
        let row = self
            .query(
                &client,
                sql::CHECK_QUOTA,
                &[
                    (&user_id, Type::TEXT),
                    (&feature, Type::TEXT),
                    (&quantity, Type::INT8),
                ],
            )
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::UnknownFeature(feature.to_owned()))?;
        Ok((
            row.try_get("allowed")?,
            usage_from_row(user_id, feature, &row)?,
        ))
    }

    /// Reserves slots for every product in `product_ids` that holds none, or
    /// for none of them.
    pub async fn reserve_many(
        &self,
        user_id: &str,
        feature: &str,
        product_ids: &[String],
        action: ReserveAction,
        caller: &Caller,
    ) -> Result<ReserveManyOutcome, StoreError> {
        let _turn = self.write_turn(user_id, feature).await?;
        let client = self.connection().await?;
        let row = self
            .query_one(
                &client,
                sql::RESERVE_MANY,
                &[
                    (&user_id, Type::TEXT),
                    (&feature, Type::TEXT),
                    (&product_ids, Type::TEXT_ARRAY),
                    (&action.as_audit_action(), Type::TEXT),
                    (&caller.actor, Type::TEXT),
                    (&caller.request_id, Type::TEXT),
                ],
            )
            .await?;

        let outcome: &str = row.try_get("outcome")?;
        match outcome {
            "reserved" => Ok(ReserveManyOutcome::Reserved {
                usage: usage_from_row(user_id, feature, &row)?,
                reserved: row.try_get("reserved")?,
                already_held: row.try_get("already_held")?,
            }),
            "denied" => Ok(ReserveManyOutcome::Denied {
                usage: usage_from_row(user_id, feature, &row)?,
                requested: row.try_get("requested")?,
                available: row.try_get("available")?,
            }),
            "unknown_feature" => Err(StoreError::UnknownFeature(feature.to_owned())),
            other => Err(StoreError::UnexpectedOutcome(other.to_owned())),
        }
    }

    /// Releases the slots of every product in `product_ids` that holds one.
    pub async fn release_many(
        &self,
        user_id: &str,
        feature: &str,
        product_ids: &[String],
        caller: &Caller,
    ) -> Result<ReleaseManyOutcome, StoreError> {
        let _turn = self.write_turn(user_id, feature).await?;
        let client = self.connection().await?;
        let row = self
            .query_one(
                &client,
                sql::RELEASE_MANY,
                &[
                    (&user_id, Type::TEXT),
                    (&feature, Type::TEXT),
                    (&product_ids, Type::TEXT_ARRAY),
                    (&caller.actor, Type::TEXT),
                    (&caller.request_id, Type::TEXT),
                ],
            )
            .await?;

        let outcome: &str = row.try_get("outcome")?;
        match outcome {
            "released" => Ok(ReleaseManyOutcome {
                usage: usage_from_row(user_id, feature, &row)?,
                released: row.try_get("released")?,
                not_held: row.try_get("not_held")?,
            }),
            "unknown_feature" => Err(StoreError::UnknownFeature(feature.to_owned())),
            other => Err(StoreError::UnexpectedOutcome(other.to_owned())),
        }
    }

    /// Makes the hold of `product_id` permanent, reserving it again if the
    /// hold expired.
    pub async fn confirm(
        &self,
        user_id: &str,
        feature: &str,
        product_id: &str,
        caller: &Caller,
    ) -> Result<ConfirmOutcome, StoreError> {
        let _turn = self.write_turn(user_id, feature).await?;
        let client = self.connection().await?;
        let row = self
            .query_one(
                &client,
                sql::CONFIRM,
                &[
                    (&user_id, Type::TEXT),
                    (&feature, Type::TEXT),
                    (&product_id, Type::TEXT),
                    (&caller.actor, Type::TEXT),
                    (&caller.request_id, Type::TEXT),
                ],
            )
            .await?;

        let outcome: &str = row.try_get("outcome")?;
        let usage = || usage_from_row(user_id, feature, &row);
        match outcome {
            "confirmed" | "already_confirmed" | "already_held" => {
                Ok(ConfirmOutcome::Confirmed(usage()?))
            }
            "re_reserved" => Ok(ConfirmOutcome::ReReserved(usage()?)),
            "denied" => Ok(ConfirmOutcome::Denied(usage()?)),
            "unknown_feature" => Err(StoreError::UnknownFeature(feature.to_owned())),
            other => Err(StoreError::UnexpectedOutcome(other.to_owned())),
        }
    }

    /// Frees the expired holds of up to `max_users` users, one short
    /// transaction (and one row lock) per user. Returns how many holds.
    pub async fn expire_holds(&self, max_users: i64) -> Result<i64, StoreError> {
        let client = self.connection().await?;
        let users = self
            .query(&client, sql::EXPIRED_HOLDS, &[(&max_users, Type::INT8)])
            .await?;
        let mut freed = 0_i64;
        for user in users {
            let user_id: &str = user.try_get("user_id")?;
            let feature: &str = user.try_get("feature_name")?;
            let row = self
                .query_one(
                    &client,
                    sql::EXPIRE_HOLDS,
                    &[(&user_id, Type::TEXT), (&feature, Type::TEXT)],
                )
                .await?;
            freed += i64::from(row.try_get::<_, i32>(0)?);
        }
        Ok(freed)
    }

    /// The newest event id (0 when there is none).
    pub async fn newest_event_id(&self) -> Result<i64, StoreError> {
        let client = self.connection().await?;
        let row = self.query_one(&client, sql::EVENTS_MAX_ID, &[]).await?;
        Ok(row.try_get(0)?)
    }

    /// Ids of the events after `after` and of those among `missing` that have
    /// appeared since, in id order, at most `limit`. Every event, unfiltered:
    /// the feed needs the whole id sequence to tell a gap from a filtered row.
    pub async fn event_ids(
        &self,
        after: i64,
        missing: &[i64],
        limit: i64,
    ) -> Result<Vec<i64>, StoreError> {
        let client = self.connection().await?;
        let rows = self
            .query(
                &client,
                sql::EVENTS_IDS,
                &[
                    (&after, Type::INT8),
                    (&missing, Type::INT8_ARRAY),
                    (&limit, Type::INT8),
                ],
            )
            .await?;
        rows.iter().map(|row| Ok(row.try_get(0)?)).collect()
    }

    /// The events among `ids` that pass `filter`, in id order.
    pub async fn events_by_id(
        &self,
        ids: &[i64],
        filter: &EventFilter,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let client = self.connection().await?;
        let rows = self
            .query(
                &client,
                sql::EVENTS_BY_ID,
                &[
                    (&ids, Type::INT8_ARRAY),
                    (&filter.user_id, Type::TEXT),
                    (&filter.feature, Type::TEXT),
                    (&filter.thresholds_only, Type::BOOL),
                ],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let before: Option<i16> = row.try_get("level_before")?;
                let after: Option<i16> = row.try_get("level_after")?;
                Ok(StoredEvent {
                    id: row.try_get("id")?,
                    occurred_at: row.try_get("occurred_at")?,
                    user_id: row.try_get("user_id")?,
                    feature: row.try_get("feature_name")?,
                    action: row.try_get("action")?,
                    product_id: row.try_get("product_id")?,
                    delta: row.try_get("delta")?,
                    usage_before: row.try_get("usage_before")?,
                    usage_after: row.try_get("usage_after")?,
                    usage_limit: row.try_get("usage_limit")?,
                    levels: before.zip(after),
                })
            })
            .collect()
    }
}
