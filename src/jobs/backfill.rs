//! The `backfill` command: a progress bar on a terminal, progress lines in the
//! log, and a summary on stdout.

use std::io::IsTerminal as _;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::{
    config::BackfillArgs,
    store::{
        self,
        backfill::{self, BackfillOptions, BackfillSummary},
        catalogue::Catalogue,
        Store,
    },
};

/// Runs `usage-service backfill`.
pub async fn run_command(args: BackfillArgs) -> anyhow::Result<()> {
    let pool = store::connect_pool(&args.database)?;
    if !args.no_migrate {
        store::migrate::run(&pool).await?;
    }
    let store = Store::configured(pool, &args.database);
    let catalogue = Catalogue::validate(&store, &args.catalogue.layout())
        .await
        .context("checking the product catalogue")?;
    let options = BackfillOptions {
        batch_size: args.batch_size,
        dry_run: args.dry_run,
        restart: args.restart,
        orphan_grace: args.catalogue.orphan_grace,
        workers: args.jobs,
    };

    // Drawn only on a terminal; logs and pipes get the progress lines alone.
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {pos}/{len} users ({per_sec}, eta {eta}) {msg}",
        )
        .context("the progress bar template")?,
    );
    let summary = backfill::run(&store, &catalogue, &options, |progress| {
        bar.set_length(progress.users_estimate.max(progress.users_scanned));
        bar.set_position(progress.users_scanned);
        bar.set_message(format!("batch {}", progress.batches));
    })
    .await;
    bar.finish_and_clear();

    print!("{}", render(&summary.context("backfilling")?));
    Ok(())
}

/// The summary as a few lines for a person.
pub fn render(summary: &BackfillSummary) -> String {
    let verb = if summary.dry_run {
        "would change"
    } else {
        "changed"
    };
    let mut out = String::new();
    if let Some(after) = &summary.resumed_after {
        out.push_str(&format!("resumed after user {after}\n"));
    }
    out.push_str(&format!(
        "{} users scanned in {} batches; {verb} {} users ({} new): {} slots added, \
         {} slots removed, {} counters corrected; {} users over their limit keep every slot\n",
        summary.users_scanned,
        summary.batches,
        summary.users_changed,
        summary.users_created,
        summary.slots_added,
        summary.slots_removed,
        summary.counters_corrected,
        summary.users_over_limit
    ));
    out
}
