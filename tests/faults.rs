//! Faults between clients, the service and PostgreSQL: retries and
//! duplicates, deadlines and cancellations, killed connections, a slow
//! database. Each test states the fault, the load and the checks; every one
//! ends with the library's consistency checks (`assert_checks`) and, where a
//! load ran, the per-user bounds of what its clients were told.

mod common;

use common::{release, reserve};

use std::time::{Duration, Instant};

use common::{
    load::{Load, LoadSpec},
    postgres_addr,
    proxy::Proxy,
    url_via, TestServer,
};
use tonic::{Code, Request};
use usage_service::usage::history::{CallKind, CallResult, History};

/// Fault: the same Reserve and Release sent many times, concurrently and
/// after delays, interleaved with the opposite call. Load: 10 products of one
/// user each hit by 8 Reserves and 4 Releases at once, and a user at 48 of 50
/// whose 5 new products are each reserved 10 times at once. Checks: no
/// product counted twice, exactly 2 of the 5 get in, every settled product in
/// the state its last acknowledged call left it, repeats change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_duplicates_never_double_count() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let mut history = History::new();

    let mut calls = Vec::new();
    for p in 0..10 {
        let product = format!("p{p}");
        for n in 0..12 {
            let (mut client, product) = (client.clone(), product.clone());
            calls.push(tokio::spawn(async move {
                if n % 3 == 2 {
                    client.release(release("dup", &product)).await.map(drop)
                } else {
                    client.reserve(reserve("dup", &product)).await.map(drop)
                }
            }));
        }
        // Overlapping calls for one product: what each did is unknown.
        history.record("dup", &product, CallKind::Reserve, CallResult::Unknown);
    }
    for result in futures::future::join_all(calls).await {
        result.expect("no panic").expect("every duplicate succeeds");
    }

    for p in 0..48 {
        client
            .clone()
            .reserve(reserve("edge", &format!("old{p}")))
            .await
            .expect("filling up to 48");
    }
    let mut edge_calls = Vec::new();
    for p in 0..5 {
        for _ in 0..10 {
            let mut client = client.clone();
            edge_calls.push(tokio::spawn(async move {
                client.reserve(reserve("edge", &format!("new{p}"))).await
            }));
        }
    }
    for result in futures::future::join_all(edge_calls).await {
        if let Err(status) = result.expect("no panic") {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        }
    }
    let usage = count_slots(&server, "edge").await;
    assert_eq!(usage, 50, "exactly two of the five new products got a slot");

    // Settle every product with one acknowledged call, then repeat each call
    // after a delay: the repeats must find the work done.
    let mut client = client.clone();
    for round in 0..3 {
        for p in 0..10 {
            let product = format!("p{p}");
            if p % 2 == 0 {
                let answer = client
                    .reserve(reserve("dup", &product))
                    .await
                    .expect("reserve");
                if round > 0 {
                    assert!(
                        answer.into_inner().already_held,
                        "a repeat reserves nothing"
                    );
                }
                history.record("dup", &product, CallKind::Reserve, CallResult::Acknowledged);
            } else {
                let answer = client
                    .release(release("dup", &product))
                    .await
                    .expect("release");
                if round > 0 {
                    assert!(!answer.into_inner().was_held, "a repeat releases nothing");
                }
                history.record("dup", &product, CallKind::Release, CallResult::Acknowledged);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await; // "after a delay" is the fault
    }
    assert_eq!(count_slots(&server, "dup").await, 5);

    server.assert_checks(Some(&history)).await;
    server.stop().await;
}

/// Fault: the user's row is held by a competing transaction (a test
/// connection's `SELECT ... FOR UPDATE`) for longer than the clients'
/// deadlines, and some clients drop their calls mid-way. Load: 6 Reserves and
/// a Release with a 300 ms deadline, 3 Reserves abandoned by their clients.
/// Checks: the deadlines are answered on time, the open transaction is
/// reported by the idle-transaction check while it lasts, and retrying every
/// call with the same product ids converges to exactly the slots asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_cancellations_converge_on_retry() {
    let server = TestServer::start_with_batches_in_flight(4, |_| {}).await;
    let mut client = server.client().await;
    let mut history = History::new();
    client
        .reserve(reserve("locked", "first"))
        .await
        .expect("setup");
    history.record(
        "locked",
        "first",
        CallKind::Reserve,
        CallResult::Acknowledged,
    );

    let holder = server.sql().await;
    holder
        .batch_execute(
            "BEGIN; SELECT * FROM user_tier_features WHERE user_id = 'locked' FOR UPDATE",
        )
        .await
        .expect("holding the user's row");

    let deadline = Duration::from_millis(300);
    let mut timed = Vec::new();
    for p in 0..6 {
        let mut client = client.clone();
        timed.push(tokio::spawn(async move {
            let mut request = Request::new(reserve("locked", &format!("t{p}")));
            request.set_timeout(deadline);
            let started = Instant::now();
            let answer = client.reserve(request).await;
            (answer.map(drop), started.elapsed())
        }));
    }
    let mut client_release = client.clone();
    timed.push(tokio::spawn(async move {
        let mut request = Request::new(release("locked", "first"));
        request.set_timeout(deadline);
        let started = Instant::now();
        let answer = client_release.release(request).await;
        (answer.map(drop), started.elapsed())
    }));
    let abandoned: Vec<_> = (0..3)
        .map(|p| {
            let mut client = client.clone();
            tokio::spawn(async move { client.reserve(reserve("locked", &format!("d{p}"))).await })
        })
        .collect();

    for call in timed {
        let (answer, elapsed) = call.await.expect("no panic");
        let status = answer.expect_err("nothing can pass the held row");
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
            "{status:?}"
        );
        assert!(
            elapsed < deadline + Duration::from_secs(1),
            "answered after {elapsed:?}"
        );
    }
    for p in 0..6 {
        history.record(
            "locked",
            &format!("t{p}"),
            CallKind::Reserve,
            CallResult::Unknown,
        );
    }
    history.record("locked", "first", CallKind::Release, CallResult::Unknown);

    // Calls are in flight and PostgreSQL holds the user's writes. This server
    // sends at most four write statements at once (--db-batches-in-flight):
    // four statements (more when a caller's give-up frees its place while
    // its statement still waits) wait for the row, and the other calls, the
    // abandoned ones among them, wait in the service or in PostgreSQL.
    let sql = server.sql().await;
    common::eventually(
        Duration::from_secs(5),
        "at least 4 statements waiting for the row",
        || async {
            common::count(
                &sql,
                "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .await
                >= 4
        },
    )
    .await;
    for call in &abandoned {
        call.abort();
    }
    for p in 0..3 {
        history.record(
            "locked",
            &format!("d{p}"),
            CallKind::Reserve,
            CallResult::Unknown,
        );
    }

    let options = usage_service::store::CheckOptions {
        idle_in_transaction_after: Duration::ZERO,
    };
    let found = server.checker.check(&options).await.expect("checking");
    assert!(
        found
            .iter()
            .any(|v| matches!(v, usage_service::store::Violation::IdleInTransaction(_))),
        "the held transaction is reported: {found:?}"
    );

    holder
        .batch_execute("ROLLBACK")
        .await
        .expect("releasing the row");
    for p in 0..6 {
        let product = format!("t{p}");
        client
            .reserve(reserve("locked", &product))
            .await
            .expect("retry");
        history.record(
            "locked",
            &product,
            CallKind::Reserve,
            CallResult::Acknowledged,
        );
    }
    for p in 0..3 {
        let product = format!("d{p}");
        client
            .reserve(reserve("locked", &product))
            .await
            .expect("retry");
        history.record(
            "locked",
            &product,
            CallKind::Reserve,
            CallResult::Acknowledged,
        );
    }
    client
        .release(release("locked", "first"))
        .await
        .expect("retry");
    history.record(
        "locked",
        "first",
        CallKind::Release,
        CallResult::Acknowledged,
    );

    common::eventually(Duration::from_secs(5), "no statement waiting", || async {
        common::count(
            &sql,
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await
            == 0
    })
    .await;
    assert_eq!(count_slots(&server, "locked").await, 9);
    server.assert_checks(Some(&history)).await;
    server.stop().await;
}

/// Fault: `pg_terminate_backend` on every connection of the service, three
/// times, in the middle of a load. Load: 8 tasks reserving and releasing for
/// 4 users, one call in flight each, 2 s deadlines, no retries. Checks: every
/// failed call failed with UNAVAILABLE (never another code, never a success
/// that did not happen: the bounds), a new call succeeds within 2 s of each
/// kill without restarting the service, then the consistency checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_fail_unavailable_and_recover() {
    let server = TestServer::start().await;
    let clients = vec![server.client().await];
    let load = Load::start(LoadSpec::default(), clients);
    load.wait_for_successes(200, Duration::from_secs(30)).await;

    let sql = server.sql().await;
    let mut probe = server.client().await;
    for round in 0..3 {
        let killed = common::count(
            &sql,
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = 'usage-service'
                AND pid <> pg_backend_pid()) AS k",
        )
        .await;
        assert!(killed > 0, "the service had connections to kill");
        let killed_at = Instant::now();
        let product = format!("probe-{round}");
        common::eventually(
            Duration::from_secs(2),
            "a call to succeed after the kill",
            || {
                let (mut probe, product) = (probe.clone(), product.clone());
                async move { probe.reserve(reserve("probe", &product)).await.is_ok() }
            },
        )
        .await;
        println!(
            "round {round}: killed {killed} connections, serving again after {:?}",
            killed_at.elapsed()
        );
        probe
            .get(usage_service::proto::GetRequest {
                user_id: "probe".into(),
                feature: String::new(),
            })
            .await
            .expect("the service still serves");
        load.wait_for_successes(100, Duration::from_secs(30)).await;
    }

    let report = load.finish().await;
    println!("{}", report.summary());
    for call in report.calls.iter().filter(|c| c.code.is_some()) {
        assert!(
            matches!(call.code, Some(Code::Unavailable | Code::ResourceExhausted)),
            "a call failed with {:?}: {}",
            call.code,
            call.message
        );
    }
    server.assert_checks(Some(&report.history)).await;
    server.stop().await;
}

