//! Command line and environment: every flag can also be set through the
//! environment variable named in its help.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    auth::{Role, Verifier, VerifyingKey},
    grpc::tls::TlsOptions,
};

/// Counts the product slots each user holds and enforces the limit of the
/// user's tier, over gRPC.
#[derive(Debug, Parser)]
#[command(name = "usage-service", version, about)]
pub struct Cli {
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Flags of `serve`, accepted without the subcommand too.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once, at start-up
pub enum Command {
    /// Apply pending migrations (unless --no-migrate), then serve gRPC.
    Serve(ServeArgs),
    /// Apply pending migrations and exit.
    Migrate(DatabaseArgs),
    /// Print a signed HS256 token for trying the API (e.g. with grpcurl).
    Token(TokenArgs),
    /// Check the data for lost or double-counted slots, limits exceeded and
    /// sessions left idle in a transaction; print each violation and exit
    /// non-zero when there is one.
    Check(CheckArgs),
    /// Bring the catalogue's existing products into the ledger, in batches.
    Backfill(BackfillArgs),
    /// Compare the ledger with the catalogue's live products and repair it.
    Reconcile(ReconcileArgs),
}

/// Everything `check` needs.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Report a session as left `idle in transaction` once it has been so for
    /// this long.
    #[arg(long, env = "USAGE_CHECK_IDLE_IN_TRANSACTION_AFTER", default_value = "1s", value_parser = humantime::parse_duration)]
    pub idle_in_transaction_after: Duration,

    #[command(flatten)]
    pub database: DatabaseArgs,
}

/// How to reach PostgreSQL and how many connections to keep.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL connection URL. Its password is never logged.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,

    /// Most connections the pool opens.
    #[arg(long, env = "USAGE_DB_POOL_SIZE", default_value_t = default_pool_size())]
    pub db_pool_size: usize,

    /// Longest a call waits for a free connection before failing with UNAVAILABLE.
    #[arg(long, env = "USAGE_DB_POOL_WAIT_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub db_pool_wait_timeout: Duration,

    /// Longest opening a new connection may take.
    #[arg(long, env = "USAGE_DB_CONNECT_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub db_connect_timeout: Duration,

    /// Longest checking an idle connection before reuse may take.
    #[arg(long, env = "USAGE_DB_RECYCLE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub db_recycle_timeout: Duration,

    /// PostgreSQL `statement_timeout` for every statement the service sends.
    #[arg(long, env = "USAGE_DB_STATEMENT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub db_statement_timeout: Duration,

    /// Send every statement unnamed, parsed and executed in one round trip,
    /// instead of preparing it once per connection: required behind a pooler
    /// in transaction mode that does not keep prepared statements (PgBouncer
    /// before 1.21, or without `max_prepared_statements`).
    #[arg(long, env = "USAGE_DB_UNNAMED_STATEMENTS")]
    pub db_unnamed_statements: bool,

    /// Most Reserve, Release or Get calls sent together in one statement
    /// when calls queue up (see "Coalescing" in the README); 1 sends every
    /// call on its own.
    #[arg(
        long,
        env = "USAGE_DB_BATCH_MAX",
        default_value_t = 100,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000)
    )]
    pub db_batch_max: usize,

    /// Statements of Reserve and Release calls, and of Get calls, each kind
    /// at most this many in PostgreSQL at once from this process; the calls
    /// that arrive meanwhile queue and go together (see "Coalescing" in the
    /// README). At most the pool's size. Default: the number of CPUs.
    #[arg(
        long,
        env = "USAGE_DB_BATCHES_IN_FLIGHT",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000)
    )]
    pub db_batches_in_flight: Option<usize>,
}

