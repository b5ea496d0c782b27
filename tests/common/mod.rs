//! Test harness: the real server on `127.0.0.1:0`, against a fresh PostgreSQL
//! database of its own, started exactly as the binary starts it.
//!
//! The database server comes from `USAGE_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); `scripts/test.sh` starts a
//! throwaway one when none answers there.

#![allow(dead_code, unreachable_pub)]

pub mod auth;
pub mod catalogue;
pub mod cluster;
pub mod load;
pub mod metrics;
pub mod process;
pub mod proxy;

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_postgres::NoTls;
use tonic::transport::Channel;
use usage_service::{
    config::DatabaseArgs,
    proto::usage_service_client::UsageServiceClient,
    store::{self, CheckOptions, Discrepancy, Store},
    usage::history::History,
    ServerOptions,
};

/// A PostgreSQL URL of the server the tests use, naming its maintenance db.
pub fn admin_url() -> String {
    std::env::var("USAGE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// `url` with its database name replaced by `name`.
pub fn url_with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let (server, _) = base
        .rsplit_once('/')
        .expect("a URL of the form postgres://host/db");
    format!("{server}/{name}{query}")
}

/// A database created for one test and dropped by [`TestDb::drop_db`].
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// Creates an empty database with a name no other test uses.
    pub async fn create() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("the clock is after 1970")
            .subsec_nanos();
        let name = format!(
            "usage_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            nanos
        );
        let admin = connect(&admin_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("creating the test database");
        let url = url_with_database(&admin_url(), &name);
        Self { name, url }
    }

    /// Drops the database, closing any connection still open to it.
    pub async fn drop_db(&self) {
        let admin = connect(&admin_url()).await;
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .expect("dropping the test database");
    }

    /// Pool settings for the service on this database: through the
    /// connection pooler at `USAGE_TEST_POOLER_ADDR` (host:port, e.g. a
    /// PgBouncer) when set, directly otherwise. Waits are generous: tests
    /// pile hundreds of calls onto one user's row lock on a shared, busy
    /// machine, and check correctness, not speed.
    pub fn args(&self) -> DatabaseArgs {
        DatabaseArgs {
            database_url: self.service_url(),
            db_pool_size: 16,
            db_pool_wait_timeout: Duration::from_secs(30),
            db_statement_timeout: Duration::from_secs(30),
            db_unnamed_statements: std::env::var("USAGE_DB_UNNAMED_STATEMENTS")
                .is_ok_and(|v| v == "true"),
            ..DatabaseArgs::default()
        }
    }

    /// Pool settings that always reach PostgreSQL directly: for migrations
    /// (a session-level advisory lock) and for the checks.
    pub fn direct_args(&self) -> DatabaseArgs {
        DatabaseArgs {
            database_url: self.url.clone(),
            db_pool_size: 2,
            ..DatabaseArgs::default()
        }
    }

    /// The URL the service uses: through the pooler when one is configured.
    pub fn service_url(&self) -> String {
        match std::env::var("USAGE_TEST_POOLER_ADDR") {
            Ok(addr) if !addr.is_empty() => url_via(
                &self.url,
                addr.parse().expect("USAGE_TEST_POOLER_ADDR is host:port"),
            ),
            _ => self.url.clone(),
        }
    }
}

/// A direct connection, for setting up and inspecting state.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|err| panic!("connecting to {url}: {err}"));
    tokio::spawn(connection);
    client
}

/// The real server, serving a fresh database.
pub struct TestServer {
    pub addr: SocketAddr,
    pub db: TestDb,
    /// The store the server uses.
    pub store: Store,
    /// A store connected directly to PostgreSQL, for the checks.
    pub checker: Store,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// A migrated fresh database and a server on it.
    pub async fn start() -> Self {
        let db = migrated_db().await;
        let args = db.args();
        Self::start_with(db, args).await
    }

    /// A migrated fresh database and a server on it, with `configure` applied
    /// to the default options.
    pub async fn start_configured(configure: impl FnOnce(&mut ServerOptions)) -> Self {
        let db = migrated_db().await;
        let args = db.args();
        Self::start_on(db, args, configure).await
    }

    /// A migrated fresh database and a server on it that sends at most
    /// `in_flight` statements of Reserves and Releases, and of Gets, at once
    /// (`--db-batches-in-flight`), whatever the machine's CPUs; `configure`
    /// is applied to the default options.
    pub async fn start_with_batches_in_flight(
        in_flight: usize,
        configure: impl FnOnce(&mut ServerOptions),
    ) -> Self {
        let db = migrated_db().await;
        let mut args = db.args();
        args.db_batches_in_flight = Some(in_flight);
        Self::start_on(db, args, configure).await
    }

    /// A server on an existing, migrated database, with the given settings.
    #[allow(clippy::field_reassign_with_default)] // options grow field by field
    pub async fn start_with(db: TestDb, args: DatabaseArgs) -> Self {
        Self::start_on(db, args, |_| {}).await
    }

