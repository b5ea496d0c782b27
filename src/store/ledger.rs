//! Reading a set of users' ledger next to their live products, and writing the
//! repairs: the part shared by the backfill and by reconciliation.
//!
//! A scan reads without locks and plans; the users that need a change are then
//! locked, read again and repaired in a transaction, so that a correction is
//! always computed from what it replaces.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use tokio_postgres::{types::ToSql, GenericClient, Transaction};

use super::{catalogue::Catalogue, sql, StoreError};
use crate::usage::drift::{LedgerSlot, Repair, UserSnapshot};

/// How the audit trail records a repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuditStyle {
    /// One `backfill` row per user, carrying the user's whole change.
    Backfill,
    /// One `reconcile` row per product, plus one for a wrong counter.
    Reconcile,
}

impl AuditStyle {
    fn action(self) -> &'static str {
        match self {
            Self::Backfill => "backfill",
            Self::Reconcile => "reconcile",
        }
    }
}

/// The users in `users`, read without locking (a scan or a dry run).
pub(crate) async fn scan(
    client: &impl GenericClient,
    catalogue: &Catalogue,
    users: &[String],
    grace: Duration,
) -> Result<Vec<UserSnapshot>, StoreError> {
    let counters = client
        .query(sql::LEDGER_USAGE, &[&catalogue.feature(), &users])
        .await?;
    let mut snapshots = read_rest(client, catalogue, grace, counters).await?;
    if snapshots.len() < users.len() {
        let default_limit: Option<i64> = client
            .query_one(sql::LEDGER_DEFAULT_LIMIT, &[&catalogue.feature()])
            .await?
            .try_get(0)?;
        let known: HashSet<String> = snapshots.iter().map(|s| s.user_id.clone()).collect();
        let mut newcomers: Vec<String> = users
            .iter()
            .filter(|u| !known.contains(*u))
            .cloned()
            .collect();
        newcomers.sort();
        newcomers.dedup();
        let counters: Vec<UserSnapshot> = newcomers
            .into_iter()
            .map(|user_id| UserSnapshot {
                user_id,
                has_row: false,
                current_usage: 0,
                usage_limit: default_limit,
                slots: Vec::new(),
                live_products: Vec::new(),
            })
            .collect();
        snapshots.extend(fill(client, catalogue, counters, grace).await?);
    }
    Ok(snapshots)
}

/// Locks the rows of `users` (creating those of users in `create` first) and
/// reads them: from here to commit no Reserve or Release of these users runs,
/// so the snapshots stay exact. `users` must be sorted.
pub(crate) async fn lock(
    tx: &Transaction<'_>,
    catalogue: &Catalogue,
    users: &[String],
    create: &[String],
    grace: Duration,
) -> Result<Vec<UserSnapshot>, StoreError> {
    if !create.is_empty() {
        tx.execute(sql::LEDGER_CREATE_USERS, &[&catalogue.feature(), &create])
            .await?;
    }
    let counters = tx
        .query(sql::LEDGER_LOCK, &[&catalogue.feature(), &users])
        .await?;
    read_rest(tx, catalogue, grace, counters).await
}

