//! PostgreSQL itself restarted under load, on a throwaway cluster each test
//! starts for itself (so that the shared test server is never restarted).
//!
//! The soak (`soak_mixed_load_with_restarts`) is ignored by default; run it
//! with
//!
//! ```sh
//! USAGE_SOAK_SECS=600 USAGE_SOAK_RESTART_EVERY_SECS=60 \
//!     cargo test --test faults_restart -- --ignored --nocapture
//! ```

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::{
    cluster::Cluster,
    connect, eventually, health_status,
    load::{Load, LoadSpec},
    TestDb, TestServer,
};
use tonic::{transport::Channel, Code};
use usage_service::{
    proto::{usage_service_client::UsageServiceClient, ReserveRequest},
    store,
};

/// A cluster, a migrated database on it and a server on that database, with
/// short connection timeouts so that an outage is noticed quickly.
async fn server_on_own_cluster() -> (Arc<Cluster>, TestServer) {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(Cluster::start)
            .await
            .expect("starting the cluster"),
    );
    connect(&cluster.url("postgres"))
        .await
        .batch_execute("CREATE DATABASE usage")
        .await
        .expect("creating the database");
    let db = TestDb {
        name: "usage".into(),
        url: cluster.url("usage"),
    };
    // Straight to the cluster: a pooler in front of the shared server has no
    // route to it.
    let mut args = db.direct_args();
    args.db_pool_size = 16;
    args.db_pool_wait_timeout = Duration::from_secs(1);
    args.db_connect_timeout = Duration::from_secs(1);
    let pool = store::connect_pool(&args).expect("building the pool");
    store::migrate::run(&pool).await.expect("migrating");
    pool.close();
    let server = TestServer::start_with(db, args).await;
    (cluster, server)
}

/// Runs a blocking cluster operation off the runtime's workers.
async fn on_cluster(cluster: &Arc<Cluster>, operation: fn(&Cluster)) {
    let cluster = cluster.clone();
    tokio::task::spawn_blocking(move || operation(&cluster))
        .await
        .expect("the cluster operation does not panic");
}

/// Waits up to 5 s for a Reserve to succeed, returning how long it took.
async fn serves_again(client: &UsageServiceClient<Channel>, product: &str) -> Duration {
    let since = Instant::now();
    eventually(
        Duration::from_secs(5),
        "a call to succeed after the restart",
        || {
            let mut client = client.clone();
            let request = ReserveRequest {
                user_id: "probe".into(),
                product_id: product.into(),
                ..Default::default()
            };
            async move { client.reserve(request).await.is_ok() }
        },
    )
    .await;
    since.elapsed()
}

/// Waits until both the server and the usage service report `status`.
async fn health_becomes(channel: &Channel, status: i32, what: &str) {
    for service in ["", "usage.v1.UsageService"] {
        eventually(Duration::from_secs(10), what, || {
            let channel = channel.clone();
            async move { health_status(channel, service).await == Some(status) }
        })
        .await;
    }
}

/// Fault: PostgreSQL restarted with `pg_ctl restart -m immediate` in the
/// middle of a load, then stopped the same way and started again after
/// health has been observed. Load: 8 tasks, 2 s deadlines, no retries.
/// Checks: health goes NOT_SERVING during the outage and SERVING after; a
/// call succeeds within 5 s of the database returning, with no restart of
/// the service; failed calls fail with UNAVAILABLE or a deadline, never
/// INTERNAL; every acknowledged change is still there (the bounds), and the
/// consistency checks hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_loses_no_acknowledged_slot() {
    let (cluster, mut server) = server_on_own_cluster().await;
    let channel = server.channel().await;
    let probe = server.client().await;
    let load = Load::start(LoadSpec::default(), vec![server.client().await]);
    load.wait_for_successes(200, Duration::from_secs(30)).await;

    on_cluster(&cluster, Cluster::restart_immediate).await;
    let took = serves_again(&probe, "after-restart").await;
    println!("pg_ctl restart -m immediate: serving again {took:?} after the database returned");
    load.wait_for_successes(100, Duration::from_secs(30)).await;

    on_cluster(&cluster, Cluster::stop_immediate).await;
    health_becomes(&channel, 2, "NOT_SERVING while the database is down").await;
    on_cluster(&cluster, Cluster::start_again).await;
    let took = serves_again(&probe, "after-start").await;
    health_becomes(&channel, 1, "SERVING once the database is back").await;
    println!("stop -m immediate, start: serving again {took:?} after the database returned");
    load.wait_for_successes(100, Duration::from_secs(30)).await;

    let report = load.finish().await;
    println!("{}", report.summary());
    for call in report.calls.iter().filter(|c| c.code.is_some()) {
        assert!(
            matches!(
                call.code,
                Some(
                    Code::Unavailable
                        | Code::ResourceExhausted
                        | Code::Cancelled
                        | Code::DeadlineExceeded
                )
            ),
            "a call failed with {:?}: {}",
            call.code,
            call.message
        );
    }
    server.assert_checks(Some(&report.history)).await;
    server.shutdown_server().await;
}

/// Fault: a long mixed load with PostgreSQL restarted (`-m immediate`)
/// every `USAGE_SOAK_RESTART_EVERY_SECS` (default 60) for `USAGE_SOAK_SECS`
/// (default 600). Load: 8 tasks over 16 users, 2 s deadlines, 3 attempts
/// per call. Checks: after every restart a call succeeds within 5 s; at the
/// end, the bounds and the consistency checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak of minutes; run on demand"]
async fn soak_mixed_load_with_restarts() {
    let seconds = |name: &str, default: u64| {
        Duration::from_secs(
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default),
        )
    };
    let total = seconds("USAGE_SOAK_SECS", 600);
    let every = seconds("USAGE_SOAK_RESTART_EVERY_SECS", 60);

    let (cluster, mut server) = server_on_own_cluster().await;
    let probe = server.client().await;
    let spec = LoadSpec {
        users: (0..16).map(|i| format!("soak-{i}")).collect(),
        attempts: 3,
        calls_per_task: usize::MAX,
        ..LoadSpec::default()
    };
    let load = Load::start(spec, vec![server.client().await]);
    let started = Instant::now();
    let mut restarts = 0;
    let mut slowest = Duration::ZERO;
    while started.elapsed() + every <= total {
        tokio::time::sleep(every).await; // the schedule of the soak, not a wait for a condition
        on_cluster(&cluster, Cluster::restart_immediate).await;
        restarts += 1;
        let took = serves_again(&probe, &format!("restart-{restarts}")).await;
        slowest = slowest.max(took);
        println!(
            "restart {restarts} at {:?}: serving again after {took:?}; {} calls so far",
            started.elapsed(),
            load.completed()
        );
    }

    // The rest of the soak's time, under load without a restart.
    tokio::time::sleep(total.saturating_sub(started.elapsed())).await;
    let report = load.finish().await;
    println!(
        "soak: {:?}, {restarts} restarts, slowest recovery {slowest:?}; {}",
        started.elapsed(),
        report.summary()
    );
    server.assert_checks(Some(&report.history)).await;
    server.shutdown_server().await;
}