/// Everything `serve` needs.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the gRPC server listens on.
    #[arg(long, env = "USAGE_LISTEN_ADDR", default_value = "0.0.0.0:50051")]
    pub listen_addr: SocketAddr,

    /// Do not apply pending migrations at start-up.
    #[arg(long, env = "USAGE_NO_MIGRATE")]
    pub no_migrate: bool,

    /// How often the database is probed for the health service.
    #[arg(long, env = "USAGE_HEALTH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub health_interval: Duration,

    /// How often holds nobody confirmed in time are freed; 0 turns it off.
    #[arg(long, env = "USAGE_HOLD_SWEEP_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub hold_sweep_interval: Duration,

    /// Log format: `text` or `json`.
    #[arg(long, env = "USAGE_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// Address of the Prometheus endpoint (`GET /metrics`).
    #[arg(long, env = "USAGE_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// Tokio worker threads; by default the CPUs available to the process.
    #[arg(long, env = "USAGE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub auth: AuthArgs,

    #[command(flatten)]
    pub tls: TlsArgs,

    #[command(flatten)]
    pub limits: LimitArgs,

    #[command(flatten)]
    pub catalogue: CatalogueArgs,

    /// Serve without a product catalogue: no Reconcile, no scheduled
    /// reconciliation, and no check of the catalogue at start-up.
    #[arg(long, env = "USAGE_NO_CATALOGUE")]
    pub no_catalogue: bool,

    /// How often every user is reconciled with the catalogue; 0 turns the
    /// schedule off. With several replicas, one runs at a time.
    #[arg(long, env = "USAGE_RECONCILE_INTERVAL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub reconcile_interval: Duration,
}

/// Where the product catalogue keeps its products. Checked at start-up
/// against the table's real columns.
#[derive(Debug, Clone, Args)]
pub struct CatalogueArgs {
    /// The catalogue's table (or view) of products.
    #[arg(long, env = "USAGE_PRODUCTS_TABLE", default_value = "products")]
    pub products_table: String,

    /// The schema of the products table; by default the first of the search path.
    #[arg(long, env = "USAGE_PRODUCTS_SCHEMA")]
    pub products_schema: Option<String>,

    /// The product id column (any type; compared as text).
    #[arg(long, env = "USAGE_PRODUCTS_ID_COLUMN", default_value = "id")]
    pub products_id_column: String,

    /// The owning user's id column (any type; compared as text).
    #[arg(long, env = "USAGE_PRODUCTS_USER_COLUMN", default_value = "user_id")]
    pub products_user_column: String,

    /// The column that is NULL while a product is live.
    #[arg(
        long,
        env = "USAGE_PRODUCTS_DELETED_COLUMN",
        default_value = "deleted_at"
    )]
    pub products_deleted_column: String,

    /// The feature each live product holds a slot of.
    #[arg(long, env = "USAGE_PRODUCTS_FEATURE", default_value = crate::usage::DEFAULT_FEATURE)]
    pub products_feature: String,

    /// How old a slot without a live product must be before it is released:
    /// a product service reserves first and inserts its product after, so a
    /// younger slot may belong to an insert still in flight.
    #[arg(long, env = "USAGE_ORPHAN_GRACE", default_value = "10m", value_parser = humantime::parse_duration)]
    pub orphan_grace: Duration,
}

impl CatalogueArgs {
    /// The layout these flags describe.
    pub fn layout(&self) -> crate::store::catalogue::CatalogueLayout {
        crate::store::catalogue::CatalogueLayout {
            schema: self.products_schema.clone(),
            table: self.products_table.clone(),
            id_column: self.products_id_column.clone(),
            user_column: self.products_user_column.clone(),
            deleted_column: self.products_deleted_column.clone(),
            feature: self.products_feature.clone(),
        }
    }
}

/// Everything `backfill` needs.
#[derive(Debug, Clone, Args)]
pub struct BackfillArgs {
    /// Report what would change (users, slots added and removed) without writing.
    #[arg(long)]
    pub dry_run: bool,

    /// Users per batch; each batch is one transaction.
    #[arg(long, env = "USAGE_BACKFILL_BATCH_SIZE", default_value_t = 2000)]
    pub batch_size: usize,

    /// Start from the first user even if an interrupted run left a checkpoint.
    #[arg(long)]
    pub restart: bool,

    /// Batches written at once, each on its own connection.
    #[arg(long, env = "USAGE_BACKFILL_JOBS", default_value_t = 2)]
    pub jobs: usize,

    /// Do not apply pending migrations first.
    #[arg(long, env = "USAGE_NO_MIGRATE")]
    pub no_migrate: bool,

    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub catalogue: CatalogueArgs,
}

/// Everything `reconcile` needs.
#[derive(Debug, Clone, Args)]
pub struct ReconcileArgs {
    /// Reconcile only this user; every user when omitted.
    #[arg(long)]
    pub user_id: Option<String>,

    /// Report what would be corrected without writing.
    #[arg(long)]
    pub dry_run: bool,

    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub catalogue: CatalogueArgs,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl DatabaseArgs {
    /// The URL with its password replaced, safe to log.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.database_url)
    }
}

