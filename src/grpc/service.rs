//! The `usage.v1.UsageService` handlers: validate, call the store, map the
//! answer. No SQL and no business rule lives here.

use std::time::Duration;

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{debug, info, instrument};

use super::{admin, status, validate};
use crate::{
    metrics,
    proto::{self, usage_service_server::UsageService},
    store::{reconcile::Reconciler, Store},
    usage::{ReleaseOutcome, ReserveAction, ReserveOutcome, Usage, HOLD_TTL_RANGE},
};

/// Largest page served; larger requests are lowered to it.
pub const MAX_PAGE_SIZE: i32 = 1000;

/// The gRPC front of the [`Store`].
#[derive(Clone)]
pub struct UsageApi {
    store: Store,
    shutdown: watch::Receiver<bool>,
    reconciler: Option<Reconciler>,
}

impl UsageApi {
    /// Handlers over `store`.
    pub fn new(store: Store) -> Self {
        Self {
            store,
            shutdown: watch::channel(false).1,
            reconciler: None,
        }
    }

    /// Serves Reconcile with `reconciler`; without one it answers
    /// FAILED_PRECONDITION.
    pub fn with_reconciler(mut self, reconciler: Option<Reconciler>) -> Self {
        self.reconciler = reconciler;
        self
    }

    /// Ends long-lived streams when `shutdown` turns true, so that a graceful
    /// shutdown does not wait for watchers forever.
    pub fn with_shutdown(mut self, shutdown: watch::Receiver<bool>) -> Self {
        self.shutdown = shutdown;
        self
    }

    pub(super) fn store(&self) -> &Store {
        &self.store
    }

    pub(super) fn shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }
}

/// Reads a `ReserveAction`; unspecified means add.
pub(super) fn reserve_action(violations: &mut validate::Violations, action: i32) -> ReserveAction {
    match proto::ReserveAction::try_from(action) {
        Ok(proto::ReserveAction::Unspecified | proto::ReserveAction::Add) => ReserveAction::Add,
        Ok(proto::ReserveAction::Restore) => ReserveAction::Restore,
        Err(_) => {
            violations.push("action", format!("unknown action {action}"));
            ReserveAction::Add
        }
    }
}

/// Reads an optional hold time, which must lie within [`HOLD_TTL_RANGE`].
fn hold_ttl(
    violations: &mut validate::Violations,
    ttl: Option<prost_types::Duration>,
) -> Option<Duration> {
    let ttl = ttl?;
    let (min, max) = HOLD_TTL_RANGE;
    let valid = (0..1_000_000_000).contains(&ttl.nanos)
        && u64::try_from(ttl.seconds).is_ok_and(|s| s >= min.as_secs() && s <= max.as_secs());
    if !valid {
        violations.push(
            "hold_ttl",
            format!("must be between {}s and {}s", min.as_secs(), max.as_secs()),
        );
        return None;
    }
    Some(Duration::new(ttl.seconds as u64, ttl.nanos as u32))
}

#[tonic::async_trait]
impl UsageService for UsageApi {
    #[instrument(skip_all, fields(user_id, feature, product_id))]
    async fn reserve(
        &self,
        request: Request<proto::ReserveRequest>,
    ) -> Result<Response<proto::ReserveResponse>, Status> {
        let caller = validate::caller(request.metadata())?;
        let request = request.into_inner();

        let mut violations = validate::Violations::default();
        let user_id = violations.id("user_id", &request.user_id);
        let product_id = violations.id("product_id", &request.product_id);
        let feature = violations.feature("feature", &request.feature);
        let action = reserve_action(&mut violations, request.action);
        let hold = hold_ttl(&mut violations, request.hold_ttl);
        violations.check()?;
        record_ids(user_id, &feature, Some(product_id));

        let outcome = self
            .store
            .reserve(user_id, &feature, product_id, action, hold, &caller)
            .await
            .map_err(status::from_store)?;

        let (usage, already_held) = match outcome {
            ReserveOutcome::Reserved(usage) => {
                metrics::record_reserved(&usage, 1);
                info!(%action, delta = 1, usage = usage.current_usage, tier = %usage.tier, "slot reserved");
                (usage, false)
            }
            ReserveOutcome::AlreadyHeld(usage) => {
                debug!(usage = usage.current_usage, "product already holds a slot");
                (usage, true)
            }
            ReserveOutcome::Denied(usage) => {
                metrics::record_refused(&usage);
                info!(%action, usage = usage.current_usage, limit = ?usage.usage_limit, tier = %usage.tier, "reservation refused at limit");
                return Err(status::limit_reached(&usage));
            }
        };
        Ok(Response::new(proto::ReserveResponse {
            usage: Some(usage.into()),
            already_held,
        }))
    }

    #[instrument(skip_all, fields(user_id, feature, product_id))]
    async fn release(
        &self,
        request: Request<proto::ReleaseRequest>,
    ) -> Result<Response<proto::ReleaseResponse>, Status> {
        let caller = validate::caller(request.metadata())?;
        let request = request.into_inner();

        let mut violations = validate::Violations::default();
        let user_id = violations.id("user_id", &request.user_id);
        let product_id = violations.id("product_id", &request.product_id);
        let feature = violations.feature("feature", &request.feature);
        violations.check()?;
        record_ids(user_id, &feature, Some(product_id));

        let outcome = self
            .store
            .release(user_id, &feature, product_id, &caller)
            .await
            .map_err(status::from_store)?;

        let (usage, was_held) = match outcome {
            ReleaseOutcome::Released(usage) => {
                metrics::record_released(&usage, 1);
                info!(delta = -1, usage = usage.current_usage, tier = %usage.tier, "slot released");
                (usage, true)
            }
            ReleaseOutcome::NotHeld(usage) => {
                debug!(usage = usage.current_usage, "product held no slot");
                (usage, false)
            }
        };
        Ok(Response::new(proto::ReleaseResponse {
            usage: Some(usage.into()),
            was_held,
        }))
    }

