//! usage-service counts the slots each user holds for a feature (one slot per
//! product by default) and enforces the limit of the user's tier, over gRPC.
//!
//! One request, one way through:
//!
//! * [`grpc`]: transport. tonic handlers, request validation, the mapping of
//!   errors to gRPC statuses, health and reflection.
//! * [`usage`]: the domain. Identifiers, usage, outcomes of a reservation; no
//!   SQL and no tonic.
//! * [`store`]: storage. The pool, migrations, and one named SQL statement per
//!   operation. The limit is enforced in `usage_reserve`
//!   (`migrations/V1__slots_and_usage.sql`), called by `src/store/sql/reserve.sql`.
//! * [`jobs`]: background work (the database health watch, the scheduled
//!   reconciliation) and the `backfill` and `reconcile` commands.
//! * [`config`] and [`telemetry`]: flags, environment and logging.
//! * [`auth`]: bearer tokens and roles; `grpc::gate` and `grpc::policy` decide
//!   per method who may call it.
//! * [`metrics`]: Prometheus metrics and their `/metrics` endpoint.
//!
//! [`run`] serves an already-bound listener until a shutdown future resolves;
//! the binary and the integration tests start the server the same way.

pub mod auth;
pub mod config;
pub mod grpc;
pub mod jobs;
pub mod metrics;
pub mod store;
pub mod telemetry;
pub mod usage;

/// Code generated from `proto/usage/v1/usage.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("usage.v1");

    /// The encoded descriptor set served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/usage_descriptor.bin"));
}

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch};
use tonic::transport::{server::TcpIncoming, Server};
use tracing::info;

use crate::{
    grpc::UsageApi,
    proto::usage_service_server::UsageServiceServer,
    store::{
        catalogue::{Catalogue, CatalogueLayout},
        reconcile::Reconciler,
        Store,
    },
};

/// What [`run`] needs beyond the listener and the store.
///
/// The default serves without authentication and without TLS (the binary
/// turns authentication on unless told otherwise).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// How often the database is probed for the health service.
    pub health_interval: Duration,
    /// How often expired holds are freed; zero turns the sweep off.
    pub hold_sweep_interval: Duration,
    /// Checks bearer tokens; `None` lets every caller in (and logs a warning
    /// at start-up and every hour).
    pub auth: Option<Arc<auth::Verifier>>,
    /// Whether reflection needs a valid token too.
    pub reflection_requires_token: bool,
    /// Serve over TLS (mutual when it names a client authority).
    pub tls: Option<grpc::tls::TlsOptions>,
    /// Largest request message accepted, in bytes; larger ones get
    /// `RESOURCE_EXHAUSTED` before reaching a handler.
    pub max_message_bytes: usize,
    /// Most calls in flight over the whole server; calls beyond it fail at
    /// once with `UNAVAILABLE`. Health checks do not count.
    pub max_concurrent_requests: usize,
    /// Most calls in flight on one connection (the HTTP/2 stream limit the
    /// server advertises, backed by a load-shedding limit).
    pub max_concurrent_requests_per_connection: usize,
    /// The product catalogue Reconcile compares the ledger with, checked at
    /// start-up; `None` turns reconciliation off.
    pub catalogue: Option<CatalogueLayout>,
    /// How often every user is reconciled; zero turns the schedule off.
    pub reconcile_interval: Duration,
    /// How old a slot without a live product must be before it is released.
    pub orphan_grace: Duration,
    /// Where `/metrics` is served; `None` serves no metrics endpoint.
    pub metrics_addr: Option<SocketAddr>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            health_interval: Duration::from_secs(1),
            hold_sweep_interval: Duration::from_secs(5),
            auth: None,
            reflection_requires_token: false,
            tls: None,
            max_message_bytes: 64 * 1024,
            max_concurrent_requests: 1024,
            max_concurrent_requests_per_connection: 256,
            catalogue: None,
            reconcile_interval: Duration::ZERO,
            orphan_grace: Duration::from_secs(600),
            metrics_addr: None,
        }
    }
}

