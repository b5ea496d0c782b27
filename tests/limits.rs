//! What a call may cost: message size, calls in flight, deadlines. Each
//! refusal happens before the database and writes nothing.

mod common;

use std::time::Duration;

use common::{
    auth::{authed, hs256_options, rows_written, token},
    eventually, TestServer,
};
use tonic::Code;
use usage_service::{
    auth::Role,
    proto::{usage_service_client::UsageServiceClient, GetRequest, ReserveRequest},
    ServerOptions,
};

fn reserve(user: &str, product: &str) -> ReserveRequest {
    ReserveRequest {
        user_id: user.into(),
        product_id: product.into(),
        ..Default::default()
    }
}

/// A request above the message limit gets RESOURCE_EXHAUSTED and writes
/// nothing, while one just under it reaches validation; an oversized call
/// without a token is refused as unauthenticated, before its body is read.
#[tokio::test]
async fn oversized_message_is_refused_before_the_database() {
    let server = TestServer::start_with_options(hs256_options()).await;
    let mut client = server.client().await;
    let sql = server.sql().await;
    let service = token(Role::Service, "catalogue");
    let before = rows_written(&sql).await;

    let huge = reserve("alice", &"x".repeat(65 * 1024));
    let refused = client
        .reserve(authed(huge.clone(), Some(&service)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("larger than 65536 bytes"));
    assert_eq!(rows_written(&sql).await, before);

    let anonymous = client.reserve(authed(huge, None)).await.unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);

    let large = reserve("alice", &"x".repeat(60 * 1024));
    let invalid = client
        .reserve(authed(large, Some(&service)))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    assert_eq!(rows_written(&sql).await, before);

    client
        .reserve(authed(reserve("alice", "p1"), Some(&service)))
        .await
        .expect("a normal call still succeeds");
    server.stop().await;
}

/// With two calls in flight (held on a row lock) a third fails at once with
/// UNAVAILABLE instead of queueing; health still answers; once the lock goes
/// the held calls complete and new calls are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_beyond_the_in_flight_bound_fail_fast_and_recover() {
    let options = ServerOptions {
        max_concurrent_requests: 2,
        health_interval: Duration::from_millis(100),
        ..ServerOptions::default()
    };
    let server = TestServer::start_with_options(options).await;
    let client = server.client().await;
    client
        .clone()
        .reserve(reserve("alice", "p0"))
        .await
        .expect("a first reservation creates alice's row");

    // Every Reserve of alice waits for her row while this transaction holds it.
    let mut locker = server.sql().await;
    let tx = locker.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM user_tier_features WHERE user_id = 'alice' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();

    let held: Vec<_> = (1..=2)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move { client.reserve(reserve("alice", &format!("p{i}"))).await })
        })
        .collect();
    let sql = server.sql().await;
    eventually(
        Duration::from_secs(10),
        "two reserves to wait on the lock",
        || {
            let sql = &sql;
            async move {
                common::count(
                    sql,
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                )
                .await
                    == 2
            }
        },
    )
    .await;

    let started = std::time::Instant::now();
    let refused = client
        .clone()
        .get(GetRequest {
            user_id: "bob".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refused at once"
    );
    assert_eq!(
        common::health_status(server.channel().await, "").await,
        Some(1)
    );

    tx.rollback().await.unwrap();
    for call in held {
        call.await.unwrap().expect("held calls complete");
    }
    client
        .clone()
        .get(GetRequest {
            user_id: "bob".into(),
            ..Default::default()
        })
        .await
        .expect("served again once calls complete");
    server.assert_invariants().await;
    server.stop().await;
}

/// A call whose deadline has already passed is answered DEADLINE_EXCEEDED
/// and never started: nothing is written.
#[tokio::test]
async fn call_past_its_deadline_is_not_started() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let sql = server.sql().await;
    let before = rows_written(&sql).await;

    let mut request = tonic::Request::new(reserve("alice", "p1"));
    request.set_timeout(Duration::ZERO);
    let refused = client.reserve(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::DeadlineExceeded, "{refused:?}");
    assert_eq!(rows_written(&sql).await, before);

    let mut request = tonic::Request::new(reserve("alice", "p1"));
    request.set_timeout(Duration::from_secs(5));
    client
        .reserve(request)
        .await
        .expect("a live deadline is served");
    server.stop().await;
}

/// One connection carries at most its limit of calls at once: with alice's
/// row locked, ten Reserves on one connection put exactly four to wait on
/// the database while a call on another connection is still served; once the
/// lock goes all ten complete, none failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_connection_is_bounded_without_failing_calls() {
    let options = ServerOptions {
        max_concurrent_requests_per_connection: 4,
        health_interval: Duration::from_millis(100),
        ..ServerOptions::default()
    };
    let server = TestServer::start_with_options(options).await;
    let client: UsageServiceClient<_> = server.client().await;
    client
        .clone()
        .reserve(reserve("alice", "p0"))
        .await
        .unwrap();

    let mut locker = server.sql().await;
    let tx = locker.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM user_tier_features WHERE user_id = 'alice' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();
    let calls: Vec<_> = (1..=10)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move { client.reserve(reserve("alice", &format!("p{i}"))).await })
        })
        .collect();

    let sql = server.sql().await;
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'";
    eventually(Duration::from_secs(10), "four reserves to wait", || {
        let sql = &sql;
        async move { common::count(sql, waiting).await == 4 }
    })
    .await;
    let mut other = server.client().await;
    other
        .get(GetRequest {
            user_id: "bob".into(),
            ..Default::default()
        })
        .await
        .expect("another connection is served");
    assert_eq!(common::count(&sql, waiting).await, 4);

    tx.rollback().await.unwrap();
    for call in calls {
        call.await.unwrap().expect("every call completes");
    }
    server.assert_invariants().await;
    server.stop().await;
}
