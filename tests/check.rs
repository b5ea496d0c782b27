//! The consistency checks find what they claim to find, and `usage-service
//! check` reports it with its exit status.

mod common;

use std::{process::Command, time::Duration};

use common::TestServer;
use usage_service::{
    proto::ReserveRequest,
    store::{CheckOptions, Violation},
};

async fn reserve(server: &TestServer, user: &str, products: usize) {
    let mut client = server.client().await;
    for i in 0..products {
        client
            .reserve(ReserveRequest {
                user_id: user.into(),
                product_id: format!("p{i}"),
                ..Default::default()
            })
            .await
            .expect("reserving");
    }
}

/// A consistent database passes; a counter out of step, a product audited
/// twice, a usage grown past a lowered limit and an open idle transaction
/// are each reported, while a user left above its limit by a downgrade is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_each_kind_of_violation() {
    let server = TestServer::start().await;
    for user in ["counter", "twice", "breach", "downgraded"] {
        reserve(&server, user, 3).await;
    }
    server.assert_checks(None).await;

    let sql = server.sql().await;
    sql.batch_execute(
        "UPDATE user_tier_features SET current_usage = 4 WHERE user_id = 'counter';
         INSERT INTO usage_events (user_id, feature_name, product_id, action, delta,
                                   usage_before, usage_after)
         VALUES ('twice', 'product_slot', 'p1', 'reserve', 1, 3, 4),
                ('twice', 'product_slot', 'p9', 'release', -1, 4, 3);
         -- Limit lowered to 2 (audited), then a slot taken past it.
         UPDATE user_tier_features SET usage_limit = 2 WHERE user_id IN ('breach', 'downgraded');
         INSERT INTO usage_events (user_id, feature_name, action, delta, usage_before, usage_after)
         VALUES ('breach', 'product_slot', 'set_tier', 0, 3, 3),
                ('downgraded', 'product_slot', 'set_tier', 0, 3, 3);
         INSERT INTO slots (user_id, feature_name, product_id) VALUES ('breach', 'product_slot', 'p3');
         UPDATE user_tier_features SET current_usage = 4 WHERE user_id = 'breach';
         INSERT INTO usage_events (user_id, feature_name, product_id, action, delta,
                                   usage_before, usage_after)
         VALUES ('breach', 'product_slot', 'p3', 'reserve', 1, 3, 4);",
    )
    .await
    .expect("corrupting the data");
    let idle = server.sql().await;
    idle.batch_execute("BEGIN; SELECT 1")
        .await
        .expect("opening a transaction");

    let options = CheckOptions {
        idle_in_transaction_after: Duration::ZERO,
    };
    let violations = server.checker.check(&options).await.expect("checking");
    let users = |pick: fn(&Violation) -> Option<&str>| -> Vec<String> {
        let mut users: Vec<String> = violations
            .iter()
            .filter_map(pick)
            .map(str::to_owned)
            .collect();
        users.sort();
        users
    };
    assert_eq!(
        users(|v| match v {
            Violation::Counter(d) => Some(&d.user_id),
            _ => None,
        }),
        ["counter"],
        "{violations:#?}"
    );
    assert_eq!(
        users(|v| match v {
            Violation::Product(p) => Some(&p.user_id),
            _ => None,
        }),
        ["twice", "twice"],
        "p1 counted twice and p9 released without a slot: {violations:#?}"
    );
    assert_eq!(
        users(|v| match v {
            Violation::Limit(b) => Some(&b.user_id),
            _ => None,
        }),
        ["breach"],
        "{violations:#?}"
    );
    assert_eq!(
        violations
            .iter()
            .filter(|v| matches!(v, Violation::IdleInTransaction(_)))
            .count(),
        1,
        "{violations:#?}"
    );

    idle.batch_execute("ROLLBACK").await.expect("rolling back");
    server.stop().await;
}

/// `usage-service check` exits 0 and says so on consistent data, and exits
/// non-zero printing each violation when a counter is out of step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_command_reports_violations_with_its_exit_status() {
    let server = TestServer::start().await;
    reserve(&server, "alice", 2).await;
    let run_check = || {
        Command::new(env!("CARGO_BIN_EXE_usage-service"))
            .arg("check")
            .env("DATABASE_URL", &server.db.url)
            .env("NO_COLOR", "1")
            .output()
            .expect("running usage-service check")
    };

    let clean = run_check();
    let stdout = String::from_utf8_lossy(&clean.stdout);
    assert!(clean.status.success(), "{stdout}");
    assert!(stdout.starts_with("ok:"), "{stdout}");

    server
        .sql()
        .await
        .batch_execute("UPDATE user_tier_features SET current_usage = 7 WHERE user_id = 'alice'")
        .await
        .expect("corrupting the counter");
    let broken = run_check();
    let stdout = String::from_utf8_lossy(&broken.stdout);
    assert!(!broken.status.success(), "{stdout}");
    assert!(
        stdout.contains("counter mismatch: user \"alice\"")
            && stdout.contains("current_usage=7 slots=2 audited=2"),
        "{stdout}"
    );
    server.stop().await;
}
