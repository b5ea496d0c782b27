//! Command line and environment: every flag can also be set through the
//! environment variable named in its help.

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand};

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
pub enum Command {
    /// Apply pending migrations (unless --no-migrate), then serve gRPC.
    Serve(ServeArgs),
    /// Apply pending migrations and exit.
    Migrate(DatabaseArgs),
    /// Check the data for lost or double-counted slots, limits exceeded and
    /// sessions left idle in a transaction; print each violation and exit
    /// non-zero when there is one.
    Check(CheckArgs),
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

    /// Tokio worker threads; by default the CPUs available to the process.
    #[arg(long, env = "USAGE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,

    #[command(flatten)]
    pub database: DatabaseArgs,
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

/// Enough connections to keep both the CPUs and the database busy: PostgreSQL
/// spends part of each call waiting for the disk, so a few per CPU.
fn default_pool_size() -> usize {
    available_cpus() * 4
}

/// The CPUs this process may use (respects cgroup quotas and affinity).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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
}
