//! The `usage.v1.UsageService` handlers: validate, call the store, map the
//! answer. No SQL and no business rule lives here.

use tonic::{Request, Response, Status};
use tracing::{debug, info, instrument};

use super::{page_token::PageToken, status, validate};
use crate::{
    proto::{self, usage_service_server::UsageService},
    store::Store,
    usage::{ReleaseOutcome, ReserveAction, ReserveOutcome, Usage},
};

/// Page size used when a request asks for none.
const DEFAULT_PAGE_SIZE: i32 = 100;

/// Largest page served; larger requests are lowered to it.
pub const MAX_PAGE_SIZE: i32 = 1000;

/// The gRPC front of the [`Store`].
#[derive(Clone)]
pub struct UsageApi {
    store: Store,
}

impl UsageApi {
    /// Handlers over `store`.
    pub fn new(store: Store) -> Self {
        Self { store }
    }
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
        let action = match proto::ReserveAction::try_from(request.action) {
            Ok(proto::ReserveAction::Unspecified | proto::ReserveAction::Add) => ReserveAction::Add,
            Ok(proto::ReserveAction::Restore) => ReserveAction::Restore,
            Err(_) => {
                violations.push("action", format!("unknown action {}", request.action));
                ReserveAction::Add
            }
        };
        violations.check()?;
        record_ids(user_id, &feature, Some(product_id));

        let outcome = self
            .store
            .reserve(user_id, &feature, product_id, action, &caller)
            .await
            .map_err(status::from_store)?;

        let (usage, already_held) = match outcome {
            ReserveOutcome::Reserved(usage) => {
                info!(%action, delta = 1, usage = usage.current_usage, tier = %usage.tier, "slot reserved");
                (usage, false)
            }
            ReserveOutcome::AlreadyHeld(usage) => {
                debug!(usage = usage.current_usage, "product already holds a slot");
                (usage, true)
            }
            ReserveOutcome::Denied(usage) => {
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

    #[instrument(skip_all, fields(user_id, feature))]
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
        let request = request.into_inner();

        let mut violations = validate::Violations::default();
        let feature = violations.feature("feature", &request.feature);
        let tier = request.tier.as_deref().filter(|t| !t.is_empty());
        if let Some(tier) = tier {
            violations.id("tier", tier);
        }
        let page_size = match request.page_size {
            size if size < 0 => {
                violations.push("page_size", "must not be negative");
                0
            }
            0 => DEFAULT_PAGE_SIZE,
            size => size.min(MAX_PAGE_SIZE),
        };
        let filters = format!("{feature}|{}", tier.unwrap_or(""));
        let after = match request.page_token.as_str() {
            "" => String::new(),
            token => match PageToken::decode(token) {
                Some(t) if t.filters == filters && t.last_key.len() == 1 => t.last_key[0].clone(),
                Some(_) => {
                    violations.push(
                        "page_token",
                        "was issued for other filters; start again without a token",
                    );
                    String::new()
                }
                None => {
                    violations.push("page_token", "is not a token this service issued");
                    String::new()
                }
            },
        };
        violations.check()?;
        tracing::Span::current().record("feature", feature.as_str());

        let page = self
            .store
            .list_all(&feature, tier, &after, i64::from(page_size))
            .await
            .map_err(status::from_store)?;
        let next_page_token = page.last_user_id.map_or_else(String::new, |last| {
            PageToken {
                filters,
                last_key: vec![last],
            }
            .encode()
        });
        Ok(Response::new(proto::ListAllResponse {
            usages: page.usages.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
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
        }
    }
}
