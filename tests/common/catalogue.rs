//! The product catalogue beside the usage service: its fixture table, a
//! generated catalogue, a server started with it, and the check that the
//! ledger matches it.

use std::{sync::Arc, time::Duration};

use usage_service::store::{
    catalogue::{Catalogue, CatalogueLayout},
    reconcile::Reconciler,
};

use super::TestServer;

/// The catalogue's schema, as shipped for tests and the example.
pub const FIXTURE: &str = include_str!("../fixtures/catalogue.sql");

/// The generator the benchmark uses.
pub const GENERATOR: &str = include_str!("../../scripts/generate_catalogue.sql");

/// Creates the fixture table and fills it with `products` products of `users`
/// users, exactly as the benchmark does.
pub async fn generate(sql: &tokio_postgres::Client, users: u32, products: u32) {
    sql.batch_execute(FIXTURE)
        .await
        .expect("creating the catalogue");
    sql.batch_execute(&format!(
        "SET catalogue.users = {users}; SET catalogue.products = {products}; {GENERATOR}"
    ))
    .await
    .expect("generating the catalogue");
}

/// Users whose counter or slots differ from their live products in the
/// default catalogue, as `(user, usage, slots, live products)`; empty when
/// the ledger matches the catalogue exactly (same product ids).
pub async fn catalogue_mismatches(sql: &tokio_postgres::Client) -> Vec<(String, i64, i64, i64)> {
    sql.query(
        "WITH live AS (
             SELECT user_id, id::text AS product_id FROM products WHERE deleted_at IS NULL),
         users AS (
             SELECT user_id FROM live UNION SELECT user_id FROM user_tier_features)
         SELECT u.user_id,
                coalesce((SELECT current_usage FROM user_tier_features t
                           WHERE t.user_id = u.user_id AND t.feature_name = 'product_slot'), 0),
                (SELECT count(*) FROM slots s WHERE s.user_id = u.user_id),
                (SELECT count(*) FROM live l WHERE l.user_id = u.user_id)
           FROM users AS u
          WHERE (SELECT count(*) FROM (
                    (SELECT product_id FROM live l WHERE l.user_id = u.user_id
                     EXCEPT SELECT product_id FROM slots s WHERE s.user_id = u.user_id)
                    UNION ALL
                    (SELECT product_id FROM slots s WHERE s.user_id = u.user_id
                     EXCEPT SELECT product_id FROM live l WHERE l.user_id = u.user_id)) AS d) > 0
             OR coalesce((SELECT current_usage FROM user_tier_features t
                           WHERE t.user_id = u.user_id), 0)
                <> (SELECT count(*) FROM live l WHERE l.user_id = u.user_id)
          ORDER BY 1",
        &[],
    )
    .await
    .expect("comparing ledger and catalogue")
    .iter()
    .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
    .collect()
}

/// A reconciler of the default catalogue of `server`.
pub async fn reconciler(server: &TestServer, grace: Duration) -> Reconciler {
    let catalogue = Catalogue::validate(&server.store, &CatalogueLayout::default())
        .await
        .expect("the fixture catalogue is valid");
    Reconciler::new(server.store.clone(), Arc::new(catalogue), grace)
}

impl TestServer {
    /// A server on a fresh migrated database holding the fixture catalogue
    /// (filled by `setup`), with reconciliation on and the given grace and
    /// schedule.
    pub async fn start_with_catalogue<F, Fut>(
        grace: Duration,
        reconcile_interval: Duration,
        setup: F,
    ) -> Self
    where
        F: FnOnce(tokio_postgres::Client) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let db = super::migrated_db().await;
        let args = db.args();
        setup(super::connect(&db.url).await).await;

        TestServer::start_on(db, args, |options| {
            options.catalogue = Some(CatalogueLayout::default());
            options.orphan_grace = grace;
            options.reconcile_interval = reconcile_interval;
        })
        .await
    }
}