impl Default for DatabaseArgs {
    fn default() -> Self {
        Self {
            database_url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            db_pool_size: default_pool_size(),
            db_pool_wait_timeout: Duration::from_secs(2),
            db_connect_timeout: Duration::from_secs(3),
            db_recycle_timeout: Duration::from_secs(2),
            db_statement_timeout: Duration::from_secs(5),
            db_unnamed_statements: false,
            db_batch_max: 100,
            db_batches_in_flight: None,
        }
    }
}

/// Replaces the password of a `postgres://user:password@host/db` URL (or a
/// `password=` pair of a key/value connection string) with `***`.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.rsplit_once('@') {
            if let Some((user, _password)) = userinfo.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Room for every kind of statement at once: coalesced Reserves, Releases
/// and Gets (`store::batches_in_flight` each), reads such as ListAll
/// (`store::reads_in_flight`), ReserveMany, ReleaseMany and Confirm (each
/// mostly waiting for its commit's WAL flush) and the background jobs, with
/// connections to spare for bursts.
fn default_pool_size() -> usize {
    (available_cpus() * 4).max(32)
}

/// The CPUs this process may use (respects cgroup quotas and affinity).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Whether callers must present a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// Bearer JWTs checked with the configured key.
    Jwt,
    /// Everyone is let in; a warning is logged at start-up and every hour.
    None,
}

/// A secret given on the command line or in the environment; never shown by
/// `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(pub String);

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for SecretString {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// How callers are authenticated.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// `jwt` (callers present a bearer token) or `none` (everyone is let in).
    #[arg(long = "auth", env = "USAGE_AUTH", default_value = "jwt")]
    pub mode: AuthMode,

    /// Shared secret for HS256 tokens, at least 32 bytes. Never logged.
    #[arg(
        long,
        env = "USAGE_AUTH_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "auth_jwt_public_key"
    )]
    pub auth_jwt_secret: Option<SecretString>,

    /// PEM public key file for RS256, ES256 or EdDSA tokens.
    #[arg(long, env = "USAGE_AUTH_JWT_PUBLIC_KEY")]
    pub auth_jwt_public_key: Option<PathBuf>,

    /// The one algorithm tokens may be signed with: HS256 with a secret
    /// (the default), RS256, ES256 or EdDSA with a public key.
    #[arg(long, env = "USAGE_AUTH_JWT_ALGORITHM", value_parser = parse_algorithm)]
    pub auth_jwt_algorithm: Option<jsonwebtoken::Algorithm>,

    /// Required `iss` claim.
    #[arg(long, env = "USAGE_AUTH_JWT_ISSUER")]
    pub auth_jwt_issuer: Option<String>,

    /// Required `aud` claim.
    #[arg(long, env = "USAGE_AUTH_JWT_AUDIENCE")]
    pub auth_jwt_audience: Option<String>,

    /// Require a token for server reflection too (health stays open).
    #[arg(long, env = "USAGE_AUTH_REFLECTION_REQUIRES_TOKEN")]
    pub auth_reflection_requires_token: bool,

    /// Most tokens remembered after they passed, each until it expires, so
    /// that a caller reusing its token is not checked again on every call;
    /// 0 checks every call's token.
    #[arg(long, env = "USAGE_AUTH_TOKEN_CACHE", default_value_t = 10_000)]
    pub auth_token_cache: usize,
}

impl AuthArgs {
    /// The token verifier, or `None` with `--auth none`. Fails when
    /// authentication is on without a usable key.
    pub fn verifier(&self) -> anyhow::Result<Option<Verifier>> {
        use anyhow::{bail, Context as _};

        if self.mode == AuthMode::None {
            return Ok(None);
        }
        let (key, default_algorithm) = match (&self.auth_jwt_secret, &self.auth_jwt_public_key) {
            (Some(secret), None) => (
                VerifyingKey::Secret(secret.0.as_bytes().to_vec()),
                Some(jsonwebtoken::Algorithm::HS256),
            ),
            (None, Some(path)) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("reading the JWT public key {}", path.display()))?;
                (VerifyingKey::PublicKeyPem(pem), None)
            }
            (None, None) => bail!(
                "authentication is on but no key is configured: set USAGE_AUTH_JWT_SECRET \
                 or USAGE_AUTH_JWT_PUBLIC_KEY, or serve without authentication with --auth none"
            ),
            (Some(_), Some(_)) => bail!("give a JWT secret or a public key, not both"),
        };
        let Some(algorithm) = self.auth_jwt_algorithm.or(default_algorithm) else {
            bail!("a JWT public key needs --auth-jwt-algorithm (RS256, ES256 or EdDSA)");
        };
        let verifier = Verifier::new(
            &key,
            algorithm,
            self.auth_jwt_issuer.as_deref(),
            self.auth_jwt_audience.as_deref(),
        )
        .context("configuring JWT verification")?
        .remembering(self.auth_token_cache);
        Ok(Some(verifier))
    }
}

