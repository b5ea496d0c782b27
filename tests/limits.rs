//! What a call may cost: message size, calls in flight, deadlines. Each
//! refusal happens before the database and writes nothing.

mod common;

use common::reserve;

use std::time::Duration;

use common::{
    auth::{authed, hs256_options, rows_written, token},
    eventually, TestServer,
};
use tonic::Code;
use usage_service::{
    auth::Role,
    proto::{usage_service_client::UsageServiceClient, GetRequest},
};

/// Sessions of the test's own database waiting for a lock.
const LOCK_WAITERS: &str = "SELECT count(*) FROM pg_stat_activity
                            WHERE wait_event_type = 'Lock' AND datname = current_database()";

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
    // Both held calls reach PostgreSQL, whatever the machine's CPUs.
    let server =
        TestServer::start_with_batches_in_flight(4, |o| o.max_concurrent_requests = 2).await;
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
            async move { common::count(sql, LOCK_WAITERS).await == 2 }
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
/// and never started: nothing is written. Sent over raw HTTP/2, because a
/// tonic client gives up on an expired deadline itself before the server
/// answers.
#[tokio::test]
async fn call_past_its_deadline_is_not_started() {
    let server = TestServer::start().await;
    let sql = server.sql().await;
    let before = rows_written(&sql).await;

    let status = raw_reserve(server.addr, Some("0n")).await;
    assert_eq!(status, Code::DeadlineExceeded as i32);
    assert_eq!(rows_written(&sql).await, before);

    let status = raw_reserve(server.addr, Some("5S")).await;
    assert_eq!(status, Code::Ok as i32, "a live deadline is served");
    assert_ne!(rows_written(&sql).await, before);
    server.stop().await;
}

/// Sends one Reserve over a bare HTTP/2 connection with the given
/// `grpc-timeout` header, and returns the `grpc-status` it gets.
async fn raw_reserve(addr: std::net::SocketAddr, timeout: Option<&str>) -> i32 {
    use prost::Message as _;

    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();

    let mut request = http::Request::post(format!("http://{addr}/usage.v1.UsageService/Reserve"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(timeout) = timeout {
        request = request.header("grpc-timeout", timeout);
    }
    let message = reserve("alice", "p1").encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&message);

    let (response, mut body) = client
        .send_request(request.body(()).unwrap(), false)
        .unwrap();
    body.send_data(frame.into(), true).unwrap();
    let response = response.await.unwrap();
    let status_of = |headers: &http::HeaderMap| {
        headers
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().parse::<i32>().unwrap())
    };
    if let Some(status) = status_of(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    status_of(&trailers).expect("a grpc-status trailer")
}

/// One connection carries at most its limit of calls at once: with alice's
/// row locked, ten Reserves on one connection put exactly four to wait on
/// the database while a call on another connection is still served; once the
/// lock goes all ten complete, none failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_connection_is_bounded_without_failing_calls() {
    // More write statements allowed at once than calls on the connection,
    // so that the connection's limit is what holds the calls back.
    let server = TestServer::start_with_batches_in_flight(16, |o| {
        o.max_concurrent_requests_per_connection = 4;
    })
    .await;
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
    eventually(Duration::from_secs(10), "four reserves to wait", || {
        let sql = &sql;
        async move { common::count(sql, LOCK_WAITERS).await == 4 }
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
    assert_eq!(common::count(&sql, LOCK_WAITERS).await, 4);

    tx.rollback().await.unwrap();
    for call in calls {
        call.await.unwrap().expect("every call completes");
    }
    server.assert_invariants().await;
    server.stop().await;
}
