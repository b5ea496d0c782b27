//! Who may call what: tokens, roles, the per-method policy, and the caller
//! named in the audit trail.

mod common;

use std::time::Duration;

use common::{
    auth::{
        authed, claims, hs256_options, now, rows_written, sign, sign_hs256, token, unsigned,
        with_verifier, SECRET,
    },
    health_status, TestServer,
};
use futures::future::BoxFuture;
use jsonwebtoken::{Algorithm, EncodingKey};
use tonic::{transport::Channel, Code, Status};
use usage_service::{
    auth::{Role, Verifier, VerifyingKey},
    proto::{
        usage_service_client::UsageServiceClient, CheckRequest, ClearLimitOverrideRequest,
        ConfirmRequest, GetRequest, GetSummaryRequest, ListAllRequest, ListEventsRequest,
        ReleaseManyRequest, ReleaseRequest, ReserveManyRequest, ReserveRequest,
        SetLimitOverrideRequest, SetTierLimitRequest, SetTierRequest, WatchUsageRequest,
    },
};

/// A call of one RPC about `alice`, made with the given token.
type Call = fn(Channel, Option<String>) -> BoxFuture<'static, Result<(), Status>>;

/// One row of the table: an RPC and the roles allowed to call it (a `user`
/// token is `alice`'s own, so "own data" rows allow it).
struct Rpc {
    name: &'static str,
    allowed: &'static [Role],
    call: Call,
}

/// A row for an RPC whose call is `client.$method($request)`.
macro_rules! rpc {
    ($name:literal, $allowed:expr, $method:ident, $request:expr) => {
        Rpc {
            name: $name,
            allowed: $allowed,
            call: |channel, token| {
                Box::pin(async move {
                    let mut client = UsageServiceClient::new(channel);
                    client
                        .$method(authed($request, token.as_deref()))
                        .await
                        .map(drop)
                })
            },
        }
    };
}

