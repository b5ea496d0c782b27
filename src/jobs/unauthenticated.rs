//! Reminds operators, at start-up and every hour, that the server lets in
//! anyone who can reach its port.

use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

/// How often the warning is repeated.
pub const REPEAT_EVERY: Duration = Duration::from_secs(3600);

/// Logs the warning now and every `every` until `stop` changes.
pub async fn warn_periodically(every: Duration, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticks.tick() => warn!(
                "authentication is off: any caller can read and change every user's usage; \
                 serve with a JWT key (USAGE_AUTH_JWT_SECRET or USAGE_AUTH_JWT_PUBLIC_KEY) instead"
            ),
            _ = stop.changed() => return,
        }
    }
}
