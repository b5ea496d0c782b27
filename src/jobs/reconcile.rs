//! Reconciliation in the background of `serve`, and the `reconcile` command.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    config::ReconcileArgs,
    store::{self, catalogue::Catalogue, reconcile::Reconciler, Store},
    usage::drift::DriftReport,
};

/// Reconciles every user each `interval` until `stop` turns true. A pass that
/// finds another replica's pass running is skipped; a failed pass is logged
/// and the next one runs on time.
pub async fn schedule(reconciler: Reconciler, interval: Duration, mut stop: watch::Receiver<bool>) {
    info!(feature = reconciler.feature(), interval = %humantime::format_duration(interval), "scheduled reconciliation on");
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        // The pass logs its own figures (the drift counts) when it ends.
        if let Err(err) = reconciler.all(false, Some(stop.clone())).await {
            warn!(cause = %err, feature = reconciler.feature(), "reconciliation failed");
        }
    }
}

/// `usage-service reconcile`: one pass, its report printed on stdout.
pub async fn run_command(args: ReconcileArgs) -> anyhow::Result<()> {
    let store = Store::configured(store::connect_pool(&args.database)?, &args.database);
    let catalogue = Catalogue::validate(&store, &args.catalogue.layout())
        .await
        .context("checking the product catalogue")?;
    let reconciler = Reconciler::new(store, Arc::new(catalogue), args.catalogue.orphan_grace);

    let report = match &args.user_id {
        Some(user_id) => {
            crate::usage::validate_id("--user-id", user_id)
                .map_err(|v| anyhow::anyhow!("{}: {}", v.field, v.description))?;
            reconciler.user(user_id, args.dry_run).await
        }
        None => reconciler.all(args.dry_run, None).await,
    }
    .context("reconciling")?;
    print!("{}", render(&report));
    Ok(())
}

/// The report as a few lines for a person.
pub fn render(report: &DriftReport) -> String {
    use std::fmt::Write as _;

    let mut out = String::new();
    if report.skipped {
        out.push_str("skipped: another reconciliation of every user is running\n");
        return out;
    }
    let verb = if report.dry_run {
        "would correct"
    } else {
        "corrected"
    };
    let _ = writeln!(
        out,
        "{}: {} users checked, {verb} {} users: {} slots added, {} slots removed, \
         {} counters corrected, {} users over their limit",
        report.feature,
        report.users_checked,
        report.users_corrected,
        report.slots_added,
        report.slots_removed,
        report.counters_corrected,
        report.users_over_limit
    );
    for c in &report.corrections {
        let _ = writeln!(
            out,
            "  {:?} user={} product={} delta={}",
            c.kind,
            c.user_id,
            c.product_id.as_deref().unwrap_or("-"),
            c.delta
        );
    }
    out
}
