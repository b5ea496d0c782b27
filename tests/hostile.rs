//! Hostile input: random bytes and unicode in every string field, extreme
//! integers and forged page tokens. The server answers each call with a
//! status, never panics, and writes nothing for a call it refuses.

mod common;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use common::{
    auth::{authed, hs256_options, rows_written, token},
    health_status, TestServer,
};
use proptest::{prelude::*, test_runner::TestRunner};
use tonic::{transport::Channel, Code, Status};
use tonic_types::StatusExt;
use usage_service::{
    auth::Role,
    proto::{
        usage_service_client::UsageServiceClient, GetRequest, ListAllRequest, ReleaseRequest,
        ReserveRequest, ReserveResponse,
    },
};

/// A Reserve request whose string fields are raw bytes, so that they can
/// carry invalid UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawReserve {
    #[prost(bytes = "vec", tag = "1")]
    user_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    product_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    feature: Vec<u8>,
    #[prost(int32, tag = "4")]
    action: i32,
}

/// One generated attack.
#[derive(Debug, Clone)]
struct Hostile {
    user_id: String,
    product_id: String,
    feature: String,
    tier: Option<String>,
    page_token: String,
    action: i32,
    page_size: i32,
    raw: Vec<u8>,
}

/// Strings from every corner: any unicode, control characters, lengths on
/// both sides of the 256-byte limit, and the default feature.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\PC{0,40}",
        "[\\x00-\\x1f\\x7f]{1,8}",
        "[a-z]{255,258}",
        "\\PC{60,90}",
        Just(String::new()),
        Just("product_slot".to_owned()),
    ]
}

/// Page tokens: garbage, base64 of garbage, and forgeries of the real
/// format with random filters and keys.
fn page_token() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|b| URL_SAFE_NO_PAD.encode(b)),
        (text(), text()).prop_map(|(f, k)| URL_SAFE_NO_PAD.encode(format!("p1\u{1f}{f}\u{1f}{k}"))),
        Just(String::new()),
    ]
}

fn integer() -> impl Strategy<Value = i32> {
    prop_oneof![
        any::<i32>(),
        Just(i32::MIN),
        Just(i32::MAX),
        Just(-1),
        Just(0),
        Just(3)
    ]
}

fn hostile() -> impl Strategy<Value = Hostile> {
    (
        (text(), text(), text(), proptest::option::of(text())),
        (page_token(), integer(), integer()),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(
            |((user_id, product_id, feature, tier), (page_token, action, page_size), raw)| {
                Hostile {
                    user_id,
                    product_id,
                    feature,
                    tier,
                    page_token,
                    action,
                    page_size,
                    raw,
                }
            },
        )
}

/// Checks one answer: a refusal carries an expected code (with field
/// violations for INVALID_ARGUMENT) and wrote nothing.
async fn check<T>(
    what: &str,
    answer: Result<T, Status>,
    before: (i64, i64, i64),
    sql: &tokio_postgres::Client,
    allowed: &[Code],
) -> Result<(), TestCaseError> {
    let Err(status) = answer else {
        return Ok(());
    };
    prop_assert!(
        allowed.contains(&status.code()),
        "{what}: unexpected {status:?}"
    );
    if status.code() == Code::InvalidArgument {
        let details = status.get_error_details();
        let violations = details
            .bad_request()
            .map_or(0, |b| b.field_violations.len());
        prop_assert!(violations > 0, "{what}: no field violations in {status:?}");
    }
    prop_assert_eq!(
        rows_written(sql).await,
        before,
        "{} refused but wrote",
        what
    );
    Ok(())
}

async fn attack(
    channel: Channel,
    sql: &tokio_postgres::Client,
    token: &str,
    h: Hostile,
) -> Result<(), TestCaseError> {
    let mut client = UsageServiceClient::new(channel.clone());
    let refusals = [Code::InvalidArgument, Code::ResourceExhausted];

    let before = rows_written(sql).await;
    let reserve = ReserveRequest {
        user_id: h.user_id.clone(),
        product_id: h.product_id.clone(),
        feature: h.feature.clone(),
        action: h.action,
        ..Default::default()
    };
    let answer = client.reserve(authed(reserve, Some(token))).await;
    check("Reserve", answer, before, sql, &refusals).await?;

    let before = rows_written(sql).await;
    let release = ReleaseRequest {
        user_id: h.user_id.clone(),
        product_id: h.product_id.clone(),
        feature: h.feature.clone(),
    };
    let answer = client.release(authed(release, Some(token))).await;
    check("Release", answer, before, sql, &refusals).await?;

    let before = rows_written(sql).await;
    let get = GetRequest {
        user_id: h.user_id.clone(),
        feature: h.feature.clone(),
    };
    let answer = client.get(authed(get, Some(token))).await;
    prop_assert_eq!(rows_written(sql).await, before, "Get wrote");
    check("Get", answer, before, sql, &refusals).await?;

    let list = ListAllRequest {
        page_size: h.page_size,
        page_token: h.page_token.clone(),
        tier: h.tier.clone(),
        feature: h.feature.clone(),
        ..Default::default()
    };
    let answer = client.list_all(authed(list, Some(token))).await;
    prop_assert_eq!(rows_written(sql).await, before, "ListAll wrote");
    check("ListAll", answer, before, sql, &refusals).await?;

    // Raw bytes in the string fields: undecodable UTF-8 is INTERNAL, the
    // code gRPC specifies for a request that does not parse.
    let before = rows_written(sql).await;
    let raw = RawReserve {
        user_id: h.raw.clone(),
        product_id: h.raw.iter().rev().copied().collect(),
        feature: h.raw.get(..h.raw.len() / 2).unwrap_or_default().to_vec(),
        action: h.action,
    };
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let answer = grpc
        .unary::<RawReserve, ReserveResponse, _>(
            authed(raw, Some(token)),
            http::uri::PathAndQuery::from_static("/usage.v1.UsageService/Reserve"),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    let raw_refusals = [
        Code::InvalidArgument,
        Code::ResourceExhausted,
        Code::Internal,
    ];
    check("raw Reserve", answer, before, sql, &raw_refusals).await?;
    Ok(())
}

/// 200 generated attacks on every RPC: each call is answered with an
/// expected status, refused calls write nothing, the invariants hold and
/// the server is still serving at the end.
#[test]
fn hostile_requests_get_a_status_and_change_nothing() {
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let (server, channel, sql) = runtime.block_on(async {
        let server = TestServer::start_with_options(hs256_options()).await;
        let channel = server.channel().await;
        let sql = server.sql().await;
        (server, channel, sql)
    });
    let admin = token(Role::Admin, "fuzzer");

    let mut runner = TestRunner::new(ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&hostile(), |h| {
        runtime.block_on(attack(channel.clone(), &sql, &admin, h))
    });

    runtime.block_on(async {
        assert_eq!(health_status(channel.clone(), "").await, Some(1));
        server.assert_invariants().await;
        server.stop().await;
    });
    if let Err(err) = result {
        panic!("{err}");
    }
}