/// Fault: 1.5 s of latency injected on every answer from PostgreSQL (a TCP
/// proxy), then removed. Load: 8 tasks, 500 ms deadlines, no retries.
/// Checks: while slow, calls end with a deadline answer from the server on
/// time (not the client's own timer); the pool does not wedge: once the
/// latency goes, 200 calls succeed again; then the consistency checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_database_honours_deadlines_and_recovers() {
    let db = common::migrated_db().await;
    let proxy = Proxy::start(postgres_addr()).await;
    let mut args = db.args();
    args.database_url = url_via(&db.url, proxy.addr);
    let server = TestServer::start_with(db, args).await;

    let deadline = Duration::from_millis(500);
    let spec = LoadSpec {
        deadline,
        ..LoadSpec::default()
    };
    let load = Load::start(spec, vec![server.client().await]);
    load.wait_for_successes(100, Duration::from_secs(30)).await;
    let before = rate(&load, Duration::from_secs(1)).await;

    proxy.set_delay(Duration::from_millis(1500));
    let slow_since = Instant::now();
    let completed = load.completed();
    common::eventually(
        Duration::from_secs(20),
        "32 calls to end while slow",
        || async { load.completed() >= completed + 32 },
    )
    .await;
    let during = rate(&load, Duration::from_secs(1)).await;

    proxy.set_delay(Duration::ZERO);
    let fast_since = Instant::now();
    load.wait_for_successes(200, Duration::from_secs(20)).await;
    let after = rate(&load, Duration::from_secs(1)).await;
    println!(
        "successful calls/s: before {before:.0}, slow {during:.0}, after {after:.0}; recovered 200 calls in {:?}",
        fast_since.elapsed()
    );

    let report = load.finish().await;
    println!("{}", report.summary());
    let slow_calls: Vec<_> = report
        .calls
        .iter()
        .filter(|c| c.started > slow_since + Duration::from_millis(100) && c.finished < fast_since)
        .collect();
    assert!(
        !slow_calls.is_empty(),
        "calls ran while the database was slow"
    );
    for call in slow_calls {
        let elapsed = call.finished - call.started;
        assert!(
            matches!(
                call.code,
                Some(Code::Cancelled | Code::DeadlineExceeded | Code::Unavailable)
            ) && call.message != "client-side deadline",
            "{:?} {:?} after {elapsed:?}",
            call.code,
            call.message
        );
        assert!(
            elapsed < deadline + Duration::from_secs(1),
            "answered after {elapsed:?}"
        );
    }
    server.assert_checks(Some(&report.history)).await;
    server.stop().await;
}

/// Successful calls per second over the next `window`.
async fn rate(load: &Load, window: Duration) -> f64 {
    let start = load.succeeded();
    tokio::time::sleep(window).await; // a measurement window, not a wait for a condition
    (load.succeeded() - start) as f64 / window.as_secs_f64()
}

async fn count_slots(server: &TestServer, user: &str) -> i64 {
    let sql = server.sql().await;
    sql.query_one("SELECT count(*) FROM slots WHERE user_id = $1", &[&user])
        .await
        .expect("counting slots")
        .get(0)
}
