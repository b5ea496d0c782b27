//! The hold sweep: frees holds nobody confirmed in time.
//!
//! Reserve, ReserveMany, Confirm and Check already treat an expired hold as
//! free at the instant they run, so the sweep is not what keeps the limit
//! right; it keeps `current_usage` and `pending` in Get and ListAll honest and
//! writes the `expire` audit rows. Several replicas may sweep at once: each
//! user is expired under its row lock, so a hold is freed exactly once.

use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::store::Store;

/// Users handled per round; a round repeats at once while it finds a full
/// batch.
const USERS_PER_ROUND: i64 = 500;

/// Sweeps every `interval` until `stop` changes.
pub async fn sweep_expired_holds(
    store: Store,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        match store.expire_holds(USERS_PER_ROUND).await {
            Ok(0) => {}
            Ok(freed) => {
                crate::metrics::record_holds_expired(u64::try_from(freed).unwrap_or(0));
                info!(freed, "expired holds freed");
                continue;
            }
            Err(err) => warn!(cause = %err, "hold sweep failed; retrying next round"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}
