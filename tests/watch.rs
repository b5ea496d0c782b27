//! WatchUsage: events across replicas, threshold crossings, and resuming.

mod common;

use common::reserve;

use std::time::Duration;

use common::TestServer;
use tonic::Streaming;
use usage_service::proto::{ReleaseRequest, UsageEvent, UsageLevel, WatchUsageRequest};

/// The next event, failing the test if none comes within ten seconds.
async fn next(stream: &mut Streaming<UsageEvent>) -> UsageEvent {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an event within 10 s")
        .expect("the stream is healthy")
        .expect("the stream is open")
}

/// A watcher connected to one replica sees a change made through another
/// replica on the same database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_sees_changes_made_on_another_replica() {
    let a = TestServer::start().await;
    let b = TestServer::start_with(
        common::TestDb {
            name: a.db.name.clone(),
            url: a.db.url.clone(),
        },
        a.db.args(),
    )
    .await;

    let mut watch = a
        .client()
        .await
        .watch_usage(WatchUsageRequest {
            user_id: "ivy".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    b.client()
        .await
        .reserve(reserve("ivy", "p1"))
        .await
        .unwrap();
    b.client()
        .await
        .reserve(reserve("someone-else", "p1"))
        .await
        .unwrap();
    b.client()
        .await
        .reserve(reserve("ivy", "p2"))
        .await
        .unwrap();

    let first = next(&mut watch).await;
    let second = next(&mut watch).await;
    assert_eq!(
        (first.user_id.as_str(), first.product_id.as_deref()),
        ("ivy", Some("p1"))
    );
    assert_eq!((second.action.as_str(), second.usage_after), ("reserve", 2));
    assert!(second.event_id > first.event_id);

    let mut b = b;
    b.shutdown_server().await;
    a.stop().await;
}

/// A thresholds-only watcher gets exactly one event per crossing: up through
/// 80% and 100%, and back below each.
#[tokio::test]
async fn threshold_crossings_are_reported_once() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut watch = client
        .watch_usage(WatchUsageRequest {
            user_id: "jo".into(),
            thresholds_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    for i in 0..50 {
        client
            .reserve(reserve("jo", &format!("p{i}")))
            .await
            .unwrap();
    }
    let _ = client
        .reserve(reserve("jo", "one-too-many"))
        .await
        .unwrap_err();
    for i in (39..50).rev() {
        client
            .release(ReleaseRequest {
                user_id: "jo".into(),
                product_id: format!("p{i}"),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    let mut crossings = Vec::new();
    for _ in 0..4 {
        let event = next(&mut watch).await;
        crossings.push((event.usage_after, event.level_before, event.level_after));
    }
    let (normal, warning, full) = (
        UsageLevel::Normal as i32,
        UsageLevel::Warning as i32,
        UsageLevel::Full as i32,
    );
    assert_eq!(
        crossings,
        vec![
            (40, normal, warning),
            (50, warning, full),
            (49, full, warning),
            (39, warning, normal)
        ]
    );
    let more = tokio::time::timeout(Duration::from_millis(800), watch.message()).await;
    assert!(more.is_err(), "no further crossing: {more:?}");
    server.stop().await;
}

/// A watcher that disconnects and resumes with its last token receives every
/// event written meanwhile, exactly once.
#[tokio::test]
async fn resume_after_disconnect_misses_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let request = WatchUsageRequest {
        user_id: "kim".into(),
        ..Default::default()
    };

    let mut watch = client
        .watch_usage(request.clone())
        .await
        .unwrap()
        .into_inner();
    for i in 0..5 {
        client
            .reserve(reserve("kim", &format!("p{i}")))
            .await
            .unwrap();
    }
    let mut received = Vec::new();
    for _ in 0..3 {
        received.push(next(&mut watch).await);
    }
    let token = received.last().unwrap().resume_token.clone();
    drop(watch);

    for i in 5..10 {
        client
            .reserve(reserve("kim", &format!("p{i}")))
            .await
            .unwrap();
    }
    let mut resumed = client
        .watch_usage(WatchUsageRequest {
            resume_token: token,
            ..request
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 3..10 {
        received.push(next(&mut resumed).await);
    }
    let products: Vec<String> = received
        .iter()
        .map(|e| e.product_id.clone().unwrap())
        .collect();
    let expected: Vec<String> = (0..10).map(|i| format!("p{i}")).collect();
    assert_eq!(products, expected, "every event once, in order");
    server.stop().await;
}

/// A malformed resume token is refused.
#[tokio::test]
async fn bad_resume_token_is_refused() {
    let server = TestServer::start().await;
    let status = server
        .client()
        .await
        .watch_usage(WatchUsageRequest {
            resume_token: "nonsense".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    server.stop().await;
}

/// An open watch does not hold up a graceful shutdown: the stream ends with
/// UNAVAILABLE so the watcher can resume on another replica.
#[tokio::test]
async fn shutdown_ends_open_watches() {
    let mut server = TestServer::start().await;
    let mut watch = server
        .client()
        .await
        .watch_usage(WatchUsageRequest::default())
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(Duration::from_secs(10), server.shutdown_server())
        .await
        .expect("shutdown completes with a watch open");
    let end = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the stream ends");
    assert_eq!(end.unwrap_err().code(), tonic::Code::Unavailable);
    server.db.drop_db().await;
}
