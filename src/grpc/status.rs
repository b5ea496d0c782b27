//! The one place where domain and storage failures become gRPC statuses.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    metrics,
    store::StoreError,
    usage::{FieldViolation, Usage},
};

/// `ErrorInfo.reason` of a refused Reserve.
pub const LIMIT_REACHED_REASON: &str = "USAGE_LIMIT_REACHED";

/// `ErrorInfo.domain` of every error this service describes.
pub const ERROR_DOMAIN: &str = "usage.v1";

/// `INVALID_ARGUMENT` with a `BadRequest` listing every offending field.
pub fn invalid_argument(violations: &[FieldViolation]) -> Status {
    let mut details = ErrorDetails::new();
    for violation in violations {
        details.add_bad_request_violation(violation.field, &violation.description);
    }
    let fields: Vec<&str> = violations.iter().map(|v| v.field).collect();
    let message = match violations {
        [only] => format!("invalid {}: {}", only.field, only.description),
        _ => format!("invalid fields: {}", fields.join(", ")),
    };
    Status::with_error_details(Code::InvalidArgument, message, details)
}

/// `RESOURCE_EXHAUSTED` for a Reserve refused at the limit, with a
/// `QuotaFailure` naming the user and feature and an `ErrorInfo` carrying the
/// figures. Callers must not retry it: only a release or a higher limit makes
/// room.
pub fn limit_reached(usage: &Usage) -> Status {
    let limit = usage
        .usage_limit
        .map_or_else(|| "unlimited".to_owned(), |l| l.to_string());
    let subject = format!("user:{}/feature:{}", usage.user_id, usage.feature);
    let description = format!(
        "user holds {} of {} {} slots allowed by tier {}",
        usage.current_usage, limit, usage.feature, usage.tier
    );
    let metadata = HashMap::from([
        ("current_usage".to_owned(), usage.current_usage.to_string()),
        ("usage_limit".to_owned(), limit.clone()),
        ("tier".to_owned(), usage.tier.clone()),
    ]);

    let mut details = ErrorDetails::new();
    details.add_quota_failure_violation(subject, description.clone());
    details.set_error_info(LIMIT_REACHED_REASON, ERROR_DOMAIN, metadata);
    Status::with_error_details(
        Code::ResourceExhausted,
        format!(
            "usage limit reached: {description}; release a slot or raise the limit, do not retry"
        ),
        details,
    )
}

/// Maps a storage failure. The cause is logged here and never sent: callers
/// see a generic message with a code that tells them whether to retry.
pub fn from_store(err: StoreError) -> Status {
    match err {
        StoreError::UnknownFeature(feature) => invalid_argument(&[FieldViolation::new(
            "feature",
            format!("unknown feature {feature:?}"),
        )]),
        StoreError::Unavailable(cause) => {
            metrics::record_database_error("unavailable");
            tracing::warn!(%cause, "database unavailable");
            Status::unavailable("database unavailable, retry later")
        }
        StoreError::Contention(cause) => {
            metrics::record_database_error("contention");
            tracing::warn!(%cause, "transaction aborted by a concurrent one");
            Status::unavailable("the change collided with a concurrent one, retry")
        }
        err @ (StoreError::Database(_) | StoreError::UnexpectedOutcome(_)) => {
            metrics::record_database_error(match err {
                StoreError::Database(_) => "database",
                _ => "unexpected_outcome",
            });
            tracing::error!(cause = %err, "database error");
            Status::internal("internal error")
        }
    }
}
