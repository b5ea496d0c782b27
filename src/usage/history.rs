//! What a client can prove about the slots it asked for, from the answers it
//! got: the Jepsen-style bounds on each user's final usage.
//!
//! Reserve and Release are idempotent per product, so the reasoning is per
//! product. A client that sends at most one call at a time for a product
//! knows, after each answer, whether the product holds a slot: an
//! acknowledged Reserve means it does, an acknowledged Release means it does
//! not, a refusal changes nothing, and a call whose answer never came (timed
//! out, cancelled, connection lost) leaves it unknown until a later answer
//! settles it. For each user this gives
//!
//! ```text
//! products known held <= final usage <= products known held + products unknown
//! ```
//!
//! and, slot by slot, every product known held is in the ledger and every
//! product known free is not.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

/// The two calls that change usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// Reserve: take a slot for the product.
    Reserve,
    /// Release: free the product's slot.
    Release,
}

/// What the client learned from one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallResult {
    /// The service answered OK: after a Reserve the product holds a slot
    /// (reserved now or already held), after a Release it holds none.
    Acknowledged,
    /// The service answered with an error that guarantees nothing changed
    /// (a refusal at the limit, an invalid argument).
    Refused,
    /// No answer that says what happened: a deadline, a cancellation, a lost
    /// connection, or `UNAVAILABLE` (which is safe to retry but may follow a
    /// commit whose answer was lost).
    Unknown,
}

/// What a product is known to hold after the calls recorded so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// The product holds a slot.
    Held,
    /// The product holds no slot.
    Free,
    /// Either: a call whose outcome is unknown may or may not have applied.
    Unknown,
}

/// The per-product knowledge of one client, or of several clients that
/// never call for the same product at the same time.
#[derive(Debug, Clone, Default)]
pub struct History {
    products: BTreeMap<(String, String), SlotState>,
}

/// The range a user's final usage must fall in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageBounds {
    /// Products known to hold a slot.
    pub min: i64,
    /// `min` plus the products whose state is unknown.
    pub max: i64,
}

/// What the database holds, to compare with a [`History`].
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Every `(user_id, product_id)` in the ledger.
    pub slots: BTreeSet<(String, String)>,
    /// `current_usage` per user; a user absent has zero.
    pub usage: BTreeMap<String, i64>,
}

/// A way the database disagrees with what the client was told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryViolation {
    /// An acknowledged Reserve whose slot is gone: a lost slot.
    LostSlot {
        /// The user.
        user_id: String,
        /// The product.
        product_id: String,
    },
    /// A slot for a product whose Release was acknowledged, or that was never
    /// reserved: a slot that should not be there.
    StraySlot {
        /// The user.
        user_id: String,
        /// The product.
        product_id: String,
    },
    /// A user's usage outside the bounds the answers allow.
    OutOfBounds {
        /// The user.
        user_id: String,
        /// `current_usage` in the database.
        usage: i64,
        /// What the answers allow.
        bounds: UsageBounds,
    },
}

impl History {
    /// An empty history: every product starts free.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the result of one call. Calls for one product must be
    /// recorded in the order they were made, and must not overlap.
    pub fn record(&mut self, user_id: &str, product_id: &str, kind: CallKind, result: CallResult) {
        let key = (user_id.to_owned(), product_id.to_owned());
        let state = self.products.entry(key).or_insert(SlotState::Free);
        let target = match kind {
            CallKind::Reserve => SlotState::Held,
            CallKind::Release => SlotState::Free,
        };
        *state = match result {
            CallResult::Acknowledged => target,
            CallResult::Refused => *state,
            // A call that may have applied leaves the product in its target
            // state or where it was; only when those agree is it still known.
            CallResult::Unknown if *state == target => target,
            CallResult::Unknown => SlotState::Unknown,
        };
    }

    /// What is known of one product (`Free` when never called for).
    pub fn state(&self, user_id: &str, product_id: &str) -> SlotState {
        self.products
            .get(&(user_id.to_owned(), product_id.to_owned()))
            .copied()
            .unwrap_or(SlotState::Free)
    }

    /// The bounds on each user's final usage.
    pub fn bounds(&self) -> BTreeMap<String, UsageBounds> {
        let mut bounds = BTreeMap::<String, UsageBounds>::new();
        for ((user_id, _), state) in &self.products {
            let entry = bounds
                .entry(user_id.clone())
                .or_insert(UsageBounds { min: 0, max: 0 });
            match state {
                SlotState::Held => {
                    entry.min += 1;
                    entry.max += 1;
                }
                SlotState::Unknown => entry.max += 1,
                SlotState::Free => {}
            }
        }
        bounds
    }

    /// How many products are in each state, `(held, free, unknown)`.
    pub fn tally(&self) -> (usize, usize, usize) {
        self.products
            .values()
            .fold((0, 0, 0), |(h, f, u), state| match state {
                SlotState::Held => (h + 1, f, u),
                SlotState::Free => (h, f + 1, u),
                SlotState::Unknown => (h, f, u + 1),
            })
    }

