//! Reserve and Release: the limit, idempotency, and the audit trail.

mod common;

use common::{release, reserve};

use std::collections::HashSet;

use common::{count, TestServer};
use tonic::Code;
use tonic_types::StatusExt;
use usage_service::proto::{ReserveAction, ReserveRequest};

/// 200 concurrent Reserves of distinct products for a new Free user: exactly
/// 50 succeed, 150 are refused with the documented details, and counter,
/// ledger and audit trail all say 50.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn free_user_never_exceeds_fifty_under_concurrency() {
    let server = TestServer::start().await;
    let client = server.client().await;

    let calls = (0..200).map(|i| {
        let mut client = client.clone();
        tokio::spawn(async move { client.reserve(reserve("alice", &format!("p{i}"))).await })
    });
    let results = futures::future::join_all(calls).await;

    let mut granted = 0;
    let mut refused = 0;
    for result in results {
        match result.expect("the call task does not panic") {
            Ok(response) => {
                assert!(!response.get_ref().already_held);
                granted += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                let details = status.get_error_details();
                let info = details.error_info().expect("ErrorInfo is attached");
                assert_eq!(info.reason, "USAGE_LIMIT_REACHED");
                assert_eq!(info.metadata["current_usage"], "50");
                assert_eq!(info.metadata["usage_limit"], "50");
                let quota = details.quota_failure().expect("QuotaFailure is attached");
                assert_eq!(
                    quota.violations[0].subject,
                    "user:alice/feature:product_slot"
                );
                refused += 1;
            }
        }
    }
    assert_eq!((granted, refused), (50, 150));

    let sql = server.sql().await;
    let usage = count(
        &sql,
        "SELECT current_usage FROM user_tier_features WHERE user_id = 'alice'",
    )
    .await;
    let slots = count(&sql, "SELECT count(*) FROM slots WHERE user_id = 'alice'").await;
    let reserves = count(
        &sql,
        "SELECT count(*) FROM usage_events WHERE action = 'reserve'",
    )
    .await;
    let denials = count(
        &sql,
        "SELECT count(*) FROM usage_events WHERE action = 'denied'",
    )
    .await;
    assert_eq!((usage, slots, reserves, denials), (50, 50, 50, 150));
    server.assert_invariants().await;
    server.stop().await;
}

/// 50 concurrent Reserves of the same product take one slot and write one
/// audit row; the other 49 answer `already_held`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_product_reserved_concurrently_counts_once() {
    let server = TestServer::start().await;
    let client = server.client().await;

    let calls = (0..50).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move { client.reserve(reserve("bob", "same")).await })
    });
    let mut already_held = 0;
    for result in futures::future::join_all(calls).await {
        let response = result.unwrap().expect("every call succeeds").into_inner();
        assert_eq!(response.usage.unwrap().current_usage, 1);
        already_held += usize::from(response.already_held);
    }
    assert_eq!(already_held, 49);

    let sql = server.sql().await;
    assert_eq!(count(&sql, "SELECT count(*) FROM slots").await, 1);
    assert_eq!(count(&sql, "SELECT count(*) FROM usage_events").await, 1);
    server.assert_invariants().await;
    server.stop().await;
}

/// Reserves and releases of one product racing each other leave the counter
/// equal to the ledger, whatever the interleaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reserve_and_release_racing_stay_consistent() {
    let server = TestServer::start().await;
    let client = server.client().await;

    let calls = (0..100).map(|i| {
        let mut client = client.clone();
        tokio::spawn(async move {
            let product = format!("p{}", i % 5);
            if i % 2 == 0 {
                client.reserve(reserve("carol", &product)).await.map(drop)
            } else {
                client.release(release("carol", &product)).await.map(drop)
            }
        })
    });
    for result in futures::future::join_all(calls).await {
        result.unwrap().expect("every call succeeds");
    }
    server.assert_invariants().await;
    server.stop().await;
}

