//! Holds that expire: pending slots, Confirm, the sweep, and Reserve treating
//! an expired hold as free.

mod common;

use common::reserve;

use std::time::Duration;

use common::{count, eventually, TestServer};
use tonic::Code;
use usage_service::proto::{ConfirmRequest, GetRequest, ReleaseRequest, ReserveRequest};

fn hold(user: &str, product: &str, seconds: i64) -> ReserveRequest {
    ReserveRequest {
        user_id: user.into(),
        product_id: product.into(),
        hold_ttl: Some(prost_types::Duration { seconds, nanos: 0 }),
        ..Default::default()
    }
}

fn confirm(user: &str, product: &str) -> ConfirmRequest {
    ConfirmRequest {
        user_id: user.into(),
        product_id: product.into(),
        ..Default::default()
    }
}

/// Fills `user` with `n` permanent slots.
async fn fill(server: &TestServer, user: &str, n: usize) {
    let mut client = server.client().await;
    for i in 0..n {
        client
            .reserve(reserve(user, &format!("perm{i}")))
            .await
            .unwrap();
    }
}

/// A hold counts toward usage and shows as pending; Confirm makes it
/// permanent once, and both steps are audited.
#[tokio::test]
async fn hold_then_confirm() {
    let server = TestServer::start().await;
    let mut client = server.client().await;

    let held = client
        .reserve(hold("ada", "p1", 60))
        .await
        .unwrap()
        .into_inner();
    let usage = held.usage.unwrap();
    assert_eq!((usage.current_usage, usage.pending), (1, 1));

    let confirmed = client
        .confirm(confirm("ada", "p1"))
        .await
        .unwrap()
        .into_inner();
    assert!(!confirmed.re_reserved);
    let usage = confirmed.usage.unwrap();
    assert_eq!((usage.current_usage, usage.pending), (1, 0));

    let again = client
        .confirm(confirm("ada", "p1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.usage.unwrap().current_usage,
        1,
        "confirming twice changes nothing"
    );

    let sql = server.sql().await;
    let actions: Vec<String> = sql
        .query("SELECT action FROM usage_events ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(actions, vec!["hold", "confirm"]);
    server.assert_invariants().await;
    server.stop().await;
}

/// An unconfirmed hold is freed by the sweep, audited as `expire`.
#[tokio::test]
async fn sweep_frees_expired_holds() {
    let server = TestServer::start_configured(|options| {
        options.hold_sweep_interval = Duration::from_millis(100);
    })
    .await;
    let mut client = server.client().await;
    client.reserve(hold("bo", "p1", 1)).await.unwrap();

    let get = GetRequest {
        user_id: "bo".into(),
        feature: String::new(),
    };
    eventually(Duration::from_secs(10), "the hold to be swept", || {
        let mut client = client.clone();
        let get = get.clone();
        async move {
            let usage = client.get(get).await.unwrap().into_inner();
            usage.current_usage == 0 && usage.pending == 0
        }
    })
    .await;
    let sql = server.sql().await;
    assert_eq!(
        count(
            &sql,
            "SELECT count(*) FROM usage_events WHERE action = 'expire'"
        )
        .await,
        1
    );
    assert_eq!(count(&sql, "SELECT count(*) FROM slots").await, 0);
    server.assert_invariants().await;
    server.stop().await;
}

/// With the sweep off, a user full because of a hold is refused while the
/// hold lives, and a Reserve competing for the last slot succeeds the moment
/// the hold has expired: Reserve itself frees it.
#[tokio::test]
async fn expired_hold_is_free_for_a_competing_reserve() {
    let server =
        TestServer::start_configured(|options| options.hold_sweep_interval = Duration::ZERO).await;
    let mut client = server.client().await;
    fill(&server, "cy", 49).await;
    client.reserve(hold("cy", "pending", 1)).await.unwrap();

    let refused = client.reserve(reserve("cy", "rival")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);

    eventually(Duration::from_secs(10), "the rival to get the slot", || {
        let mut client = client.clone();
        async move { client.reserve(reserve("cy", "rival")).await.is_ok() }
    })
    .await;
    let usage = client
        .get(GetRequest {
            user_id: "cy".into(),
            feature: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((usage.current_usage, usage.pending), (50, 0));

    // The hold is gone, and the user is full: confirming it is refused.
    let late = client.confirm(confirm("cy", "pending")).await.unwrap_err();
    assert_eq!(late.code(), Code::ResourceExhausted);
    server.assert_invariants().await;
    server.stop().await;
}

/// Confirming a hold that expired reserves the slot again when there is room.
#[tokio::test]
async fn confirm_after_expiry_re_reserves() {
    let server =
        TestServer::start_configured(|options| options.hold_sweep_interval = Duration::ZERO).await;
    let mut client = server.client().await;
    client.reserve(hold("dan", "p1", 1)).await.unwrap();
    let sql = server.sql().await;
    eventually(Duration::from_secs(10), "the hold to expire", || {
        let sql = &sql;
        async move {
            count(
                sql,
                "SELECT count(*) FROM slots WHERE hold_expires_at <= now()",
            )
            .await
                == 1
        }
    })
    .await;

    let confirmed = client
        .confirm(confirm("dan", "p1"))
        .await
        .unwrap()
        .into_inner();
    assert!(confirmed.re_reserved);
    let usage = confirmed.usage.unwrap();
    assert_eq!((usage.current_usage, usage.pending), (1, 0));

    let actions: Vec<String> = sql
        .query("SELECT action FROM usage_events ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(actions, vec!["hold", "expire", "confirm"]);
    server.assert_invariants().await;
    server.stop().await;
}

/// Releasing a pending slot frees it and its pending count; a hold time out
/// of range is refused.
#[tokio::test]
async fn release_of_a_hold_and_bad_ttl() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client.reserve(hold("eve", "p1", 60)).await.unwrap();
    let released = client
        .release(ReleaseRequest {
            user_id: "eve".into(),
            product_id: "p1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let usage = released.usage.unwrap();
    assert_eq!((usage.current_usage, usage.pending), (0, 0));

    for seconds in [0, -5, 86_401] {
        let status = client
            .reserve(hold("eve", "p2", seconds))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{seconds}s");
    }
    server.assert_invariants().await;
    server.stop().await;
}
