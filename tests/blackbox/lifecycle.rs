//! The binary: startup refusals, graceful shutdown on SIGTERM, health and reflection.

use std::time::Duration;

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::*;

#[tokio::test]
async fn a_wrong_root_key_stops_startup_with_one_clear_line() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    spawn(&db, &issuer).await.stop().await;

    let pairs = settings_pairs(&db, &issuer, &[("VAULT_ROOT_KEY", OTHER_ROOT_KEY)]);
    let (ok, stderr) = run_binary_to_exit(&["serve"], &pairs);

    assert!(!ok, "must exit non-zero");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.contains("root key does not match"), "{stderr}");
    assert!(
        !stderr.contains(OTHER_ROOT_KEY) && !stderr.contains(ROOT_KEY),
        "the key itself is never printed"
    );
    assert!(
        try_spawn(&db, &issuer, &[("VAULT_ROOT_KEY", OTHER_ROOT_KEY)])
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_passphrase_root_key_works_and_a_wrong_passphrase_is_refused() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let passphrase = [
        ("VAULT_ROOT_KEY", ""),
        ("VAULT_ROOT_PASSPHRASE", "correct horse battery staple"),
    ];
    let app = spawn_with(&db, &issuer, &passphrase).await;
    app.client(&issuer, "agent-a", "alice")
        .await
        .store_token("jira", oauth_token("at", "rt", 3600), None)
        .await
        .unwrap();
    app.stop().await;

    let app = spawn_with(&db, &issuer, &passphrase).await;
    assert_eq!(
        access_token(&app.client(&issuer, "agent-a", "alice").await, "jira").await,
        "at"
    );
    app.stop().await;

    let wrong = [
        ("VAULT_ROOT_KEY", ""),
        ("VAULT_ROOT_PASSPHRASE", "incorrect horse battery staple"),
    ];
    let err = try_spawn(&db, &issuer, &wrong)
        .await
        .err()
        .expect("wrong passphrase refused");
    assert!(err.to_string().contains("root key does not match"), "{err}");
    let err = try_spawn(&db, &issuer, &[])
        .await
        .err()
        .expect("a key where a passphrase was used is refused");
    assert!(err.to_string().contains("passphrase"), "{err}");
}

#[tokio::test]
async fn a_missing_or_malformed_setting_is_named_at_startup() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let mut pairs = settings_pairs(&db, &issuer, &[]);
    pairs.retain(|(k, _)| *k != "VAULT_JWT_ISSUER");
    let (ok, stderr) = run_binary_to_exit(&["serve"], &pairs);
    assert!(!ok);
    assert!(stderr.contains("VAULT_JWT_ISSUER"), "{stderr}");

    let pairs = settings_pairs(&db, &issuer, &[("SECRETS_TTL_SECONDS", "2592001")]);
    let (ok, stderr) = run_binary_to_exit(&["serve"], &pairs);
    assert!(!ok);
    assert!(stderr.contains("SECRETS_TTL_SECONDS"), "{stderr}");
}

#[tokio::test]
async fn sigterm_reports_not_serving_drains_in_flight_calls_and_exits_zero() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let pairs = settings_pairs(&db, &issuer, &[("VAULT_SHUTDOWN_DELAY_SECONDS", "1")]);
    let mut server = start_binary(&pairs).await;
    let vault = vault_client::Client::connect(server.endpoint())
        .await
        .unwrap()
        .with_bearer(&issuer.token("agent-a", "alice"))
        .unwrap();
    store(&vault, "jira", "v1").await;
    let mut health = HealthClient::new(channel(&server.endpoint()).await);
    let serving = health
        .check(HealthCheckRequest {
            service: "vault.v1.CredentialVault".into(),
        })
        .await
        .unwrap();
    assert_eq!(serving.into_inner().status, ServingStatus::Serving as i32);

    // Hold the credential row so the next StoreToken is in flight inside the server.
    let mut lock = db.connect().await;
    let schema = schema_of("agent-a");
    sqlx::raw_sql("BEGIN").execute(&mut lock).await.unwrap();
    sqlx::raw_sql(&format!(
        "SELECT * FROM \"{schema}\".credentials FOR UPDATE"
    ))
    .execute(&mut lock)
    .await
    .unwrap();
    let in_flight_client = vault.clone();
    let in_flight = tokio::spawn(async move {
        in_flight_client
            .store_token("jira", oauth_token("v2", "rt", 3600), None)
            .await
    });
    eventually("the StoreToken waits on the row lock", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = 'vault-server' AND wait_event_type = 'Lock'
               AND datname = current_database()",
        )
        .fetch_one(&mut db.connect().await)
        .await
        .unwrap();
        waiting > 0
    })
    .await;

    server.signal("TERM");
    eventually("the vault reports NOT_SERVING", || {
        let mut health = health.clone();
        async move {
            health
                .check(HealthCheckRequest {
                    service: "vault.v1.CredentialVault".into(),
                })
                .await
                .is_ok_and(|r| r.into_inner().status == ServingStatus::NotServing as i32)
        }
    })
    .await;
    let draining = health
        .check(HealthCheckRequest {
            service: "vault.v1.CredentialVault".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        draining.into_inner().status,
        ServingStatus::NotServing as i32
    );
    assert!(server.child.try_wait().unwrap().is_none(), "still draining");
    sqlx::raw_sql("COMMIT").execute(&mut lock).await.unwrap();

    let stored = in_flight
        .await
        .unwrap()
        .expect("the in-flight call completes");
    assert!(stored.generation > 1);
    let lines = std::sync::Arc::clone(&server.stderr_lines);
    let status = tokio::task::spawn_blocking(move || server.wait_exit(Duration::from_secs(15)))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    let logged = lines.lock().unwrap().join("\n");
    assert!(
        logged.contains("draining in-flight calls") && logged.contains("stopped"),
        "{logged}"
    );
}