    // A Get changes nothing and logs nothing unless it fails, so its span
    // is only built when debug logging is on: recording the ids into an
    // info span was about a tenth of the service's instructions per Get.
    #[instrument(level = "debug", skip_all, fields(user_id, feature))]
    async fn get(
        &self,
        request: Request<proto::GetRequest>,
    ) -> Result<Response<proto::Usage>, Status> {
        let request = request.into_inner();
        // A user token reads itself, named or implied by an empty user_id.
        let identity = super::gate::authenticated();
        let user_id = super::policy::own_user(identity.as_ref(), &request.user_id)?;

        let mut violations = validate::Violations::default();
        let user_id = violations.id("user_id", &user_id);
        let feature = violations.feature("feature", &request.feature);
        violations.check()?;
        record_ids(user_id, &feature, None);

        let usage = self
            .store
            .get(user_id, &feature)
            .await
            .map_err(status::from_store)?;
        Ok(Response::new(usage.into()))
    }

    #[instrument(skip_all, fields(feature))]
    async fn list_all(
        &self,
        request: Request<proto::ListAllRequest>,
    ) -> Result<Response<proto::ListAllResponse>, Status> {
        admin::list_all(&self.store, request).await
    }

    #[instrument(skip_all, fields(user_id, feature))]
    async fn set_tier(
        &self,
        request: Request<proto::SetTierRequest>,
    ) -> Result<Response<proto::Usage>, Status> {
        admin::set_tier(&self.store, request).await
    }

    #[instrument(skip_all, fields(user_id, feature))]
    async fn set_limit_override(
        &self,
        request: Request<proto::SetLimitOverrideRequest>,
    ) -> Result<Response<proto::Usage>, Status> {
        admin::set_limit_override(&self.store, request).await
    }

    #[instrument(skip_all, fields(user_id, feature))]
    async fn clear_limit_override(
        &self,
        request: Request<proto::ClearLimitOverrideRequest>,
    ) -> Result<Response<proto::Usage>, Status> {
        admin::clear_limit_override(&self.store, request).await
    }

    #[instrument(skip_all, fields(feature))]
    async fn set_tier_limit(
        &self,
        request: Request<proto::SetTierLimitRequest>,
    ) -> Result<Response<proto::SetTierLimitResponse>, Status> {
        admin::set_tier_limit(&self.store, request).await
    }

    #[instrument(skip_all, fields(feature))]
    async fn get_summary(
        &self,
        request: Request<proto::GetSummaryRequest>,
    ) -> Result<Response<proto::Summary>, Status> {
        admin::get_summary(&self.store, request).await
    }

    #[instrument(skip_all, fields(feature))]
    async fn list_events(
        &self,
        request: Request<proto::ListEventsRequest>,
    ) -> Result<Response<proto::ListEventsResponse>, Status> {
        admin::list_events(&self.store, request).await
    }

    async fn check(
        &self,
        request: Request<proto::CheckRequest>,
    ) -> Result<Response<proto::CheckResponse>, Status> {
        self.check_quota(request).await
    }

    async fn reserve_many(
        &self,
        request: Request<proto::ReserveManyRequest>,
    ) -> Result<Response<proto::ReserveManyResponse>, Status> {
        self.reserve_many_slots(request).await
    }

    async fn release_many(
        &self,
        request: Request<proto::ReleaseManyRequest>,
    ) -> Result<Response<proto::ReleaseManyResponse>, Status> {
        self.release_many_slots(request).await
    }

    async fn confirm(
        &self,
        request: Request<proto::ConfirmRequest>,
    ) -> Result<Response<proto::ConfirmResponse>, Status> {
        self.confirm_hold(request).await
    }

    type WatchUsageStream = super::watch::EventStream;

    async fn watch_usage(
        &self,
        request: Request<proto::WatchUsageRequest>,
    ) -> Result<Response<Self::WatchUsageStream>, Status> {
        self.watch(request).await
    }

    #[instrument(skip_all, fields(user_id))]
    async fn reconcile(
        &self,
        request: Request<proto::ReconcileRequest>,
    ) -> Result<Response<proto::ReconcileReport>, Status> {
        super::reconcile::handle(self.reconciler.as_ref(), request.into_inner()).await
    }
}

/// Adds the request's identifiers to the current span, so every log line of
/// the call carries them as fields.
fn record_ids(user_id: &str, feature: &str, product_id: Option<&str>) {
    let span = tracing::Span::current();
    span.record("user_id", user_id);
    span.record("feature", feature);
    if let Some(product_id) = product_id {
        span.record("product_id", product_id);
    }
}

impl From<Usage> for proto::Usage {
    fn from(usage: Usage) -> Self {
        let remaining = usage.remaining();
        let over_limit = usage.over_limit();
        Self {
            unlimited: usage.usage_limit.is_none(),
            user_id: usage.user_id,
            feature: usage.feature,
            tier: usage.tier,
            current_usage: usage.current_usage,
            usage_limit: usage.usage_limit,
            remaining,
            over_limit,
            pending: usage.pending,
        }
    }
}
