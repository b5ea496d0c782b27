//! Administration: tiers, per-user limit overrides, tier limits, the
//! analytics admins read, and the audit trail.

use std::{fmt, str::FromStr, time::SystemTime};

use super::{FieldViolation, Usage};

/// Longest reason accepted with an administrative change, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

/// Share of the limit from which a user counts as near it in the summary,
/// as a fraction: numerator over denominator (80%).
pub const NEAR_LIMIT: (i64, i64) = (4, 5);

/// The answer to an administrative change of one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserChange {
    /// The change was made and audited.
    Changed(Usage),
    /// The user already was in the asked state: nothing written.
    Unchanged(Usage),
    /// The tier named does not exist for the feature: nothing written.
    UnknownTier(Usage),
}

/// A per-user limit that replaces the tier's while it is in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitOverride {
    /// The limit; `None` is unlimited.
    pub usage_limit: Option<i64>,
    /// When the tier's limit applies again; `None` is until cleared.
    pub expires_at: Option<SystemTime>,
    /// Why, kept in the audit trail.
    pub reason: Option<String>,
}

/// The answer to a change of a tier's limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierLimitChange {
    /// The tier.
    pub tier: String,
    /// The feature.
    pub feature: String,
    /// The tier's limit now; `None` is unlimited.
    pub usage_limit: Option<i64>,
    /// False when the tier already had this limit: nothing written.
    pub changed: bool,
    /// Users whose stored tier limit changed.
    pub users_updated: i64,
}

/// The order of a usage listing. Both are total, so keyset pages are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ListOrder {
    /// By user id, ascending.
    #[default]
    UserId,
    /// By current usage, largest first, then by user id.
    CurrentUsageDesc,
}

/// Which users a usage listing returns.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UsageFilter {
    /// The feature.
    pub feature: String,
    /// Only this tier.
    pub tier: Option<String>,
    /// Only users at or above this fraction of their limit in force.
    pub min_utilization: Option<f64>,
    /// Only users above their limit in force.
    pub over_limit_only: bool,
    /// The order.
    pub order: ListOrder,
}

impl UsageFilter {
    /// The filters in a fixed textual form, bound into page tokens so that a
    /// token is refused with other filters.
    pub fn fingerprint(&self) -> String {
        let order = match self.order {
            ListOrder::UserId => "user_id",
            ListOrder::CurrentUsageDesc => "usage_desc",
        };
        format!(
            "{}|{}|{}|{}|{order}",
            self.feature,
            self.tier.as_deref().unwrap_or(""),
            self.min_utilization
                .map(|u| u.to_string())
                .unwrap_or_default(),
            self.over_limit_only,
        )
    }
}

/// Where a usage page starts: strictly after this row in the listing's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageKey {
    /// The last row's usage (only used when ordered by usage).
    pub current_usage: i64,
    /// The last row's user.
    pub user_id: String,
}

/// Checks a utilization threshold: a fraction from 0 to 1.
pub fn validate_utilization(field: &'static str, value: f64) -> Result<f64, FieldViolation> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(FieldViolation::new(
            field,
            format!("must be between 0 and 1 (0.8 = 80%), got {value}"),
        ))
    }
}

/// Checks a limit: zero or more.
pub fn validate_limit(field: &'static str, value: i64) -> Result<i64, FieldViolation> {
    if value < 0 {
        return Err(FieldViolation::new(
            field,
            format!("must be zero or more (omit it for unlimited), got {value}"),
        ));
    }
    Ok(value)
}

/// Checks a reason: empty means none; at most [`MAX_REASON_BYTES`].
pub fn validate_reason(field: &'static str, value: &str) -> Result<Option<String>, FieldViolation> {
    if value.len() > MAX_REASON_BYTES {
        return Err(FieldViolation::new(
            field,
            format!(
                "must be at most {MAX_REASON_BYTES} bytes, got {}",
                value.len()
            ),
        ));
    }
    Ok((!value.is_empty()).then(|| value.to_owned()))
}

/// What an audit row records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditAction {
    /// A slot taken for a new product.
    Reserve,
    /// A slot taken for a product coming back.
    Restore,
    /// A slot freed.
    Release,
    /// A Reserve refused at the limit.
    Denied,
    /// A user moved to another tier.
    SetTier,
    /// A per-user override set or cleared.
    Override,
    /// A tier's limit changed.
    TierLimit,
    /// A counter corrected to match the ledger.
    Reconcile,
    /// Slots recorded for products that existed before the service.
    Backfill,
    /// A slot taken pending confirmation.
    Hold,
    /// A pending slot made permanent.
    Confirm,
    /// A pending slot freed because nobody confirmed it in time.
    Expire,
}

impl AuditAction {
    /// Every action, in the order the audit trail documents them.
    pub const ALL: [Self; 12] = [
        Self::Reserve,
        Self::Restore,
        Self::Release,
        Self::Denied,
        Self::SetTier,
        Self::Override,
        Self::TierLimit,
        Self::Reconcile,
        Self::Backfill,
        Self::Hold,
        Self::Confirm,
        Self::Expire,
    ];

