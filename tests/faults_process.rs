//! Faults of the service's own processes: SIGTERM under load, and one of two
//! replicas stopped mid-load. The servers are the real binary in child
//! processes, sharing one database.

mod common;

use std::time::{Duration, Instant};

use common::{
    assert_checks, eventually, health_status,
    load::{Load, LoadReport, LoadSpec},
    migrated_db,
    process::ServerProcess,
    TestDb,
};
use tonic::Code;
use usage_service::store::{self, Store};

/// Waits until the process's health service says SERVING.
async fn wait_until_serving(server: &ServerProcess) {
    let channel = server.channel().await;
    eventually(Duration::from_secs(10), "the process to serve", || {
        let channel = channel.clone();
        async move { health_status(channel, "").await == Some(1) }
    })
    .await;
}

/// A store on `db`, for the checks.
fn store_on(db: &TestDb) -> Store {
    Store::new(store::connect_pool(&db.direct_args()).expect("building the pool"))
}

/// Every call sent to `client` before `signal_at` was answered by the
/// service, not failed by its shutdown.
fn assert_answered_before(report: &LoadReport, client: usize, signal_at: Instant) -> usize {
    let before: Vec<_> = report
        .calls
        .iter()
        .filter(|c| c.client == client && c.started < signal_at)
        .collect();
    for call in &before {
        assert!(
            matches!(call.code, None | Some(Code::ResourceExhausted)),
            "a call started {:?} before the signal failed with {:?}: {}",
            signal_at - call.started,
            call.code,
            call.message
        );
    }
    let in_flight = before.iter().filter(|c| c.finished > signal_at).count();
    println!(
        "{} calls started before the signal, {in_flight} of them still in flight when it came; all answered",
        before.len()
    );
    before.len()
}

/// Fault: SIGTERM to the server process while calls run. Load: 8 tasks,
/// one call in flight each, 5 s deadlines. Checks: every call that started
/// before the signal is answered normally (none fails because of the
/// shutdown), the process exits 0, then the consistency checks and bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_load_answers_every_started_call() {
    let db = migrated_db().await;
    let mut server = ServerProcess::spawn(&db.service_url());
    wait_until_serving(&server).await;
    let spec = LoadSpec {
        deadline: Duration::from_secs(5),
        ..LoadSpec::default()
    };
    let load = Load::start(spec, vec![server.client().await]);
    load.wait_for_successes(200, Duration::from_secs(30)).await;

    let signal_at = Instant::now();
    server.terminate();
    let status = server.wait(Duration::from_secs(10)).await;
    let report = load.finish().await;
    println!("{}", report.summary());

    assert!(
        status.success(),
        "the server exits 0 after SIGTERM: {status:?}"
    );
    assert!(assert_answered_before(&report, 0, signal_at) > 0);
    let log = server.log().join("\n");
    assert!(
        log.contains("received SIGTERM") && log.contains("shut down"),
        "{log}"
    );

    let store = store_on(&db);
    assert_checks(&store, Some(&report.history)).await;
    store.pool().close();
    db.drop_db().await;
}

/// Fault: two replicas on one database under one load, then one stopped with
/// SIGTERM in the middle. Load: 8 tasks spreading calls over both replicas
/// (the client balances call by call, and retries an UNAVAILABLE call on the
/// other replica), 5 s deadlines. Checks: the stopped replica answers every
/// call it was sent before the signal and exits 0; the other keeps serving
/// 300 more calls alone; then the consistency checks and bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_stopped_mid_load() {
    let db = migrated_db().await;
    let mut stopping = ServerProcess::spawn(&db.service_url());
    let staying = ServerProcess::spawn(&db.service_url());
    wait_until_serving(&stopping).await;
    wait_until_serving(&staying).await;

    let spec = LoadSpec {
        deadline: Duration::from_secs(5),
        attempts: 3,
        ..LoadSpec::default()
    };
    let load = Load::start(spec, vec![stopping.client().await, staying.client().await]);
    load.wait_for_successes(300, Duration::from_secs(30)).await;

    let signal_at = Instant::now();
    stopping.terminate();
    let status = stopping.wait(Duration::from_secs(10)).await;
    let exited_at = Instant::now();
    load.wait_for_successes(300, Duration::from_secs(30)).await;
    let report = load.finish().await;
    println!("{}", report.summary());

    assert!(status.success(), "the stopped replica exits 0: {status:?}");
    assert!(assert_answered_before(&report, 0, signal_at) > 0);
    let served_alone = report
        .calls
        .iter()
        .filter(|c| c.client == 1 && c.started > exited_at)
        .inspect(|c| {
            assert!(
                matches!(c.code, None | Some(Code::ResourceExhausted)),
                "the remaining replica failed a call: {:?} {}",
                c.code,
                c.message
            );
        })
        .count();
    assert!(
        served_alone >= 200,
        "the remaining replica served {served_alone} calls"
    );

    let store = store_on(&db);
    assert_checks(&store, Some(&report.history)).await;
    store.pool().close();
    drop(staying);
    db.drop_db().await;
}
