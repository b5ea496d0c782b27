//! The backfill: the catalogue's existing products brought into the ledger,
//! idempotently, resumably, while serving, on any catalogue layout.

mod common;

use std::{process::Stdio, time::Duration};

use common::{
    catalogue::{catalogue_mismatches, generate},
    count, eventually, TestServer,
};
use usage_service::store::{
    backfill::{self, BackfillError, BackfillOptions},
    catalogue::{Catalogue, CatalogueError, CatalogueLayout},
};

const GRACE: Duration = Duration::from_secs(600);

async fn default_catalogue(server: &TestServer) -> Catalogue {
    Catalogue::validate(&server.store, &CatalogueLayout::default())
        .await
        .expect("the fixture catalogue is valid")
}

fn options(batch_size: usize, dry_run: bool) -> BackfillOptions {
    BackfillOptions {
        batch_size,
        dry_run,
        restart: false,
        orphan_grace: GRACE,
        workers: 2,
    }
}

/// A dry run writes nothing; the backfill then makes every user's usage and
/// slots equal to their live products, with one audit row per user and
/// over-limit users keeping every slot; a second run changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_matches_the_catalogue_and_is_idempotent() {
    let server = TestServer::start_with_catalogue(GRACE, Duration::ZERO, |sql| async move {
        generate(&sql, 500, 6000).await;
    })
    .await;
    let sql = server.sql().await;
    let catalogue = default_catalogue(&server).await;
    let live = count(
        &sql,
        "SELECT count(*) FROM products WHERE deleted_at IS NULL",
    )
    .await;
    let owners = count(
        &sql,
        "SELECT count(DISTINCT user_id) FROM products WHERE deleted_at IS NULL",
    )
    .await;
    let over = count(
        &sql,
        "SELECT count(*) FROM (SELECT user_id FROM products WHERE deleted_at IS NULL
          GROUP BY user_id HAVING count(*) > 50) AS o",
    )
    .await;
    assert!(over > 0, "the generated catalogue has users over the limit");

    let dry = backfill::run(&server.store, &catalogue, &options(64, true), |_| {})
        .await
        .expect("the dry run succeeds");
    assert_eq!(dry.users_changed as i64, owners);
    assert_eq!(dry.slots_added as i64, live);
    assert_eq!(dry.users_over_limit as i64, over);
    for table in [
        "slots",
        "user_tier_features",
        "usage_events",
        "backfill_checkpoints",
    ] {
        let rows = count(&sql, &format!("SELECT count(*) FROM {table}")).await;
        assert_eq!(rows, 0, "the dry run wrote to {table}");
    }

    let mut batches_seen = 0;
    let done = backfill::run(&server.store, &catalogue, &options(64, false), |p| {
        batches_seen = p.batches;
    })
    .await
    .expect("the backfill succeeds");
    assert_eq!(done.users_changed, dry.users_changed);
    assert_eq!(done.users_created as i64, owners);
    assert_eq!(done.slots_added as i64, live);
    assert_eq!(done.users_over_limit as i64, over);
    assert!(batches_seen > 1, "ran in batches, saw {batches_seen}");
    assert!(catalogue_mismatches(&sql).await.is_empty());
    server.assert_invariants().await;
    let audit_rows = count(
        &sql,
        "SELECT count(*) FROM usage_events WHERE action = 'backfill' AND product_id IS NULL",
    )
    .await;
    assert_eq!(audit_rows, owners);
    let over_kept = count(
        &sql,
        "SELECT count(*) FROM user_tier_features WHERE tier = 'free' AND current_usage > 50",
    )
    .await;
    assert_eq!(over_kept, over, "over-limit users keep every slot");
    assert_eq!(
        count(&sql, "SELECT count(*) FROM backfill_checkpoints").await,
        0
    );

    let events = count(&sql, "SELECT count(*) FROM usage_events").await;
    let again = backfill::run(&server.store, &catalogue, &options(64, false), |_| {})
        .await
        .expect("the second run succeeds");
    assert_eq!(
        (again.users_changed, again.slots_added, again.slots_removed),
        (0, 0, 0)
    );
    assert_eq!(
        count(&sql, "SELECT count(*) FROM usage_events").await,
        events
    );
    assert!(catalogue_mismatches(&sql).await.is_empty());
    server.stop().await;
}