fn parse_algorithm(value: &str) -> Result<jsonwebtoken::Algorithm, String> {
    value
        .parse()
        .map_err(|_| format!("unknown JWT algorithm {value:?}"))
}

/// TLS for the gRPC server.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// PEM certificate chain; serves gRPC over TLS.
    #[arg(long, env = "USAGE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "USAGE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM certificates of the authorities whose client certificates are
    /// required (mutual TLS).
    #[arg(long, env = "USAGE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The TLS configuration read from the files, or `None` without
    /// `--tls-cert`.
    pub fn options(&self) -> anyhow::Result<Option<TlsOptions>> {
        use anyhow::Context as _;

        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        Ok(Some(TlsOptions {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: self.tls_client_ca.as_ref().map(read).transpose()?,
        }))
    }
}

/// Bounds on what calls may cost.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Largest request message accepted, in bytes.
    #[arg(long, env = "USAGE_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Most calls in flight over the whole server; more fail with UNAVAILABLE.
    #[arg(long, env = "USAGE_MAX_CONCURRENT_REQUESTS", default_value_t = 1024)]
    pub max_concurrent_requests: usize,

    /// Most calls in flight on one connection.
    #[arg(
        long,
        env = "USAGE_MAX_CONCURRENT_REQUESTS_PER_CONNECTION",
        default_value_t = 256
    )]
    pub max_concurrent_requests_per_connection: usize,
}

/// What `token` signs.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The token's role.
    #[arg(long, value_enum)]
    pub role: Role,

    /// The caller the token names: a user id for `user`, a service or person
    /// otherwise.
    #[arg(long)]
    pub sub: String,

    /// How long the token is valid, e.g. `1h`, `30m`.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,

    /// The HS256 secret the server checks tokens with.
    #[arg(long, env = "USAGE_AUTH_JWT_SECRET", hide_env_values = true)]
    pub auth_jwt_secret: SecretString,

    /// The `iss` claim, when the server requires one.
    #[arg(long, env = "USAGE_AUTH_JWT_ISSUER")]
    pub auth_jwt_issuer: Option<String>,

    /// The `aud` claim, when the server requires one.
    #[arg(long, env = "USAGE_AUTH_JWT_AUDIENCE")]
    pub auth_jwt_audience: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The password never survives redaction, in either URL form.
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/usage"),
            "postgres://app:***@db:5432/usage"
        );
        assert_eq!(
            redact_url("postgres://app@db/usage"),
            "postgres://app@db/usage"
        );
        assert_eq!(
            redact_url("host=db user=app password=s3cret dbname=usage"),
            "host=db user=app password=*** dbname=usage"
        );
    }

    /// A bare invocation means `serve`, and its flags parse without the
    /// subcommand.
    #[test]
    fn serve_is_the_default() {
        let cli = Cli::try_parse_from(["usage-service", "--listen-addr", "127.0.0.1:1"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.serve.listen_addr.port(), 1);
    }

    /// Authentication is on unless turned off explicitly, and is refused
    /// without a key; a secret never shows in `Debug`.
    #[test]
    fn auth_is_on_by_default() {
        let cli = Cli::try_parse_from(["usage-service"]).unwrap();
        assert_eq!(cli.serve.auth.mode, AuthMode::Jwt);
        if cli.serve.auth.auth_jwt_secret.is_none() && cli.serve.auth.auth_jwt_public_key.is_none()
        {
            assert!(cli.serve.auth.verifier().is_err());
        }

        let off = Cli::try_parse_from(["usage-service", "--auth", "none"]).unwrap();
        assert!(off.serve.auth.verifier().unwrap().is_none());

        let secret = "s3cret-s3cret-s3cret-s3cret-s3cret";
        let on = Cli::try_parse_from(["usage-service", "--auth-jwt-secret", secret]).unwrap();
        assert!(on.serve.auth.verifier().unwrap().is_some());
        assert!(!format!("{on:?}").contains(secret));
    }
}