    /// The action as written in `usage_events.action`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserve => "reserve",
            Self::Restore => "restore",
            Self::Release => "release",
            Self::Denied => "denied",
            Self::SetTier => "set_tier",
            Self::Override => "override",
            Self::TierLimit => "tier_limit",
            Self::Reconcile => "reconcile",
            Self::Backfill => "backfill",
            Self::Hold => "hold",
            Self::Confirm => "confirm",
            Self::Expire => "expire",
        }
    }
}

impl FromStr for AuditAction {
    type Err = FieldViolation;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|action| action.as_str() == value)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|a| a.as_str()).collect();
                FieldViolation::new(
                    "actions",
                    format!(
                        "unknown action {value:?}; expected any of {}",
                        known.join(", ")
                    ),
                )
            })
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which audit rows a listing returns, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventFilter {
    /// Only this user's events; `None` for every user and tier-wide events.
    pub user_id: Option<String>,
    /// The feature.
    pub feature: String,
    /// Only these actions; empty for all.
    pub actions: Vec<AuditAction>,
    /// Only events at or after this instant.
    pub since: Option<SystemTime>,
    /// Only events before this instant.
    pub until: Option<SystemTime>,
}

impl EventFilter {
    /// The filters in a fixed textual form, bound into page tokens.
    pub fn fingerprint(&self) -> String {
        let instant = |t: Option<SystemTime>| {
            t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos().to_string())
                .unwrap_or_default()
        };
        let actions: Vec<&str> = self.actions.iter().map(|a| a.as_str()).collect();
        format!(
            "{}|{}|{}|{}|{}",
            self.user_id.as_deref().unwrap_or(""),
            self.feature,
            actions.join(","),
            instant(self.since),
            instant(self.until),
        )
    }
}

/// One row of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Increases with every row written.
    pub id: i64,
    /// When the change was made.
    pub occurred_at: SystemTime,
    /// The user; `None` for a tier-wide row.
    pub user_id: Option<String>,
    /// The feature.
    pub feature: String,
    /// The product, when there is one.
    pub product_id: Option<String>,
    /// What happened, as written in the table.
    pub action: String,
    /// Change of usage.
    pub delta: i64,
    /// Usage before; `None` for a tier-wide row.
    pub usage_before: Option<i64>,
    /// Usage after; `None` for a tier-wide row.
    pub usage_after: Option<i64>,
    /// The authenticated caller.
    pub actor: Option<String>,
    /// The caller's request id.
    pub request_id: Option<String>,
    /// Administrative changes: the value before.
    pub old_value: Option<String>,
    /// Administrative changes: the value after.
    pub new_value: Option<String>,
    /// The reason given.
    pub reason: Option<String>,
    /// The tier concerned, on override and tier limit rows.
    pub tier: Option<String>,
}

/// Figures of one tier of a feature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierSummary {
    /// The tier.
    pub tier: String,
    /// The tier's limit; `None` is unlimited.
    pub usage_limit: Option<i64>,
    /// Users of the tier.
    pub users: i64,
    /// Slots they hold.
    pub slots: i64,
    /// Users at or over their limit in force.
    pub users_at_limit: i64,
    /// Users at or above [`NEAR_LIMIT`] of their limit in force.
    pub users_near_limit: i64,
}

/// A feature's usage, read from one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The feature.
    pub feature: String,
    /// Every tier of the feature, by name.
    pub tiers: Vec<TierSummary>,
    /// Refusals in the last 24 hours.
    pub refusals_last_24h: i64,
    /// Refusals in the last 7 days.
    pub refusals_last_7d: i64,
    /// The users holding most, largest first.
    pub top_users: Vec<Usage>,
    /// The instant of the snapshot.
    pub computed_at: SystemTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every action parses from its own name, and an unknown one is refused
    /// with the list of known ones.
    #[test]
    fn actions_round_trip() {
        for action in AuditAction::ALL {
            assert_eq!(action.as_str().parse::<AuditAction>(), Ok(action));
        }
        let err = "delete".parse::<AuditAction>().unwrap_err();
        assert!(err.description.contains("set_tier"), "{err:?}");
    }

    /// Utilization outside 0..=1 (and NaN) is refused; limits must not be
    /// negative; reasons are bounded and empty means none.
    #[test]
    fn validates_admin_fields() {
        assert!(validate_utilization("u", 0.0).is_ok());
        assert!(validate_utilization("u", 1.0).is_ok());
        assert!(validate_utilization("u", 1.01).is_err());
        assert!(validate_utilization("u", -0.1).is_err());
        assert!(validate_utilization("u", f64::NAN).is_err());
        assert!(validate_limit("l", -1).is_err());
        assert_eq!(validate_limit("l", 0), Ok(0));
        assert_eq!(validate_reason("r", ""), Ok(None));
        assert!(validate_reason("r", &"x".repeat(MAX_REASON_BYTES + 1)).is_err());
    }
}
