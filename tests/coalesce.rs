//! Calls sent together: Reserves and Releases that queue in the service, of
//! one busy user or of many users, go to PostgreSQL as one statement and one
//! commit, and Gets that queue go as one read, yet every call gets its own
//! answer and audit row. A batch that fails is sent again call by call, and
//! batches naming the same users cannot deadlock.
//!
//! Queues are made on purpose: the server runs [`IN_FLIGHT`] statements of
//! each kind at once, and a transaction of the test holds a user's row (or
//! the features table), so the first calls wait in PostgreSQL and the rest
//! in the service, where the metrics show them.
//!
//! The queue gauge is process-wide, so the tests of this file run one at a
//! time.

mod common;

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use common::{
    connect, count, eventually,
    metrics::{free_addr, scrape, Samples},
    release, reserve, TestServer,
};
use tokio::sync::Mutex;
use tonic::{Code, Request};
use usage_service::proto::{usage_service_client::UsageServiceClient, GetRequest};

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// Statements of the test's database waiting for a lock.
const WAITING: &str = "SELECT count(*) FROM pg_stat_activity \
                       WHERE datname = current_database() AND wait_event_type = 'Lock'";

/// Statements of each kind the test servers run at once
/// (`--db-batches-in-flight`), whatever the machine's CPUs.
const IN_FLIGHT: i64 = 4;

/// A server that serves metrics, with its metrics address.
async fn server_with_metrics() -> (TestServer, SocketAddr) {
    let metrics = free_addr();
    let server = TestServer::start_with_batches_in_flight(IN_FLIGHT as usize, |o| {
        o.metrics_addr = Some(metrics)
    })
    .await;
    (server, metrics)
}

/// A connection of the test holding `user`'s counter row in an open
/// transaction, so that every write of that user waits for it.
async fn hold_row(server: &TestServer, user: &str) -> tokio_postgres::Client {
    let holder = server.sql().await;
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT * FROM user_tier_features WHERE user_id = '{user}' FOR UPDATE"
        ))
        .await
        .expect("holding the user's row");
    holder
}

/// [`IN_FLIGHT`] Reserves of `user` (products `lead0`, `lead1`, ...),
/// once all of them wait for a lock in PostgreSQL: the writes the server
/// runs at once, so that the next calls queue in the service.
async fn leaders_waiting(
    server: &TestServer,
    client: &UsageServiceClient<tonic::transport::Channel>,
    user: &str,
) -> Vec<tokio::task::JoinHandle<Result<i64, tonic::Status>>> {
    let leaders = (0..IN_FLIGHT)
        .map(|p| spawn_reserve(client, user, &format!("lead{p}")))
        .collect();
    let sql = server.sql().await;
    eventually(
        Duration::from_secs(20),
        "the first calls to wait",
        || async { count(&sql, WAITING).await == IN_FLIGHT },
    )
    .await;
    leaders
}

async fn sample(metrics: SocketAddr, name: &str, kind: &str) -> f64 {
    Samples::parse(&scrape(metrics).await).get(name, &[("kind", kind)])
}

/// Reserves `product` for `user` in a task, tagged with the request id
/// `product`.
fn spawn_reserve(
    client: &UsageServiceClient<tonic::transport::Channel>,
    user: &str,
    product: &str,
) -> tokio::task::JoinHandle<Result<i64, tonic::Status>> {
    let mut client = client.clone();
    let mut request = Request::new(reserve(user, product));
    request
        .metadata_mut()
        .insert("x-request-id", product.parse().expect("an ASCII id"));
    tokio::spawn(async move {
        let reply = client.reserve(request).await?.into_inner();
        Ok(reply.usage.expect("a usage").current_usage)
    })
}

/// Waits until `statements` of the database wait for a lock and `queued`
/// more calls of `kind` than `before` wait in the service.
async fn until_queued(
    server: &TestServer,
    metrics: SocketAddr,
    statements: i64,
    kind: &str,
    before: f64,
    queued: usize,
) {
    let sql = server.sql().await;
    eventually(
        Duration::from_secs(20),
        "the calls to wait in PostgreSQL and in the service",
        || async {
            count(&sql, WAITING).await == statements
                && sample(metrics, "usage_db_queued_calls", kind).await - before == queued as f64
        },
    )
    .await;
}

