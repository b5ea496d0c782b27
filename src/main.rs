//! The `usage-service` binary: parse the command line, start logging, build
//! the pool, migrate, then hand over to [`usage_service::run`].

use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use tokio::net::TcpListener;
use tracing::info;
use usage_service::{
    auth,
    config::{
        available_cpus, CheckArgs, Cli, Command, DatabaseArgs, LogFormat, ServeArgs, TokenArgs,
    },
    jobs,
    store::{self, CheckOptions, Store},
    telemetry, ServerOptions,
};

/// mimalloc instead of the system allocator: a call allocates some eighty
/// small blocks across hyper, h2, tonic and the handler, and glibc's malloc
/// spent about a sixth of a Get's instructions on them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve(cli.serve));

    let (log_format, worker_threads) = match &command {
        Command::Serve(args) => (args.log_format, args.worker_threads),
        Command::Migrate(_) | Command::Check(_) | Command::Backfill(_) | Command::Reconcile(_) => {
            (LogFormat::Text, None)
        }
        Command::Token(args) => return print_token(args),
    };
    let _logs = telemetry::init(log_format);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads.unwrap_or_else(available_cpus))
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        match command {
            Command::Serve(args) => serve(args).await,
            Command::Migrate(args) => migrate(&args).await.map(drop),
            Command::Check(args) => check(&args).await,
            Command::Token(_) => unreachable!("handled before the runtime starts"),
            Command::Backfill(args) => jobs::backfill::run_command(args).await,
            Command::Reconcile(args) => jobs::reconcile::run_command(args).await,
        }
    })
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Configuration mistakes (a missing key, an unreadable certificate) stop
    // start-up before anything touches the database.
    let verifier = args.auth.verifier()?.map(Arc::new);
    let tls = args.tls.options()?;

    let pool = store::connect_pool(&args.database)?;
    if args.no_migrate {
        info!("skipping migrations (--no-migrate)");
    } else {
        migrate(&args.database).await?;
    }

    let listener = TcpListener::bind(args.listen_addr)
        .await
        .with_context(|| format!("binding {}", args.listen_addr))?;
    let options = ServerOptions {
        health_interval: args.health_interval,
        hold_sweep_interval: args.hold_sweep_interval,
        auth: verifier,
        reflection_requires_token: args.auth.auth_reflection_requires_token,
        tls,
        max_message_bytes: args.limits.max_message_bytes,
        max_concurrent_requests: args.limits.max_concurrent_requests,
        max_concurrent_requests_per_connection: args.limits.max_concurrent_requests_per_connection,
        catalogue: (!args.no_catalogue).then(|| args.catalogue.layout()),
        reconcile_interval: args.reconcile_interval,
        orphan_grace: args.catalogue.orphan_grace,
        metrics_addr: Some(args.metrics_addr),
    };
    let store = Store::configured(pool, &args.database);
    usage_service::run(listener, store, options, shutdown_signal()).await
}

async fn migrate(args: &DatabaseArgs) -> anyhow::Result<usize> {
    info!(database = %args.redacted_url(), "applying migrations");
    let pool = store::connect_pool(args)?;
    let applied = store::migrate::run(&pool).await?;
    info!(applied, "migrations up to date");
    Ok(applied)
}

/// Prints every violation found on stdout, one a line, and fails when there
/// is one, so that scripts can act on the exit status.
async fn check(args: &CheckArgs) -> anyhow::Result<()> {
    info!(database = %args.database.redacted_url(), "checking consistency");
    let store = Store::configured(store::connect_pool(&args.database)?, &args.database);
    let options = CheckOptions {
        idle_in_transaction_after: args.idle_in_transaction_after,
    };
    let violations = store
        .check(&options)
        .await
        .context("reading the data to check")?;
    for violation in &violations {
        println!("{violation}");
    }
    if !violations.is_empty() {
        anyhow::bail!("{} violation(s) found", violations.len());
    }
    println!("ok: counters, ledger and audit trail agree; no limit exceeded; no idle transaction");
    Ok(())
}

/// Prints a token signed with the configured secret, for trying the API.
fn print_token(args: &TokenArgs) -> anyhow::Result<()> {
    let token = auth::mint_hs256(
        args.auth_jwt_secret.0.as_bytes(),
        &auth::TokenRequest {
            subject: &args.sub,
            role: args.role,
            ttl: args.ttl,
            issuer: args.auth_jwt_issuer.as_deref(),
            audience: args.auth_jwt_audience.as_deref(),
        },
    )
    .context("signing the token")?;
    println!("{token}");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(cause = %err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(err) => {
                tracing::error!(cause = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();

    tokio::select! {
        _ = ctrl_c => info!("received Ctrl-C"),
        _ = terminate => info!("received SIGTERM"),
    }
}
