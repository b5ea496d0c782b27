//! Tiers, per-user limit overrides, tier limits as data, and the filtered
//! ListAll.

mod common;

use common::{release, reserve};

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use common::{count, eventually, TestServer};
use tonic::{transport::Channel, Code};
use tonic_types::StatusExt;
use usage_service::proto::{
    usage_service_client::UsageServiceClient, ClearLimitOverrideRequest, GetRequest, ListAllOrder,
    ListAllRequest, ReserveAction, ReserveRequest, SetLimitOverrideRequest, SetTierLimitRequest,
    SetTierRequest, Usage,
};

type Client = UsageServiceClient<Channel>;

fn set_tier(user: &str, tier: &str) -> SetTierRequest {
    SetTierRequest {
        user_id: user.into(),
        tier: tier.into(),
        feature: String::new(),
    }
}

fn set_override(
    user: &str,
    limit: Option<i64>,
    expires_at: Option<SystemTime>,
) -> SetLimitOverrideRequest {
    SetLimitOverrideRequest {
        user_id: user.into(),
        feature: String::new(),
        usage_limit: limit,
        expires_at: expires_at.map(Into::into),
        reason: "customer request".into(),
    }
}

fn tier_limit(tier: &str, limit: Option<i64>) -> SetTierLimitRequest {
    SetTierLimitRequest {
        tier: tier.into(),
        feature: String::new(),
        usage_limit: limit,
        reason: "pricing change".into(),
    }
}

async fn get(client: &mut Client, user: &str) -> Usage {
    client
        .get(GetRequest {
            user_id: user.into(),
            feature: String::new(),
        })
        .await
        .expect("get succeeds")
        .into_inner()
}

/// Reserves products `from..to` of `user` concurrently, all expected to succeed.
async fn fill(client: &Client, user: &str, from: usize, to: usize) {
    let calls = (from..to).map(|i| {
        let mut client = client.clone();
        let request = reserve(user, &format!("p{i}"));
        tokio::spawn(async move { client.reserve(request).await })
    });
    for result in futures::future::join_all(calls).await {
        result.unwrap().expect("reservation within the limit");
    }
}

/// The field named by the first BadRequest violation of an INVALID_ARGUMENT.
fn bad_field(status: &tonic::Status) -> String {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    let bad = details.bad_request().expect("BadRequest is attached");
    bad.field_violations[0].field.clone()
}

/// Upgrading a full Free user to Premium makes the next Reserve succeed, and
/// the change is audited with old and new tier, delta 0 and the request id.
#[tokio::test]
async fn upgrade_to_premium_lifts_the_limit() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    fill(&client, "ann", 0, 50).await;
    let refused = client.reserve(reserve("ann", "p50")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);

    let mut request = tonic::Request::new(set_tier("ann", "premium"));
    request
        .metadata_mut()
        .insert("x-request-id", "billing-7".parse().unwrap());
    let usage = client.set_tier(request).await.unwrap().into_inner();
    assert_eq!(
        (usage.tier.as_str(), usage.current_usage, usage.unlimited),
        ("premium", 50, true)
    );
    client.reserve(reserve("ann", "p50")).await.unwrap();

    let sql = server.sql().await;
    let row = sql
        .query_one(
            "SELECT old_value, new_value, delta, usage_before, usage_after, request_id
               FROM usage_events WHERE action = 'set_tier'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("free"));
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("premium"));
    assert_eq!(
        (
            row.get::<_, i64>(2),
            row.get::<_, i64>(3),
            row.get::<_, i64>(4)
        ),
        (0, 50, 50)
    );
    assert_eq!(
        row.get::<_, Option<String>>(5).as_deref(),
        Some("billing-7")
    );
    server.assert_invariants().await;
    server.stop().await;
}

