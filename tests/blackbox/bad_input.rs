//! Hostile or malformed requests: INVALID_ARGUMENT naming the field, never a panic, and the
//! server stays healthy.

use std::time::{Duration, UNIX_EPOCH};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt as _;
use vault_client::proto::{GetTokenRequest, StoreTokenRequest};
use vault_client::{Error, Owner};

use crate::helpers::*;

fn field_of<T: std::fmt::Debug>(result: Result<T, Error>) -> String {
    match result {
        Err(Error::InvalidArgument { field, message }) => {
            assert!(
                message.starts_with(&field),
                "message names the field: {message}"
            );
            field
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
}

#[tokio::test]
async fn each_bad_field_is_named() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let vault = app.client(&issuer, "agent-a", "alice").await;
    let good = || oauth_token("at", "rt", 3600);

    assert_eq!(field_of(vault.store_token("", good(), None).await), "tool");
    assert_eq!(
        field_of(vault.store_token("jira tool", good(), None).await),
        "tool"
    );
    assert_eq!(
        field_of(vault.store_token("jira/x", good(), None).await),
        "tool"
    );
    assert_eq!(
        field_of(vault.store_token("ツール", good(), None).await),
        "tool"
    );
    assert_eq!(
        field_of(vault.store_token(&"x".repeat(129), good(), None).await),
        "tool"
    );
    assert!(
        vault
            .store_token(&"x".repeat(128), good(), None)
            .await
            .is_ok(),
        "128 is allowed"
    );
    assert_eq!(
        field_of(
            vault
                .store_token("jira", oauth_token("", "rt", 3600), None)
                .await
        ),
        "token.access_token"
    );
    let huge = "a".repeat(16 * 1024 + 1);
    assert_eq!(
        field_of(
            vault
                .store_token("jira", oauth_token(&huge, "rt", 3600), None)
                .await
        ),
        "token.access_token"
    );
    assert!(
        vault
            .store_token(
                "jira",
                oauth_token(&"a".repeat(16 * 1024), "rt", 3600),
                None
            )
            .await
            .is_ok()
    );
    assert_eq!(
        field_of(
            vault
                .store_token("jira", oauth_token("at", &huge, 3600), None)
                .await
        ),
        "token.refresh_token"
    );
    // A negative TTL cannot be written with the typed client's `Duration`: send it raw.
    let negative_ttl = vault
        .raw()
        .store_token(StoreTokenRequest {
            tool: "jira".into(),
            token: Some(good().into()),
            ttl_seconds: -1,
        })
        .await
        .map_err(Error::from);
    assert_eq!(field_of(negative_ttl), "ttl_seconds");
    let mut bad_time = good();
    bad_time.expires_at = Some(UNIX_EPOCH - Duration::from_secs(5));
    assert_eq!(
        field_of(vault.store_token("jira", bad_time, None).await),
        "token.expires_at"
    );
    let mut bad_scope = good();
    bad_scope.scopes = vec!["read write".into()];
    assert_eq!(
        field_of(vault.store_token("jira", bad_scope, None).await),
        "token.scopes"
    );

    let missing = vault
        .raw()
        .store_token(StoreTokenRequest {
            tool: "jira".into(),
            token: None,
            ttl_seconds: 0,
        })
        .await
        .map_err(Error::from);
    assert_eq!(field_of(missing), "token");
    assert_eq!(field_of(vault.get_token("", Duration::ZERO).await), "tool");
    let negative_margin = vault
        .raw()
        .get_token(GetTokenRequest {
            tool: "jira".into(),
            min_valid_seconds: -1,
        })
        .await
        .map_err(Error::from);
    assert_eq!(field_of(negative_margin), "min_valid_seconds");
    assert_eq!(field_of(vault.refresh("a b", None).await), "tool");
    assert_eq!(field_of(vault.revoke(Some("a b"), false).await), "tool");
    let bad_user = vault
        .revoke_for(
            Owner {
                user_id: Some("x\u{1}y".into()),
                ..Owner::default()
            },
            None,
            false,
        )
        .await;
    assert_eq!(field_of(bad_user), "user_id");
}

#[tokio::test]
async fn a_request_over_one_mebibyte_is_refused_naming_the_limit_and_the_server_stays_healthy() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let vault = app.client(&issuer, "agent-a", "alice").await;

    let mut token = oauth_token("at", "rt", 3600);
    token.scopes = vec!["s".repeat(1024); 1100];
    let result = vault
        .raw()
        .store_token(StoreTokenRequest {
            tool: "jira".into(),
            token: Some(token.into()),
            ttl_seconds: 0,
        })
        .await;
    let status = result.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    let info = status.get_error_details().error_info().cloned();
    assert_eq!(
        info.as_ref().map(|i| i.reason.as_str()),
        Some("REQUEST_TOO_LARGE"),
        "{status:?}"
    );
    assert_eq!(
        info.unwrap()
            .metadata
            .get("limit_bytes")
            .map(String::as_str),
        Some("1048576")
    );
    match Error::from(status) {
        Error::ResourceExhausted {
            reason, message, ..
        } => {
            assert_eq!(reason, vault_client::ErrorReason::RequestTooLarge);
            assert!(message.contains("at most 1048576 bytes"), "{message}");
        }
        other => panic!("expected ResourceExhausted, got {other:?}"),
    }

    let big_header = "x".repeat(64 * 1024);
    let mut refused = vault.raw();
    let mut request = tonic::Request::new(GetTokenRequest {
        tool: "jira".into(),
        min_valid_seconds: 0,
    });
    request
        .metadata_mut()
        .insert("x-padding", big_header.parse().unwrap());
    assert!(
        refused.get_token(request).await.is_err(),
        "oversized headers are refused"
    );

    let mut health = HealthClient::new(channel(&app.endpoint()).await);
    let status = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let vault = app.client(&issuer, "agent-a", "alice").await;
    store_and_read_back(&vault, "jira", "at").await;
}