/// Every RPC of the service. An RPC added to the service gets a row here.
fn rpcs() -> Vec<Rpc> {
    vec![
        Rpc {
            name: "Reserve",
            allowed: &[Role::Service, Role::Admin],
            call: |channel, token| {
                Box::pin(async move {
                    let request = ReserveRequest {
                        user_id: "alice".into(),
                        product_id: "new".into(),
                        ..Default::default()
                    };
                    let mut client = UsageServiceClient::new(channel);
                    client
                        .reserve(authed(request, token.as_deref()))
                        .await
                        .map(drop)
                })
            },
        },
        Rpc {
            name: "Release",
            allowed: &[Role::Service, Role::Admin],
            call: |channel, token| {
                Box::pin(async move {
                    let request = ReleaseRequest {
                        user_id: "alice".into(),
                        product_id: "held".into(),
                        ..Default::default()
                    };
                    let mut client = UsageServiceClient::new(channel);
                    client
                        .release(authed(request, token.as_deref()))
                        .await
                        .map(drop)
                })
            },
        },
        Rpc {
            name: "Get",
            allowed: &[Role::User, Role::Service, Role::Admin],
            call: |channel, token| {
                Box::pin(async move {
                    let request = GetRequest {
                        user_id: "alice".into(),
                        ..Default::default()
                    };
                    let mut client = UsageServiceClient::new(channel);
                    client
                        .get(authed(request, token.as_deref()))
                        .await
                        .map(drop)
                })
            },
        },
        Rpc {
            name: "ListAll",
            allowed: &[Role::Admin],
            call: |channel, token| {
                Box::pin(async move {
                    let mut client = UsageServiceClient::new(channel);
                    let request = ListAllRequest::default();
                    client
                        .list_all(authed(request, token.as_deref()))
                        .await
                        .map(drop)
                })
            },
        },
        rpc!(
            "Check",
            &[Role::Service, Role::Admin],
            check,
            CheckRequest {
                user_id: "alice".into(),
                ..Default::default()
            }
        ),
        rpc!(
            "ReserveMany",
            &[Role::Service, Role::Admin],
            reserve_many,
            ReserveManyRequest {
                user_id: "alice".into(),
                product_ids: vec!["bulk-1".into(), "bulk-2".into()],
                ..Default::default()
            }
        ),
        rpc!(
            "ReleaseMany",
            &[Role::Service, Role::Admin],
            release_many,
            ReleaseManyRequest {
                user_id: "alice".into(),
                product_ids: vec!["held".into()],
                ..Default::default()
            }
        ),
        rpc!(
            "Confirm",
            &[Role::Service, Role::Admin],
            confirm,
            ConfirmRequest {
                user_id: "alice".into(),
                product_id: "held".into(),
                ..Default::default()
            }
        ),
        rpc!(
            "WatchUsage",
            &[Role::Service, Role::Admin],
            watch_usage,
            WatchUsageRequest {
                user_id: "alice".into(),
                ..Default::default()
            }
        ),
        rpc!(
            "SetTier",
            &[Role::Admin],
            set_tier,
            SetTierRequest {
                user_id: "alice".into(),
                tier: "premium".into(),
                ..Default::default()
            }
        ),
        rpc!(
            "SetLimitOverride",
            &[Role::Admin],
            set_limit_override,
            SetLimitOverrideRequest {
                user_id: "alice".into(),
                usage_limit: Some(75),
                ..Default::default()
            }
        ),
        rpc!(
            "ClearLimitOverride",
            &[Role::Admin],
            clear_limit_override,
            ClearLimitOverrideRequest {
                user_id: "alice".into(),
                ..Default::default()
            }
        ),
        rpc!(
            "SetTierLimit",
            &[Role::Admin],
            set_tier_limit,
            SetTierLimitRequest {
                tier: "pro".into(),
                usage_limit: Some(500),
                ..Default::default()
            }
        ),
        rpc!(
            "GetSummary",
            &[Role::Admin],
            get_summary,
            GetSummaryRequest::default()
        ),
        rpc!(
            "ListEvents",
            &[Role::Admin],
            list_events,
            ListEventsRequest::default()
        ),
    ]
}

/// Tokens that must never be accepted, each claiming the admin role so that
/// accepting one would let the call through.
fn bad_credentials() -> Vec<(&'static str, Option<String>, Code)> {
    let admin = claims("admin", "mallory");
    let with = |key: &str, value: serde_json::Value| {
        let mut claims = admin.clone();
        claims[key] = value;
        claims
    };
    let without = |key: &str| {
        let mut claims = admin.clone();
        claims.as_object_mut().unwrap().remove(key);
        claims
    };
    let other_secret = EncodingKey::from_secret(b"another-secret-another-secret-another").unwrap();
    let same_secret = EncodingKey::from_secret(SECRET).unwrap();
    let user_token = sign_hs256(&claims("user", "alice"));
    let tampered = {
        // alice's valid user token with its payload swapped for an admin one.
        let parts: Vec<&str> = user_token.split('.').collect();
        let admin_payload = unsigned(&claims("admin", "alice"));
        let payload = admin_payload.split('.').nth(1).unwrap().to_owned();
        format!("{}.{payload}.{}", parts[0], parts[2])
    };
    let unauthenticated = Code::Unauthenticated;
    vec![
        ("no token", None, unauthenticated),
        ("garbage", Some("not-a-jwt".into()), unauthenticated),
        (
            "expired",
            Some(sign_hs256(&with("exp", (now() - 3600).into()))),
            unauthenticated,
        ),
        ("no exp", Some(sign_hs256(&without("exp"))), unauthenticated),
        (
            "not yet valid",
            Some(sign_hs256(&with("nbf", (now() + 3600).into()))),
            unauthenticated,
        ),
        (
            "exp as a string",
            Some(sign_hs256(&with("exp", "never".into()))),
            unauthenticated,
        ),
        (
            "wrong signature",
            Some(sign(&admin, Algorithm::HS256, &other_secret)),
            unauthenticated,
        ),
        (
            "wrong algorithm",
            Some(sign(&admin, Algorithm::HS512, &same_secret)),
            unauthenticated,
        ),
        ("alg none", Some(unsigned(&admin)), unauthenticated),
        ("tampered payload", Some(tampered), unauthenticated),
        (
            "wrong audience",
            Some(sign_hs256(&with("aud", "billing".into()))),
            unauthenticated,
        ),
        (
            "no audience",
            Some(sign_hs256(&without("aud"))),
            unauthenticated,
        ),
        (
            "wrong issuer",
            Some(sign_hs256(&with("iss", "https://evil.test".into()))),
            unauthenticated,
        ),
        (
            "no issuer",
            Some(sign_hs256(&without("iss"))),
            unauthenticated,
        ),
        ("no sub", Some(sign_hs256(&without("sub"))), unauthenticated),
        (
            "unknown role",
            Some(sign_hs256(&with("role", "root".into()))),
            Code::PermissionDenied,
        ),
    ]
}

