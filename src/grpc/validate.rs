//! Request validation: every check of a request runs before anything touches
//! the database, and all violations of one request are reported together.

use tonic::{metadata::MetadataMap, Status};

use super::status::invalid_argument;
use crate::usage::{self, Caller, FieldViolation};

/// Longest `x-request-id` accepted, in bytes.
const MAX_REQUEST_ID_BYTES: usize = 128;

/// Collects violations, then fails with one `INVALID_ARGUMENT` naming them all.
#[derive(Default)]
pub(crate) struct Violations(Vec<FieldViolation>);

impl Violations {
    /// Checks an identifier field, returning it when valid.
    pub(crate) fn id<'a>(&mut self, field: &'static str, value: &'a str) -> &'a str {
        if let Err(violation) = usage::validate_id(field, value) {
            self.0.push(violation);
        }
        value
    }

    /// Resolves a feature field (empty means the default feature).
    pub(crate) fn feature(&mut self, field: &'static str, value: &str) -> String {
        usage::feature_or_default(field, value).unwrap_or_else(|violation| {
            self.0.push(violation);
            String::new()
        })
    }

    /// Records a violation found by the caller.
    pub(crate) fn push(&mut self, field: &'static str, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// True once any violation was recorded.
    pub(crate) fn has_any(&self) -> bool {
        !self.0.is_empty()
    }

    /// `Ok` when nothing was wrong.
    pub(crate) fn check(self) -> Result<(), Status> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(invalid_argument(&self.0))
        }
    }
}

/// Who is calling: the subject of the token the gate authenticated (the
/// actor of every audit row the call writes), and the request id from the
/// metadata.
pub(crate) fn caller(metadata: &MetadataMap) -> Result<Caller, Status> {
    let request_id = match metadata.get("x-request-id") {
        None => None,
        Some(value) => {
            let valid = value
                .to_str()
                .ok()
                .filter(|v| !v.is_empty() && v.len() <= MAX_REQUEST_ID_BYTES);
            match valid {
                Some(v) => Some(v.to_owned()),
                None => {
                    return Err(invalid_argument(&[FieldViolation::new(
                        "x-request-id",
                        format!("must be 1 to {MAX_REQUEST_ID_BYTES} printable ASCII characters"),
                    )]))
                }
            }
        }
    };
    Ok(Caller {
        actor: super::gate::authenticated().map(|identity| identity.subject),
        request_id,
    })
}