#[tokio::test]
async fn server_reflection_v1_and_v1alpha_list_the_vault_service() {
    use tokio_stream::StreamExt as _;
    use tonic_reflection::pb::{v1, v1alpha};
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;

    let mut client =
        v1::server_reflection_client::ServerReflectionClient::new(channel(&app.endpoint()).await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.next().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"vault.v1.CredentialVault".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(
        channel(&app.endpoint()).await,
    );
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "vault.v1.CredentialVault".into(),
            ),
        ),
    };
    let mut stream = alpha
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = stream.next().await.unwrap().unwrap();
    assert!(matches!(
        response.message_response,
        Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()
    ));
}

#[tokio::test]
async fn migrate_and_sweep_commands_work_against_the_database() {
    let db = TestDb::new().await;
    let pairs = [("VAULT_DATABASE_URL", db.url.as_str())];
    let (ok, stderr) = run_binary_to_exit(&["migrate"], &pairs);
    assert!(ok, "{stderr}");
    let (ok, stderr) = run_binary_to_exit(&["migrate"], &pairs);
    assert!(ok, "migrate is idempotent: {stderr}");
    let (ok, stderr) = run_binary_to_exit(&["sweep", "--dry-run"], &pairs);
    assert!(ok, "{stderr}");
}

/// Every file that reflection serves for `request`, and their imports, as a client resolves them.
async fn reflected_files(
    client: &mut tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient<
        tonic::transport::Channel,
    >,
    symbol: &str,
) -> Vec<prost_types::FileDescriptorProto> {
    use prost::Message as _;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut files: Vec<prost_types::FileDescriptorProto> = Vec::new();
    let mut wanted = vec![MessageRequest::FileContainingSymbol(symbol.into())];
    while let Some(request) = wanted.pop() {
        let mut stream = client
            .server_reflection_info(tokio_stream::iter([ServerReflectionRequest {
                host: String::new(),
                message_request: Some(request.clone()),
            }]))
            .await
            .unwrap()
            .into_inner();
        let response = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::FileDescriptorResponse(found)) = response.message_response else {
            panic!("reflection cannot resolve {request:?}: {response:?}");
        };
        for bytes in found.file_descriptor_proto {
            let file = prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap();
            if files.iter().any(|f| f.name == file.name) {
                continue;
            }
            for import in &file.dependency {
                if !files.iter().any(|f| f.name() == import) {
                    wanted.push(MessageRequest::FileByFilename(import.clone()));
                }
            }
            files.push(file);
        }
    }
    files
}

/// What grpcurl does with an error: it looks the detail's type up through reflection and
/// decodes it. Without `google/rpc/error_details.proto` served, grpcurl printed the ErrorInfo as
/// base64 ("google.rpc.ErrorInfo is not recognized"). `buf curl` is no help here: it decodes
/// details only of types compiled into buf itself, whatever reflection serves.
#[tokio::test]
async fn a_reflection_client_decodes_an_errors_details_with_the_types_reflection_serves() {
    use prost::Message as _;
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let vault = app.client(&issuer, "agent-a", "alice").await;
    let status = vault
        .raw()
        .get_token(vault_client::proto::GetTokenRequest {
            tool: "jira".into(),
            min_valid_seconds: 0,
        })
        .await
        .unwrap_err();
    let details = tonic_types::pb::Status::decode(status.details())
        .unwrap()
        .details;
    assert_eq!(details.len(), 1, "{status:?}");
    let type_name = details[0].type_url.rsplit('/').next().unwrap().to_string();
    assert_eq!(type_name, "google.rpc.ErrorInfo");

    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            channel(&app.endpoint()).await,
        );
    let files = reflected_files(&mut reflection, &type_name).await;
    let names: Vec<&str> = files.iter().map(|f| f.name()).collect();
    assert!(
        names.contains(&"google/rpc/error_details.proto"),
        "{names:?}"
    );
    assert!(
        !reflected_files(&mut reflection, "google.rpc.Status")
            .await
            .is_empty(),
        "google/rpc/status.proto is served too"
    );

    let pool =
        prost_reflect::DescriptorPool::from_file_descriptor_set(prost_types::FileDescriptorSet {
            file: files,
        })
        .unwrap();
    let info = prost_reflect::DynamicMessage::decode(
        pool.get_message_by_name(&type_name).unwrap(),
        details[0].value.as_slice(),
    )
    .unwrap();
    let field = |name: &str| {
        info.get_field_by_name(name)
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap()
    };
    assert_eq!(field("reason"), "CREDENTIAL_NOT_FOUND");
    assert_eq!(field("domain"), "vault.v1");
}
