//! Keeps the gRPC health service truthful: `SERVING` only while the database
//! answers.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::watch;
use tonic_health::{server::HealthReporter, ServingStatus};
use tracing::{info, warn};

use crate::proto::usage_service_server::SERVICE_NAME;

/// Probes the database every `interval` and reports the result for both the
/// whole server (`""`) and `usage.v1.UsageService`, logging each change.
/// Returns when `stop` changes; the caller then owns the health status.
pub async fn watch_database(
    pool: Pool,
    reporter: HealthReporter,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut serving = None;
    loop {
        let healthy = probe(&pool, interval.max(Duration::from_secs(1))).await;
        if serving != Some(healthy) {
            if healthy {
                info!("database answers; serving");
            } else {
                warn!("database does not answer; not serving");
            }
            set_status(&reporter, healthy).await;
            serving = Some(healthy);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Sets the status of the server and of the usage service together.
pub async fn set_status(reporter: &HealthReporter, serving: bool) {
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
    crate::metrics::set_health(serving);
}

/// One round trip to the database within `timeout`.
async fn probe(pool: &Pool, timeout: Duration) -> bool {
    let attempt = async {
        let client = pool.get().await.ok()?;
        client.simple_query("SELECT 1").await.ok()
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(_)))
}