/// Serves gRPC on `listener` until `shutdown` resolves, then shuts down
/// gracefully: health turns `NOT_SERVING`, the listener closes, calls in
/// flight finish, and the function returns.
pub async fn run(
    listener: TcpListener,
    store: Store,
    options: ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    jobs::health::set_status(&reporter, false).await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building reflection v1")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building reflection v1alpha")?;

    let reconciler = match &options.catalogue {
        Some(layout) => {
            let catalogue = Catalogue::validate(&store, layout)
                .await
                .context("checking the product catalogue")?;
            info!(table = %catalogue, feature = catalogue.feature(), "product catalogue checked");
            Some(Reconciler::new(
                store.clone(),
                std::sync::Arc::new(catalogue),
                options.orphan_grace,
            ))
        }
        None => None,
    };

    let metrics_listener = match options.metrics_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics address {addr}"))?,
        ),
        None => None,
    };

    let (stop_jobs, stopped) = watch::channel(false);
    let metrics_endpoint = metrics_listener.map(|listener| {
        tokio::spawn(metrics::serve(
            listener,
            store.pool().clone(),
            stopped.clone(),
        ))
    });
    let health_watch = tokio::spawn(jobs::health::watch_database(
        store.pool().clone(),
        reporter.clone(),
        options.health_interval,
        stopped.clone(),
    ));
    let reconcile_schedule = match &reconciler {
        Some(reconciler) if !options.reconcile_interval.is_zero() => Some(tokio::spawn(
            jobs::reconcile::schedule(reconciler.clone(), options.reconcile_interval, stopped),
        )),
        _ => None,
    };

    let hold_sweep = (!options.hold_sweep_interval.is_zero()).then(|| {
        tokio::spawn(jobs::holds::sweep_expired_holds(
            store.clone(),
            options.hold_sweep_interval,
            stop_jobs.subscribe(),
        ))
    });
    let unauthenticated_warning = options.auth.is_none().then(|| {
        tokio::spawn(jobs::unauthenticated::warn_periodically(
            jobs::unauthenticated::REPEAT_EVERY,
            stop_jobs.subscribe(),
        ))
    });

    let api = UsageApi::new(store)
        .with_shutdown(stop_jobs.subscribe())
        .with_reconciler(reconciler);
    let local_addr = listener
        .local_addr()
        .context("reading the listener address")?;
    info!(%local_addr, "serving gRPC");

    let on_shutdown = async {
        shutdown.await;
        info!("shutting down: refusing new calls, finishing those in flight");
        let _ = stop_jobs.send(true);
        // The watch must be gone before the last word, or its next probe
        // could report SERVING again.
        health_watch.await.ok();
        if let Some(sweep) = hold_sweep {
            sweep.await.ok();
        }
        if let Some(warning) = unauthenticated_warning {
            warning.await.ok();
        }
        if let Some(schedule) = reconcile_schedule {
            schedule.await.ok();
        }
        jobs::health::set_status(&reporter, false).await;
    };

    let mut builder = Server::builder();
    if let Some(tls) = &options.tls {
        builder = builder
            .tls_config(tls.server_config())
            .context("configuring TLS")?;
    }
    let per_connection = options.max_concurrent_requests_per_connection;
    let gate = grpc::gate::GateLayer::new(
        options.auth.clone(),
        grpc::policy::Policy {
            reflection_requires_token: options.reflection_requires_token,
        },
        options.max_concurrent_requests,
        options.max_message_bytes,
    );
    info!(
        auth = options.auth.is_some(),
        tls = options.tls.is_some(),
        mutual_tls = options
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca_pem.is_some()),
        "serving options"
    );

    builder
        .max_concurrent_streams(u32::try_from(per_connection).unwrap_or(u32::MAX))
        .concurrency_limit_per_connection(per_connection)
        .load_shed(true)
        .layer(grpc::metered::MeteredLayer)
        .layer(gate)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            UsageServiceServer::new(api).max_decoding_message_size(options.max_message_bytes),
        )
        .serve_with_incoming_shutdown(incoming(listener), on_shutdown)
        .await
        .context("serving gRPC")?;
    if let Some(endpoint) = metrics_endpoint {
        endpoint
            .await
            .context("the metrics endpoint panicked")?
            .context("serving metrics")?;
    }

    info!("shut down");
    Ok(())
}

/// The connections accepted on `listener`, with Nagle's algorithm off: a
/// reply is a few small HTTP/2 frames, and holding the last one back until
/// the client acknowledges the previous (which it may delay by up to 40 ms)
/// would add that to calls whenever the connection is not busy. tonic's own
/// `tcp_nodelay` setting applies only to listeners tonic binds itself.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt as _;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_send_without_delay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("an address");
        let mut incoming = incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connecting");
        let accepted = incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        assert!(accepted.nodelay().expect("reading TCP_NODELAY"));
    }
}
