//! Handlers for Check, ReserveMany, ReleaseMany and Confirm.

use std::collections::HashMap;

use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tracing::info;

use super::{
    service::{reserve_action, UsageApi},
    status::{self, ERROR_DOMAIN, LIMIT_REACHED_REASON},
    validate::{self, Violations},
};
use crate::{
    metrics, proto,
    usage::{ConfirmOutcome, ReserveManyOutcome, Usage, MAX_BULK_PRODUCTS},
};

/// Validates a list of product ids: 1 to [`MAX_BULK_PRODUCTS`] of them, each
/// a valid identifier. Violations name the first offending index.
fn product_ids<'a>(violations: &mut Violations, ids: &'a [String]) -> &'a [String] {
    if ids.is_empty() || ids.len() > MAX_BULK_PRODUCTS {
        violations.push(
            "product_ids",
            format!(
                "must name 1 to {MAX_BULK_PRODUCTS} products, got {}",
                ids.len()
            ),
        );
        return ids;
    }
    let mut per_id = Violations::default();
    if let Some(index) = ids.iter().position(|id| {
        per_id.id("product_ids", id);
        per_id.has_any()
    }) {
        violations.push(
            "product_ids",
            format!("product_ids[{index}] must be 1 to 256 bytes without control characters"),
        );
    }
    ids
}

impl UsageApi {
    pub(super) async fn check_quota(
        &self,
        request: Request<proto::CheckRequest>,
    ) -> Result<Response<proto::CheckResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::default();
        let user_id = violations.id("user_id", &request.user_id);
        let feature = violations.feature("feature", &request.feature);
        let quantity = match request.quantity {
            0 => 1,
            q if q < 0 => {
                violations.push("quantity", "must not be negative");
                1
            }
            q => q,
        };
        violations.check()?;

        let (allowed, usage) = self
            .store()
            .check_quota(user_id, &feature, quantity)
            .await
            .map_err(status::from_store)?;
        Ok(Response::new(proto::CheckResponse {
            allowed,
            usage: Some(usage.into()),
        }))
    }

    pub(super) async fn reserve_many_slots(
        &self,
        request: Request<proto::ReserveManyRequest>,
    ) -> Result<Response<proto::ReserveManyResponse>, Status> {
        let caller = validate::caller(request.metadata())?;
        let request = request.into_inner();
        let mut violations = Violations::default();
        let user_id = violations.id("user_id", &request.user_id);
        let feature = violations.feature("feature", &request.feature);
        let ids = product_ids(&mut violations, &request.product_ids);
        let action = reserve_action(&mut violations, request.action);
        violations.check()?;

        let outcome = self
            .store()
            .reserve_many(user_id, &feature, ids, action, &caller)
            .await
            .map_err(status::from_store)?;
        match outcome {
            ReserveManyOutcome::Reserved {
                usage,
                reserved,
                already_held,
            } => {
                metrics::record_reserved(&usage, reserved.len() as u64);
                info!(
                    user_id,
                    feature,
                    delta = reserved.len(),
                    usage = usage.current_usage,
                    "slots reserved in bulk"
                );
                Ok(Response::new(proto::ReserveManyResponse {
                    usage: Some(usage.into()),
                    reserved,
                    already_held,
                }))
            }
            ReserveManyOutcome::Denied {
                usage,
                requested,
                available,
            } => {
                metrics::record_refused(&usage);
                info!(
                    user_id,
                    feature, requested, available, "bulk reservation refused at limit"
                );
                Err(bulk_refused(&usage, requested, available))
            }
        }
    }

    pub(super) async fn release_many_slots(
        &self,
        request: Request<proto::ReleaseManyRequest>,
    ) -> Result<Response<proto::ReleaseManyResponse>, Status> {
        let caller = validate::caller(request.metadata())?;
        let request = request.into_inner();
        let mut violations = Violations::default();
        let user_id = violations.id("user_id", &request.user_id);
        let feature = violations.feature("feature", &request.feature);
        let ids = product_ids(&mut violations, &request.product_ids);
        violations.check()?;

        let outcome = self
            .store()
            .release_many(user_id, &feature, ids, &caller)
            .await
            .map_err(status::from_store)?;
        metrics::record_released(&outcome.usage, outcome.released.len() as u64);
        info!(
            user_id,
            feature,
            delta = -(outcome.released.len() as i64),
            usage = outcome.usage.current_usage,
            "slots released in bulk"
        );
        Ok(Response::new(proto::ReleaseManyResponse {
            usage: Some(outcome.usage.into()),
            released: outcome.released,
            not_held: outcome.not_held,
        }))
    }

    pub(super) async fn confirm_hold(
        &self,
        request: Request<proto::ConfirmRequest>,
    ) -> Result<Response<proto::ConfirmResponse>, Status> {
        let caller = validate::caller(request.metadata())?;
        let request = request.into_inner();
        let mut violations = Violations::default();
        let user_id = violations.id("user_id", &request.user_id);
        let product_id = violations.id("product_id", &request.product_id);
        let feature = violations.feature("feature", &request.feature);
        violations.check()?;

        let outcome = self
            .store()
            .confirm(user_id, &feature, product_id, &caller)
            .await
            .map_err(status::from_store)?;
        let (usage, re_reserved) = match outcome {
            ConfirmOutcome::Confirmed(usage) => (usage, false),
            ConfirmOutcome::ReReserved(usage) => {
                metrics::record_reserved(&usage, 1);
                (usage, true)
            }
            ConfirmOutcome::Denied(usage) => {
                metrics::record_refused(&usage);
                return Err(status::limit_reached(&usage));
            }
        };
        info!(
            user_id,
            feature,
            product_id,
            re_reserved,
            usage = usage.current_usage,
            "hold confirmed"
        );
        Ok(Response::new(proto::ConfirmResponse {
            usage: Some(usage.into()),
            re_reserved,
        }))
    }
}

/// `RESOURCE_EXHAUSTED` for a bulk reservation that does not fit: the same
/// details as a single refusal, plus how many slots were asked for and free.
fn bulk_refused(usage: &Usage, requested: i64, available: i64) -> Status {
    let limit = usage.usage_limit.unwrap_or_default();
    let mut details = ErrorDetails::new();
    details.add_quota_failure_violation(
        format!("user:{}/feature:{}", usage.user_id, usage.feature),
        format!("{requested} slots requested, {available} free"),
    );
    details.set_error_info(
        LIMIT_REACHED_REASON,
        ERROR_DOMAIN,
        HashMap::from([
            ("current_usage".to_owned(), usage.current_usage.to_string()),
            ("usage_limit".to_owned(), limit.to_string()),
            ("requested".to_owned(), requested.to_string()),
            ("available".to_owned(), available.to_string()),
        ]),
    );
    Status::with_error_details(
        Code::ResourceExhausted,
        format!(
            "usage limit reached: {requested} slots requested, {available} free of {limit}; nothing was reserved"
        ),
        details,
    )
}