    /// A server on an existing, migrated database, with `configure` applied
    /// to the default options. Options are assigned one by one so that
    /// settings added to ServerOptions later keep their defaults here.
    #[allow(clippy::field_reassign_with_default)]
    pub async fn start_on(
        db: TestDb,
        args: DatabaseArgs,
        configure: impl FnOnce(&mut ServerOptions),
    ) -> Self {
        let pool = store::connect_pool(&args).expect("building the pool");
        let store = Store::configured(pool, &args);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding port 0");
        let addr = listener.local_addr().expect("a bound address");
        let (tx, rx) = oneshot::channel();
        let mut options = ServerOptions::default();
        options.health_interval = Duration::from_millis(100);
        configure(&mut options);
        let task = tokio::spawn(usage_service::run(
            listener,
            store.clone(),
            options,
            async {
                rx.await.ok();
            },
        ));
        let checker =
            Store::new(store::connect_pool(&db.direct_args()).expect("building the pool"));
        let server = Self {
            addr,
            db,
            store,
            checker,
            shutdown: Some(tx),
            task: Some(task),
        };
        server.wait_until_serving().await;
        server
    }

    /// A channel to the server.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("a valid URI")
            .connect()
            .await
            .expect("connecting to the test server")
    }

    /// A client of the usage service.
    pub async fn client(&self) -> UsageServiceClient<Channel> {
        UsageServiceClient::new(self.channel().await)
    }

    /// A direct connection to the server's database.
    pub async fn sql(&self) -> tokio_postgres::Client {
        connect(&self.db.url).await
    }

    /// Waits until the health service reports SERVING.
    pub async fn wait_until_serving(&self) {
        let channel = self.channel().await;
        eventually(Duration::from_secs(10), "the server to serve", || {
            let channel = channel.clone();
            async move { health_status(channel, "").await == Some(1) }
        })
        .await;
    }

    /// Asserts that counters, ledger and audit trail agree for every user.
    pub async fn assert_invariants(&self) {
        let discrepancies: Vec<Discrepancy> = self
            .checker
            .check_invariants()
            .await
            .expect("reading the invariants");
        assert!(
            discrepancies.is_empty(),
            "invariant broken: {discrepancies:#?}"
        );
    }

    /// Runs every consistency check (see [`assert_checks`]).
    pub async fn assert_checks(&self, history: Option<&History>) {
        assert_checks(&self.checker, history).await;
    }

    /// Shuts the server down gracefully and drops its database.
    pub async fn stop(mut self) {
        self.shutdown_server().await;
        self.db.drop_db().await;
    }

    /// Shuts the server down gracefully, keeping the database.
    pub async fn shutdown_server(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("the server task does not panic")
                .expect("the server shuts down cleanly");
        }
        self.store.pool().close();
        self.checker.pool().close();
    }
}

/// The health status of `service` (1 SERVING, 2 NOT_SERVING), or `None` when
/// the check fails.
pub async fn health_status(channel: Channel, service: &str) -> Option<i32> {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let mut client = HealthClient::new(channel);
    let response = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .ok()?;
    Some(response.into_inner().status)
}

/// Polls `condition` until it holds, failing the test after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Counts rows with a query returning one bigint.
pub async fn count(sql: &tokio_postgres::Client, query: &str) -> i64 {
    sql.query_one(query, &[]).await.expect(query).get(0)
}

/// The checks every fault test ends with, from the library (the same code as
/// `usage-service check`): counter = ledger = audit sum for every user, no
/// product counted twice, no usage grown past a limit, no session left idle
/// in a transaction, and, given a client's `history`, no acknowledged slot
/// lost, none stray, every user's usage within the bounds the answers allow.
pub async fn assert_checks(store: &Store, history: Option<&History>) {
    let options = CheckOptions {
        idle_in_transaction_after: Duration::ZERO,
    };
    let mut violations = store.check(&options).await.expect("running the checks");
    if let Some(history) = history {
        let feature = usage_service::usage::DEFAULT_FEATURE;
        violations.extend(
            store
                .check_history(feature, history)
                .await
                .expect("reading the ledger"),
        );
    }
    let lines: Vec<String> = violations.iter().map(ToString::to_string).collect();
    assert!(lines.is_empty(), "checks failed:\n{}", lines.join("\n"));
}

/// The address of the PostgreSQL server the tests use.
pub fn postgres_addr() -> SocketAddr {
    let config: tokio_postgres::Config = admin_url().parse().expect("a valid test URL");
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) if host != "localhost" => host.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}").parse().expect("a host and port")
}

/// `url` with its host and port replaced by `addr` (to go through a proxy).
pub fn url_via(url: &str, addr: SocketAddr) -> String {
    let (server, db) = url.rsplit_once('/').expect("a URL ending in /db");
    let (scheme_user, _) = server.rsplit_once('@').expect("a URL with user@host");
    format!("{scheme_user}@{addr}/{db}")
}

/// A fresh migrated database; the pool used to migrate is closed.
pub async fn migrated_db() -> TestDb {
    let db = TestDb::create().await;
    let pool = store::connect_pool(&db.direct_args()).expect("building the pool");
    store::migrate::run(&pool).await.expect("migrating");
    pool.close();
    db
}

/// A Reserve of `product` for `user`, on the default feature.
pub fn reserve(user: &str, product: &str) -> usage_service::proto::ReserveRequest {
    usage_service::proto::ReserveRequest {
        user_id: user.into(),
        product_id: product.into(),
        ..Default::default()
    }
}

/// A Release of `product` for `user`, on the default feature.
pub fn release(user: &str, product: &str) -> usage_service::proto::ReleaseRequest {
    usage_service::proto::ReleaseRequest {
        user_id: user.into(),
        product_id: product.into(),
        ..Default::default()
    }
}