/// Snapshots of the users whose counter rows are `counters`, completed with
/// their slots and live products.
async fn read_rest(
    client: &impl GenericClient,
    catalogue: &Catalogue,
    grace: Duration,
    counters: Vec<tokio_postgres::Row>,
) -> Result<Vec<UserSnapshot>, StoreError> {
    let snapshots = counters
        .iter()
        .map(|row| {
            Ok(UserSnapshot {
                user_id: row.try_get("user_id")?,
                has_row: row.try_get("has_row")?,
                current_usage: row.try_get("current_usage")?,
                usage_limit: row.try_get("usage_limit")?,
                slots: Vec::new(),
                live_products: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    fill(client, catalogue, snapshots, grace).await
}

/// Adds to each snapshot its slots and live products.
async fn fill(
    client: &impl GenericClient,
    catalogue: &Catalogue,
    mut snapshots: Vec<UserSnapshot>,
    grace: Duration,
) -> Result<Vec<UserSnapshot>, StoreError> {
    if snapshots.is_empty() {
        return Ok(snapshots);
    }
    let users: Vec<&str> = snapshots.iter().map(|s| s.user_id.as_str()).collect();
    let index: HashMap<String, usize> = users
        .iter()
        .enumerate()
        .map(|(i, u)| ((*u).to_owned(), i))
        .collect();

    let slots = client
        .query(
            sql::LEDGER_SLOTS,
            &[&catalogue.feature(), &users, &grace.as_secs_f64()],
        )
        .await?;
    let live = client
        .query(catalogue.live_products_sql(), &[&users])
        .await?;
    for row in slots {
        let user_id: &str = row.try_get("user_id")?;
        if let Some(&i) = index.get(user_id) {
            snapshots[i].slots.push(LedgerSlot {
                product_id: row.try_get("product_id")?,
                settled: row.try_get("settled")?,
            });
        }
    }
    for row in live {
        let user_id: &str = row.try_get("user_id")?;
        if let Some(&i) = index.get(user_id) {
            let product_id: Option<String> = row.try_get("product_id")?;
            // A product without an id cannot hold a slot; the catalogue's
            // primary key normally rules it out.
            if let Some(product_id) = product_id {
                snapshots[i].live_products.push(product_id);
            }
        }
    }
    Ok(snapshots)
}

/// Writes `repairs` in `tx`, whose caller holds the users' row locks: slots
/// released and taken, counters set, and the audit rows. The audit rows start
/// from each user's audited sum, so the trail sums to the new counter.
pub(crate) async fn apply(
    tx: &Transaction<'_>,
    feature: &str,
    repairs: &[Repair],
    style: AuditStyle,
    actor: &str,
) -> Result<(), StoreError> {
    let repairs: Vec<&Repair> = repairs.iter().filter(|r| r.is_needed()).collect();
    if repairs.is_empty() {
        return Ok(());
    }
    let users: Vec<&str> = repairs.iter().map(|r| r.user_id.as_str()).collect();

    let audited: HashMap<String, i64> = tx
        .query(sql::LEDGER_AUDITED, &[&feature, &users])
        .await?
        .iter()
        .map(|row| Ok((row.try_get("user_id")?, row.try_get("audited")?)))
        .collect::<Result<_, StoreError>>()?;

    let pairs = |pick: fn(&Repair) -> &Vec<String>| {
        let mut owners = Vec::new();
        let mut products = Vec::new();
        for repair in &repairs {
            for product in pick(repair) {
                owners.push(repair.user_id.as_str());
                products.push(product.as_str());
            }
        }
        (owners, products)
    };
    let (owners, products) = pairs(|r| &r.remove);
    if !owners.is_empty() {
        tx.execute(sql::LEDGER_REMOVE_SLOTS, &[&feature, &owners, &products])
            .await?;
    }
    let (owners, products) = pairs(|r| &r.add);
    if !owners.is_empty() {
        tx.execute(sql::LEDGER_ADD_SLOTS, &[&feature, &owners, &products])
            .await?;
    }

    let usages: Vec<i64> = repairs.iter().map(|r| r.usage_after).collect();
    tx.execute(sql::LEDGER_SET_COUNTERS, &[&feature, &users, &usages])
        .await?;

    let mut rows = AuditRows::default();
    for repair in &repairs {
        let audited = audited.get(&repair.user_id).copied().unwrap_or(0);
        match style {
            AuditStyle::Backfill => rows.backfill(repair, audited),
            AuditStyle::Reconcile => rows.reconcile(repair, audited),
        }
    }
    rows.write(tx, feature, style, actor).await
}

/// The columns of the audit rows to insert, one vector per column.
#[derive(Default)]
struct AuditRows {
    user_id: Vec<String>,
    product_id: Vec<Option<String>>,
    usage_before: Vec<i64>,
    usage_after: Vec<i64>,
    old_value: Vec<Option<String>>,
    new_value: Vec<Option<String>>,
    reason: Vec<String>,
}

impl AuditRows {
    fn push(&mut self, repair: &Repair, product: Option<&str>, before: i64, after: i64) {
        self.user_id.push(repair.user_id.clone());
        self.product_id.push(product.map(str::to_owned));
        self.usage_before.push(before);
        self.usage_after.push(after);
    }

    /// One row for the user's whole change.
    fn backfill(&mut self, repair: &Repair, audited: i64) {
        self.push(repair, None, audited, repair.usage_after);
        self.old_value.push(Some(repair.usage_before.to_string()));
        self.new_value.push(Some(repair.usage_after.to_string()));
        self.reason.push(format!(
            "backfill from the catalogue: {} slots added, {} removed",
            repair.add.len(),
            repair.remove.len()
        ));
    }

    /// One row per product, then one for the counter if the trail still
    /// differs from the ledger.
    fn reconcile(&mut self, repair: &Repair, mut audited: i64) {
        for product in &repair.add {
            self.push(repair, Some(product), audited, audited + 1);
            self.old_value.push(None);
            self.new_value.push(None);
            self.reason.push("live product held no slot".to_owned());
            audited += 1;
        }
        for product in &repair.remove {
            self.push(repair, Some(product), audited, audited - 1);
            self.old_value.push(None);
            self.new_value.push(None);
            self.reason.push("product deleted or gone".to_owned());
            audited -= 1;
        }
        if audited != repair.usage_after || repair.counter_wrong() {
            self.push(repair, None, audited, repair.usage_after);
            self.old_value.push(Some(repair.usage_before.to_string()));
            self.new_value.push(Some(repair.usage_after.to_string()));
            self.reason
                .push("counter differed from the ledger".to_owned());
        }
    }

    async fn write(
        self,
        tx: &Transaction<'_>,
        feature: &str,
        style: AuditStyle,
        actor: &str,
    ) -> Result<(), StoreError> {
        let params: [&(dyn ToSql + Sync); 10] = [
            &feature,
            &style.action(),
            &actor,
            &self.user_id,
            &self.product_id,
            &self.usage_before,
            &self.usage_after,
            &self.old_value,
            &self.new_value,
            &self.reason,
        ];
        tx.execute(sql::LEDGER_AUDIT, &params).await?;
        Ok(())
    }
}
