//! The Reconcile handler: validate, delegate to the [`Reconciler`], map the
//! report.

use tonic::{Response, Status};

use super::{status, validate};
use crate::{
    proto,
    store::reconcile::Reconciler,
    usage::drift::{Correction, CorrectionKind, DriftReport},
};

/// Reconciles one user (`user_id` set) or every user.
pub(crate) async fn handle(
    reconciler: Option<&Reconciler>,
    request: proto::ReconcileRequest,
) -> Result<Response<proto::ReconcileReport>, Status> {
    let mut violations = validate::Violations::default();
    let user_id = match request.user_id.as_str() {
        "" => None,
        user_id => Some(violations.id("user_id", user_id)),
    };
    violations.check()?;

    let Some(reconciler) = reconciler else {
        return Err(Status::failed_precondition(
            "reconciliation needs the product catalogue: start the server without \
             --no-catalogue, pointing --products-table at the catalogue",
        ));
    };
    let report = match user_id {
        Some(user_id) => {
            tracing::Span::current().record("user_id", user_id);
            reconciler.user(user_id, request.dry_run).await
        }
        None => reconciler.all(request.dry_run, None).await,
    }
    .map_err(status::from_store)?;
    Ok(Response::new(report.into()))
}

impl From<DriftReport> for proto::ReconcileReport {
    fn from(report: DriftReport) -> Self {
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        Self {
            feature: report.feature,
            dry_run: report.dry_run,
            skipped: report.skipped,
            users_checked: count(report.users_checked),
            users_corrected: count(report.users_corrected),
            slots_added: count(report.slots_added),
            slots_removed: count(report.slots_removed),
            counters_corrected: count(report.counters_corrected),
            users_over_limit: count(report.users_over_limit),
            corrections: report.corrections.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<Correction> for proto::Correction {
    fn from(correction: Correction) -> Self {
        let kind = match correction.kind {
            CorrectionKind::SlotAdded => proto::CorrectionKind::SlotAdded,
            CorrectionKind::SlotRemoved => proto::CorrectionKind::SlotRemoved,
            CorrectionKind::CounterCorrected => proto::CorrectionKind::CounterCorrected,
        };
        Self {
            user_id: correction.user_id,
            product_id: correction.product_id.unwrap_or_default(),
            kind: kind.into(),
            delta: correction.delta,
        }
    }
}
