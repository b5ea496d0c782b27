//! Drift between the slot ledger and the product catalogue, and the repair
//! that removes it.
//!
//! The rule, per user: every live product holds exactly one slot, every slot
//! belongs to a live product, and the counter equals the number of slots. A
//! slot without a live product is released only once it is older than a grace
//! period, because a product service reserves first and inserts its product
//! afterwards: a young slot without a product is most likely an insert still
//! in flight.

use std::collections::BTreeSet;

/// A slot of the ledger, as a reconciliation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerSlot {
    /// The product holding the slot.
    pub product_id: String,
    /// True when the slot is older than the grace period.
    pub settled: bool,
}

/// What one user holds in the ledger and owns in the catalogue, read at one
/// instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSnapshot {
    /// The user.
    pub user_id: String,
    /// False when the user has no counter yet (never reserved, not backfilled).
    pub has_row: bool,
    /// What the counter says.
    pub current_usage: i64,
    /// The limit in force; `None` is unlimited.
    pub usage_limit: Option<i64>,
    /// The slots held.
    pub slots: Vec<LedgerSlot>,
    /// The ids of the user's live products, as text.
    pub live_products: Vec<String>,
}

/// The corrections that bring one user's ledger and counter in line with the
/// catalogue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    /// The user.
    pub user_id: String,
    /// False when the user's counter row must be created first.
    pub has_row: bool,
    /// Live products that hold no slot, in id order.
    pub add: Vec<String>,
    /// Settled slots whose product is deleted or gone, in id order.
    pub remove: Vec<String>,
    /// The counter before the repair.
    pub usage_before: i64,
    /// Slots held before the repair.
    pub slots_before: i64,
    /// The counter (and number of slots) after the repair.
    pub usage_after: i64,
    /// The limit in force.
    pub usage_limit: Option<i64>,
}

impl Repair {
    /// What `snapshot` needs; empty (see [`Repair::is_needed`]) when the user
    /// is consistent.
    pub fn plan(snapshot: &UserSnapshot) -> Self {
        let live: BTreeSet<&str> = snapshot.live_products.iter().map(String::as_str).collect();
        let held: BTreeSet<&str> = snapshot
            .slots
            .iter()
            .map(|s| s.product_id.as_str())
            .collect();

        let add: Vec<String> = live.difference(&held).map(|id| (*id).to_owned()).collect();
        let mut remove: Vec<String> = snapshot
            .slots
            .iter()
            .filter(|s| s.settled && !live.contains(s.product_id.as_str()))
            .map(|s| s.product_id.clone())
            .collect();
        remove.sort();

        let slots_before = snapshot.slots.len() as i64;
        Self {
            user_id: snapshot.user_id.clone(),
            has_row: snapshot.has_row,
            usage_after: slots_before + add.len() as i64 - remove.len() as i64,
            add,
            remove,
            usage_before: snapshot.current_usage,
            slots_before,
            usage_limit: snapshot.usage_limit,
        }
    }

    /// True when anything must change.
    pub fn is_needed(&self) -> bool {
        !self.add.is_empty() || !self.remove.is_empty() || self.counter_wrong()
    }

    /// True when the counter disagreed with the ledger before the repair.
    pub fn counter_wrong(&self) -> bool {
        self.usage_before != self.slots_before
    }

    /// How much drift this repair corrects: slots added and removed plus one
    /// for a wrong counter, the unit of [`DriftReport::drift`].
    pub fn drift(&self) -> u64 {
        (self.add.len() + self.remove.len()) as u64 + u64::from(self.counter_wrong())
    }

    /// True when the user holds more than its limit after the repair. Such a
    /// user keeps every slot, exactly as after a downgrade.
    pub fn over_limit(&self) -> bool {
        self.usage_limit
            .is_some_and(|limit| self.usage_after > limit)
    }

    /// The corrections of this repair, one per product plus one for a wrong
    /// counter.
    pub fn corrections(&self) -> impl Iterator<Item = Correction> + '_ {
        let added = self.add.iter().map(|p| Correction {
            user_id: self.user_id.clone(),
            product_id: Some(p.clone()),
            kind: CorrectionKind::SlotAdded,
            delta: 1,
        });
        let removed = self.remove.iter().map(|p| Correction {
            user_id: self.user_id.clone(),
            product_id: Some(p.clone()),
            kind: CorrectionKind::SlotRemoved,
            delta: -1,
        });
        let counter = self.counter_wrong().then(|| Correction {
            user_id: self.user_id.clone(),
            product_id: None,
            kind: CorrectionKind::CounterCorrected,
            delta: self.slots_before - self.usage_before,
        });
        added.chain(removed).chain(counter)
    }
}

