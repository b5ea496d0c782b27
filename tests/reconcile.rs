//! Reconciliation of the ledger with the catalogue, and the example product
//! service that keeps the two in step.

mod common;

use common::reserve;

use std::{process::Stdio, time::Duration};

use common::{
    catalogue::{catalogue_mismatches, reconciler, FIXTURE},
    count, eventually, TestServer,
};
use product_service::{ProductError, ProductService};
use tonic::{transport::Channel, Code};
use tonic_types::StatusExt;
use usage_service::proto::{
    usage_service_client::UsageServiceClient, CorrectionKind, ReconcileReport, ReconcileRequest,
};

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/product_service.rs"]
mod product_service;

fn all_users(dry_run: bool) -> ReconcileRequest {
    ReconcileRequest {
        user_id: String::new(),
        dry_run,
    }
}

fn one_user(user: &str) -> ReconcileRequest {
    ReconcileRequest {
        user_id: user.into(),
        dry_run: false,
    }
}

/// A product service on its own connections to the server and the database.
async fn product_service(server: &TestServer) -> ProductService {
    ProductService::new(server.sql().await, server.client().await)
}

/// The corrections of a report as (user, product, kind, delta).
fn corrections(report: &ReconcileReport) -> Vec<(String, String, CorrectionKind, i64)> {
    let mut list: Vec<_> = report
        .corrections
        .iter()
        .map(|c| (c.user_id.clone(), c.product_id.clone(), c.kind(), c.delta))
        .collect();
    list.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    list
}

fn owned(list: &[(&str, &str, CorrectionKind, i64)]) -> Vec<(String, String, CorrectionKind, i64)> {
    list.iter()
        .map(|(u, p, k, d)| ((*u).to_owned(), (*p).to_owned(), *k, *d))
        .collect()
}