/// Load: a Free user at 1 of 50, its row held by a transaction while 60
/// Reserves of new products arrive: 4 wait in PostgreSQL, 56 in the service.
/// Checks: once the row is free, exactly 49 get in and 11 are refused, the
/// 49 were told the usages 2 to 50 once each, each call's audit row carries
/// the usage it was told, and the 56 queued calls were committed together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_reserves_of_a_busy_user_share_one_commit() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (server, metrics) = server_with_metrics().await;
    let client = server.client().await;
    client
        .clone()
        .reserve(reserve("busy", "first"))
        .await
        .expect("setup");

    let holder = hold_row(&server, "busy").await;
    let before = sample(metrics, "usage_db_queued_calls", "write").await;
    let products: Vec<String> = (0..60).map(|p| format!("p{p:02}")).collect();
    let calls: Vec<_> = products
        .iter()
        .map(|p| spawn_reserve(&client, "busy", p))
        .collect();
    until_queued(&server, metrics, IN_FLIGHT, "write", before, 56).await;
    holder
        .batch_execute("COMMIT")
        .await
        .expect("freeing the row");

    let mut told = HashMap::new();
    let mut refused = 0;
    for (product, call) in products.iter().zip(calls) {
        match call.await.expect("no panic") {
            Ok(usage) => {
                told.insert(product.clone(), usage);
            }
            Err(status) if status.code() == Code::ResourceExhausted => refused += 1,
            Err(status) => panic!("unexpected answer for {product}: {status:?}"),
        }
    }
    assert_eq!((told.len(), refused), (49, 11));
    let mut usages: Vec<i64> = told.values().copied().collect();
    usages.sort_unstable();
    assert_eq!(usages, (2..=50).collect::<Vec<_>>(), "each usage told once");

    let sql = server.sql().await;
    let audit = sql
        .query(
            "SELECT request_id, action, usage_after, xmin::text AS tx FROM usage_events \
              WHERE user_id = 'busy' AND product_id LIKE 'p%'",
            &[],
        )
        .await
        .expect("reading the audit trail");
    assert_eq!(audit.len(), 60, "one audit row per call");
    for row in &audit {
        let request_id: String = row.get("request_id");
        let action: String = row.get("action");
        match told.get(&request_id) {
            Some(usage) => {
                assert_eq!(action, "reserve", "{request_id}");
                assert_eq!(row.get::<_, i64>("usage_after"), *usage, "{request_id}");
            }
            None => assert_eq!(action, "denied", "{request_id}"),
        }
    }
    let mut transactions: Vec<String> = audit.iter().map(|row| row.get("tx")).collect();
    transactions.sort();
    transactions.dedup();
    assert_eq!(
        transactions.len(),
        IN_FLIGHT as usize + 1,
        "the four calls that waited in PostgreSQL committed alone, the 56 queued ones together"
    );
    server.assert_checks(None).await;
    server.stop().await;
}

/// Fault: a trigger that fails the insert of one product's slot. Load: 4
/// Reserves waiting at a held row, then 10 queued behind them, the failing
/// one among them. Checks: the failing call alone gets INTERNAL with
/// nothing recorded for it; the 9 others are reserved, each in a
/// transaction of its own (the batch was sent again call by call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_call_does_not_fail_its_batch() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (server, metrics) = server_with_metrics().await;
    let client = server.client().await;
    let sql = server.sql().await;
    sql.batch_execute(
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.product_id = 'poison' THEN
                 RAISE EXCEPTION 'this product cannot be stored';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_poison BEFORE INSERT ON slots
             FOR EACH ROW EXECUTE FUNCTION refuse_poison();",
    )
    .await
    .expect("installing the fault");
    client
        .clone()
        .reserve(reserve("mixed", "first"))
        .await
        .expect("setup");

    let holder = hold_row(&server, "mixed").await;
    let leaders = leaders_waiting(&server, &client, "mixed").await;
    let before = sample(metrics, "usage_db_queued_calls", "write").await;
    let mut products: Vec<String> = (0..9).map(|p| format!("q{p}")).collect();
    products.insert(4, "poison".to_owned());
    let queued: Vec<_> = products
        .iter()
        .map(|p| spawn_reserve(&client, "mixed", p))
        .collect();
    until_queued(&server, metrics, IN_FLIGHT, "write", before, 10).await;
    holder
        .batch_execute("COMMIT")
        .await
        .expect("freeing the row");

    for call in leaders {
        call.await.expect("no panic").expect("a leader is reserved");
    }
    for (product, call) in products.iter().zip(queued) {
        let answer = call.await.expect("no panic");
        if product == "poison" {
            let status = answer.expect_err("the failing product is not reserved");
            assert_eq!(status.code(), Code::Internal, "{status:?}");
        } else {
            answer.unwrap_or_else(|s| panic!("{product} is reserved: {s:?}"));
        }
    }

    let poison = "SELECT count(*) FROM usage_events WHERE product_id = 'poison'";
    assert_eq!(count(&sql, poison).await, 0, "nothing audited for it");
    let alone = "SELECT count(DISTINCT xmin::text) FROM usage_events WHERE product_id LIKE 'q%'";
    assert_eq!(count(&sql, alone).await, 9, "each sent again on its own");
    let usage = server
        .store
        .get("mixed", "product_slot")
        .await
        .expect("reading the usage");
    assert_eq!(usage.current_usage, 1 + IN_FLIGHT + 9);
    server.assert_checks(None).await;
    server.stop().await;
}

