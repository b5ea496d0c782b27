//! Health follows the database; reflection lists every service.

mod common;

use std::time::Duration;

use common::{admin_url, eventually, health_status, proxy::Proxy, TestServer};
use tonic::Code;
use usage_service::proto::GetRequest;

/// The address of the test PostgreSQL server.
fn postgres_addr() -> std::net::SocketAddr {
    let config: tokio_postgres::Config = admin_url().parse().unwrap();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        #[allow(unreachable_patterns)]
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let host = if host == "localhost" {
        "127.0.0.1".to_owned()
    } else {
        host
    };
    format!("{host}:{port}").parse().unwrap()
}

/// Health goes NOT_SERVING when the database goes away, calls fail with
/// UNAVAILABLE meanwhile, and both recover when it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_database() {
    let db = common::migrated_db().await;

    let proxy = Proxy::start(postgres_addr()).await;
    let mut args = db.args();
    let (server_part, db_part) = db.url.rsplit_once('/').unwrap();
    let (scheme_user, _) = server_part.rsplit_once('@').unwrap();
    args.database_url = format!("{scheme_user}@{}/{db_part}", proxy.addr);
    args.db_pool_wait_timeout = Duration::from_millis(500);
    args.db_connect_timeout = Duration::from_millis(500);
    let server = TestServer::start_with(db, args).await;
    let channel = server.channel().await;
    let mut client = server.client().await;

    proxy.down();
    for service in ["", "usage.v1.UsageService"] {
        eventually(Duration::from_secs(10), "NOT_SERVING", || {
            let channel = channel.clone();
            async move { health_status(channel, service).await == Some(2) }
        })
        .await;
    }
    let status = client
        .get(GetRequest {
            user_id: "u".into(),
            feature: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        !status.message().contains("127.0.0.1"),
        "no connection details leak"
    );

    proxy.up();
    eventually(Duration::from_secs(10), "SERVING again", || {
        let channel = channel.clone();
        async move { health_status(channel, "usage.v1.UsageService").await == Some(1) }
    })
    .await;
    client
        .get(GetRequest {
            user_id: "u".into(),
            feature: String::new(),
        })
        .await
        .expect("calls succeed again");
    server.stop().await;
}

/// Server reflection (v1) lists the usage, health and reflection services.
#[tokio::test]
async fn reflection_lists_services() {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };

    let server = TestServer::start().await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "usage.v1.UsageService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }
    server.stop().await;
}

/// Shutting down ends the server task cleanly (no error) and the server stops
/// answering.
#[tokio::test]
async fn shutdown_is_graceful() {
    let mut server = TestServer::start().await;
    let channel = server.channel().await;
    assert_eq!(health_status(channel.clone(), "").await, Some(1));
    server.shutdown_server().await;
    assert_eq!(
        health_status(channel, "").await,
        None,
        "the server no longer answers"
    );
    server.db.drop_db().await;
}
