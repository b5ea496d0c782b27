//! Prometheus metrics: what the service records and the `/metrics` endpoint
//! that serves them on a port of its own.
//!
//! Every metric goes through one of the `record_*` / `set_*` functions below,
//! so the names, labels and units live in this file only. Recording is a hash
//! lookup and an atomic add; until [`install`] has run it does nothing at all.
//! The metrics of every call (requests, durations, queued calls) keep their
//! handles once made, so a call does not build label keys and look them up
//! in the registry again.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `usage_grpc_requests_total` | counter | `rpc`, `code` |
//! | `usage_grpc_request_duration_seconds` | histogram | `rpc` |
//! | `usage_slots_reserved_total` | counter | `feature`, `tier` |
//! | `usage_slots_released_total` | counter | `feature`, `tier` |
//! | `usage_slots_refused_total` | counter | `feature`, `tier` |
//! | `usage_holds_expired_total` | counter | |
//! | `usage_db_pool_connections` | gauge | `state` (`max`, `open`, `idle`) |
//! | `usage_db_pool_waiting` | gauge | |
//! | `usage_db_pool_wait_seconds` | histogram | |
//! | `usage_db_errors_total` | counter | `kind` (`unavailable`, `database`, `unexpected_outcome`) |
//! | `usage_db_batch_calls` | histogram | `kind` (`write`, `get`) |
//! | `usage_db_queued_calls` | gauge | `kind` (`write`, `get`) |
//! | `usage_reconciliation_drift_found_total` | counter | |
//! | `usage_reconciliation_drift_fixed_total` | counter | |
//! | `usage_health_serving` | gauge | 1 while the database answers, else 0 |

use std::{
    collections::HashMap,
    sync::{OnceLock, PoisonError, RwLock},
    time::Duration,
};

use axum::{extract::State, routing::get, Router};
use deadpool_postgres::Pool;
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::{net::TcpListener, sync::watch};
use tonic::Code;
use tracing::{info, warn};

use crate::usage::Usage;

/// Requests served, by RPC (`/package.Service/Method`) and gRPC status code.
pub const GRPC_REQUESTS: &str = "usage_grpc_requests_total";
/// Time from a request's arrival to its response headers, by RPC.
pub const GRPC_DURATION: &str = "usage_grpc_request_duration_seconds";
/// Slots taken by Reserve, by feature and tier.
pub const SLOTS_RESERVED: &str = "usage_slots_reserved_total";
/// Slots freed by Release, by feature and tier.
pub const SLOTS_RELEASED: &str = "usage_slots_released_total";
/// Reserves refused at the limit, by feature and tier.
pub const SLOTS_REFUSED: &str = "usage_slots_refused_total";
/// Holds the sweep freed because nobody confirmed them in time.
pub const HOLDS_EXPIRED: &str = "usage_holds_expired_total";
/// Connections of the pool: `max`, `open` and `idle`.
pub const POOL_CONNECTIONS: &str = "usage_db_pool_connections";
/// Calls waiting for a free connection.
pub const POOL_WAITING: &str = "usage_db_pool_waiting";
/// Time a call waited for a connection.
pub const POOL_WAIT: &str = "usage_db_pool_wait_seconds";
/// Failed database calls, by kind.
pub const DB_ERRORS: &str = "usage_db_errors_total";
/// Calls sent together in one batch statement, by kind (`write` for
/// Reserve and Release, `get`); calls sent alone are not counted.
pub const BATCH_CALLS: &str = "usage_db_batch_calls";
/// Calls waiting in the service to be sent with others, by kind.
pub const QUEUED_CALLS: &str = "usage_db_queued_calls";
/// Drift reconciliation found: slots missing or orphaned, plus counters that
/// disagreed with their ledger (dry runs included).
pub const RECONCILIATION_FOUND: &str = "usage_reconciliation_drift_found_total";
/// Drift reconciliation corrected, in the same units.
pub const RECONCILIATION_FIXED: &str = "usage_reconciliation_drift_fixed_total";
/// 1 while the health service reports `SERVING`, else 0.
pub const HEALTH_SERVING: &str = "usage_health_serving";

/// Bucket bounds of the latency histograms, in seconds: 250 µs to 5 s, dense
/// around the few milliseconds a durable commit takes.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002, 0.003, 0.005, 0.007_5, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0,
];

/// Bucket bounds of the batch-size histogram, in calls (a batch holds at
/// least two and at most a hundred).
const BATCH_BUCKETS: &[f64] = &[2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 100.0];

/// How often histogram samples are folded into their buckets, which bounds
/// the memory they take when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// The recorder's handle and the handles of the per-call metrics, made on
/// first use. They exist only once the recorder does: a handle made before
/// it would record nowhere for good.
struct Installed {
    handle: PrometheusHandle,
    rpcs: RpcTable,
    queued: Handles<Gauge>,
}