/// Every RPC against every kind of bad token answers the exact code and
/// writes nothing; then each role gets exactly the RPCs of its row, and the
/// refused ones write nothing either.
#[tokio::test]
async fn every_rpc_answers_each_credential_with_its_exact_code() {
    let server = TestServer::start_with_options(hs256_options()).await;
    let channel = server.channel().await;
    let sql = server.sql().await;
    let service = token(Role::Service, "catalogue");
    let held = ReserveRequest {
        user_id: "alice".into(),
        product_id: "held".into(),
        ..Default::default()
    };
    UsageServiceClient::new(channel.clone())
        .reserve(authed(held, Some(&service)))
        .await
        .expect("a service reserves");

    let before = rows_written(&sql).await;
    for rpc in rpcs() {
        for (case, token, expected) in bad_credentials() {
            let result = (rpc.call)(channel.clone(), token).await;
            let code = result.err().map_or(Code::Ok, |s| s.code());
            assert_eq!(code, expected, "{} with {case}", rpc.name);
            assert_eq!(
                rows_written(&sql).await,
                before,
                "{} with {case} wrote",
                rpc.name
            );
        }
    }

    for rpc in rpcs() {
        for role in [Role::User, Role::Service, Role::Admin] {
            let before = rows_written(&sql).await;
            let result = (rpc.call)(channel.clone(), Some(token(role, "alice"))).await;
            if rpc.allowed.contains(&role) {
                assert!(result.is_ok(), "{} as {role}: {result:?}", rpc.name);
            } else {
                let status = result
                    .err()
                    .unwrap_or_else(|| panic!("{} as {role} was let in", rpc.name));
                assert_eq!(
                    status.code(),
                    Code::PermissionDenied,
                    "{} as {role}",
                    rpc.name
                );
                assert_eq!(
                    rows_written(&sql).await,
                    before,
                    "{} as {role} wrote",
                    rpc.name
                );
            }
        }
    }
    server.assert_invariants().await;
    server.stop().await;
}

/// A user token reads its own usage (named, or implied by an empty user_id)
/// and gets PERMISSION_DENIED for anyone else, with the same answer whether
/// that user exists or not.
#[tokio::test]
async fn user_reading_another_users_usage_is_denied() {
    let server = TestServer::start_with_options(hs256_options()).await;
    let mut client = server.client().await;
    let service = token(Role::Service, "catalogue");
    for (user, product) in [("alice", "a1"), ("bob", "b1")] {
        let request = ReserveRequest {
            user_id: user.into(),
            product_id: product.into(),
            ..Default::default()
        };
        client
            .reserve(authed(request, Some(&service)))
            .await
            .unwrap();
    }

    let alice = token(Role::User, "alice");
    let get = |user: &str| GetRequest {
        user_id: user.into(),
        ..Default::default()
    };
    let own = client.get(authed(get(""), Some(&alice))).await.unwrap();
    assert_eq!(own.get_ref().user_id, "alice");
    assert_eq!(own.get_ref().current_usage, 1);
    let named = client
        .get(authed(get("alice"), Some(&alice)))
        .await
        .unwrap();
    assert_eq!(named.get_ref(), own.get_ref());

    let existing = client
        .get(authed(get("bob"), Some(&alice)))
        .await
        .unwrap_err();
    let absent = client
        .get(authed(get("nobody"), Some(&alice)))
        .await
        .unwrap_err();
    assert_eq!(existing.code(), Code::PermissionDenied);
    assert_eq!(absent.code(), Code::PermissionDenied);
    assert_eq!(existing.message(), absent.message());

    let empty = get("");
    let unauthenticated = client.get(authed(empty, None)).await.unwrap_err();
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);
    server.stop().await;
}

