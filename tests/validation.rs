//! Malformed requests are refused with INVALID_ARGUMENT naming the field, and
//! write nothing.

mod common;

use common::{count, TestServer};
use tonic::{Code, Status};
use tonic_types::StatusExt;
use usage_service::proto::{GetRequest, ListAllRequest, ReleaseRequest, ReserveRequest};

/// The fields named in the status's BadRequest details.
fn violated_fields(status: &Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    let bad_request = details
        .bad_request()
        .expect("BadRequest details are attached");
    bad_request
        .field_violations
        .iter()
        .map(|v| v.field.clone())
        .collect()
}

/// Every malformed identifier in Reserve, Release and Get is refused with the
/// field named, and no row of any table is written by any of them.
#[tokio::test]
async fn malformed_identifiers_are_refused_and_write_nothing() {
    let server = TestServer::start().await;
    let mut client = server.client().await;

    let too_long = "x".repeat(257);
    let cases: Vec<(&str, &str, &str, &str)> = vec![
        // (user_id, product_id, feature, field expected)
        ("", "p1", "", "user_id"),
        (&too_long, "p1", "", "user_id"),
        ("bad\nuser", "p1", "", "user_id"),
        ("bad\u{0}user", "p1", "", "user_id"),
        ("u1", "", "", "product_id"),
        ("u1", &too_long, "", "product_id"),
        ("u1", "p\t1", "", "product_id"),
        ("u1", "p1", "no_such_feature", "feature"),
        ("u1", "p1", "bad\rfeature", "feature"),
    ];
    for (user_id, product_id, feature, field) in &cases {
        let reserve = client
            .reserve(ReserveRequest {
                user_id: user_id.to_string(),
                product_id: product_id.to_string(),
                feature: feature.to_string(),
                action: 0,
                hold_ttl: None,
            })
            .await
            .unwrap_err();
        assert_eq!(
            violated_fields(&reserve),
            vec![field.to_string()],
            "reserve {user_id:?} {product_id:?}"
        );

        let release = client
            .release(ReleaseRequest {
                user_id: user_id.to_string(),
                product_id: product_id.to_string(),
                feature: feature.to_string(),
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&release), vec![field.to_string()]);

        if *field != "product_id" {
            let get = client
                .get(GetRequest {
                    user_id: user_id.to_string(),
                    feature: feature.to_string(),
                })
                .await
                .unwrap_err();
            assert_eq!(violated_fields(&get), vec![field.to_string()]);
        }
    }

    let sql = server.sql().await;
    for table in ["user_tier_features", "slots", "usage_events"] {
        assert_eq!(
            count(&sql, &format!("SELECT count(*) FROM {table}")).await,
            0,
            "{table}"
        );
    }
    server.stop().await;
}

/// A request with several bad fields names them all at once, and an unknown
/// action value is refused.
#[tokio::test]
async fn all_violations_are_reported_together() {
    let server = TestServer::start().await;
    let mut client = server.client().await;

    let status = client
        .reserve(ReserveRequest {
            user_id: String::new(),
            product_id: String::new(),
            feature: String::new(),
            action: 42,
            hold_ttl: None,
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&status),
        vec!["user_id", "product_id", "action"]
    );

    let bad_request_id = {
        let mut request = tonic::Request::new(ReserveRequest {
            user_id: "u".into(),
            product_id: "p".into(),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("x-request-id", "x".repeat(200).parse().unwrap());
        client.reserve(request).await.unwrap_err()
    };
    assert_eq!(violated_fields(&bad_request_id), vec!["x-request-id"]);

    let sql = server.sql().await;
    assert_eq!(count(&sql, "SELECT count(*) FROM usage_events").await, 0);
    server.stop().await;
}

/// ListAll refuses a negative page size, a malformed token, a token issued
/// for other filters and an unknown feature.
#[tokio::test]
async fn list_all_refuses_bad_paging() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    for i in 0..3 {
        client
            .reserve(ReserveRequest {
                user_id: format!("u{i}"),
                product_id: "p".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    let negative = client
        .list_all(ListAllRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&negative), vec!["page_size"]);

    let garbage = client
        .list_all(ListAllRequest {
            page_token: "%%%not-a-token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&garbage), vec!["page_token"]);

    let first = client
        .list_all(ListAllRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    let other_filters = client
        .list_all(ListAllRequest {
            page_size: 1,
            page_token: first.next_page_token,
            tier: Some("premium".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&other_filters), vec!["page_token"]);

    let unknown = client
        .list_all(ListAllRequest {
            feature: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&unknown), vec!["feature"]);
    server.stop().await;
}