/// Downgrading a user holding 70 to Free deletes nothing: usage stays 70 and
/// `over_limit` is set; every Reserve (add or restore) is refused until
/// releases bring usage below 50, and then the next one succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn downgrade_over_the_limit_keeps_slots_and_refuses_until_below() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client.set_tier(set_tier("ben", "premium")).await.unwrap();
    fill(&client, "ben", 0, 70).await;

    let usage = client
        .set_tier(set_tier("ben", "free"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            usage.current_usage,
            usage.usage_limit,
            usage.over_limit,
            usage.remaining
        ),
        (70, Some(50), true, Some(0))
    );
    let sql = server.sql().await;
    assert_eq!(count(&sql, "SELECT count(*) FROM slots").await, 70);

    for i in 0..20 {
        client
            .release(release("ben", &format!("p{i}")))
            .await
            .unwrap();
        let add = client.reserve(reserve("ben", "new")).await.unwrap_err();
        assert_eq!(add.code(), Code::ResourceExhausted, "at {}", 69 - i);
        let restore = client
            .reserve(ReserveRequest {
                action: ReserveAction::Restore.into(),
                ..reserve("ben", &format!("p{i}"))
            })
            .await
            .unwrap_err();
        assert_eq!(restore.code(), Code::ResourceExhausted);
    }
    let at_limit = get(&mut client, "ben").await;
    assert_eq!((at_limit.current_usage, at_limit.over_limit), (50, false));

    client.release(release("ben", "p20")).await.unwrap();
    let usage = client
        .reserve(reserve("ben", "new"))
        .await
        .expect("below the limit again")
        .into_inner()
        .usage
        .unwrap();
    assert_eq!(usage.current_usage, 50);
    server.assert_invariants().await;
    server.stop().await;
}

/// An unknown tier is INVALID_ARGUMENT and writes nothing; setting the tier a
/// user already has writes no audit row.
#[tokio::test]
async fn unknown_or_same_tier_changes_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let sql = server.sql().await;

    let err = client.set_tier(set_tier("cat", "gold")).await.unwrap_err();
    assert_eq!(bad_field(&err), "tier");
    assert!(err.message().contains("gold"), "{}", err.message());
    let err = client.set_tier(set_tier("", "")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        count(&sql, "SELECT count(*) FROM user_tier_features").await,
        0
    );

    client.reserve(reserve("cat", "p1")).await.unwrap();
    let usage = client
        .set_tier(set_tier("cat", "free"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((usage.tier.as_str(), usage.current_usage), ("free", 1));
    client.set_tier(set_tier("cat", "premium")).await.unwrap();
    client.set_tier(set_tier("cat", "premium")).await.unwrap();
    assert_eq!(
        count(
            &sql,
            "SELECT count(*) FROM usage_events WHERE action = 'set_tier'"
        )
        .await,
        1
    );
    server.stop().await;
}

/// SetTier racing with Reserves of the same user: replaying the user's audit
/// trail (in lock order) shows every reservation within the limit in force
/// when it committed, each event starting from the usage the previous one
/// left, whatever usage the downgrade struck at.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn set_tier_racing_reserves_never_passes_the_limit_in_force() {
    let server = TestServer::start().await;
    let client = server.client().await;
    let sql = server.sql().await;

    for (round, threshold) in [20_i64, 45, 50, 58, 75].into_iter().enumerate() {
        let user = format!("racer-{round}");
        client
            .clone()
            .set_tier(set_tier(&user, "premium"))
            .await
            .unwrap();

        let workers = (0..4).map(|w| {
            let mut client = client.clone();
            let user = user.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    let _ = client.reserve(reserve(&user, &format!("w{w}-{i}"))).await;
                }
            })
        });
        let workers: Vec<_> = workers.collect();
        let mut admin = client.clone();
        let downgrade = tokio::spawn({
            let user = user.clone();
            async move {
                eventually(
                    Duration::from_secs(20),
                    "usage to reach the threshold",
                    || {
                        let mut admin = admin.clone();
                        let user = user.clone();
                        async move { get(&mut admin, &user).await.current_usage >= threshold }
                    },
                )
                .await;
                admin.set_tier(set_tier(&user, "free")).await.unwrap();
            }
        });
        for worker in workers {
            worker.await.unwrap();
        }
        downgrade.await.unwrap();

        let rows = sql
            .query(
                "SELECT action, new_value, usage_before, usage_after FROM usage_events
                  WHERE user_id = $1 ORDER BY id",
                &[&user],
            )
            .await
            .unwrap();
        let mut limit: Option<i64> = None;
        let mut usage = 0;
        let mut downgraded_at = None;
        for row in &rows {
            let action: &str = row.get(0);
            let (before, after): (i64, i64) = (row.get(2), row.get(3));
            assert_eq!(before, usage, "{user}: events are serial");
            match action {
                "set_tier" if row.get::<_, Option<&str>>(1) == Some("free") => {
                    limit = Some(50);
                    downgraded_at = Some(after);
                }
                "set_tier" => limit = None,
                "reserve" => assert!(
                    limit.is_none_or(|l| after <= l),
                    "{user}: reserved to {after} under limit {limit:?}"
                ),
                "denied" => assert!(limit.is_some_and(|l| before >= l)),
                other => panic!("unexpected action {other}"),
            }
            usage = after;
        }
        let downgraded_at = downgraded_at.expect("the downgrade is audited");
        assert!(downgraded_at >= threshold);
        let final_usage = get(&mut client.clone(), &user).await.current_usage;
        assert_eq!(final_usage, usage);
        assert_eq!(final_usage, downgraded_at.max(50));
    }
    server.assert_invariants().await;
    server.stop().await;
}