/// The token's subject is the actor of every audit row its calls write.
#[tokio::test]
async fn audit_rows_name_the_caller() {
    let server = TestServer::start_with_options(hs256_options()).await;
    let mut client = server.client().await;
    let reserve = ReserveRequest {
        user_id: "alice".into(),
        product_id: "p1".into(),
        ..Default::default()
    };
    let release = ReleaseRequest {
        user_id: "alice".into(),
        product_id: "p1".into(),
        ..Default::default()
    };
    let service = token(Role::Service, "catalogue");
    client
        .reserve(authed(reserve, Some(&service)))
        .await
        .unwrap();
    let admin = token(Role::Admin, "ops-jane");
    client.release(authed(release, Some(&admin))).await.unwrap();

    let rows = server
        .sql()
        .await
        .query("SELECT action, actor FROM usage_events ORDER BY id", &[])
        .await
        .unwrap();
    let actors: Vec<(String, Option<String>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        actors,
        vec![
            ("reserve".to_owned(), Some("catalogue".to_owned())),
            ("release".to_owned(), Some("ops-jane".to_owned())),
        ]
    );
    server.stop().await;
}

/// With a public key configured, tokens signed by its private key are
/// accepted (ES256 and EdDSA), while an HS256 token keyed with the public key
/// itself (algorithm confusion) and tokens of any other algorithm are refused.
#[tokio::test]
async fn algorithm_is_fixed_by_configuration() {
    for (algorithm, rcgen_alg) in [
        (Algorithm::ES256, &rcgen::PKCS_ECDSA_P256_SHA256),
        (Algorithm::EdDSA, &rcgen::PKCS_ED25519),
    ] {
        let pair = rcgen::KeyPair::generate_for(rcgen_alg).unwrap();
        let public_pem = pair.public_key_pem();
        let private_pem = pair.serialize_pem();
        let verifier = Verifier::new(
            &VerifyingKey::PublicKeyPem(public_pem.clone().into_bytes()),
            algorithm,
            Some(common::auth::ISSUER),
            Some(common::auth::AUDIENCE),
        )
        .unwrap();
        let server = TestServer::start_with_options(with_verifier(verifier)).await;
        let mut client = server.client().await;
        let get = || GetRequest {
            user_id: "alice".into(),
            ..Default::default()
        };

        let signing = match algorithm {
            Algorithm::ES256 => EncodingKey::from_ec_pem(private_pem.as_bytes()).unwrap(),
            _ => EncodingKey::from_ed_pem(private_pem.as_bytes()).unwrap(),
        };
        let good = sign(&claims("service", "catalogue"), algorithm, &signing);
        client.get(authed(get(), Some(&good))).await.unwrap();

        let confused_key = EncodingKey::from_secret(public_pem.as_bytes()).unwrap();
        let confused = sign(&claims("admin", "mallory"), Algorithm::HS256, &confused_key);
        let refused = client
            .get(authed(get(), Some(&confused)))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{algorithm:?}");

        let hs = sign_hs256(&claims("admin", "mallory"));
        let refused = client.get(authed(get(), Some(&hs))).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{algorithm:?}");
        server.stop().await;
    }
}

