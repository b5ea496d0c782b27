//! The audit trail (ListEvents) and the admin summary (GetSummary).

mod common;

use common::{release, reserve};

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime},
};

use common::{eventually, TestServer};
use tonic::{transport::Channel, Code};
use tonic_types::StatusExt;
use usage_service::proto::{
    usage_service_client::UsageServiceClient, Event, GetSummaryRequest, ListEventsRequest,
    SetLimitOverrideRequest, SetTierLimitRequest, SetTierRequest,
};

type Client = UsageServiceClient<Channel>;

fn set_tier(user: &str, tier: &str) -> SetTierRequest {
    SetTierRequest {
        user_id: user.into(),
        tier: tier.into(),
        feature: String::new(),
    }
}

fn events_of(user: &str) -> ListEventsRequest {
    ListEventsRequest {
        user_id: user.into(),
        ..Default::default()
    }
}

async fn list(client: &mut Client, request: ListEventsRequest) -> Vec<Event> {
    client
        .list_events(request)
        .await
        .expect("listing events succeeds")
        .into_inner()
        .events
}

fn actions(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.action.as_str()).collect()
}

fn bad_field(status: &tonic::Status) -> String {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    details
        .bad_request()
        .expect("BadRequest is attached")
        .field_violations[0]
        .field
        .clone()
}