    /// Every way `observed` contradicts the answers recorded; empty when the
    /// database is consistent with them. Only the users of this history are
    /// examined.
    pub fn verify(&self, observed: &Observed) -> Vec<HistoryViolation> {
        let mut violations = Vec::new();
        for ((user_id, product_id), state) in &self.products {
            let held = observed
                .slots
                .contains(&(user_id.clone(), product_id.clone()));
            let ids = || (user_id.clone(), product_id.clone());
            match (state, held) {
                (SlotState::Held, false) => {
                    let (user_id, product_id) = ids();
                    violations.push(HistoryViolation::LostSlot {
                        user_id,
                        product_id,
                    });
                }
                (SlotState::Free, true) => {
                    let (user_id, product_id) = ids();
                    violations.push(HistoryViolation::StraySlot {
                        user_id,
                        product_id,
                    });
                }
                _ => {}
            }
        }
        for (user_id, bounds) in self.bounds() {
            let usage = observed.usage.get(&user_id).copied().unwrap_or(0);
            if usage < bounds.min || usage > bounds.max {
                violations.push(HistoryViolation::OutOfBounds {
                    user_id,
                    usage,
                    bounds,
                });
            }
        }
        violations
    }
}

impl fmt::Display for HistoryViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::LostSlot {
                user_id,
                product_id,
            } => write!(
                f,
                "lost slot: user {user_id:?} product {product_id:?} was acknowledged as held but is not in the ledger"
            ),
            Self::StraySlot {
                user_id,
                product_id,
            } => write!(
                f,
                "stray slot: user {user_id:?} product {product_id:?} is in the ledger but was acknowledged as free"
            ),
            Self::OutOfBounds {
                user_id,
                usage,
                bounds,
            } => write!(
                f,
                "usage out of bounds: user {user_id:?} holds {usage}, answers allow {}..={}",
                bounds.min, bounds.max
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(slots: &[(&str, &str)], usage: &[(&str, i64)]) -> Observed {
        Observed {
            slots: slots
                .iter()
                .map(|(u, p)| ((*u).to_owned(), (*p).to_owned()))
                .collect(),
            usage: usage.iter().map(|(u, n)| ((*u).to_owned(), *n)).collect(),
        }
    }

    /// Acknowledged answers fix a product's state, refusals change nothing,
    /// and an unknown answer makes it unknown unless it could not change it.
    #[test]
    fn answers_settle_or_unsettle_a_product() {
        let mut history = History::new();
        history.record("u", "a", CallKind::Reserve, CallResult::Acknowledged);
        history.record("u", "b", CallKind::Reserve, CallResult::Unknown);
        history.record("u", "c", CallKind::Reserve, CallResult::Refused);
        history.record("u", "d", CallKind::Reserve, CallResult::Unknown);
        history.record("u", "d", CallKind::Reserve, CallResult::Acknowledged);
        history.record("u", "e", CallKind::Release, CallResult::Unknown);
        history.record("u", "a", CallKind::Reserve, CallResult::Unknown);

        assert_eq!(history.state("u", "a"), SlotState::Held);
        assert_eq!(history.state("u", "b"), SlotState::Unknown);
        assert_eq!(history.state("u", "c"), SlotState::Free);
        assert_eq!(history.state("u", "d"), SlotState::Held);
        assert_eq!(history.state("u", "e"), SlotState::Free);
        assert_eq!(history.bounds()["u"], UsageBounds { min: 2, max: 3 });
    }

    /// A lost slot, a stray slot and a count outside the bounds are each
    /// reported; a database within the bounds passes.
    #[test]
    fn verify_reports_each_contradiction() {
        let mut history = History::new();
        history.record("u", "a", CallKind::Reserve, CallResult::Acknowledged);
        history.record("u", "b", CallKind::Reserve, CallResult::Unknown);
        history.record("u", "c", CallKind::Reserve, CallResult::Acknowledged);
        history.record("u", "c", CallKind::Release, CallResult::Acknowledged);

        let ok = observed(&[("u", "a"), ("u", "b")], &[("u", 2)]);
        assert!(history.verify(&ok).is_empty());
        let ok_without_b = observed(&[("u", "a")], &[("u", 1)]);
        assert!(history.verify(&ok_without_b).is_empty());

        let lost = observed(&[("u", "b")], &[("u", 1)]);
        assert!(matches!(
            history.verify(&lost)[..],
            [HistoryViolation::LostSlot { .. }]
        ));
        let stray = observed(&[("u", "a"), ("u", "c")], &[("u", 2)]);
        assert!(matches!(
            history.verify(&stray)[..],
            [HistoryViolation::StraySlot { .. }]
        ));
        let counted_twice = observed(&[("u", "a"), ("u", "b")], &[("u", 3)]);
        assert!(matches!(
            history.verify(&counted_twice)[..],
            [HistoryViolation::OutOfBounds { usage: 3, .. }]
        ));
    }
}
