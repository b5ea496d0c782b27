//! The Prometheus endpoint: every counter moves by exactly what the calls did.
//!
//! The recorder is process-wide, so the tests of this file run one at a time
//! and compare scrapes taken before and after their calls.

mod common;

use common::{release, reserve};

use std::time::Duration;

use common::{
    catalogue::{reconciler, FIXTURE},
    eventually,
    metrics::{free_addr, scrape, Delta, Samples},
    proxy::Proxy,
    url_with_database, TestServer,
};
use tokio::sync::Mutex;
use tonic::Code;
use usage_service::proto::{GetRequest, ReleaseManyRequest, ReserveManyRequest};

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

const RESERVE: &str = "/usage.v1.UsageService/Reserve";
const RELEASE: &str = "/usage.v1.UsageService/Release";
const GET: &str = "/usage.v1.UsageService/Get";
const INVENTED: &str = "/usage.v1.UsageService/Invented";

/// The `host:port` of a `postgres://user@host:port/db` URL.
fn database_host_port(url: &str) -> &str {
    let (_, rest) = url.split_once("://").expect("a postgres:// URL");
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    rest.split(['/', '?'])
        .next()
        .expect("split yields at least one part")
}

/// Requests by RPC and code, their latency counts, and slots reserved,
/// released and refused by feature and tier move by exactly the calls made;
/// the pool and health gauges describe the running server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_exactly_the_calls_made() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let metrics_addr = free_addr();
    let server = TestServer::start_configured(|o| o.metrics_addr = Some(metrics_addr)).await;
    let mut client = server.client().await;
    server
        .sql()
        .await
        .batch_execute(
            "INSERT INTO user_tier_features (user_id, feature_name, tier, usage_limit)
             VALUES ('bob', 'product_slot', 'premium', NULL)",
        )
        .await
        .expect("making bob premium");
    let before = Samples::parse(&scrape(metrics_addr).await);

    // 50 slots for a Free user, then its 51st refused twice.
    for i in 0..50 {
        client
            .reserve(reserve("alice", &format!("p{i}")))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        let refused = client.reserve(reserve("alice", "p50")).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
    }
    // Neither an already held product nor a release of nothing moves a slot.
    client.reserve(reserve("alice", "p0")).await.unwrap();
    client.release(release("alice", "p1")).await.unwrap();
    client.release(release("alice", "p2")).await.unwrap();
    client.release(release("alice", "never")).await.unwrap();
    // One premium slot, three more in bulk and two of them released in bulk
    // (the third product named holds nothing), one invalid request, one read.
    client.reserve(reserve("bob", "p0")).await.unwrap();
    client
        .reserve_many(ReserveManyRequest {
            user_id: "bob".into(),
            product_ids: vec!["m1".into(), "m2".into(), "m3".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    client
        .release_many(ReleaseManyRequest {
            user_id: "bob".into(),
            product_ids: vec!["m1".into(), "m2".into(), "never".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let invalid = client.reserve(reserve("", "p0")).await.unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    client
        .get(GetRequest {
            user_id: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    // A method the server does not serve, named by the client.
    let mut raw = tonic::client::Grpc::new(server.channel().await);
    raw.ready().await.expect("the channel is ready");
    let invented = raw
        .unary(
            tonic::Request::new(()),
            http::uri::PathAndQuery::from_static(INVENTED),
            tonic_prost::ProstCodec::<(), ()>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(invented.code(), Code::Unimplemented);

    let scraped = scrape(metrics_addr).await;
    assert!(
        !scraped.contains(INVENTED),
        "no series names the invented path"
    );
    let after = Samples::parse(&scraped);
    let delta = Delta { before, after };
    let free = [("feature", "product_slot"), ("tier", "free")];
    let premium = [("feature", "product_slot"), ("tier", "premium")];
    assert_eq!(delta.of("usage_slots_reserved_total", &free), 50.0);
    assert_eq!(delta.of("usage_slots_reserved_total", &premium), 4.0);
    assert_eq!(delta.of("usage_slots_released_total", &premium), 2.0);
    assert_eq!(delta.of("usage_slots_refused_total", &free), 2.0);
    assert_eq!(delta.of("usage_slots_released_total", &free), 2.0);

    let requests = "usage_grpc_requests_total";
    assert_eq!(
        delta.of(requests, &[("rpc", RESERVE), ("code", "OK")]),
        52.0
    );
    assert_eq!(
        delta.of(
            requests,
            &[("rpc", RESERVE), ("code", "RESOURCE_EXHAUSTED")]
        ),
        2.0
    );
    assert_eq!(
        delta.of(requests, &[("rpc", RESERVE), ("code", "INVALID_ARGUMENT")]),
        1.0
    );
    assert_eq!(delta.of(requests, &[("rpc", RELEASE), ("code", "OK")]), 3.0);
    assert_eq!(delta.of(requests, &[("rpc", GET), ("code", "OK")]), 1.0);
    // Counted, under one label value for every path nobody serves.
    assert_eq!(
        delta.of(requests, &[("rpc", "unknown"), ("code", "UNIMPLEMENTED")]),
        1.0
    );

    let latency_count = "usage_grpc_request_duration_seconds_count";
    assert_eq!(delta.of(latency_count, &[("rpc", RESERVE)]), 55.0);
    assert_eq!(delta.of(latency_count, &[("rpc", RELEASE)]), 3.0);
    // Every call that reached the store waited for a connection once.
    assert_eq!(delta.of("usage_db_pool_wait_seconds_count", &[]), 60.0);
    for kind in ["unavailable", "database", "unexpected_outcome"] {
        assert_eq!(delta.of("usage_db_errors_total", &[("kind", kind)]), 0.0);
    }

    let now = &delta.after;
    // The gauge follows the health probe, which a loaded machine can make
    // miss one round; it must come back to 1 while the database answers.
    eventually(Duration::from_secs(10), "the health gauge at 1", || async {
        Samples::parse(&scrape(metrics_addr).await).get("usage_health_serving", &[]) == 1.0
    })
    .await;
    assert_eq!(
        now.get("usage_db_pool_connections", &[("state", "max")]),
        16.0
    );
    let open = now.get("usage_db_pool_connections", &[("state", "open")]);
    assert!(open >= 1.0, "at least one connection is open, got {open}");
    assert_eq!(now.get("usage_db_pool_waiting", &[]), 0.0);

    server.assert_invariants().await;
    server.stop().await;
}

/// With the database gone, each failed call counts one `unavailable` error
/// and health drops to 0; it returns to 1 when the database is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_errors_and_health_are_counted() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let db = common::migrated_db().await;
    let admin = common::admin_url();
    let upstream = database_host_port(&admin);
    let upstream_addr = tokio::net::lookup_host(upstream)
        .await
        .expect("resolving the database host")
        .next()
        .expect("an address for the database host");
    let proxy = Proxy::start(upstream_addr).await;
    let mut args = db.args();
    args.database_url = url_with_database(
        &admin.replacen(upstream, &proxy.addr.to_string(), 1),
        &db.name,
    );
    args.db_pool_wait_timeout = Duration::from_millis(500);
    args.db_connect_timeout = Duration::from_millis(500);
    let metrics_addr = free_addr();
    let server = TestServer::start_on(db, args, |o| o.metrics_addr = Some(metrics_addr)).await;
    let mut client = server.client().await;
    client.reserve(reserve("carol", "p0")).await.unwrap();

    proxy.down();
    eventually(Duration::from_secs(10), "health to drop to 0", || async {
        Samples::parse(&scrape(metrics_addr).await).get("usage_health_serving", &[]) == 0.0
    })
    .await;
    let before = Samples::parse(&scrape(metrics_addr).await);
    for product in ["p1", "p2", "p3"] {
        let failed = client.reserve(reserve("carol", product)).await.unwrap_err();
        assert_eq!(failed.code(), Code::Unavailable, "{failed:?}");
    }
    let after = Samples::parse(&scrape(metrics_addr).await);
    let delta = Delta { before, after };
    let unavailable = [("kind", "unavailable")];
    assert_eq!(delta.of("usage_db_errors_total", &unavailable), 3.0);
    let failed_calls = [("rpc", RESERVE), ("code", "UNAVAILABLE")];
    assert_eq!(delta.of("usage_grpc_requests_total", &failed_calls), 3.0);

    proxy.up();
    eventually(Duration::from_secs(10), "health to return to 1", || async {
        Samples::parse(&scrape(metrics_addr).await).get("usage_health_serving", &[]) == 1.0
    })
    .await;
    server.stop().await;
}

/// Reconciliation counts the drift it finds, dry runs included, and the
/// drift it corrects: two live products without a slot and one slot without
/// a product are three units found by the dry run and three found and fixed
/// by the real pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_drift_is_counted() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let metrics_addr = free_addr();
    let server = TestServer::start_configured(|o| o.metrics_addr = Some(metrics_addr)).await;
    let sql = server.sql().await;
    sql.batch_execute(FIXTURE)
        .await
        .expect("creating the catalogue");
    sql.batch_execute("INSERT INTO products (id, user_id) VALUES (1, 'ann'), (2, 'ann')")
        .await
        .expect("adding products without slots");
    let mut client = server.client().await;
    client
        .reserve(reserve("ben", "no-such-product"))
        .await
        .unwrap();
    let reconciler = reconciler(&server, Duration::ZERO).await;
    let found = "usage_reconciliation_drift_found_total";
    let fixed = "usage_reconciliation_drift_fixed_total";

    let before = Samples::parse(&scrape(metrics_addr).await);
    let dry = reconciler.all(true, None).await.expect("a dry run");
    assert_eq!(dry.drift(), 3);
    let after = Samples::parse(&scrape(metrics_addr).await);
    let delta = Delta { before, after };
    assert_eq!(delta.of(found, &[]), 3.0);
    assert_eq!(delta.of(fixed, &[]), 0.0);

    let before = delta.after;
    let real = reconciler.all(false, None).await.expect("a pass");
    assert_eq!(real.drift(), 3);
    let after = Samples::parse(&scrape(metrics_addr).await);
    let delta = Delta { before, after };
    assert_eq!(delta.of(found, &[]), 3.0);
    assert_eq!(delta.of(fixed, &[]), 3.0);

    server.assert_invariants().await;
    server.stop().await;
}
