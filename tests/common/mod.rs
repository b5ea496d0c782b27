//! Test harness: the real server on `127.0.0.1:0`, against a fresh PostgreSQL
//! database of its own, started exactly as the binary starts it.
//!
//! The database server comes from `USAGE_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); `scripts/test.sh` starts a
//! throwaway one when none answers there.

#![allow(dead_code, unreachable_pub)]

pub mod auth;
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
    store::{self, Discrepancy, Store},
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

    /// Pool settings for this database.
    pub fn args(&self) -> DatabaseArgs {
        DatabaseArgs {
            database_url: self.url.clone(),
            db_pool_size: 16,
            ..DatabaseArgs::default()
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
    pub store: Store,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// A migrated fresh database and a server on it.
    pub async fn start() -> Self {
        let db = TestDb::create().await;
        let args = db.args();
        let pool = store::connect_pool(&args).expect("building the pool");
        store::migrate::run(&pool).await.expect("migrating");
        Self::start_with(db, args).await
    }

    /// A server on an existing, migrated database, with the given settings.
    #[allow(clippy::field_reassign_with_default)] // options grow field by field
    pub async fn start_with(db: TestDb, args: DatabaseArgs) -> Self {
        let pool = store::connect_pool(&args).expect("building the pool");
        let store = Store::new(pool);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding port 0");
        let addr = listener.local_addr().expect("a bound address");
        let (tx, rx) = oneshot::channel();
        let mut options = ServerOptions::default();
        options.health_interval = Duration::from_millis(100);
        let task = tokio::spawn(usage_service::run(
            listener,
            store.clone(),
            options,
            async {
                rx.await.ok();
            },
        ));
        let server = Self {
            addr,
            db,
            store,
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
            .store
            .check_invariants()
            .await
            .expect("reading the invariants");
        assert!(
            discrepancies.is_empty(),
            "invariant broken: {discrepancies:#?}"
        );
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
