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

use deadpool_postgres::Transaction;
use tokio_postgres::types::Type;

use super::{catalogue::Catalogue, sql, statements::Param, Connection, Store, StoreError};
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
    store: &Store,
    client: &impl Connection,
    catalogue: &Catalogue,
    users: &[String],
    grace: Duration,
) -> Result<Vec<UserSnapshot>, StoreError> {
    let feature = catalogue.feature();
    let counters = store
        .query(
            client,
            sql::LEDGER_USAGE,
            &[(&feature, Type::TEXT), (&users, Type::TEXT_ARRAY)],
        )
        .await?;
    let mut snapshots = read_rest(store, client, catalogue, grace, counters).await?;
    if snapshots.len() < users.len() {
        let default_limit: Option<i64> = store
            .query_one(client, sql::LEDGER_DEFAULT_LIMIT, &[(&feature, Type::TEXT)])
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
        snapshots.extend(fill(store, client, catalogue, counters, grace).await?);
    }
    Ok(snapshots)
}

/// Locks the rows of `users` (creating those of users in `create` first) and
/// reads them: from here to commit no Reserve or Release of these users runs,
/// so the snapshots stay exact. `users` must be sorted.
pub(crate) async fn lock(
    store: &Store,
    tx: &Transaction<'_>,
    catalogue: &Catalogue,
    users: &[String],
    create: &[String],
    grace: Duration,
) -> Result<Vec<UserSnapshot>, StoreError> {
    let feature = catalogue.feature();
    if !create.is_empty() {
        store
            .query(
                tx,
                sql::LEDGER_CREATE_USERS,
                &[(&feature, Type::TEXT), (&create, Type::TEXT_ARRAY)],
            )
            .await?;
    }
    let counters = store
        .query(
            tx,
            sql::LEDGER_LOCK,
            &[(&feature, Type::TEXT), (&users, Type::TEXT_ARRAY)],
        )
        .await?;
    read_rest(store, tx, catalogue, grace, counters).await
}

/// Snapshots of the users whose counter rows are `counters`, completed with
/// their slots and live products.
async fn read_rest(
    store: &Store,
    client: &impl Connection,
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
    fill(store, client, catalogue, snapshots, grace).await
}

/// Adds to each snapshot its slots and live products.
async fn fill(
    store: &Store,
    client: &impl Connection,
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

    let slots = store
        .query(
            client,
            sql::LEDGER_SLOTS,
            &[
                (&catalogue.feature(), Type::TEXT),
                (&users, Type::TEXT_ARRAY),
                (&grace.as_secs_f64(), Type::FLOAT8),
            ],
        )
        .await?;
    let live = store
        .query(
            client,
            catalogue.live_products_sql(),
            &[(&users, Type::TEXT_ARRAY)],
        )
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
    store: &Store,
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

    let audited: HashMap<String, i64> = store
        .query(
            tx,
            sql::LEDGER_AUDITED,
            &[(&feature, Type::TEXT), (&users, Type::TEXT_ARRAY)],
        )
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
    for (statement, (owners, products)) in [
        (sql::LEDGER_REMOVE_SLOTS, pairs(|r| &r.remove)),
        (sql::LEDGER_ADD_SLOTS, pairs(|r| &r.add)),
    ] {
        if !owners.is_empty() {
            let params: [Param<'_>; 3] = [
                (&feature, Type::TEXT),
                (&owners, Type::TEXT_ARRAY),
                (&products, Type::TEXT_ARRAY),
            ];
            store.query(tx, statement, &params).await?;
        }
    }

    let usages: Vec<i64> = repairs.iter().map(|r| r.usage_after).collect();
    store
        .query(
            tx,
            sql::LEDGER_SET_COUNTERS,
            &[
                (&feature, Type::TEXT),
                (&users, Type::TEXT_ARRAY),
                (&usages, Type::INT8_ARRAY),
            ],
        )
        .await?;

    let mut rows = AuditRows::default();
    for repair in &repairs {
        let audited = audited.get(&repair.user_id).copied().unwrap_or(0);
        match style {
            AuditStyle::Backfill => rows.backfill(repair, audited),
            AuditStyle::Reconcile => rows.reconcile(repair, audited),
        }
    }
    rows.write(store, tx, feature, style, actor).await
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
        store: &Store,
        tx: &Transaction<'_>,
        feature: &str,
        style: AuditStyle,
        actor: &str,
    ) -> Result<(), StoreError> {
        let params: [Param<'_>; 10] = [
            (&feature, Type::TEXT),
            (&style.action(), Type::TEXT),
            (&actor, Type::TEXT),
            (&self.user_id, Type::TEXT_ARRAY),
            (&self.product_id, Type::TEXT_ARRAY),
            (&self.usage_before, Type::INT8_ARRAY),
            (&self.usage_after, Type::INT8_ARRAY),
            (&self.old_value, Type::TEXT_ARRAY),
            (&self.new_value, Type::TEXT_ARRAY),
            (&self.reason, Type::TEXT_ARRAY),
        ];
        store.query(tx, sql::LEDGER_AUDIT, &params).await?;
        Ok(())
    }
}
