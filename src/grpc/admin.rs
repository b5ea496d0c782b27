//! Handlers of the administrative RPCs (tiers, overrides, tier limits, the
//! filtered listing, the summary and the audit trail): validate, call the
//! store, map the answer.

use std::time::SystemTime;

use tonic::{Request, Response, Status};
use tracing::{debug, info};

use super::{page_token::PageToken, service::MAX_PAGE_SIZE, status, validate};
use crate::{
    proto,
    store::Store,
    usage::{
        admin::{
            self, AuditAction, AuditEvent, EventFilter, LimitOverride, ListOrder, Summary,
            TierSummary, UsageFilter, UsageKey, UserChange,
        },
        FieldViolation, Usage,
    },
};

/// Page size used when a request asks for none.
const DEFAULT_PAGE_SIZE: i32 = 100;

/// `ListAll`: one keyset page of a feature's users, filtered and ordered.
pub(super) async fn list_all(
    store: &Store,
    request: Request<proto::ListAllRequest>,
) -> Result<Response<proto::ListAllResponse>, Status> {
    let request = request.into_inner();

    let mut violations = validate::Violations::default();
    let filter = usage_filter(&mut violations, &request);
    let page_size = page_size(&mut violations, request.page_size);
    let fingerprint = filter.fingerprint();
    let order = filter.order;
    let after = page_start(&mut violations, &request.page_token, &fingerprint, |key| {
        usage_key_from_token(order, key)
    });
    violations.check()?;
    tracing::Span::current().record("feature", filter.feature.as_str());

    let page = store
        .list_all(&filter, after.as_ref(), i64::from(page_size))
        .await
        .map_err(status::from_store)?;
    let next_page_token = page.next.map_or_else(String::new, |key| {
        PageToken {
            filters: fingerprint,
            last_key: usage_key_to_token(order, key),
        }
        .encode()
    });
    Ok(Response::new(proto::ListAllResponse {
        usages: page.usages.into_iter().map(Into::into).collect(),
        next_page_token,
    }))
}

/// The filters and order of a ListAll request.
fn usage_filter(
    violations: &mut validate::Violations,
    request: &proto::ListAllRequest,
) -> UsageFilter {
    let feature = violations.feature("feature", &request.feature);
    let tier = request.tier.clone().filter(|t| !t.is_empty());
    if let Some(tier) = &tier {
        violations.id("tier", tier);
    }
    let min_utilization = request.min_utilization.and_then(|value| {
        admin::validate_utilization("min_utilization", value)
            .map_err(|v| violations.push(v.field, v.description))
            .ok()
    });
    let order = match proto::ListAllOrder::try_from(request.order) {
        Ok(proto::ListAllOrder::Unspecified | proto::ListAllOrder::UserId) => ListOrder::UserId,
        Ok(proto::ListAllOrder::CurrentUsageDesc) => ListOrder::CurrentUsageDesc,
        Err(_) => {
            violations.push("order", format!("unknown order {}", request.order));
            ListOrder::UserId
        }
    };
    UsageFilter {
        feature,
        tier,
        min_utilization,
        over_limit_only: request.over_limit_only,
        order,
    }
}

/// The key of a usage page's last row, as carried by its token.
fn usage_key_to_token(order: ListOrder, key: UsageKey) -> Vec<String> {
    match order {
        ListOrder::UserId => vec![key.user_id],
        ListOrder::CurrentUsageDesc => vec![key.current_usage.to_string(), key.user_id],
    }
}

/// The key carried by a usage page token, if it has the order's shape.
fn usage_key_from_token(order: ListOrder, key: &[String]) -> Option<UsageKey> {
    match (order, key) {
        (ListOrder::UserId, [user_id]) => Some(UsageKey {
            current_usage: 0,
            user_id: user_id.clone(),
        }),
        (ListOrder::CurrentUsageDesc, [usage, user_id]) => Some(UsageKey {
            current_usage: usage.parse().ok()?,
            user_id: user_id.clone(),
        }),
        _ => None,
    }
}

