//! ListAll: keyset pagination over every user.

mod common;

use std::collections::HashSet;

use common::TestServer;
use usage_service::proto::{ListAllRequest, ReserveRequest};

/// Writes `n` users directly, user ids `user-0000` ... in a shuffled order.
async fn seed_users(sql: &tokio_postgres::Client, n: usize, tier: &str) {
    sql.execute(
        "INSERT INTO user_tier_features (user_id, feature_name, tier, usage_limit)
         SELECT format('user-%s-%s', $2::text, lpad(i::text, 4, '0')), 'product_slot', $2,
                (SELECT usage_limit FROM tier_limits WHERE tier = $2)
           FROM generate_series(0, $1 - 1) AS i ORDER BY random()",
        &[&(n as i32), &tier],
    )
    .await
    .unwrap();
}

/// Walking 250 users with page size 7 returns every user exactly once, in
/// user id order, and the last page has no token.
#[tokio::test]
async fn walks_every_user_once_in_order() {
    let server = TestServer::start().await;
    let sql = server.sql().await;
    seed_users(&sql, 250, "free").await;
    let mut client = server.client().await;

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_all(ListAllRequest {
                page_size: 7,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.usages.len() <= 7);
        seen.extend(page.usages.into_iter().map(|u| u.user_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 250);
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        250,
        "no user twice"
    );
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted, "pages come in user id order");
    assert_eq!(pages, 36, "250 / 7 rounded up");
    server.stop().await;
}

/// Users that exist throughout a walk are all returned exactly once even
/// while other users are created and usage changes between pages.
#[tokio::test]
async fn pages_are_stable_under_concurrent_writes() {
    let server = TestServer::start().await;
    let sql = server.sql().await;
    seed_users(&sql, 100, "free").await;
    let mut client = server.client().await;

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut round = 0;
    loop {
        let page = client
            .list_all(ListAllRequest {
                page_size: 9,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.usages.into_iter().map(|u| u.user_id));
        // Between pages: new users sorting before and after the cursor, and
        // a change of usage for a user already listed.
        for id in [
            format!("user-free-{round:04}x"),
            format!("a-new-{round}"),
            seen[0].clone(),
        ] {
            client
                .reserve(ReserveRequest {
                    user_id: id,
                    product_id: format!("p{round}"),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        round += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let seeded: Vec<&String> = seen
        .iter()
        .filter(|id| id.len() == "user-free-0000".len())
        .collect();
    assert_eq!(seeded.len(), 100, "every seeded user exactly once");
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        seen.len(),
        "no user twice"
    );
    server.stop().await;
}

/// The tier filter lists only that tier; page size 0 means 100 and sizes above
/// 1000 are lowered to 1000.
#[tokio::test]
async fn tier_filter_and_page_size_bounds() {
    let server = TestServer::start().await;
    let sql = server.sql().await;
    seed_users(&sql, 1100, "free").await;
    seed_users(&sql, 5, "premium").await;
    let mut client = server.client().await;

    let premium = client
        .list_all(ListAllRequest {
            tier: Some("premium".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(premium.usages.len(), 5);
    assert!(premium
        .usages
        .iter()
        .all(|u| u.tier == "premium" && u.unlimited));
    assert!(premium.next_page_token.is_empty());

    let default_size = client
        .list_all(ListAllRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(default_size.usages.len(), 100);
    let capped = client
        .list_all(ListAllRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(capped.usages.len(), 1000);
    server.stop().await;
}