/// Load: users holding 0 to 9 slots; the features table locked while the
/// store's Gets in flight wait in PostgreSQL and 12 more Gets queue: each
/// of the 10 users, one never seen, and one for a feature that does not
/// exist. Checks: the 12 are read in one statement, and each call gets its
/// own user's usage, or INVALID_ARGUMENT for the unknown feature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_gets_are_read_together() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (server, metrics) = server_with_metrics().await;
    let client = server.client().await;
    for user in 0..10 {
        for p in 0..user {
            client
                .clone()
                .reserve(reserve(&format!("g{user}"), &format!("p{p}")))
                .await
                .expect("setup");
        }
    }

    let holder = server.sql().await;
    holder
        .batch_execute("BEGIN; LOCK TABLE features IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("locking the features");
    let get = |user: String, feature: &str| {
        let mut client = client.clone();
        let request = GetRequest {
            user_id: user,
            feature: feature.to_owned(),
        };
        tokio::spawn(async move { client.get(request).await.map(|r| r.into_inner()) })
    };
    let reads = IN_FLIGHT;
    let leaders: Vec<_> = (0..reads)
        .map(|n| get(format!("lead{n}"), "product_slot"))
        .collect();
    let sql = server.sql().await;
    eventually(
        Duration::from_secs(20),
        "the first reads to wait",
        || async { count(&sql, WAITING).await == reads },
    )
    .await;

    let samples = Samples::parse(&scrape(metrics).await);
    let before = |name: &str| samples.get(name, &[("kind", "get")]);
    let (queued_before, batches_before, calls_before) = (
        before("usage_db_queued_calls"),
        before("usage_db_batch_calls_count"),
        before("usage_db_batch_calls_sum"),
    );
    let mut queued: Vec<_> = (0..10)
        .map(|user| get(format!("g{user}"), "product_slot"))
        .collect();
    queued.push(get("ghost".to_owned(), "product_slot"));
    queued.push(get("g3".to_owned(), "no_such_feature"));
    until_queued(&server, metrics, reads, "get", queued_before, 12).await;
    holder.batch_execute("COMMIT").await.expect("unlocking");

    for call in leaders {
        let usage = call.await.expect("no panic").expect("a leader is read");
        assert_eq!(usage.current_usage, 0);
    }
    let mut answers = Vec::new();
    for call in queued {
        answers.push(call.await.expect("no panic"));
    }
    let unknown = answers.pop().expect("12 answers");
    assert_eq!(
        unknown.expect_err("no such feature").code(),
        Code::InvalidArgument
    );
    let ghost = answers
        .pop()
        .expect("11 answers")
        .expect("an unseen user reads as empty");
    assert_eq!((ghost.current_usage, ghost.tier.as_str()), (0, "free"));
    for (user, answer) in (0..).zip(answers) {
        let usage = answer.unwrap_or_else(|s| panic!("g{user} is read: {s:?}"));
        assert_eq!(usage.user_id, format!("g{user}"));
        assert_eq!(usage.current_usage, user, "g{user}");
        assert_eq!(usage.usage_limit, Some(50), "g{user}");
    }

    let samples = Samples::parse(&scrape(metrics).await);
    let after = |name: &str| samples.get(name, &[("kind", "get")]);
    assert_eq!(after("usage_db_batch_calls_count") - batches_before, 1.0);
    assert_eq!(after("usage_db_batch_calls_sum") - calls_before, 12.0);
    server.stop().await;
}