/// Every kind of change shows in a user's history, newest first, saying who
/// caused it (request id), the product, delta, usage before and after, and
/// for administrative changes the old and new value; filters by action and
/// time range select exactly the matching events; a tier's limit change
/// shows in the feature's history as a tier-wide event.
#[tokio::test]
async fn events_tell_who_did_what_and_filter() {
    let server = TestServer::start().await;
    let mut client = server.client().await;

    let mut first = tonic::Request::new(reserve("ivy", "p1"));
    first
        .metadata_mut()
        .insert("x-request-id", "r-1".parse().unwrap());
    client.reserve(first).await.unwrap();
    client.reserve(reserve("ivy", "p2")).await.unwrap();
    client
        .set_limit_override(SetLimitOverrideRequest {
            user_id: "ivy".into(),
            usage_limit: Some(2),
            reason: "trial".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let denied = client.reserve(reserve("ivy", "p3")).await.unwrap_err();
    assert_eq!(denied.code(), Code::ResourceExhausted);
    client.release(release("ivy", "p1")).await.unwrap();
    client.set_tier(set_tier("ivy", "premium")).await.unwrap();
    client
        .set_tier_limit(SetTierLimitRequest {
            tier: "free".into(),
            usage_limit: Some(55),
            reason: "promotion".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let history = list(&mut client, events_of("ivy")).await;
    assert_eq!(
        actions(&history),
        ["set_tier", "release", "denied", "override", "reserve", "reserve"]
    );
    assert!(history.windows(2).all(|w| w[0].id > w[1].id));
    let [set, rel, den, ovr, _, res1] = &history[..] else {
        unreachable!()
    };
    assert_eq!(
        (
            res1.product_id.as_deref(),
            res1.request_id.as_deref(),
            res1.delta
        ),
        (Some("p1"), Some("r-1"), 1)
    );
    assert_eq!((res1.usage_before, res1.usage_after), (Some(0), Some(1)));
    assert_eq!(
        (den.product_id.as_deref(), den.delta, den.usage_after),
        (Some("p3"), 0, Some(2))
    );
    assert_eq!(
        (rel.delta, rel.usage_before, rel.usage_after),
        (-1, Some(2), Some(1))
    );
    assert_eq!(
        (
            ovr.old_value.as_deref(),
            ovr.new_value.as_deref(),
            ovr.reason.as_deref()
        ),
        (None, Some("2"), Some("trial"))
    );
    assert_eq!(
        (
            set.old_value.as_deref(),
            set.new_value.as_deref(),
            set.delta
        ),
        (Some("free"), Some("premium"), 0)
    );
    assert_eq!(set.usage_before, set.usage_after);

    let by_action = list(
        &mut client,
        ListEventsRequest {
            actions: vec!["reserve".into(), "denied".into()],
            ..events_of("ivy")
        },
    )
    .await;
    assert_eq!(actions(&by_action), ["denied", "reserve", "reserve"]);
    let since = list(
        &mut client,
        ListEventsRequest {
            since: den.occurred_at,
            ..events_of("ivy")
        },
    )
    .await;
    assert_eq!(actions(&since), ["set_tier", "release", "denied"]);
    let until = list(
        &mut client,
        ListEventsRequest {
            until: den.occurred_at,
            ..events_of("ivy")
        },
    )
    .await;
    assert_eq!(actions(&until), ["override", "reserve", "reserve"]);

    let tier_wide = list(
        &mut client,
        ListEventsRequest {
            actions: vec!["tier_limit".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(tier_wide.len(), 1, "no Free user: only the tier-wide event");
    let event = &tier_wide[0];
    assert_eq!(
        (
            event.user_id.as_str(),
            event.tier.as_deref(),
            event.old_value.as_deref(),
            event.new_value.as_deref(),
            event.usage_before
        ),
        ("", Some("free"), Some("50"), Some("55"), None)
    );

    let bad_action = client
        .list_events(ListEventsRequest {
            actions: vec!["delete".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&bad_action), "actions");
    let backwards = client
        .list_events(ListEventsRequest {
            since: den.occurred_at,
            until: res1.occurred_at,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&backwards), "until");
    let unknown = client
        .list_events(ListEventsRequest {
            feature: "no_such_feature".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&unknown), "feature");
    server.stop().await;
}

/// Paging through a user's history while new events for that user are being
/// written returns every event that existed before paging began exactly
/// once, newest first, never repeating one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paging_events_while_they_are_written() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client.set_tier(set_tier("pat", "premium")).await.unwrap();
    let calls = (0..150).map(|i| {
        let mut client = client.clone();
        tokio::spawn(async move { client.reserve(reserve("pat", &format!("p{i}"))).await })
    });
    for call in futures::future::join_all(calls).await {
        call.unwrap().unwrap();
    }
    for i in 0..50 {
        client
            .release(release("pat", &format!("p{i}")))
            .await
            .unwrap();
    }

    let sql = server.sql().await;
    let existing: HashSet<i64> = sql
        .query("SELECT id FROM usage_events WHERE user_id = 'pat'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(existing.len(), 201);

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn({
        let (stop, written, mut client) = (stop.clone(), written.clone(), client.clone());
        async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let product = format!("w{i}");
                client.reserve(reserve("pat", &product)).await.unwrap();
                client.release(release("pat", &product)).await.unwrap();
                written.fetch_add(2, Ordering::Relaxed);
                i += 1;
            }
        }
    });
    eventually(Duration::from_secs(10), "the writer to start", || {
        let written = written.clone();
        async move { written.load(Ordering::Relaxed) > 0 }
    })
    .await;

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_events(ListEventsRequest {
                page_size: 7,
                page_token: token,
                ..events_of("pat")
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.events.len() <= 7);
        seen.extend(page.events.iter().map(|e| e.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        // New events between every two pages, whatever the machine's pace.
        let before_next = written.load(Ordering::Relaxed);
        eventually(
            Duration::from_secs(10),
            "events written between pages",
            || {
                let written = written.clone();
                async move { written.load(Ordering::Relaxed) > before_next }
            },
        )
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert!(
        seen.windows(2).all(|w| w[0] > w[1]),
        "newest first, no event twice"
    );
    let seen: HashSet<i64> = seen.into_iter().collect();
    assert!(
        existing.is_subset(&seen),
        "missing: {:?}",
        existing.difference(&seen).collect::<Vec<_>>()
    );
    server.assert_invariants().await;
    server.stop().await;
}

/// One generated user's row, as the direct count reads it.
struct Generated {
    user_id: String,
    tier: String,
    usage: i64,
    limit: Option<i64>,
}

/// On 3,000 generated users across three tiers (with raised, lowered,
/// unlimited and expired overrides, and users over their limit) and 2,000
/// refusals of various ages, every figure of the summary equals the same
/// figure counted directly from the rows in Rust.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn summary_matches_direct_counts() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .set_tier_limit(SetTierLimitRequest {
            tier: "pro".into(),
            usage_limit: Some(500),
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..50 {
        client
            .reserve(reserve("real", &format!("p{i}")))
            .await
            .unwrap();
    }
    for i in 50..53 {
        let refused = client.reserve(reserve("real", &format!("p{i}"))).await;
        assert_eq!(refused.unwrap_err().code(), Code::ResourceExhausted);
    }

    // Counters only: the summary reads counters and refusals, not slots.
    let sql = server.sql().await;
    sql.batch_execute(
        "INSERT INTO user_tier_features (user_id, feature_name, tier, current_usage,
                 usage_limit, override_active, override_limit, override_expires_at)
         SELECT 'gen-' || lpad(i::text, 5, '0'), 'product_slot', t.tier,
                CASE t.tier WHEN 'free' THEN (i * 37) % 62
                            WHEN 'premium' THEN (i * 13) % 900
                            ELSE (i * 29) % 560 END,
                l.usage_limit,
                i % 17 = 0 OR i % 19 = 0,
                CASE WHEN i % 17 = 0 THEN CASE WHEN i % 3 = 0 THEN NULL ELSE 40 END
                     WHEN i % 19 = 0 THEN 5 END,
                CASE WHEN i % 17 = 0 THEN
                          CASE WHEN i % 2 = 0 THEN now() + interval '1 day' END
                     WHEN i % 19 = 0 THEN now() - interval '1 day' END
           FROM generate_series(1, 3000) AS i
          CROSS JOIN LATERAL (
                SELECT (ARRAY['free', 'free', 'free', 'premium', 'pro'])[1 + i % 5] AS tier
          ) AS t
           JOIN tier_limits AS l ON l.tier = t.tier AND l.feature_name = 'product_slot';
         INSERT INTO usage_events (occurred_at, user_id, feature_name, product_id, action,
                                   delta, usage_before, usage_after)
         SELECT now() - make_interval(
                    hours => (ARRAY[1, 5, 12, 23, 26, 48, 100, 160, 176, 300, 1000])[1 + i % 11]),
                'gen-' || lpad((1 + i % 3000)::text, 5, '0'), 'product_slot', 'x' || i,
                CASE WHEN i % 7 = 0 THEN 'reserve' ELSE 'denied' END,
                CASE WHEN i % 7 = 0 THEN 1 ELSE 0 END, 0, CASE WHEN i % 7 = 0 THEN 1 ELSE 0 END
           FROM generate_series(1, 2000) AS i;",
    )
    .await
    .unwrap();

    let summary = client
        .get_summary(GetSummaryRequest::default())
        .await
        .unwrap()
        .into_inner();

    let now = SystemTime::now();
    let users: Vec<Generated> = sql
        .query(
            "SELECT user_id, tier, current_usage, usage_limit, override_active,
                    override_limit, override_expires_at
               FROM user_tier_features WHERE feature_name = 'product_slot'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let overridden =
                r.get::<_, bool>(4) && r.get::<_, Option<SystemTime>>(6).is_none_or(|at| at > now);
            Generated {
                user_id: r.get(0),
                tier: r.get(1),
                usage: r.get(2),
                limit: if overridden { r.get(5) } else { r.get(3) },
            }
        })
        .collect();
    assert_eq!(users.len(), 3001);

    let mut expected: BTreeMap<String, (Option<i64>, i64, i64, i64, i64)> = sql
        .query(
            "SELECT tier, usage_limit FROM tier_limits WHERE feature_name = 'product_slot'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), 0, 0, 0, 0)))
        .collect();
    for user in &users {
        let figures = expected.get_mut(&user.tier).unwrap();
        figures.1 += 1;
        figures.2 += user.usage;
        if let Some(limit) = user.limit {
            figures.3 += i64::from(user.usage >= limit);
            figures.4 += i64::from(user.usage * 5 >= limit * 4);
        }
    }
    let reported: BTreeMap<String, (Option<i64>, i64, i64, i64, i64)> = summary
        .tiers
        .iter()
        .map(|t| {
            let figures = (
                t.usage_limit,
                t.users,
                t.slots,
                t.users_at_limit,
                t.users_near_limit,
            );
            (t.tier.clone(), figures)
        })
        .collect();
    assert_eq!(reported, expected);
    assert!(expected
        .values()
        .all(|f| f.3 > 0 && f.4 > f.3 || f.0.is_none()));

    let ages: Vec<Duration> = sql
        .query(
            "SELECT occurred_at FROM usage_events
              WHERE action = 'denied' AND feature_name = 'product_slot'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| now.duration_since(r.get(0)).unwrap_or_default())
        .collect();
    let within = |hours: u64| {
        ages.iter()
            .filter(|a| **a < Duration::from_secs(hours * 3600))
            .count() as i64
    };
    assert_eq!(
        (summary.refusals_last_24h, summary.refusals_last_7d),
        (within(24), within(24 * 7))
    );
    assert!(within(24) < within(24 * 7) && within(24 * 7) < ages.len() as i64);

    let mut ranked: Vec<&Generated> = users.iter().collect();
    ranked.sort_by(|a, b| b.usage.cmp(&a.usage).then(a.user_id.cmp(&b.user_id)));
    let top: Vec<(String, i64, Option<i64>)> = summary
        .top_users
        .iter()
        .map(|u| (u.user_id.clone(), u.current_usage, u.usage_limit))
        .collect();
    let expected_top: Vec<(String, i64, Option<i64>)> = ranked[..10]
        .iter()
        .map(|u| (u.user_id.clone(), u.usage, u.limit))
        .collect();
    assert_eq!(top, expected_top);

    let unknown = client
        .get_summary(GetSummaryRequest {
            feature: "no_such_feature".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_field(&unknown), "feature");
    server.stop().await;
}