/// Metric handles by label value.
struct Handles<T> {
    by_label: RwLock<HashMap<Box<str>, T>>,
}

impl<T: Clone> Handles<T> {
    fn new() -> Self {
        Self {
            by_label: RwLock::new(HashMap::new()),
        }
    }

    /// The handle for `label`, made by `make` the first time.
    fn get(&self, label: &str, make: impl FnOnce() -> T) -> T {
        let known = self.by_label.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(handle) = known.get(label) {
            return handle.clone();
        }
        drop(known);
        self.by_label
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(label.into())
            .or_insert_with(make)
            .clone()
    }
}

/// The request metrics of one RPC: its duration histogram, and its call
/// counter for each status code (made when the code first occurs, so the
/// scrape lists only the codes that did).
struct RpcMetrics {
    duration: Histogram,
    calls: [OnceLock<Counter>; 17],
}

/// The request metrics of every `rpc` label value: one per method the server
/// serves, and `unknown` for any other path. Any other path (a method a
/// client invents, refused for want of a token or answered UNIMPLEMENTED)
/// would otherwise add a label value, and a series, per path. The table is
/// fixed when the recorder is installed, so a call finds its label and its
/// metrics in one lookup; each RPC's metrics are made on its first call.
struct RpcTable {
    served: HashMap<Box<str>, OnceLock<RpcMetrics>>,
    unknown: OnceLock<RpcMetrics>,
}

impl RpcTable {
    fn new() -> Self {
        Self {
            served: crate::grpc::metered::served_methods()
                .map(|path| (path.into_boxed_str(), OnceLock::new()))
                .collect(),
            unknown: OnceLock::new(),
        }
    }

    /// The `rpc` label of a call to `path`, and where its metrics are kept.
    fn entry(&self, path: &str) -> (&str, &OnceLock<RpcMetrics>) {
        match self.served.get_key_value(path) {
            Some((served, metrics)) => (served, metrics),
            None => ("unknown", &self.unknown),
        }
    }
}

/// Installs the process-wide recorder on first call and returns its handle;
/// later calls return the same handle.
pub fn install() -> PrometheusHandle {
    INSTALLED
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("the bucket list is not empty")
                .set_buckets_for_metric(Matcher::Full(BATCH_CALLS.into()), BATCH_BUCKETS)
                .expect("the bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            if let Err(err) = ::metrics::set_global_recorder(recorder) {
                warn!(cause = %err, "another metrics recorder is installed; /metrics stays empty");
            }
            describe();
            Installed {
                handle,
                rpcs: RpcTable::new(),
                queued: Handles::new(),
            }
        })
        .handle
        .clone()
}

/// Serves `GET /metrics` on `listener` until `stop` changes, folding
/// histogram samples every few seconds meanwhile. Pool gauges are read at
/// scrape time, so they cost nothing between scrapes.
pub async fn serve(
    listener: TcpListener,
    pool: Pool,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let handle = install();
    if let Ok(local_addr) = listener.local_addr() {
        info!(%local_addr, "serving metrics on /metrics");
    }

    let upkeep = {
        let handle = handle.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(UPKEEP_INTERVAL) => handle.run_upkeep(),
                    _ = stop.changed() => return,
                }
            }
        })
    };

    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state((handle, pool));
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        })
        .await;
    upkeep.await.ok();
    served
}

/// Refreshes the pool gauges, then renders every metric.
async fn scrape(State((handle, pool)): State<(PrometheusHandle, Pool)>) -> String {
    let status = pool.status();
    ::metrics::gauge!(POOL_CONNECTIONS, "state" => "max").set(status.max_size as f64);
    ::metrics::gauge!(POOL_CONNECTIONS, "state" => "open").set(status.size as f64);
    ::metrics::gauge!(POOL_CONNECTIONS, "state" => "idle").set(status.available as f64);
    ::metrics::gauge!(POOL_WAITING).set(status.waiting as f64);
    handle.render()
}

/// One call of the method at `path` answered with `code` after `elapsed`.
pub fn record_request(path: &str, code: Code, elapsed: Duration) {
    let Some(installed) = INSTALLED.get() else {
        return;
    };
    let (rpc, metrics) = installed.rpcs.entry(path);
    let metrics = metrics.get_or_init(|| RpcMetrics {
        duration: ::metrics::histogram!(GRPC_DURATION, "rpc" => rpc.to_owned()),
        calls: Default::default(),
    });
    metrics.duration.record(elapsed.as_secs_f64());
    // Every gRPC code is below 17; an unknown one counts as UNKNOWN.
    let code = if (code as usize) < metrics.calls.len() {
        code
    } else {
        Code::Unknown
    };
    metrics.calls[code as usize]
        .get_or_init(|| {
            let name = crate::grpc::metered::code_name(code);
            ::metrics::counter!(GRPC_REQUESTS, "rpc" => rpc.to_owned(), "code" => name)
        })
        .increment(1);
}