/// An override replaces the tier's limit, raised or unlimited; it survives a
/// tier change; lowered below usage it behaves like a downgrade; cleared, the
/// tier's limit is back. Each change is audited with old and new values and
/// the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overrides_replace_the_tier_limit_until_cleared() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    fill(&client, "dan", 0, 50).await;

    let usage = client
        .set_limit_override(set_override("dan", Some(60), None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((usage.usage_limit, usage.remaining), (Some(60), Some(10)));
    fill(&client, "dan", 50, 60).await;
    let full = client.reserve(reserve("dan", "p60")).await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted);

    client.set_tier(set_tier("dan", "premium")).await.unwrap();
    let usage = get(&mut client, "dan").await;
    assert_eq!(
        (usage.tier.as_str(), usage.usage_limit),
        ("premium", Some(60)),
        "the override survives the tier change"
    );

    let usage = client
        .set_limit_override(set_override("dan", Some(40), None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((usage.current_usage, usage.over_limit), (60, true));
    let refused = client.reserve(reserve("dan", "p60")).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);

    client
        .set_limit_override(set_override("dan", None, None))
        .await
        .unwrap();
    client
        .reserve(reserve("dan", "p60"))
        .await
        .expect("unlimited");

    let cleared = client
        .clear_limit_override(ClearLimitOverrideRequest {
            user_id: "dan".into(),
            feature: String::new(),
            reason: "resolved".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (cleared.tier.as_str(), cleared.unlimited),
        ("premium", true)
    );

    let sql = server.sql().await;
    let rows = sql
        .query(
            "SELECT old_value, new_value, reason FROM usage_events
              WHERE action = 'override' ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let audited: Vec<(Option<String>, Option<String>, Option<String>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let s = |v: &str| Some(v.to_owned());
    assert_eq!(
        audited,
        vec![
            (None, s("60"), s("customer request")),
            (s("60"), s("40"), s("customer request")),
            (s("40"), s("unlimited"), s("customer request")),
            (s("unlimited"), None, s("resolved")),
        ]
    );
    server.assert_invariants().await;
    server.stop().await;
}

/// An override with a short expiry applies while it lasts; once it expires
/// the tier's limit applies to the very next Reserve, with no job having
/// cleared the override.
#[tokio::test]
async fn expired_override_gives_way_to_the_tier_limit() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let expires_at = SystemTime::now() + Duration::from_secs(6);

    let usage = client
        .set_limit_override(set_override("eve", Some(10), Some(expires_at)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usage.usage_limit, Some(10));
    fill(&client, "eve", 0, 10).await;
    let refused = client.reserve(reserve("eve", "p10")).await.unwrap_err();
    assert!(
        SystemTime::now() < expires_at,
        "the machine was too slow to observe the override before it expired"
    );
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(
        refused.get_error_details().error_info().unwrap().metadata["usage_limit"],
        "10"
    );

    eventually(Duration::from_secs(20), "the override to expire", || {
        let mut client = client.clone();
        async move { get(&mut client, "eve").await.usage_limit == Some(50) }
    })
    .await;
    let usage = client
        .reserve(reserve("eve", "p10"))
        .await
        .expect("the tier's limit applies")
        .into_inner()
        .usage
        .unwrap();
    assert_eq!((usage.current_usage, usage.usage_limit), (11, Some(50)));

    let sql = server.sql().await;
    assert_eq!(
        count(
            &sql,
            "SELECT count(*) FROM user_tier_features WHERE override_active"
        )
        .await,
        1,
        "expiry needed no write"
    );

    let past = client
        .set_limit_override(set_override("eve", Some(5), Some(SystemTime::now())))
        .await
        .unwrap_err();
    assert_eq!(bad_field(&past), "expires_at");
    let negative = client
        .set_limit_override(set_override("eve", Some(-1), None))
        .await
        .unwrap_err();
    assert_eq!(bad_field(&negative), "usage_limit");
    server.stop().await;
}

/// Raising Free from 50 to 60 lets a user at 50 reserve again, rewrites every
/// Free row (audited once per user plus once for the tier) and leaves an
/// overridden user's limit in force alone; a new tier needs only data.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tier_limit_change_applies_to_every_user_of_the_tier() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    fill(&client, "fay", 0, 50).await;
    fill(&client, "gus", 0, 3).await;
    client
        .set_limit_override(set_override("gus", Some(5), None))
        .await
        .unwrap();
    client.set_tier(set_tier("hal", "premium")).await.unwrap();

    let response = client
        .set_tier_limit(tier_limit("free", Some(60)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            response.changed,
            response.users_updated,
            response.usage_limit
        ),
        (true, 2, Some(60))
    );
    client
        .reserve(reserve("fay", "p50"))
        .await
        .expect("room under 60");
    assert_eq!(get(&mut client, "gus").await.usage_limit, Some(5));
    assert!(get(&mut client, "hal").await.unlimited);

    let again = client
        .set_tier_limit(tier_limit("free", Some(60)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.changed, again.users_updated), (false, 0));

    let sql = server.sql().await;
    let audited: Vec<(Option<String>, Option<String>)> = sql
        .query(
            "SELECT user_id, new_value FROM usage_events
              WHERE action = 'tier_limit' ORDER BY user_id NULLS FIRST",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let s = |v: &str| Some(v.to_owned());
    assert_eq!(
        audited,
        vec![(None, s("60")), (s("fay"), s("60")), (s("gus"), s("60"))]
    );

    let pro = client
        .set_tier_limit(tier_limit("pro", Some(500)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((pro.changed, pro.users_updated), (true, 0));
    let usage = client
        .set_tier(set_tier("fay", "pro"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((usage.tier.as_str(), usage.usage_limit), ("pro", Some(500)));

    let negative = client
        .set_tier_limit(tier_limit("free", Some(-5)))
        .await
        .unwrap_err();
    assert_eq!(bad_field(&negative), "usage_limit");
    let unknown = client
        .set_tier_limit(SetTierLimitRequest {
            feature: "no_such_feature".into(),
            ..tier_limit("free", Some(5))
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&unknown), "feature");
    server.assert_invariants().await;
    server.stop().await;
}

/// A tier limit change racing with many users' first Reserves leaves no row
/// holding the old limit: every Free row ends at the new limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tier_limit_change_racing_first_reserves_leaves_no_stale_limit() {
    let server = TestServer::start().await;
    let client = server.client().await;

    let calls: Vec<_> = (0..300)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .reserve(reserve(&format!("new-{i}"), "p1"))
                    .await
                    .map(drop)
            })
        })
        .collect();
    let mut admin = client.clone();
    let change = admin
        .set_tier_limit(tier_limit("free", Some(20)))
        .await
        .unwrap()
        .into_inner();
    for call in futures::future::join_all(calls).await {
        call.unwrap()
            .expect("a first reservation is within any limit");
    }

    let sql = server.sql().await;
    assert_eq!(
        count(
            &sql,
            "SELECT count(*) FROM user_tier_features
              WHERE tier = 'free' AND usage_limit IS DISTINCT FROM 20"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &sql,
            "SELECT count(*) FROM usage_events
              WHERE action = 'tier_limit' AND user_id IS NOT NULL"
        )
        .await,
        change.users_updated
    );
    server.assert_invariants().await;
    server.stop().await;
}

/// ListAll filters by tier, utilization (exactly 80% included, unlimited
/// never) and being over the limit, and orders by usage descending with ties
/// by user id; small keyset pages concatenate to exactly the full listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_all_filters_and_orders_with_stable_pages() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let plan: [(&str, usize); 8] = [
        ("a", 45),
        ("b", 40),
        ("c", 39),
        ("d", 100),
        ("e", 30),
        ("f", 50),
        ("g", 1),
        ("h", 40),
    ];
    client.set_tier(set_tier("d", "premium")).await.unwrap();
    for (user, held) in plan {
        fill(&client, user, 0, held).await;
    }
    client
        .set_limit_override(set_override("e", Some(20), None))
        .await
        .unwrap();

    let lister = client.clone();
    let list = move |request: ListAllRequest| {
        let mut client = lister.clone();
        async move {
            let mut users = Vec::new();
            let mut token = String::new();
            loop {
                let page = client
                    .list_all(ListAllRequest {
                        page_token: token,
                        ..request.clone()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(page.usages.len() <= request.page_size.max(1) as usize);
                users.extend(
                    page.usages
                        .into_iter()
                        .map(|u| (u.user_id, u.current_usage)),
                );
                if page.next_page_token.is_empty() {
                    return users;
                }
                token = page.next_page_token;
            }
        }
    };
    let ids = |users: Vec<(String, i64)>| users.into_iter().map(|(u, _)| u).collect::<Vec<_>>();
    let base = ListAllRequest {
        page_size: 2,
        ..Default::default()
    };

    let near = list(ListAllRequest {
        min_utilization: Some(0.8),
        ..base.clone()
    })
    .await;
    assert_eq!(ids(near), ["a", "b", "e", "f", "h"]);
    let over = list(ListAllRequest {
        over_limit_only: true,
        ..base.clone()
    })
    .await;
    assert_eq!(ids(over), ["e"]);
    let premium = list(ListAllRequest {
        tier: Some("premium".into()),
        ..base.clone()
    })
    .await;
    assert_eq!(ids(premium), ["d"]);

    let by_usage = list(ListAllRequest {
        order: ListAllOrder::CurrentUsageDesc.into(),
        ..base.clone()
    })
    .await;
    let mut expected: Vec<(String, i64)> = plan
        .iter()
        .map(|(u, n)| (u.to_string(), *n as i64))
        .collect();
    expected.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    assert_eq!(by_usage, expected);
    let by_usage_one_page = list(ListAllRequest {
        order: ListAllOrder::CurrentUsageDesc.into(),
        page_size: 100,
        ..Default::default()
    })
    .await;
    assert_eq!(by_usage_one_page, expected);

    let free_near_by_usage = list(ListAllRequest {
        tier: Some("free".into()),
        min_utilization: Some(0.8),
        order: ListAllOrder::CurrentUsageDesc.into(),
        ..base.clone()
    })
    .await;
    assert_eq!(ids(free_near_by_usage), ["f", "a", "b", "h", "e"]);

    let first = client
        .list_all(ListAllRequest {
            order: ListAllOrder::CurrentUsageDesc.into(),
            ..base.clone()
        })
        .await
        .unwrap()
        .into_inner();
    let mixed = client
        .list_all(ListAllRequest {
            page_token: first.next_page_token,
            ..base.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&mixed), "page_token");
    let out_of_range = client
        .list_all(ListAllRequest {
            min_utilization: Some(1.5),
            ..base.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&out_of_range), "min_utilization");
    let by_user: HashMap<String, i64> = list(base.clone()).await.into_iter().collect();
    assert_eq!(by_user.len(), plan.len());
    server.stop().await;
}