/// A Premium user is never refused: 500 reservations all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn premium_user_is_unlimited() {
    let server = TestServer::start().await;
    let sql = server.sql().await;
    sql.batch_execute(
        "INSERT INTO user_tier_features (user_id, feature_name, tier, usage_limit)
         VALUES ('dora', 'product_slot', 'premium', NULL)",
    )
    .await
    .unwrap();

    let client = server.client().await;
    let calls = (0..500).map(|i| {
        let mut client = client.clone();
        tokio::spawn(async move { client.reserve(reserve("dora", &format!("p{i}"))).await })
    });
    let mut seen = HashSet::new();
    for result in futures::future::join_all(calls).await {
        let usage = result
            .unwrap()
            .expect("premium is never refused")
            .into_inner()
            .usage
            .unwrap();
        assert!(usage.unlimited);
        assert_eq!(usage.usage_limit, None);
        assert_eq!(usage.remaining, None);
        seen.insert(usage.current_usage);
    }
    assert_eq!(seen.len(), 500, "each call saw its own increment");
    assert_eq!(count(&sql, "SELECT count(*) FROM slots").await, 500);
    server.assert_invariants().await;
    server.stop().await;
}

/// Release frees a slot that a Restore can take again; releasing an unheld
/// product and reserving a held one change nothing and write no audit row.
#[tokio::test]
async fn release_then_restore_and_idempotent_calls() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let sql = server.sql().await;

    for i in 0..50 {
        client
            .reserve(reserve("erin", &format!("p{i}")))
            .await
            .unwrap();
    }
    let full = client.reserve(reserve("erin", "p50")).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted);

    let held_again = client
        .reserve(reserve("erin", "p7"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        held_again.already_held,
        "a held product is reported, not refused"
    );
    assert_eq!(held_again.usage.unwrap().current_usage, 50);

    let released = client
        .release(release("erin", "p7"))
        .await
        .unwrap()
        .into_inner();
    assert!(released.was_held);
    let usage = released.usage.unwrap();
    assert_eq!((usage.current_usage, usage.remaining), (49, Some(1)));

    let events_before = count(&sql, "SELECT count(*) FROM usage_events").await;
    let not_held = client
        .release(release("erin", "p7"))
        .await
        .unwrap()
        .into_inner();
    assert!(!not_held.was_held);
    assert_eq!(not_held.usage.unwrap().current_usage, 49);
    let unknown_user = client
        .release(release("nobody", "p1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!unknown_user.was_held);
    assert_eq!(
        count(&sql, "SELECT count(*) FROM usage_events").await,
        events_before
    );
    assert_eq!(
        count(
            &sql,
            "SELECT count(*) FROM user_tier_features WHERE user_id = 'nobody'"
        )
        .await,
        0
    );

    let restored = client
        .reserve(ReserveRequest {
            action: ReserveAction::Restore.into(),
            ..reserve("erin", "p7")
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!restored.already_held);
    assert_eq!(restored.usage.unwrap().current_usage, 50);
    let restores = count(
        &sql,
        "SELECT count(*) FROM usage_events WHERE action = 'restore'",
    )
    .await;
    assert_eq!(restores, 1);

    server.assert_invariants().await;
    server.stop().await;
}

/// Get reports usage, limit and remaining; a user never seen is at the
/// default tier with nothing held, and asking writes nothing.
#[tokio::test]
async fn get_reports_usage_and_writes_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;

    let fresh = client
        .get(usage_service::proto::GetRequest {
            user_id: "frank".into(),
            feature: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            fresh.tier.as_str(),
            fresh.current_usage,
            fresh.usage_limit,
            fresh.remaining
        ),
        ("free", 0, Some(50), Some(50))
    );
    let sql = server.sql().await;
    assert_eq!(
        count(&sql, "SELECT count(*) FROM user_tier_features").await,
        0
    );

    client.reserve(reserve("frank", "p1")).await.unwrap();
    let after = client
        .get(usage_service::proto::GetRequest {
            user_id: "frank".into(),
            feature: "product_slot".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (after.current_usage, after.remaining, after.over_limit),
        (1, Some(49), false)
    );
    server.stop().await;
}

/// The `x-request-id` a caller sends is recorded in the audit row.
#[tokio::test]
async fn request_id_is_audited() {
    let server = TestServer::start().await;
    let mut client = server.client().await;

    let mut request = tonic::Request::new(reserve("gina", "p1"));
    request
        .metadata_mut()
        .insert("x-request-id", "req-123".parse().unwrap());
    client.reserve(request).await.unwrap();

    let sql = server.sql().await;
    let row = sql
        .query_one(
            "SELECT request_id, product_id, delta, usage_before, usage_after FROM usage_events",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("req-123"));
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("p1"));
    assert_eq!(
        (
            row.get::<_, i64>(2),
            row.get::<_, i64>(3),
            row.get::<_, i64>(4)
        ),
        (1, 0, 1)
    );
    server.stop().await;
}