/// Health checks and reflection answer without a token; with reflection
/// closed, reflection needs any valid token while health stays open.
#[tokio::test]
async fn health_and_reflection_are_open_unless_configured() {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, ServerReflectionRequest,
    };

    async fn list_services(channel: Channel, token: Option<&str>) -> Result<usize, Status> {
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let stream = futures::stream::iter([request]);
        let mut responses = ServerReflectionClient::new(channel)
            .server_reflection_info(authed(stream, token))
            .await?
            .into_inner();
        let response = responses.message().await?.expect("one response");
        Ok(format!("{response:?}").matches("name:").count())
    }

    let server = TestServer::start_with_options(hs256_options()).await;
    let channel = server.channel().await;
    assert_eq!(health_status(channel.clone(), "").await, Some(1));
    assert!(list_services(channel, None).await.unwrap() >= 2);
    server.stop().await;

    let mut options = hs256_options();
    options.reflection_requires_token = true;
    let server = TestServer::start_with_options(options).await;
    let channel = server.channel().await;
    assert_eq!(health_status(channel.clone(), "").await, Some(1));
    let refused = list_services(channel.clone(), None).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let user = token(Role::User, "alice");
    assert!(list_services(channel, Some(&user)).await.unwrap() >= 2);
    server.stop().await;
}

/// Without authentication every call is let in and audit rows name no actor
/// (the library default the other tests run with).
#[tokio::test]
async fn without_authentication_calls_need_no_token() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let request = ReserveRequest {
        user_id: "alice".into(),
        product_id: "p1".into(),
        ..Default::default()
    };
    client.reserve(request).await.unwrap();
    let actor: Option<String> = server
        .sql()
        .await
        .query_one("SELECT actor FROM usage_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(actor, None);
    tokio::time::timeout(Duration::from_secs(5), server.stop())
        .await
        .expect("the server stops promptly with the warning job running");
}

/// `usage-service token` mints a token, signed with the configured secret
/// and carrying the configured issuer and audience, that the server accepts
/// for the role it names.
#[tokio::test]
async fn token_command_mints_a_token_the_server_accepts() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_usage-service"))
        .args([
            "token",
            "--role",
            "service",
            "--sub",
            "catalogue",
            "--ttl",
            "5m",
        ])
        .env(
            "USAGE_AUTH_JWT_SECRET",
            std::str::from_utf8(SECRET).unwrap(),
        )
        .env("USAGE_AUTH_JWT_ISSUER", common::auth::ISSUER)
        .env("USAGE_AUTH_JWT_AUDIENCE", common::auth::AUDIENCE)
        .output()
        .expect("running usage-service token");
    assert!(output.status.success(), "{output:?}");
    let minted = String::from_utf8(output.stdout).unwrap().trim().to_owned();

    let server = TestServer::start_with_options(hs256_options()).await;
    let mut client = server.client().await;
    let reserve = ReserveRequest {
        user_id: "alice".into(),
        product_id: "p1".into(),
        ..Default::default()
    };
    client
        .reserve(authed(reserve, Some(&minted)))
        .await
        .unwrap();
    let list = client
        .list_all(authed(ListAllRequest::default(), Some(&minted)))
        .await
        .unwrap_err();
    assert_eq!(list.code(), Code::PermissionDenied);
    server.stop().await;
}

/// The binary refuses to serve with authentication on and no key, saying
/// how to fix it, before it touches the database.
#[test]
fn binary_refuses_to_start_without_a_key() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_usage-service"))
        .args(["--listen-addr", "127.0.0.1:0"])
        // Nothing listens there: reaching the database would fail differently.
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .env_remove("USAGE_AUTH")
        .env_remove("USAGE_AUTH_JWT_SECRET")
        .env_remove("USAGE_AUTH_JWT_PUBLIC_KEY")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("running usage-service");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no key is configured"), "{stderr}");
    assert!(stderr.contains("--auth none"), "{stderr}");
    assert!(!stderr.contains("applying migrations"), "{stderr}");
}