/// Load: a user's row held while 4 of its Reserves wait in PostgreSQL, then
/// Reserves for 20 users never seen and a Release of the held user queue in
/// the service. Checks: once the row is free, the 21 queued calls are sent
/// as one statement and committed in one transaction of their own; each new
/// user is told a usage of 1, the Release is told the usage its audit row
/// records, and the held user ends at 1 + 4 - 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_writes_of_many_users_share_one_commit() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (server, metrics) = server_with_metrics().await;
    let client = server.client().await;
    client
        .clone()
        .reserve(reserve("busy", "first"))
        .await
        .expect("setup");

    let holder = hold_row(&server, "busy").await;
    let leaders = leaders_waiting(&server, &client, "busy").await;
    let sql = server.sql().await;
    let samples = Samples::parse(&scrape(metrics).await);
    let before = |name: &str| samples.get(name, &[("kind", "write")]);
    let (queued_before, batches_before, calls_before) = (
        before("usage_db_queued_calls"),
        before("usage_db_batch_calls_count"),
        before("usage_db_batch_calls_sum"),
    );
    let users: Vec<String> = (0..20).map(|u| format!("u{u:02}")).collect();
    let reserves: Vec<_> = users
        .iter()
        .map(|user| spawn_reserve(&client, user, &format!("{user}-p")))
        .collect();
    let mut release_request = Request::new(release("busy", "first"));
    release_request
        .metadata_mut()
        .insert("x-request-id", "busy-release".parse().expect("ASCII"));
    let mut releaser = client.clone();
    let released = tokio::spawn(async move { releaser.release(release_request).await });
    until_queued(&server, metrics, IN_FLIGHT, "write", queued_before, 21).await;
    holder
        .batch_execute("COMMIT")
        .await
        .expect("freeing the row");

    for call in leaders {
        call.await.expect("no panic").expect("a leader is reserved");
    }
    for (user, call) in users.iter().zip(reserves) {
        let usage = call
            .await
            .expect("no panic")
            .unwrap_or_else(|s| panic!("{user} is reserved: {s:?}"));
        assert_eq!(usage, 1, "{user}");
    }
    let released = released
        .await
        .expect("no panic")
        .expect("the release is answered")
        .into_inner();
    // The queue is sent when the first leader ends, so the Release may pass
    // some leaders at the row lock: its answer is whatever the row said
    // when it ran, as its audit row records.
    let told = released.usage.expect("a usage").current_usage;
    let audited = "SELECT usage_after FROM usage_events WHERE request_id = 'busy-release'";
    let audited: i64 = sql
        .query_one(audited, &[])
        .await
        .expect("the release's audit row")
        .get(0);
    assert_eq!(told, audited, "the Release is told what it did");
    let busy = server
        .store
        .get("busy", "product_slot")
        .await
        .expect("reading the usage");
    assert_eq!(busy.current_usage, IN_FLIGHT, "1 + 4 reserved - 1 released");

    let queued_txs = "SELECT count(DISTINCT xmin::text) FROM usage_events \
                      WHERE product_id LIKE 'u%' OR request_id = 'busy-release'";
    assert_eq!(count(&sql, queued_txs).await, 1, "one commit for the 21");
    let shared = "SELECT count(*) FROM usage_events AS e \
                   WHERE e.product_id LIKE 'lead%' AND e.xmin::text IN \
                         (SELECT xmin::text FROM usage_events WHERE product_id LIKE 'u%')";
    assert_eq!(count(&sql, shared).await, 0, "the leaders committed alone");
    let samples = Samples::parse(&scrape(metrics).await);
    let after = |name: &str| samples.get(name, &[("kind", "write")]);
    assert_eq!(after("usage_db_batch_calls_count") - batches_before, 1.0);
    assert_eq!(after("usage_db_batch_calls_sum") - calls_before, 21.0);
    server.assert_checks(None).await;
    server.stop().await;
}

