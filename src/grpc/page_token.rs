//! Opaque page tokens for keyset pagination.
//!
//! A token carries the filters it was issued for and the key of the last row
//! returned. It is base64 so that callers treat it as opaque; it is not
//! signed, because it grants nothing: a forged token only moves where a page
//! starts within what the caller may already list.

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};

/// Version tag, so that a token format change is refused cleanly.
const VERSION: &str = "p1";

/// Separates the parts; identifiers cannot contain control characters.
const SEPARATOR: char = '\u{1f}';

/// A decoded page token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PageToken {
    /// The filters the token was issued for, in a fixed textual form.
    pub(crate) filters: String,
    /// The key of the last row of the previous page.
    pub(crate) last_key: Vec<String>,
}

impl PageToken {
    /// Encodes the token.
    pub(crate) fn encode(&self) -> String {
        let mut text = format!("{VERSION}{SEPARATOR}{}", self.filters);
        for part in &self.last_key {
            text.push(SEPARATOR);
            text.push_str(part);
        }
        URL_SAFE_NO_PAD.encode(text)
    }

    /// Decodes a token; `None` when it was not produced by [`PageToken::encode`].
    pub(crate) fn decode(token: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let mut parts = text.split(SEPARATOR);
        if parts.next()? != VERSION {
            return None;
        }
        let filters = parts.next()?.to_owned();
        let last_key: Vec<String> = parts.map(str::to_owned).collect();
        if last_key.is_empty() {
            return None;
        }
        Some(Self { filters, last_key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token decodes to what was encoded, and garbage decodes to nothing.
    #[test]
    fn round_trips_and_refuses_garbage() {
        let token = PageToken {
            filters: "product_slot|free".into(),
            last_key: vec!["user-7".into()],
        };
        assert_eq!(PageToken::decode(&token.encode()), Some(token));
        assert_eq!(PageToken::decode("not a token"), None);
        assert_eq!(PageToken::decode(""), None);
        assert_eq!(
            PageToken::decode(&URL_SAFE_NO_PAD.encode("p9\u{1f}x\u{1f}y")),
            None
        );
    }
}
