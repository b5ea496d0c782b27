//! gRPC over TLS and mutual TLS, with certificates generated for each test.

mod common;

use std::time::Duration;

use common::{
    auth::{authed, hs256_options, token, Pki},
    TestServer,
};
use tonic::Code;
use usage_service::{
    auth::Role,
    proto::{GetRequest, ReserveRequest},
};

fn get(user: &str) -> GetRequest {
    GetRequest {
        user_id: user.into(),
        ..Default::default()
    }
}

/// A TLS server serves clients that trust its authority (tokens still
/// required); a plaintext client, or one trusting another authority, gets
/// no answer.
#[tokio::test]
async fn tls_serves_trusting_clients_and_refuses_plaintext() {
    let pki = Pki::generate("tls");
    let mut options = hs256_options();
    options.tls = Some(pki.server(false));
    let server = TestServer::start_tls(options, pki.client()).await;

    let mut client = server.tls_client(pki.client()).await.unwrap();
    let service = token(Role::Service, "catalogue");
    let reserve = ReserveRequest {
        user_id: "alice".into(),
        product_id: "p1".into(),
        ..Default::default()
    };
    client
        .reserve(authed(reserve, Some(&service)))
        .await
        .unwrap();
    let refused = client.get(authed(get("alice"), None)).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);

    let plaintext = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect_lazy();
    let mut plaintext =
        usage_service::proto::usage_service_client::UsageServiceClient::new(plaintext);
    let failed = plaintext.get(authed(get("alice"), Some(&service))).await;
    assert!(failed.is_err(), "a plaintext call must fail: {failed:?}");

    let stranger = Pki::generate("stranger");
    let untrusted = match server.tls_client(stranger.client()).await {
        Ok(mut client) => client.get(authed(get("alice"), Some(&service))).await,
        Err(err) => Err(tonic::Status::unavailable(err.to_string())),
    };
    assert!(
        untrusted.is_err(),
        "a client trusting another authority was served"
    );
    server.stop().await;
}

/// With a client authority configured, a client presenting a certificate it
/// signed is served, while a client without a certificate, or with one from
/// another authority, is refused.
#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate() {
    let pki = Pki::generate("mtls");
    let mut options = hs256_options();
    options.tls = Some(pki.server(true));
    let server = TestServer::start_tls(options, pki.client_with_cert()).await;
    let service = token(Role::Service, "catalogue");

    let mut client = server.tls_client(pki.client_with_cert()).await.unwrap();
    let usage = client
        .get(authed(get("alice"), Some(&service)))
        .await
        .unwrap();
    assert_eq!(usage.get_ref().current_usage, 0);

    let without_cert = match server.tls_client(pki.client()).await {
        Ok(mut client) => client.get(authed(get("alice"), Some(&service))).await,
        Err(err) => Err(tonic::Status::unavailable(err.to_string())),
    };
    assert!(without_cert.is_err(), "served without a client certificate");

    let stranger = Pki::generate("stranger");
    let foreign = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost")
        .identity(tonic::transport::Identity::from_pem(
            &stranger.client_cert_pem,
            &stranger.client_key_pem,
        ));
    let foreign_cert = match server.tls_client(foreign).await {
        Ok(mut client) => client.get(authed(get("alice"), Some(&service))).await,
        Err(err) => Err(tonic::Status::unavailable(err.to_string())),
    };
    assert!(
        foreign_cert.is_err(),
        "served with a foreign client certificate"
    );
    server.stop().await;
}
