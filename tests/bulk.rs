//! Check, ReserveMany and ReleaseMany.

mod common;

use common::{count, TestServer};
use tonic::Code;
use tonic_types::StatusExt;
use usage_service::proto::{CheckRequest, ReleaseManyRequest, ReserveManyRequest, ReserveRequest};

fn ids(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

fn bulk(user: &str, product_ids: Vec<String>) -> ReserveManyRequest {
    ReserveManyRequest {
        user_id: user.into(),
        product_ids,
        ..Default::default()
    }
}

/// Check answers whether a quantity fits, with usage and limit, and writes
/// nothing at all (not even for a user never seen).
#[tokio::test]
async fn check_answers_without_writing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let sql = server.sql().await;

    let fresh = client
        .check(CheckRequest {
            user_id: "new".into(),
            quantity: 50,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(fresh.allowed);
    assert_eq!(fresh.usage.unwrap().usage_limit, Some(50));
    assert_eq!(
        count(&sql, "SELECT count(*) FROM user_tier_features").await,
        0
    );

    client
        .reserve_many(bulk("ann", ids("p", 0..45)))
        .await
        .unwrap();
    let events = count(&sql, "SELECT count(*) FROM usage_events").await;
    for (quantity, allowed) in [(0, true), (1, true), (5, true), (6, false)] {
        let answer = client
            .check(CheckRequest {
                user_id: "ann".into(),
                quantity,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.allowed, allowed, "quantity {quantity}");
        assert_eq!(answer.usage.unwrap().current_usage, 45);
    }
    assert_eq!(
        count(&sql, "SELECT count(*) FROM usage_events").await,
        events
    );

    let negative = client
        .check(CheckRequest {
            user_id: "ann".into(),
            quantity: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(negative.code(), Code::InvalidArgument);
    server.stop().await;
}

/// A bulk of 1,000 against 30 free slots is refused whole with the figures
/// in the details, and changes nothing but the refusal's audit row.
#[tokio::test]
async fn bulk_too_large_is_refused_whole() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .reserve_many(bulk("bea", ids("old", 0..20)))
        .await
        .unwrap();
    let sql = server.sql().await;

    let status = client
        .reserve_many(bulk("bea", ids("new", 0..1000)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let info = status.get_error_details().error_info().unwrap().clone();
    assert_eq!(info.reason, "USAGE_LIMIT_REACHED");
    assert_eq!(info.metadata["requested"], "1000");
    assert_eq!(info.metadata["available"], "30");

    assert_eq!(count(&sql, "SELECT count(*) FROM slots").await, 20);
    assert_eq!(
        count(&sql, "SELECT current_usage FROM user_tier_features").await,
        20
    );
    assert_eq!(
        count(
            &sql,
            "SELECT count(*) FROM usage_events WHERE action = 'denied'"
        )
        .await,
        1
    );
    server.assert_invariants().await;
    server.stop().await;
}

/// Products already holding a slot are reported, not counted twice, and each
/// product reserved writes one audit row; the bulk takes one call.
#[tokio::test]
async fn bulk_reports_held_products_and_audits_each() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .reserve(ReserveRequest {
            user_id: "cid".into(),
            product_id: "p3".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let mut request = ids("p", 0..10);
    request.push("p1".into()); // a duplicate in the request counts once
    let response = client
        .reserve_many(bulk("cid", request))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.already_held, vec!["p3"]);
    assert_eq!(response.reserved.len(), 9);
    assert_eq!(response.usage.unwrap().current_usage, 10);

    let sql = server.sql().await;
    assert_eq!(
        count(
            &sql,
            "SELECT count(*) FROM usage_events WHERE action = 'reserve'"
        )
        .await,
        10
    );
    let steps = count(
        &sql,
        "SELECT count(DISTINCT usage_after) FROM usage_events WHERE action = 'reserve'",
    )
    .await;
    assert_eq!(steps, 10, "each audit row has its own usage_after");

    let released = client
        .release_many(ReleaseManyRequest {
            user_id: "cid".into(),
            product_ids: vec!["p1".into(), "p2".into(), "nope".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.released, vec!["p1", "p2"]);
    assert_eq!(released.not_held, vec!["nope"]);
    assert_eq!(released.usage.unwrap().current_usage, 8);
    assert_eq!(
        count(
            &sql,
            "SELECT count(*) FROM usage_events WHERE action = 'release'"
        )
        .await,
        2
    );
    server.assert_invariants().await;
    server.stop().await;
}

/// Ten concurrent bulks of ten products for one Free user: exactly five fit,
/// five are refused whole, and the user ends at exactly 50.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_bulks_never_pass_the_limit() {
    let server = TestServer::start().await;
    let client = server.client().await;

    let calls = (0..10).map(|batch| {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .reserve_many(bulk("dee", ids(&format!("b{batch}-"), 0..10)))
                .await
        })
    });
    let mut granted = 0;
    for result in futures::future::join_all(calls).await {
        match result.unwrap() {
            Ok(response) => {
                assert_eq!(response.into_inner().reserved.len(), 10);
                granted += 1;
            }
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted),
        }
    }
    assert_eq!(granted, 5);
    let sql = server.sql().await;
    assert_eq!(
        count(&sql, "SELECT current_usage FROM user_tier_features").await,
        50
    );
    server.assert_invariants().await;
    server.stop().await;
}

/// Empty, oversized and malformed product lists are refused and write nothing.
#[tokio::test]
async fn bulk_validation() {
    let server = TestServer::start().await;
    let mut client = server.client().await;

    for product_ids in [vec![], ids("p", 0..1001), vec!["ok".into(), String::new()]] {
        let status = client
            .reserve_many(bulk("eli", product_ids.clone()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        let fields: Vec<String> = status
            .get_error_details()
            .bad_request()
            .unwrap()
            .field_violations
            .iter()
            .map(|v| v.field.clone())
            .collect();
        assert_eq!(fields, vec!["product_ids"]);

        let status = client
            .release_many(ReleaseManyRequest {
                user_id: "eli".into(),
                product_ids,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    let sql = server.sql().await;
    assert_eq!(count(&sql, "SELECT count(*) FROM usage_events").await, 0);
    server.stop().await;
}
