//! The domain: what a slot, a reservation and a limit are, independent of gRPC
//! and SQL.
//!
//! Identifiers are validated once, when a request enters the service, by the
//! functions here; everything below the transport takes them as checked.

pub mod admin;

pub mod history;

pub mod drift;

use std::fmt;

pub mod feed;

/// The feature counted when a request names none.
pub const DEFAULT_FEATURE: &str = "product_slot";

/// Longest identifier accepted, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// Why a request field was refused; becomes one `BadRequest` field violation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field, as named in the protobuf request.
    pub field: &'static str,
    /// What is wrong with it, in words a caller can act on.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: &'static str, description: impl Into<String>) -> Self {
        Self {
            field,
            description: description.into(),
        }
    }
}

/// Checks an identifier: 1 to 256 bytes, no control characters.
pub fn validate_id(field: &'static str, value: &str) -> Result<(), FieldViolation> {
    if value.is_empty() {
        return Err(FieldViolation::new(field, "must not be empty"));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(FieldViolation::new(
            field,
            format!("must be at most {MAX_ID_BYTES} bytes, got {}", value.len()),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldViolation::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// The feature named by a request: empty means [`DEFAULT_FEATURE`]. Whether
/// the feature exists is for the store to say.
pub fn feature_or_default(field: &'static str, value: &str) -> Result<String, FieldViolation> {
    if value.is_empty() {
        return Ok(DEFAULT_FEATURE.to_owned());
    }
    validate_id(field, value)?;
    Ok(value.to_owned())
}

/// Why a slot is being reserved; recorded as the audit row's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveAction {
    /// A new product.
    Add,
    /// A deleted product coming back.
    Restore,
}

impl ReserveAction {
    /// The action as written in `usage_events.action`.
    pub fn as_audit_action(self) -> &'static str {
        match self {
            Self::Add => "reserve",
            Self::Restore => "restore",
        }
    }
}

/// What a user holds of one feature and the limit in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// The user.
    pub user_id: String,
    /// The feature counted.
    pub feature: String,
    /// The user's tier.
    pub tier: String,
    /// Slots held now.
    pub current_usage: i64,
    /// The limit in force; `None` is unlimited.
    pub usage_limit: Option<i64>,
    /// Slots held pending confirmation, included in `current_usage`.
    pub pending: i64,
}

impl Usage {
    /// Slots still free; `None` when unlimited. Never negative, even for a
    /// user above its limit.
    pub fn remaining(&self) -> Option<i64> {
        self.usage_limit
            .map(|limit| limit.saturating_sub(self.current_usage).max(0))
    }

    /// True when the user holds more than its limit allows (after a downgrade
    /// or a lowered limit).
    pub fn over_limit(&self) -> bool {
        self.usage_limit
            .is_some_and(|limit| self.current_usage > limit)
    }
}

/// The answer to a Reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// A slot was taken for the product.
    Reserved(Usage),
    /// The product already held a slot; nothing changed.
    AlreadyHeld(Usage),
    /// The user is at (or above) its limit; nothing changed but the refusal's
    /// audit row.
    Denied(Usage),
}

/// The answer to a Release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The product's slot was freed.
    Released(Usage),
    /// The product held no slot; nothing changed.
    NotHeld(Usage),
}

/// Who caused a change, recorded in its audit row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// The authenticated caller, when known.
    pub actor: Option<String>,
    /// The `x-request-id` the caller sent, when it sent one.
    pub request_id: Option<String>,
}

/// Most products one bulk call may name.
pub const MAX_BULK_PRODUCTS: usize = 1000;

/// Shortest and longest time a hold may be asked for.
pub const HOLD_TTL_RANGE: (std::time::Duration, std::time::Duration) = (
    std::time::Duration::from_secs(1),
    std::time::Duration::from_secs(24 * 60 * 60),
);

/// The answer to a ReserveMany.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveManyOutcome {
    /// Every product not yet holding a slot got one.
    Reserved {
        /// Usage after the call.
        usage: Usage,
        /// Products that got a slot now.
        reserved: Vec<String>,
        /// Products that held one already.
        already_held: Vec<String>,
    },
    /// Not enough room for all of them: none was reserved.
    Denied {
        /// Usage now.
        usage: Usage,
        /// Slots the call needed.
        requested: i64,
        /// Slots that were free.
        available: i64,
    },
}

/// The answer to a ReleaseMany.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseManyOutcome {
    /// Usage after the call.
    pub usage: Usage,
    /// Products whose slot was freed.
    pub released: Vec<String>,
    /// Products that held no slot.
    pub not_held: Vec<String>,
}

/// The answer to a Confirm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfirmOutcome {
    /// The hold is now permanent (or already was).
    Confirmed(Usage),
    /// The hold had expired; the slot was reserved again.
    ReReserved(Usage),
    /// The hold had expired and the user is at its limit.
    Denied(Usage),
}

impl fmt::Display for ReserveAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_audit_action())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Identifiers are refused when empty, too long or with control characters,
    /// and accepted up to exactly 256 bytes of any unicode.
    #[test]
    fn validates_identifiers() {
        assert!(validate_id("user_id", "").is_err());
        assert!(validate_id("user_id", &"x".repeat(257)).is_err());
        assert!(validate_id("user_id", "a\nb").is_err());
        assert!(validate_id("user_id", "a\u{7f}b").is_err());
        assert!(validate_id("user_id", &"x".repeat(256)).is_ok());
        assert!(validate_id("user_id", "ユーザー-42").is_ok());
    }

    /// Remaining never goes negative and over_limit only holds above the limit.
    #[test]
    fn remaining_and_over_limit() {
        let mut usage = Usage {
            user_id: "u".into(),
            feature: DEFAULT_FEATURE.into(),
            tier: "free".into(),
            current_usage: 50,
            usage_limit: Some(50),
            pending: 0,
        };
        assert_eq!(usage.remaining(), Some(0));
        assert!(!usage.over_limit());
        usage.current_usage = 70;
        assert_eq!(usage.remaining(), Some(0));
        assert!(usage.over_limit());
        usage.usage_limit = None;
        assert_eq!(usage.remaining(), None);
        assert!(!usage.over_limit());
    }
}