/// A call took `slots` slots (Reserve, ReserveMany, a Confirm that reserved
/// again); `usage` is the user's usage after it.
pub fn record_reserved(usage: &Usage, slots: u64) {
    slot_counter(SLOTS_RESERVED, usage).increment(slots);
}

/// A call freed `slots` slots (Release, ReleaseMany); `usage` is the user's
/// usage after it.
pub fn record_released(usage: &Usage, slots: u64) {
    slot_counter(SLOTS_RELEASED, usage).increment(slots);
}

/// A call that would have taken slots was refused at the limit (one count
/// per call, however many slots it asked for).
pub fn record_refused(usage: &Usage) {
    slot_counter(SLOTS_REFUSED, usage).increment(1);
}

/// The hold sweep freed `holds` holds nobody confirmed in time.
pub fn record_holds_expired(holds: u64) {
    ::metrics::counter!(HOLDS_EXPIRED).increment(holds);
}

fn slot_counter(name: &'static str, usage: &Usage) -> ::metrics::Counter {
    ::metrics::counter!(name, "feature" => usage.feature.clone(), "tier" => usage.tier.clone())
}

/// A call waited `waited` for a pooled connection (whether or not it got one).
pub fn record_pool_wait(waited: Duration) {
    ::metrics::histogram!(POOL_WAIT).record(waited.as_secs_f64());
}

/// A database call failed; `kind` is `unavailable`, `contention`,
/// `database` or `unexpected_outcome`.
pub fn record_database_error(kind: &'static str) {
    ::metrics::counter!(DB_ERRORS, "kind" => kind).increment(1);
}

/// `calls` calls of `kind` went to the database as one batch statement.
pub fn record_batch(kind: &'static str, calls: usize) {
    ::metrics::histogram!(BATCH_CALLS, "kind" => kind).record(calls as f64);
}

/// `change` calls of `kind` joined (positive) or left (negative) the queues
/// of calls waiting to be sent together.
pub fn add_queued(kind: &'static str, change: i64) {
    if let Some(installed) = INSTALLED.get() {
        installed
            .queued
            .get(kind, || ::metrics::gauge!(QUEUED_CALLS, "kind" => kind))
            .increment(change as f64);
    }
}

/// Reconciliation of one user found `found` units of drift (slots to add or
/// remove, a counter to correct) and corrected `fixed` of them.
pub fn record_reconciliation(found: u64, fixed: u64) {
    ::metrics::counter!(RECONCILIATION_FOUND).increment(found);
    ::metrics::counter!(RECONCILIATION_FIXED).increment(fixed);
}

/// The health service now reports `serving`.
pub fn set_health(serving: bool) {
    ::metrics::gauge!(HEALTH_SERVING).set(if serving { 1.0 } else { 0.0 });
}

/// The HELP lines of the endpoint.
fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

    describe_counter!(GRPC_REQUESTS, "gRPC calls answered, by rpc and status code");
    describe_histogram!(
        GRPC_DURATION,
        Unit::Seconds,
        "time from a call's arrival to its response, by rpc"
    );
    describe_counter!(SLOTS_RESERVED, "slots taken by Reserve");
    describe_counter!(SLOTS_RELEASED, "slots freed by Release");
    describe_counter!(SLOTS_REFUSED, "Reserve calls refused at the limit");
    describe_counter!(
        HOLDS_EXPIRED,
        "holds freed by the sweep, unconfirmed in time"
    );
    describe_gauge!(POOL_CONNECTIONS, "database connections: max, open, idle");
    describe_gauge!(POOL_WAITING, "calls waiting for a database connection");
    describe_histogram!(
        POOL_WAIT,
        Unit::Seconds,
        "time a call waited for a database connection"
    );
    describe_counter!(DB_ERRORS, "failed database calls, by kind");
    describe_histogram!(
        BATCH_CALLS,
        "calls sent together in one batch statement, by kind"
    );
    describe_gauge!(
        QUEUED_CALLS,
        "calls waiting to be sent together with others, by kind"
    );
    describe_counter!(
        RECONCILIATION_FOUND,
        "drift found by reconciliation: slots to add or remove, counters to correct"
    );
    describe_counter!(RECONCILIATION_FIXED, "drift corrected by reconciliation");
    describe_gauge!(HEALTH_SERVING, "1 while the database answers, else 0");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpc_label(path: &str) -> String {
        RpcTable::new().entry(path).0.to_owned()
    }

    /// The methods of every service served keep their path; an invented
    /// one, even in a served package, is `unknown`.
    #[test]
    fn labels_only_served_methods() {
        for path in [
            "/usage.v1.UsageService/Reserve",
            "/usage.v1.UsageService/SetTier",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(rpc_label(path), path);
        }
        for path in ["/usage.v1.UsageService/Invented", "/x.Y/Z", "", "/"] {
            assert_eq!(rpc_label(path), "unknown", "{path}");
        }
    }
}
