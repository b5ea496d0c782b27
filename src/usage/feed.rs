//! The cursor of the event feed: which audit events a watcher has seen, so it
//! can resume without missing one.
//!
//! Event ids come from one sequence, but transactions commit in their own
//! order: id 100 may become visible after id 101, or never (a rolled-back
//! transaction). So the cursor is the highest id seen plus the ids below it
//! that were still missing, each with the time it was first found missing. A
//! missing id that appears is delivered then; one still missing after
//! [`MISSING_ID_WAIT`] is given up as rolled back. Every statement the
//! service runs is bounded by `statement_timeout` (seconds), far below that
//! wait, so an id given up on can no longer commit.

use std::{collections::BTreeMap, time::Duration};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};

/// How long an id below the cursor may stay missing before it is given up.
pub const MISSING_ID_WAIT: Duration = Duration::from_secs(60);

/// Most missing ids a cursor keeps; beyond, the oldest are given up.
const MAX_MISSING: usize = 10_000;

/// Where a watcher is in the event sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedCursor {
    /// The highest event id seen.
    pub after: i64,
    /// Ids below `after` not seen yet, with when (unix ms) they were first
    /// found missing.
    pub missing: BTreeMap<i64, u64>,
}

impl FeedCursor {
    /// A cursor positioned after `id`.
    pub fn after(id: i64) -> Self {
        Self {
            after: id,
            missing: BTreeMap::new(),
        }
    }

    /// The missing ids, for the next query.
    pub fn missing_ids(&self) -> Vec<i64> {
        self.missing.keys().copied().collect()
    }

    /// Takes in the ids now visible (ascending: ids above `after` and any
    /// that were missing) and returns each new one with the resume token that
    /// stands just after it. Gaps become missing ids; missing ids older than
    /// [`MISSING_ID_WAIT`] at `now_ms` are given up.
    pub fn advance(&mut self, ids: &[i64], now_ms: u64) -> Vec<(i64, String)> {
        let mut seen = Vec::with_capacity(ids.len());
        for &id in ids {
            if id <= self.after {
                if self.missing.remove(&id).is_some() {
                    seen.push((id, self.token()));
                }
                continue;
            }
            for gap in (self.after + 1)..id {
                self.missing.insert(gap, now_ms);
            }
            self.after = id;
            seen.push((id, self.token()));
        }

        let wait = MISSING_ID_WAIT.as_millis() as u64;
        self.missing
            .retain(|_, first_missing| now_ms.saturating_sub(*first_missing) < wait);
        while self.missing.len() > MAX_MISSING {
            self.missing.pop_first();
        }
        seen
    }

    /// The cursor as an opaque token.
    pub fn token(&self) -> String {
        let missing: Vec<String> = self
            .missing
            .iter()
            .map(|(id, at)| format!("{id}.{at}"))
            .collect();
        URL_SAFE_NO_PAD.encode(format!("f1:{}:{}", self.after, missing.join(",")))
    }

    /// Reads a token made by [`FeedCursor::token`]; `None` for anything else.
    pub fn from_token(token: &str) -> Option<Self> {
        let text = String::from_utf8(URL_SAFE_NO_PAD.decode(token).ok()?).ok()?;
        let mut parts = text.splitn(3, ':');
        if parts.next()? != "f1" {
            return None;
        }
        let after: i64 = parts.next()?.parse().ok()?;
        let mut missing = BTreeMap::new();
        for entry in parts.next()?.split(',').filter(|e| !e.is_empty()) {
            let (id, at) = entry.split_once('.')?;
            let id: i64 = id.parse().ok()?;
            if id >= after || after < 0 {
                return None;
            }
            missing.insert(id, at.parse().ok()?);
        }
        (after >= 0 && missing.len() <= MAX_MISSING).then_some(Self { after, missing })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids arriving out of order are each delivered once, gaps are
    /// remembered, and the token taken at any point resumes without loss.
    #[test]
    fn late_ids_are_delivered_once() {
        let mut cursor = FeedCursor::after(10);
        let first: Vec<i64> = cursor
            .advance(&[11, 13, 14], 0)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(first, vec![11, 13, 14]);
        assert_eq!(cursor.missing_ids(), vec![12]);

        let token = cursor.token();
        let late: Vec<i64> = cursor
            .advance(&[12, 15], 1)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(late, vec![12, 15]);
        assert!(cursor.missing.is_empty());

        let mut resumed = FeedCursor::from_token(&token).unwrap();
        assert_eq!(resumed.after, 14);
        let again: Vec<i64> = resumed
            .advance(&[12, 15], 2)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(
            again,
            vec![12, 15],
            "the late id is not lost across a resume"
        );
    }

    /// A missing id is given up after the wait, and garbage tokens are refused.
    #[test]
    fn missing_ids_expire_and_tokens_validate() {
        let mut cursor = FeedCursor::after(0);
        cursor.advance(&[2], 0);
        assert_eq!(cursor.missing_ids(), vec![1]);
        cursor.advance(&[], MISSING_ID_WAIT.as_millis() as u64);
        assert!(cursor.missing.is_empty());

        assert_eq!(FeedCursor::from_token("garbage"), None);
        assert_eq!(
            FeedCursor::from_token(&URL_SAFE_NO_PAD.encode("f1:5:9.0")),
            None
        );
        assert_eq!(
            FeedCursor::from_token(&URL_SAFE_NO_PAD.encode("f1:-1:")),
            None
        );
        let ok = FeedCursor::from_token(&URL_SAFE_NO_PAD.encode("f1:5:3.7")).unwrap();
        assert_eq!(ok.missing.get(&3), Some(&7));
    }
}