/// `SetTier`: moves a user to a tier.
pub(super) async fn set_tier(
    store: &Store,
    request: Request<proto::SetTierRequest>,
) -> Result<Response<proto::Usage>, Status> {
    let caller = validate::caller(request.metadata())?;
    let request = request.into_inner();

    let mut violations = validate::Violations::default();
    let user_id = violations.id("user_id", &request.user_id);
    let tier = violations.id("tier", &request.tier);
    let feature = violations.feature("feature", &request.feature);
    violations.check()?;
    record_ids(user_id, &feature);

    let change = store
        .set_tier(user_id, &feature, tier, &caller)
        .await
        .map_err(status::from_store)?;
    match change {
        UserChange::Changed(usage) => {
            info!(%tier, usage = usage.current_usage, limit = ?usage.usage_limit, over_limit = usage.over_limit(), "tier changed");
            Ok(Response::new(usage.into()))
        }
        UserChange::Unchanged(usage) => {
            debug!(%tier, "user already at tier");
            Ok(Response::new(usage.into()))
        }
        UserChange::UnknownTier(_) => Err(unknown_tier(tier, &feature)),
    }
}

/// `SetLimitOverride`: gives a user a limit of its own.
pub(super) async fn set_limit_override(
    store: &Store,
    request: Request<proto::SetLimitOverrideRequest>,
) -> Result<Response<proto::Usage>, Status> {
    let caller = validate::caller(request.metadata())?;
    let request = request.into_inner();

    let mut violations = validate::Violations::default();
    let user_id = violations.id("user_id", &request.user_id);
    let feature = violations.feature("feature", &request.feature);
    let usage_limit = request.usage_limit.filter(|&limit| {
        admin::validate_limit("usage_limit", limit)
            .map_err(|v| violations.push(v.field, v.description))
            .is_ok()
    });
    let expires_at = request
        .expires_at
        .and_then(|ts| instant(&mut violations, "expires_at", ts));
    if expires_at.is_some_and(|at| at <= SystemTime::now()) {
        violations.push(
            "expires_at",
            "must be in the future; omit it for an override without expiry",
        );
    }
    let reason = reason(&mut violations, &request.reason);
    violations.check()?;
    record_ids(user_id, &feature);

    let limit = LimitOverride {
        usage_limit,
        expires_at,
        reason,
    };
    let change = store
        .set_override(user_id, &feature, &limit, &caller)
        .await
        .map_err(status::from_store)?;
    let usage = changed_usage(change, "limit override set");
    Ok(Response::new(usage.into()))
}

/// `ClearLimitOverride`: the tier's limit applies again.
pub(super) async fn clear_limit_override(
    store: &Store,
    request: Request<proto::ClearLimitOverrideRequest>,
) -> Result<Response<proto::Usage>, Status> {
    let caller = validate::caller(request.metadata())?;
    let request = request.into_inner();

    let mut violations = validate::Violations::default();
    let user_id = violations.id("user_id", &request.user_id);
    let feature = violations.feature("feature", &request.feature);
    let reason = reason(&mut violations, &request.reason);
    violations.check()?;
    record_ids(user_id, &feature);

    let change = store
        .clear_override(user_id, &feature, reason.as_deref(), &caller)
        .await
        .map_err(status::from_store)?;
    let usage = changed_usage(change, "limit override cleared");
    Ok(Response::new(usage.into()))
}