/// Two batches naming the same two users in opposite orders, the first
/// user's row held by the test so that both queue behind it. Were each
/// batch run in its calls' order, the one given `y, x` would hold `y` while
/// waiting for `x`, and the other would take `x` and then wait for `y`: a
/// deadlock. Checks: both batches complete, and each call's row carries its
/// own position and user's usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_take_their_users_locks_in_one_order() {
    let server = TestServer::start().await;
    let client = server.client().await;
    for (user, held) in [("x", 1), ("y", 3)] {
        for p in 0..held {
            client
                .clone()
                .reserve(reserve(user, &format!("{user}{p}")))
                .await
                .expect("setup");
        }
    }
    let sql = server.sql().await;
    let holder = hold_row(&server, "x").await;

    let batch = |users: [&'static str; 2], tag: &'static str| {
        let url = server.db.url.clone();
        tokio::spawn(async move {
            let conn = connect(&url).await;
            let products = users.map(|user| format!("{tag}-{user}"));
            let rows = conn
                .query(
                    "SELECT ord, outcome, current_usage FROM usage_write_batch( \
                       $1, ARRAY['product_slot', 'product_slot'], ARRAY['reserve', 'reserve'], \
                       $2, ARRAY['reserve', 'reserve'], ARRAY[NULL, NULL]::text[], \
                       ARRAY[NULL, NULL]::text[], ARRAY[NULL, NULL]::float8[], NULL) \
                     ORDER BY ord",
                    &[&users.to_vec(), &products.to_vec()],
                )
                .await?;
            Ok::<_, tokio_postgres::Error>(
                rows.iter()
                    .map(|r| {
                        let outcome: String = r.get("outcome");
                        (
                            r.get::<_, i32>("ord"),
                            outcome,
                            r.get::<_, i64>("current_usage"),
                        )
                    })
                    .collect::<Vec<_>>(),
            )
        })
    };
    let forward = batch(["x", "y"], "f");
    eventually(
        Duration::from_secs(20),
        "the first batch to wait",
        || async { count(&sql, WAITING).await == 1 },
    )
    .await;
    let backward = batch(["y", "x"], "b");
    eventually(Duration::from_secs(20), "both batches to wait", || async {
        count(&sql, WAITING).await == 2
    })
    .await;
    holder.batch_execute("COMMIT").await.expect("freeing x");

    let forward = forward
        .await
        .expect("no panic")
        .expect("the batch x, y completes");
    assert_eq!(
        forward,
        [(1, "reserved".to_owned(), 2), (2, "reserved".to_owned(), 4)]
    );
    let backward = backward
        .await
        .expect("no panic")
        .expect("the batch y, x completes");
    assert_eq!(
        backward,
        [(1, "reserved".to_owned(), 5), (2, "reserved".to_owned(), 3)]
    );
    server.assert_checks(None).await;
    server.stop().await;
}

/// Fault: a user's row held by a transaction that does not end (a session
/// left idle in it). Load: 4 Reserves of another user waiting at that
/// user's held row, then queued behind them a Reserve of the held user and
/// Reserves of 10 users never seen, sent as one batch once the way is free.
/// Checks: the batch gives up on the held row after its lock wait and is
/// sent call by call; the 10 users are served while the row is still held,
/// and the held user's Reserve completes once it is let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_user_does_not_hold_up_its_batch() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (server, metrics) = server_with_metrics().await;
    let client = server.client().await;
    for user in ["gate", "held"] {
        client
            .clone()
            .reserve(reserve(user, "first"))
            .await
            .expect("setup");
    }
    let held = hold_row(&server, "held").await;
    let gate = hold_row(&server, "gate").await;
    let leaders = leaders_waiting(&server, &client, "gate").await;
    let sql = server.sql().await;
    let before = sample(metrics, "usage_db_queued_calls", "write").await;
    let stuck = spawn_reserve(&client, "held", "second");
    let users: Vec<String> = (0..10).map(|u| format!("u{u:02}")).collect();
    let others: Vec<_> = users
        .iter()
        .map(|user| spawn_reserve(&client, user, &format!("{user}-p")))
        .collect();
    until_queued(&server, metrics, IN_FLIGHT, "write", before, 11).await;
    gate.batch_execute("COMMIT")
        .await
        .expect("opening the gate");

    for call in leaders {
        call.await.expect("no panic").expect("a leader is reserved");
    }
    for (user, call) in users.iter().zip(others) {
        let usage = tokio::time::timeout(Duration::from_secs(20), call)
            .await
            .unwrap_or_else(|_| panic!("{user} is not held up by the held row"))
            .expect("no panic")
            .unwrap_or_else(|s| panic!("{user} is reserved: {s:?}"));
        assert_eq!(usage, 1, "{user}");
    }
    assert!(
        !stuck.is_finished(),
        "the held user's call waits for its row"
    );
    let alone = "SELECT count(DISTINCT xmin::text) FROM usage_events WHERE product_id LIKE 'u%'";
    assert_eq!(count(&sql, alone).await, 10, "each sent again on its own");

    held.batch_execute("COMMIT")
        .await
        .expect("letting the row go");
    let usage = stuck
        .await
        .expect("no panic")
        .expect("the held user's call completes");
    assert_eq!(usage, 2);
    server.assert_checks(None).await;
    server.stop().await;
}
