//! A few writes at a time per user, from this process, for the calls that
//! are not coalesced: ReserveMany, ReleaseMany and Confirm (Reserve and
//! Release go through [`super::coalesce`] instead).
//!
//! Every write of a user updates that user's counter row, so PostgreSQL
//! runs them one after another behind the row lock whatever this process
//! does. Sending them all at once only makes that queue more
//! expensive: each waiter holds a connection, sleeps on the lock and is woken
//! to recheck the row when the transaction before it commits. Measured on one
//! hot user, the statement alone runs at about 1,200 commits per second from
//! one to four connections and at about 700 from 32 (bench/compare.sh,
//! `hot`). So the calls for one user wait here instead, in arrival order, and
//! at most [`PER_USER`] of them go to the database at once; calls for other
//! users are not held up. Not one: refusals do not wait for each other in
//! PostgreSQL, and one at a time cut the throughput of a user kept at its
//! limit by more than half (3,881 to 1,577 refusals per second).
//!
//! This is a matter of speed, not of correctness: the limit is still enforced
//! by the single statement in PostgreSQL, which also orders the writes of
//! other replicas and of background jobs.

use std::{
    hash::{BuildHasher, RandomState},
    time::Duration,
};

use tokio::sync::{Semaphore, SemaphorePermit};

use super::StoreError;

/// Stripes of the lock table. Users are hashed onto them, so two users
/// may share one; with a few hundred calls in flight that is rare, and
/// it costs only a little waiting.
const STRIPES: usize = 4096;

/// Writes of one user that may be in PostgreSQL at once.
pub(crate) const PER_USER: usize = 4;

/// The right of one call to write for a user; the next waiting call's turn
/// comes when it is dropped.
pub(crate) type Turn<'a> = SemaphorePermit<'a>;

/// A semaphore per stripe of (user, feature).
pub(crate) struct UserTurns {
    stripes: Box<[Semaphore]>,
    hasher: RandomState,
}

impl Default for UserTurns {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Semaphore::new(PER_USER)).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl UserTurns {
    /// Waits for the turn of `user_id` and `feature`, at most `wait` (no
    /// bound when `None`). A caller that gives up, or whose call is cancelled,
    /// simply leaves the queue.
    pub(crate) async fn take(
        &self,
        user_id: &str,
        feature: &str,
        wait: Option<Duration>,
    ) -> Result<Turn<'_>, StoreError> {
        let stripe = &self.stripes[self.stripe(user_id, feature)];
        let turn = async {
            stripe
                .acquire()
                .await
                .expect("the semaphores live as long as the store and are never closed")
        };
        match wait {
            None => Ok(turn.await),
            Some(wait) => tokio::time::timeout(wait, turn).await.map_err(|_| {
                StoreError::Unavailable(format!(
                    "other calls for this user kept it busy for {wait:?}; try again"
                ))
            }),
        }
    }

    fn stripe(&self, user_id: &str, feature: &str) -> usize {
        (self.hasher.hash_one((user_id, feature)) % STRIPES as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call for a user with [`PER_USER`] calls running waits for one of
    /// them; a call for another user does not.
    #[tokio::test]
    async fn busy_user_waits_other_user_does_not() {
        let turns = UserTurns::default();
        let other = (0..)
            .map(|n| format!("user-{n}"))
            .find(|u| turns.stripe(u, "f") != turns.stripe("alice", "f"))
            .expect("some user lands on another stripe");

        let mut running = Vec::new();
        for _ in 0..PER_USER {
            running.push(turns.take("alice", "f", None).await.expect("no wait"));
        }
        let short = Some(Duration::from_millis(20));
        let err = turns
            .take("alice", "f", short)
            .await
            .expect_err("alice's turn is taken");
        assert!(err.is_unavailable(), "{err}");
        let _free = turns
            .take(&other, "f", short)
            .await
            .expect("another user's turn is free");

        running.pop();
        let _again = turns
            .take("alice", "f", short)
            .await
            .expect("alice's turn is free again");
    }
}
