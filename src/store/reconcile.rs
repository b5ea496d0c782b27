//! Reconciliation: finds where the ledger and the catalogue disagree and
//! repairs it, one user per transaction.
//!
//! A pass over every user scans a page of users without locks, then repairs
//! each user that needs it in a transaction of its own: lock the user's row,
//! read again, plan, write, commit. It never holds more than one user's row
//! lock, so a Reserve or Release waits at most for one user's repair, and
//! whatever such a call committed before the lock is in the fresh read and is
//! kept. Only one pass over every user runs at a time per database: it holds a
//! PostgreSQL advisory lock, and a pass that cannot take it reports itself
//! skipped.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_postgres::types::Type;
use tracing::{debug, info};

use super::{
    catalogue::Catalogue,
    job_lock,
    ledger::{self, AuditStyle},
    Store, StoreError,
};
use crate::usage::drift::{DriftReport, Repair};

/// Advisory lock key held by a pass over every user.
pub(crate) const RECONCILE_LOCK_KEY: i64 = 0x7573_6167_655f_7263; // "usage_rc"

/// Actor recorded in the audit rows a reconciliation writes.
const ACTOR: &str = "usage-service reconcile";

/// Users scanned per page of a pass over every user.
const PAGE_SIZE: i64 = 1000;

/// Reconciles the ledger of one catalogue.
#[derive(Debug, Clone)]
pub struct Reconciler {
    store: Store,
    catalogue: Arc<Catalogue>,
    orphan_grace: Duration,
}

impl Reconciler {
    /// A reconciler of `catalogue` that releases a slot without a live product
    /// only once it is older than `orphan_grace`.
    pub fn new(store: Store, catalogue: Arc<Catalogue>, orphan_grace: Duration) -> Self {
        Self {
            store,
            catalogue,
            orphan_grace,
        }
    }

    /// The feature reconciled.
    pub fn feature(&self) -> &str {
        self.catalogue.feature()
    }

    /// Reconciles one user. No advisory lock: the user's row lock is enough to
    /// serialise it with everything else that touches this user.
    pub async fn user(&self, user_id: &str, dry_run: bool) -> Result<DriftReport, StoreError> {
        let mut report = DriftReport::new(self.feature(), dry_run);
        let client = self.store.pool().get().await?;
        let users = [user_id.to_owned()];
        let scanned = ledger::scan(
            &self.store,
            &client,
            &self.catalogue,
            &users,
            self.orphan_grace,
        )
        .await?;
        drop(client);

        report.users_checked = 1;
        for repair in scanned.iter().map(Repair::plan) {
            self.settle(&repair, dry_run, &mut report).await?;
        }
        Ok(report)
    }

    /// Reconciles every user, unless another pass holds the lock (then the
    /// report says `skipped`). Stops between two users when `stop` turns true.
    pub async fn all(
        &self,
        dry_run: bool,
        stop: Option<watch::Receiver<bool>>,
    ) -> Result<DriftReport, StoreError> {
        let mut report = DriftReport::new(self.feature(), dry_run);
        let pass = self.pages(dry_run, stop, &mut report);
        if job_lock::run_alone(&self.store, RECONCILE_LOCK_KEY, pass)
            .await?
            .is_none()
        {
            info!(
                feature = self.feature(),
                "reconciliation skipped: another one is running"
            );
            report.skipped = true;
            return Ok(report);
        }
        info!(
            feature = self.feature(),
            dry_run,
            users_checked = report.users_checked,
            users_corrected = report.users_corrected,
            slots_added = report.slots_added,
            slots_removed = report.slots_removed,
            counters_corrected = report.counters_corrected,
            users_over_limit = report.users_over_limit,
            drift = report.drift(),
            "reconciliation finished"
        );
        Ok(report)
    }

    async fn pages(
        &self,
        dry_run: bool,
        stop: Option<watch::Receiver<bool>>,
        report: &mut DriftReport,
    ) -> Result<(), StoreError> {
        let stopped = || stop.as_ref().is_some_and(|s| *s.borrow());
        let feature = self.feature();
        let mut after = String::new();
        loop {
            let client = self.store.pool().get().await?;
            let users: Vec<String> = self
                .store
                .query(
                    &client,
                    self.catalogue.users_after_sql(),
                    &[
                        (&feature, Type::TEXT),
                        (&after, Type::TEXT),
                        (&PAGE_SIZE, Type::INT8),
                    ],
                )
                .await?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<Result<_, _>>()?;
            let Some(last) = users.last().cloned() else {
                return Ok(());
            };
            let scanned = ledger::scan(
                &self.store,
                &client,
                &self.catalogue,
                &users,
                self.orphan_grace,
            )
            .await?;
            drop(client);

            report.users_checked += users.len() as u64;
            for repair in scanned.iter().map(Repair::plan) {
                if stopped() {
                    info!(feature, "reconciliation stopped before its end");
                    return Ok(());
                }
                self.settle(&repair, dry_run, report).await?;
            }
            after = last;
        }
    }

    /// Makes (or, in a dry run, reports) the repair a scan proposed. The scan
    /// read without locks, so the user is locked and read again first, and the
    /// repair written is the one that fresh read calls for.
    async fn settle(
        &self,
        proposed: &Repair,
        dry_run: bool,
        report: &mut DriftReport,
    ) -> Result<(), StoreError> {
        if !proposed.is_needed() {
            return Ok(());
        }
        if dry_run {
            crate::metrics::record_reconciliation(proposed.drift(), 0);
            report.record(proposed);
            return Ok(());
        }

        let mut client = self.store.pool().get().await?;
        let tx = client.transaction().await?;
        let users = [proposed.user_id.clone()];
        let create: &[String] = if proposed.has_row { &[] } else { &users };
        let locked = ledger::lock(
            &self.store,
            &tx,
            &self.catalogue,
            &users,
            create,
            self.orphan_grace,
        )
        .await?;
        let repairs: Vec<Repair> = locked.iter().map(Repair::plan).collect();
        ledger::apply(
            &self.store,
            &tx,
            self.feature(),
            &repairs,
            AuditStyle::Reconcile,
            ACTOR,
        )
        .await?;
        tx.commit().await?;

        for repair in &repairs {
            crate::metrics::record_reconciliation(repair.drift(), repair.drift());
            if repair.is_needed() {
                info!(
                    user_id = %repair.user_id,
                    feature = self.feature(),
                    delta = repair.usage_after - repair.usage_before,
                    usage = repair.usage_after,
                    slots_added = repair.add.len(),
                    slots_removed = repair.remove.len(),
                    counter_corrected = repair.counter_wrong(),
                    "ledger reconciled"
                );
            } else {
                debug!(user_id = %repair.user_id, "drift gone before the lock was granted");
            }
            report.record(repair);
        }
        Ok(())
    }
}