/// Users who already have a row keep their tier and the slots of live
/// products; a slot whose product is deleted is released, a wrong counter
/// is corrected, and the audit trail still sums to every counter.
#[tokio::test]
async fn backfill_keeps_tiers_and_repairs_an_existing_ledger() {
    let server =
        TestServer::start_with_catalogue(Duration::ZERO, Duration::ZERO, |sql| async move {
            sql.batch_execute(common::catalogue::FIXTURE).await.unwrap();
            sql.batch_execute(
                "INSERT INTO products (id, user_id, deleted_at) VALUES
                 (1, 'pam', NULL), (2, 'pam', NULL), (3, 'pam', now()),
                 (4, 'quinn', NULL);
             INSERT INTO user_tier_features (user_id, feature_name, tier, usage_limit)
                 VALUES ('pam', 'product_slot', 'premium', NULL);",
            )
            .await
            .unwrap();
        })
        .await;
    let sql = server.sql().await;
    let mut client = server.client().await;
    // pam already holds products 1 and 3 through the service; 3 was deleted
    // without a release.
    for product in ["1", "3"] {
        client
            .reserve(usage_service::proto::ReserveRequest {
                user_id: "pam".into(),
                product_id: product.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // quinn's counter drifted from an empty ledger, audit trail included.
    sql.batch_execute(
        "INSERT INTO user_tier_features (user_id, feature_name, tier, usage_limit, current_usage)
             VALUES ('quinn', 'product_slot', 'free', 50, 3);
         INSERT INTO usage_events (user_id, feature_name, action, delta, usage_before, usage_after)
             VALUES ('quinn', 'product_slot', 'reserve', 3, 0, 3);",
    )
    .await
    .unwrap();

    let catalogue = default_catalogue(&server).await;
    let no_grace = BackfillOptions {
        orphan_grace: Duration::ZERO,
        ..options(1, false)
    };
    let summary = backfill::run(&server.store, &catalogue, &no_grace, |_| {})
        .await
        .unwrap();
    assert_eq!(summary.users_changed, 2);
    assert_eq!(summary.users_created, 0);
    assert_eq!((summary.slots_added, summary.slots_removed), (2, 1));
    assert_eq!(summary.counters_corrected, 1);

    let tier: String = sql
        .query_one(
            "SELECT tier FROM user_tier_features WHERE user_id = 'pam'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tier, "premium");
    assert!(catalogue_mismatches(&sql).await.is_empty());
    server.assert_invariants().await;
    server.stop().await;
}

/// Killed half-way, the backfill leaves whole batches and a checkpoint; the
/// next run resumes after it and the ledger ends up matching the catalogue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_resumes_after_being_killed() {
    let server = TestServer::start_with_catalogue(GRACE, Duration::ZERO, |sql| async move {
        generate(&sql, 1500, 7500).await;
    })
    .await;
    let sql = server.sql().await;
    let binary = env!("CARGO_BIN_EXE_usage-service");
    let backfill = |extra: &[&str]| {
        let mut command = tokio::process::Command::new(binary);
        command
            .args([
                "backfill",
                "--batch-size",
                "10",
                "--database-url",
                &server.db.url,
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        command
    };

    let mut child = backfill(&[]).spawn().expect("starting the backfill");
    let watcher = &sql;
    eventually(
        Duration::from_secs(30),
        "a committed batch",
        || async move { count(watcher, "SELECT count(*) FROM backfill_checkpoints").await > 0 },
    )
    .await;
    child.kill().await.expect("killing the backfill");

    let checkpoint: String = sql
        .query_one("SELECT last_user_id FROM backfill_checkpoints", &[])
        .await
        .expect("a killed run leaves its checkpoint")
        .get(0);
    let done = count(&sql, "SELECT count(*) FROM user_tier_features").await;
    let owners = count(
        &sql,
        "SELECT count(DISTINCT user_id) FROM products WHERE deleted_at IS NULL",
    )
    .await;
    assert!(
        done > 0 && done < owners,
        "killed half-way: {done} of {owners}"
    );
    server.assert_invariants().await;
    // Whole batches only: every user up to the checkpoint is complete.
    let behind = count(
        &sql,
        &format!(
            "SELECT count(DISTINCT user_id) FROM products
              WHERE deleted_at IS NULL AND user_id <= '{checkpoint}'"
        ),
    )
    .await;
    assert!(done >= behind);

    let output = backfill(&[])
        .output()
        .await
        .expect("rerunning the backfill");
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("resumed after user"),
        "the second run resumes: {stdout}"
    );
    assert!(catalogue_mismatches(&sql).await.is_empty());
    assert_eq!(
        count(&sql, "SELECT count(*) FROM backfill_checkpoints").await,
        0
    );
    server.assert_invariants().await;

    let output = backfill(&["--dry-run"]).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("would change 0 users"),
        "nothing left to do: {stdout}"
    );
    server.stop().await;
}

/// Reserves and Releases of the same users during the backfill are neither
/// lost nor counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backfill_while_serving_loses_nothing() {
    let server = TestServer::start_with_catalogue(GRACE, Duration::ZERO, |sql| async move {
        generate(&sql, 300, 3000).await;
    })
    .await;
    let catalogue = default_catalogue(&server).await;

    // Each task plays a product service for its users: create then delete.
    let traffic = (0..4).map(|task| {
        let server_addr = server.addr;
        let url = server.db.url.clone();
        tokio::spawn(async move {
            let db = common::connect(&url).await;
            let usage = usage_service::proto::usage_service_client::UsageServiceClient::connect(
                format!("http://{server_addr}"),
            )
            .await
            .unwrap();
            let mut products = product_service::ProductService::new(db, usage);
            for round in 0..40 {
                let user = format!("user-{:07}", 100 + task * 40 + round);
                if let Ok(id) = products.create(&user, "new").await {
                    if round % 2 == 0 {
                        products.delete(&user, id).await.unwrap();
                    }
                }
            }
        })
    });
    let traffic: Vec<_> = traffic.collect();
    let summary = backfill::run(&server.store, &catalogue, &options(7, false), |_| {})
        .await
        .expect("the backfill succeeds while serving");
    for task in traffic {
        task.await.expect("the traffic task does not panic");
    }
    assert!(summary.slots_added > 0);

    let sql = server.sql().await;
    assert!(catalogue_mismatches(&sql).await.is_empty());
    server.assert_invariants().await;
    server.stop().await;
}

/// Another layout works once configured: schema, table and column names that
/// need quoting, uuid product ids and bigint user ids, compared as text.
#[tokio::test]
async fn custom_layout_with_quoted_names_and_other_id_types() {
    let server = TestServer::start_with_catalogue(GRACE, Duration::ZERO, |sql| async move {
        sql.batch_execute(common::catalogue::FIXTURE).await.unwrap();
        sql.batch_execute(
            r#"CREATE SCHEMA "Shop Floor";
               CREATE TABLE "Shop Floor"."Items" (
                   "Item Id"    uuid PRIMARY KEY,
                   "Owner"      bigint NOT NULL,
                   "removed at" timestamptz);
               INSERT INTO "Shop Floor"."Items" VALUES
                   ('6f1c0c5e-0000-4000-8000-000000000001', 7, NULL),
                   ('6f1c0c5e-0000-4000-8000-000000000002', 7, NULL),
                   ('6f1c0c5e-0000-4000-8000-000000000003', 7, now()),
                   ('6f1c0c5e-0000-4000-8000-000000000004', 42, NULL);"#,
        )
        .await
        .unwrap();
    })
    .await;
    let layout = CatalogueLayout {
        schema: Some("Shop Floor".into()),
        table: "Items".into(),
        id_column: "Item Id".into(),
        user_column: "Owner".into(),
        deleted_column: "removed at".into(),
        feature: "product_slot".into(),
    };
    let catalogue = Catalogue::validate(&server.store, &layout)
        .await
        .expect("the layout is valid");
    let summary = backfill::run(&server.store, &catalogue, &options(10, false), |_| {})
        .await
        .unwrap();
    assert_eq!((summary.users_created, summary.slots_added), (2, 3));

    let sql = server.sql().await;
    let slots: Vec<(String, String)> = sql
        .query("SELECT user_id, product_id FROM slots ORDER BY 1, 2", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        slots,
        [
            ("42".into(), "6f1c0c5e-0000-4000-8000-000000000004".into()),
            ("7".into(), "6f1c0c5e-0000-4000-8000-000000000001".into()),
            ("7".into(), "6f1c0c5e-0000-4000-8000-000000000002".into()),
        ]
    );
    server.assert_invariants().await;
    server.stop().await;
}

/// A layout naming a missing table, a missing column, or carrying SQL is
/// refused at start-up with the flag to fix, and nothing runs.
#[tokio::test]
async fn bad_layouts_are_refused_at_start_up() {
    let server = TestServer::start_with_catalogue(GRACE, Duration::ZERO, |sql| async move {
        sql.batch_execute(common::catalogue::FIXTURE).await.unwrap();
    })
    .await;
    let store = &server.store;

    let injected = CatalogueLayout {
        table: "products; DROP TABLE slots; --".into(),
        ..CatalogueLayout::default()
    };
    let err = Catalogue::validate(store, &injected).await.unwrap_err();
    assert!(matches!(err, CatalogueError::TableNotFound { .. }), "{err}");
    assert!(err.to_string().contains("--products-table"), "{err}");

    let wrong_column = CatalogueLayout {
        deleted_column: "removed_at\" IS NULL OR true --".into(),
        ..CatalogueLayout::default()
    };
    let err = Catalogue::validate(store, &wrong_column).await.unwrap_err();
    assert!(
        matches!(err, CatalogueError::ColumnNotFound { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("--products-deleted-column"),
        "{err}"
    );
    assert!(
        err.to_string().contains("deleted_at"),
        "lists the real columns: {err}"
    );

    let unknown_feature = CatalogueLayout {
        feature: "widgets".into(),
        ..CatalogueLayout::default()
    };
    let err = Catalogue::validate(store, &unknown_feature)
        .await
        .unwrap_err();
    assert!(matches!(err, CatalogueError::UnknownFeature(_)), "{err}");

    let sql = server.sql().await;
    assert_eq!(
        count(&sql, "SELECT count(*) FROM slots").await,
        0,
        "slots survives"
    );

    // The server refuses to start on a bad layout.
    let options = usage_service::ServerOptions {
        catalogue: Some(injected),
        ..usage_service::ServerOptions::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let started = usage_service::run(listener, server.store.clone(), options, async {}).await;
    let err = started.expect_err("a bad layout stops start-up");
    assert!(format!("{err:#}").contains("--products-table"), "{err:#}");
    server.stop().await;
}

/// Two backfills at once: the second refuses to run.
#[tokio::test]
async fn a_second_backfill_at_once_is_refused() {
    let server = TestServer::start_with_catalogue(GRACE, Duration::ZERO, |sql| async move {
        generate(&sql, 50, 200).await;
    })
    .await;
    let catalogue = default_catalogue(&server).await;
    let holder = server.sql().await;
    holder
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&backfill::BACKFILL_LOCK_KEY],
        )
        .await
        .unwrap();
    let err = backfill::run(&server.store, &catalogue, &options(10, false), |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, BackfillError::AlreadyRunning), "{err}");
    drop(holder);
    server.stop().await;
}

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/product_service.rs"]
mod product_service;