/// Each kind of drift (missing slot, orphan slot, wrong counter, product
/// deleted without Release, product restored without Reserve) is reported by
/// a dry run without writing, then fixed for one user or all, each fix with a
/// `reconcile` audit row naming the product; a second pass finds nothing.
#[tokio::test]
async fn every_kind_of_drift_is_found_fixed_and_audited() {
    let server =
        TestServer::start_with_catalogue(Duration::ZERO, Duration::ZERO, |sql| async move {
            sql.batch_execute(FIXTURE).await.unwrap();
            sql.batch_execute(
                "INSERT INTO products (id, user_id, deleted_at) VALUES
                 (1, 'ann', NULL), (2, 'ann', NULL), (3, 'ann', NULL),
                 (5, 'ben', now()), (6, 'ben', NULL),
                 (7, 'cy', NULL)",
            )
            .await
            .unwrap();
        })
        .await;
    let sql = server.sql().await;
    let mut client = server.client().await;
    let clean = client
        .reconcile(all_users(false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (clean.users_checked, clean.slots_added),
        (3, 5),
        "initial sync"
    );

    // Missing slot: a product inserted without a Reserve.
    sql.batch_execute("INSERT INTO products (id, user_id) VALUES (4, 'ann')")
        .await
        .unwrap();
    // Orphan slot: a Reserve whose product never came.
    client.reserve(reserve("ann", "999")).await.unwrap();
    // Product deleted without Release.
    sql.batch_execute("UPDATE products SET deleted_at = now() WHERE id = 2")
        .await
        .unwrap();
    // Product restored without Reserve.
    sql.batch_execute("UPDATE products SET deleted_at = NULL WHERE id = 5")
        .await
        .unwrap();
    // Wrong counter.
    sql.batch_execute(
        "UPDATE user_tier_features SET current_usage = current_usage + 3 WHERE user_id = 'ben'",
    )
    .await
    .unwrap();

    let events = count(&sql, "SELECT count(*) FROM usage_events").await;
    let dry = client
        .reconcile(all_users(true))
        .await
        .unwrap()
        .into_inner();
    assert!(dry.dry_run && !dry.skipped);
    assert_eq!(
        (
            dry.users_checked,
            dry.users_corrected,
            dry.slots_added,
            dry.slots_removed,
            dry.counters_corrected
        ),
        (3, 2, 2, 2, 1)
    );
    assert_eq!(
        count(&sql, "SELECT count(*) FROM usage_events").await,
        events,
        "a dry run writes nothing"
    );
    assert_eq!(catalogue_mismatches(&sql).await.len(), 2);

    let ben = client
        .reconcile(one_user("ben"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        corrections(&ben),
        owned(&[
            ("ben", "", CorrectionKind::CounterCorrected, -3),
            ("ben", "5", CorrectionKind::SlotAdded, 1),
        ])
    );
    let left: Vec<String> = catalogue_mismatches(&sql)
        .await
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(left, ["ann"], "only the user asked for was reconciled");

    let all = client
        .reconcile(all_users(false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((all.users_checked, all.users_corrected), (3, 1));
    assert_eq!(
        corrections(&all),
        owned(&[
            ("ann", "2", CorrectionKind::SlotRemoved, -1),
            ("ann", "4", CorrectionKind::SlotAdded, 1),
            ("ann", "999", CorrectionKind::SlotRemoved, -1),
        ])
    );
    assert!(catalogue_mismatches(&sql).await.is_empty());
    server.assert_invariants().await;

    let audited: Vec<(String, Option<String>, i64)> = sql
        .query(
            "SELECT user_id, product_id, delta FROM usage_events
              WHERE action = 'reconcile' AND id > $1 ORDER BY id",
            &[&events],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        audited,
        [
            ("ben".to_owned(), Some("5".to_owned()), 1),
            ("ben".to_owned(), None, 0),
            ("ann".to_owned(), Some("4".to_owned()), 1),
            ("ann".to_owned(), Some("2".to_owned()), -1),
            ("ann".to_owned(), Some("999".to_owned()), -1),
        ],
        "one audit row per correction; ben's counter row records 5 -> 2 with old/new values"
    );
    let (old, new): (Option<String>, Option<String>) = sql
        .query_one(
            "SELECT old_value, new_value FROM usage_events
              WHERE action = 'reconcile' AND product_id IS NULL",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((old.as_deref(), new.as_deref()), (Some("4"), Some("2")));

    let again = client
        .reconcile(all_users(false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.users_corrected, again.corrections.len()), (0, 0));
    server.stop().await;
}

/// A slot without a product is kept while younger than the grace period (its
/// product may be committing) and released once older.
#[tokio::test]
async fn young_slots_without_a_product_are_kept_for_the_grace_period() {
    let server = TestServer::start_with_catalogue(
        Duration::from_secs(600),
        Duration::ZERO,
        |sql| async move {
            sql.batch_execute(FIXTURE).await.unwrap();
        },
    )
    .await;
    let sql = server.sql().await;
    let mut client = server.client().await;
    client.reserve(reserve("dee", "in-flight")).await.unwrap();

    let report = client
        .reconcile(one_user("dee"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.slots_removed, 0);
    assert_eq!(count(&sql, "SELECT count(*) FROM slots").await, 1);

    sql.batch_execute("UPDATE slots SET reserved_at = now() - interval '11 minutes'")
        .await
        .unwrap();
    let report = client
        .reconcile(all_users(false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.slots_removed, 1);
    assert_eq!(count(&sql, "SELECT count(*) FROM slots").await, 0);
    server.assert_invariants().await;
    server.stop().await;
}

/// Scheduled and requested reconciliations running while several product
/// services add, delete and restore products of the same users: at the end
/// ledger and catalogue agree exactly, and no Free user got above 50.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconciliation_while_products_change_leaves_no_discrepancy() {
    let grace = Duration::from_secs(2);
    let server =
        TestServer::start_with_catalogue(grace, Duration::from_millis(20), |sql| async move {
            sql.batch_execute(FIXTURE).await.unwrap();
        })
        .await;
    let users = ["eve", "fay", "gus"];

    let mut tasks = Vec::new();
    for task in 0..6_u64 {
        let mut products = product_service(&server).await;
        tasks.push(tokio::spawn(async move {
            let mut seed = task * 7919 + 1;
            let mut next = move |n: u64| {
                seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (seed >> 33) % n
            };
            let mut live: Vec<(&str, i64)> = Vec::new();
            let mut deleted: Vec<(&str, i64)> = Vec::new();
            for _ in 0..120 {
                let user = users[next(3) as usize];
                match next(4) {
                    0 | 1 => match products.create(user, "item").await {
                        Ok(id) => live.push((user, id)),
                        Err(ProductError::LimitReached(_)) => {}
                        Err(err) => panic!("create failed: {err}"),
                    },
                    2 if !live.is_empty() => {
                        let (user, id) = live.swap_remove(next(live.len() as u64) as usize);
                        products.delete(user, id).await.expect("delete");
                        deleted.push((user, id));
                    }
                    3 if !deleted.is_empty() => {
                        let i = next(deleted.len() as u64) as usize;
                        let (user, id) = deleted[i];
                        match products.restore(user, id).await {
                            Ok(()) => {
                                deleted.swap_remove(i);
                                live.push((user, id));
                            }
                            Err(ProductError::LimitReached(_)) => {}
                            Err(err) => panic!("restore failed: {err}"),
                        }
                    }
                    _ => {}
                }
            }
        }));
    }
    let mut client = server.client().await;
    let mut passes = 0;
    while tasks.iter().any(|t| !t.is_finished()) {
        let report = client
            .reconcile(all_users(false))
            .await
            .unwrap()
            .into_inner();
        passes += u32::from(!report.skipped);
    }
    for task in tasks {
        task.await.expect("a product service task does not panic");
    }
    assert!(passes > 0, "some requested passes ran during the traffic");

    let sql = server.sql().await;
    // Scheduled passes may still be running: wait for one that finds nothing.
    eventually(
        Duration::from_secs(10),
        "a pass with nothing to correct",
        || {
            let mut client = client.clone();
            async move {
                let report = client
                    .reconcile(all_users(true))
                    .await
                    .unwrap()
                    .into_inner();
                !report.skipped && report.users_corrected == 0
            }
        },
    )
    .await;
    assert_eq!(catalogue_mismatches(&sql).await, vec![]);
    server.assert_invariants().await;
    // A slot is taken before its product is live, so no pass ever had to add
    // one: a pass that released a reservation in flight would have had to.
    let undone = count(
        &sql,
        "SELECT count(*) FROM usage_events WHERE action = 'reconcile' AND delta > 0",
    )
    .await;
    assert_eq!(undone, 0, "a reconciliation undid a reservation in flight");
    let most_live = count(
        &sql,
        "SELECT coalesce(max(n), 0) FROM (SELECT count(*) AS n FROM products
          WHERE deleted_at IS NULL GROUP BY user_id) AS c",
    )
    .await;
    let most_used = count(&sql, "SELECT max(current_usage) FROM user_tier_features").await;
    assert!(
        most_live <= 50 && most_used <= 50,
        "{most_live} live, {most_used} used"
    );
    assert!(most_used > 0);
    server.stop().await;
}

/// Two passes over every user started at once: one works, the other reports
/// it was skipped (over gRPC and on the command line); meanwhile the pass
/// that works blocks no Reserve of any other user.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_reconcilers_at_once_only_one_works() {
    let server =
        TestServer::start_with_catalogue(Duration::ZERO, Duration::ZERO, |sql| async move {
            sql.batch_execute(FIXTURE).await.unwrap();
            sql.batch_execute(
                "INSERT INTO products (id, user_id) VALUES (1, 'hal'), (2, 'ivy');
             INSERT INTO user_tier_features (user_id, feature_name, tier, usage_limit)
                 VALUES ('hal', 'product_slot', 'free', 50), ('ivy', 'product_slot', 'free', 50);",
            )
            .await
            .unwrap();
        })
        .await;

    // Hold hal's row lock, as a long Reserve would: the pass that gets the
    // advisory lock waits on it.
    let mut holder = server.sql().await;
    let tx = holder.transaction().await.unwrap();
    tx.query(
        "SELECT 1 FROM user_tier_features WHERE user_id = 'hal' FOR UPDATE",
        &[],
    )
    .await
    .unwrap();

    let client = server.client().await;
    let start = |mut client: UsageServiceClient<Channel>| {
        tokio::spawn(async move {
            client
                .reconcile(all_users(false))
                .await
                .unwrap()
                .into_inner()
        })
    };
    let mut first = start(client.clone());
    let mut second = start(client.clone());
    let (skipped, working) = tokio::select! {
        report = &mut first => (report.unwrap(), 1),
        report = &mut second => (report.unwrap(), 0),
    };
    let working = if working == 0 { first } else { second };
    assert!(skipped.skipped, "the first to answer is the one skipped");
    assert_eq!(skipped.users_checked, 0);

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_usage-service"))
        .args(["reconcile", "--database-url", &server.db.url])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("skipped"));

    // The working pass holds no lock of ivy: ivy's Reserve goes through.
    let mut other = client.clone();
    tokio::time::timeout(Duration::from_secs(5), other.reserve(reserve("ivy", "2")))
        .await
        .expect("a Reserve of another user is not blocked")
        .unwrap();

    tx.commit().await.unwrap();
    let working = working.await.unwrap();
    assert!(!working.skipped, "one of the two passes works");
    assert_eq!((working.users_checked, working.slots_added), (2, 1));
    let sql = server.sql().await;
    assert!(catalogue_mismatches(&sql).await.is_empty());
    server.assert_invariants().await;
    server.stop().await;
}

/// Reconcile refuses a malformed user id with a BadRequest, and answers
/// FAILED_PRECONDITION on a server started without a catalogue.
#[tokio::test]
async fn reconcile_refuses_bad_requests() {
    let server =
        TestServer::start_with_catalogue(Duration::ZERO, Duration::ZERO, |sql| async move {
            sql.batch_execute(FIXTURE).await.unwrap();
        })
        .await;
    let mut client = server.client().await;
    let status = client.reconcile(one_user("a\nb")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let bad_request = status
        .get_details_bad_request()
        .expect("BadRequest details");
    assert_eq!(bad_request.field_violations[0].field, "user_id");
    server.stop().await;

    let plain = TestServer::start().await;
    let status = plain
        .client()
        .await
        .reconcile(all_users(false))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("--products-table"),
        "{}",
        status.message()
    );
    plain.stop().await;
}

/// The example product service: create reserves then inserts, the 51st
/// create of a Free user is refused and leaves no product, a failed insert
/// gives its slot back, delete releases, restore reserves again and is
/// refused at the limit, leaving the product deleted.
#[tokio::test]
async fn example_product_service_keeps_ledger_and_catalogue_in_step() {
    let server =
        TestServer::start_with_catalogue(Duration::ZERO, Duration::ZERO, |sql| async move {
            sql.batch_execute(FIXTURE).await.unwrap();
        })
        .await;
    let sql = server.sql().await;
    let mut products = product_service(&server).await;

    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(products.create("jo", &format!("item {i}")).await.unwrap());
    }
    let refused = products.create("jo", "one too many").await.unwrap_err();
    assert!(
        matches!(refused, ProductError::LimitReached(_)),
        "{refused}"
    );
    assert_eq!(count(&sql, "SELECT count(*) FROM products").await, 50);

    products.delete("jo", ids[0]).await.unwrap();
    let too_long = "x".repeat(201);
    let failed = products.create("jo", &too_long).await.unwrap_err();
    assert!(matches!(failed, ProductError::Database(_)), "{failed}");
    assert_eq!(
        count(
            &sql,
            "SELECT current_usage FROM user_tier_features WHERE user_id = 'jo'"
        )
        .await,
        49,
        "the failed insert's slot was given back"
    );

    products.create("jo", "fills the freed slot").await.unwrap();
    let refused = products.restore("jo", ids[0]).await.unwrap_err();
    assert!(
        matches!(refused, ProductError::LimitReached(_)),
        "{refused}"
    );
    products.delete("jo", ids[1]).await.unwrap();
    products.restore("jo", ids[0]).await.unwrap();
    let missing = products.restore("jo", ids[0]).await.unwrap_err();
    assert!(
        matches!(missing, ProductError::NotFound),
        "restoring a live product"
    );

    let restores = count(
        &sql,
        "SELECT count(*) FROM usage_events WHERE action = 'restore'",
    )
    .await;
    assert_eq!(restores, 1);
    assert!(catalogue_mismatches(&sql).await.is_empty());
    server.assert_invariants().await;
    let report = reconciler(&server, Duration::ZERO)
        .await
        .all(true, None)
        .await
        .unwrap();
    assert_eq!(report.drift(), 0);
    server.stop().await;
}