/// `SetTierLimit`: a tier's limit for every user of the tier.
pub(super) async fn set_tier_limit(
    store: &Store,
    request: Request<proto::SetTierLimitRequest>,
) -> Result<Response<proto::SetTierLimitResponse>, Status> {
    let caller = validate::caller(request.metadata())?;
    let request = request.into_inner();

    let mut violations = validate::Violations::default();
    let tier = violations.id("tier", &request.tier);
    let feature = violations.feature("feature", &request.feature);
    let usage_limit = request.usage_limit.filter(|&limit| {
        admin::validate_limit("usage_limit", limit)
            .map_err(|v| violations.push(v.field, v.description))
            .is_ok()
    });
    let reason = reason(&mut violations, &request.reason);
    violations.check()?;
    tracing::Span::current().record("feature", feature.as_str());

    let change = store
        .set_tier_limit(tier, &feature, usage_limit, reason.as_deref(), &caller)
        .await
        .map_err(status::from_store)?;
    if change.changed {
        info!(%tier, limit = ?usage_limit, users_updated = change.users_updated, "tier limit changed");
    }
    Ok(Response::new(proto::SetTierLimitResponse {
        tier: change.tier,
        feature: change.feature,
        usage_limit: change.usage_limit,
        unlimited: change.usage_limit.is_none(),
        users_updated: change.users_updated,
        changed: change.changed,
    }))
}

/// `GetSummary`: a feature's figures from one snapshot.
pub(super) async fn get_summary(
    store: &Store,
    request: Request<proto::GetSummaryRequest>,
) -> Result<Response<proto::Summary>, Status> {
    let request = request.into_inner();

    let mut violations = validate::Violations::default();
    let feature = violations.feature("feature", &request.feature);
    violations.check()?;
    tracing::Span::current().record("feature", feature.as_str());

    let summary = store.summary(&feature).await.map_err(status::from_store)?;
    Ok(Response::new(summary.into()))
}

/// `ListEvents`: one keyset page of the audit trail, newest first.
pub(super) async fn list_events(
    store: &Store,
    request: Request<proto::ListEventsRequest>,
) -> Result<Response<proto::ListEventsResponse>, Status> {
    let request = request.into_inner();

    let mut violations = validate::Violations::default();
    let filter = event_filter(&mut violations, &request);
    let page_size = page_size(&mut violations, request.page_size);
    let fingerprint = filter.fingerprint();
    let before = page_start(
        &mut violations,
        &request.page_token,
        &fingerprint,
        |key| match key {
            [id] => id.parse::<i64>().ok(),
            _ => None,
        },
    );
    violations.check()?;
    tracing::Span::current().record("feature", filter.feature.as_str());

    let page = store
        .list_events(&filter, before, i64::from(page_size))
        .await
        .map_err(status::from_store)?;
    let next_page_token = page.next.map_or_else(String::new, |id| {
        PageToken {
            filters: fingerprint,
            last_key: vec![id.to_string()],
        }
        .encode()
    });
    Ok(Response::new(proto::ListEventsResponse {
        events: page.events.into_iter().map(Into::into).collect(),
        next_page_token,
    }))
}

/// The filters of a ListEvents request. Actions are deduplicated and sorted,
/// so that the same set in another order keeps a page token valid.
fn event_filter(
    violations: &mut validate::Violations,
    request: &proto::ListEventsRequest,
) -> EventFilter {
    let user_id = (!request.user_id.is_empty())
        .then(|| violations.id("user_id", &request.user_id).to_owned());
    let feature = violations.feature("feature", &request.feature);
    let mut actions = Vec::new();
    for name in &request.actions {
        match name.parse::<AuditAction>() {
            Ok(action) if !actions.contains(&action) => actions.push(action),
            Ok(_) => {}
            Err(v) => violations.push(v.field, v.description),
        }
    }
    actions.sort_by_key(|a| a.as_str());
    let since = request
        .since
        .and_then(|ts| instant(violations, "since", ts));
    let until = request
        .until
        .and_then(|ts| instant(violations, "until", ts));
    if let (Some(since), Some(until)) = (since, until) {
        if since >= until {
            violations.push("until", "must be after since");
        }
    }
    EventFilter {
        user_id,
        feature,
        actions,
        since,
        until,
    }
}

/// `INVALID_ARGUMENT` naming the tier that does not exist.
fn unknown_tier(tier: &str, feature: &str) -> Status {
    status::invalid_argument(&[FieldViolation::new(
        "tier",
        format!("unknown tier {tier:?} for feature {feature:?}; create it with SetTierLimit first"),
    )])
}