/// What a correction does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorrectionKind {
    /// A live product had no slot: one was taken.
    SlotAdded,
    /// A slot's product is deleted or gone: the slot was released.
    SlotRemoved,
    /// The counter differed from the ledger: it was set to the ledger's count.
    CounterCorrected,
}

/// One change made (or, in a dry run, proposed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Correction {
    /// The user.
    pub user_id: String,
    /// The product; `None` for a counter correction.
    pub product_id: Option<String>,
    /// What it does.
    pub kind: CorrectionKind,
    /// The change of usage it makes.
    pub delta: i64,
}

/// Most corrections a [`DriftReport`] lists; the counts cover all of them.
pub const MAX_LISTED_CORRECTIONS: usize = 100;

/// What a reconciliation found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriftReport {
    /// The feature the catalogue counts.
    pub feature: String,
    /// True when nothing was written.
    pub dry_run: bool,
    /// True when another reconciliation of every user held the lock, so this
    /// one did nothing.
    pub skipped: bool,
    /// Users compared.
    pub users_checked: u64,
    /// Users with at least one correction.
    pub users_corrected: u64,
    /// Slots taken for live products.
    pub slots_added: u64,
    /// Slots released for want of a live product.
    pub slots_removed: u64,
    /// Users whose counter differed from their ledger.
    pub counters_corrected: u64,
    /// Users above their limit after the corrections.
    pub users_over_limit: u64,
    /// The first [`MAX_LISTED_CORRECTIONS`] corrections.
    pub corrections: Vec<Correction>,
}

impl DriftReport {
    /// An empty report.
    pub fn new(feature: &str, dry_run: bool) -> Self {
        Self {
            feature: feature.to_owned(),
            dry_run,
            ..Self::default()
        }
    }

    /// Counts a repair made (or proposed).
    pub fn record(&mut self, repair: &Repair) {
        if !repair.is_needed() {
            return;
        }
        self.users_corrected += 1;
        self.slots_added += repair.add.len() as u64;
        self.slots_removed += repair.remove.len() as u64;
        self.counters_corrected += u64::from(repair.counter_wrong());
        self.users_over_limit += u64::from(repair.over_limit());
        let room = MAX_LISTED_CORRECTIONS.saturating_sub(self.corrections.len());
        self.corrections.extend(repair.corrections().take(room));
    }

    /// The total drift found: slots added and removed plus counters corrected.
    /// Zero means ledger and catalogue agreed.
    pub fn drift(&self) -> u64 {
        self.slots_added + self.slots_removed + self.counters_corrected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: &str, settled: bool) -> LedgerSlot {
        LedgerSlot {
            product_id: id.into(),
            settled,
        }
    }

    fn snapshot(usage: i64, slots: Vec<LedgerSlot>, live: &[&str]) -> UserSnapshot {
        UserSnapshot {
            user_id: "u".into(),
            has_row: true,
            current_usage: usage,
            usage_limit: Some(2),
            slots,
            live_products: live.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// A consistent user needs nothing.
    #[test]
    fn consistent_user_needs_nothing() {
        let repair = Repair::plan(&snapshot(
            2,
            vec![slot("a", true), slot("b", true)],
            &["b", "a"],
        ));
        assert!(!repair.is_needed());
        assert_eq!(repair.corrections().count(), 0);
    }

    /// Missing slots are added, settled orphans removed, young orphans kept,
    /// and a wrong counter is reported with the difference it corrects.
    #[test]
    fn plans_every_kind_of_drift() {
        let repair = Repair::plan(&snapshot(
            5,
            vec![slot("gone", true), slot("young", false), slot("kept", true)],
            &["kept", "new2", "new1"],
        ));
        assert_eq!(repair.add, ["new1", "new2"]);
        assert_eq!(repair.remove, ["gone"]);
        assert_eq!(repair.usage_after, 4);
        assert!(repair.counter_wrong());
        assert!(repair.over_limit());
        let kinds: Vec<_> = repair.corrections().map(|c| (c.kind, c.delta)).collect();
        assert_eq!(
            kinds,
            [
                (CorrectionKind::SlotAdded, 1),
                (CorrectionKind::SlotAdded, 1),
                (CorrectionKind::SlotRemoved, -1),
                (CorrectionKind::CounterCorrected, -2),
            ]
        );
    }

    /// The report counts everything but lists at most the first hundred.
    #[test]
    fn report_caps_the_list_not_the_counts() {
        let live: Vec<String> = (0..150).map(|i| format!("p{i}")).collect();
        let repair = Repair::plan(&UserSnapshot {
            live_products: live,
            ..snapshot(0, vec![], &[])
        });
        let mut report = DriftReport::new("product_slot", false);
        report.record(&repair);
        assert_eq!(report.slots_added, 150);
        assert_eq!(report.corrections.len(), MAX_LISTED_CORRECTIONS);
        assert_eq!(report.drift(), 150);
    }
}