/// The usage after an override change, logging it when it changed anything.
fn changed_usage(change: UserChange, message: &'static str) -> Usage {
    match change {
        UserChange::Changed(usage) => {
            info!(
                usage = usage.current_usage,
                limit = ?usage.usage_limit,
                over_limit = usage.over_limit(),
                "{message}"
            );
            usage
        }
        UserChange::Unchanged(usage) | UserChange::UnknownTier(usage) => {
            debug!("override unchanged");
            usage
        }
    }
}

/// The page size asked for: 0 is the default, larger than the maximum is
/// lowered to it, negative is refused.
fn page_size(violations: &mut validate::Violations, size: i32) -> i32 {
    match size {
        size if size < 0 => {
            violations.push("page_size", "must not be negative");
            0
        }
        0 => DEFAULT_PAGE_SIZE,
        size => size.min(MAX_PAGE_SIZE),
    }
}

/// Where a page starts, from its token: `None` for the first page. A token
/// issued for other filters, or not issued here, is a violation.
fn page_start<T>(
    violations: &mut validate::Violations,
    token: &str,
    fingerprint: &str,
    key: impl FnOnce(&[String]) -> Option<T>,
) -> Option<T> {
    if token.is_empty() {
        return None;
    }
    let Some(decoded) = PageToken::decode(token) else {
        violations.push("page_token", "is not a token this service issued");
        return None;
    };
    if decoded.filters != fingerprint {
        violations.push(
            "page_token",
            "was issued for other filters; start again without a token",
        );
        return None;
    }
    let start = key(&decoded.last_key);
    if start.is_none() {
        violations.push("page_token", "is not a token this service issued");
    }
    start
}

/// A timestamp field as an instant, or a violation.
fn instant(
    violations: &mut validate::Violations,
    field: &'static str,
    timestamp: prost_types::Timestamp,
) -> Option<SystemTime> {
    SystemTime::try_from(timestamp)
        .map_err(|err| violations.push(field, format!("is not a valid timestamp: {err}")))
        .ok()
}

/// A reason field: empty is none, too long is a violation.
fn reason(violations: &mut validate::Violations, value: &str) -> Option<String> {
    admin::validate_reason("reason", value)
        .map_err(|v| violations.push(v.field, v.description))
        .ok()
        .flatten()
}

/// Adds the request's identifiers to the current span.
fn record_ids(user_id: &str, feature: &str) {
    let span = tracing::Span::current();
    span.record("user_id", user_id);
    span.record("feature", feature);
}

impl From<Summary> for proto::Summary {
    fn from(summary: Summary) -> Self {
        Self {
            feature: summary.feature,
            tiers: summary.tiers.into_iter().map(Into::into).collect(),
            refusals_last_24h: summary.refusals_last_24h,
            refusals_last_7d: summary.refusals_last_7d,
            top_users: summary.top_users.into_iter().map(Into::into).collect(),
            computed_at: Some(summary.computed_at.into()),
        }
    }
}

impl From<TierSummary> for proto::TierSummary {
    fn from(tier: TierSummary) -> Self {
        Self {
            tier: tier.tier,
            usage_limit: tier.usage_limit,
            users: tier.users,
            slots: tier.slots,
            users_at_limit: tier.users_at_limit,
            users_near_limit: tier.users_near_limit,
        }
    }
}

impl From<AuditEvent> for proto::Event {
    fn from(event: AuditEvent) -> Self {
        Self {
            id: event.id,
            occurred_at: Some(event.occurred_at.into()),
            user_id: event.user_id.unwrap_or_default(),
            feature: event.feature,
            product_id: event.product_id,
            action: event.action,
            delta: event.delta,
            usage_before: event.usage_before,
            usage_after: event.usage_after,
            actor: event.actor,
            request_id: event.request_id,
            old_value: event.old_value,
            new_value: event.new_value,
            reason: event.reason,
            tier: event.tier,
        }
    }
}
