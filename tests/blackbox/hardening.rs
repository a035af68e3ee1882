//! The attack review's findings (issue 10), each reproduced against a running server: every test
//! here failed on the code before its fix.

use std::time::Duration;

use tonic_types::StatusExt as _;
use vault_client::Error;
use vault_client::TokenSet;
use vault_client::proto::StoreTokenRequest;
use vault_client::proto::credential_vault_client::CredentialVaultClient;

use crate::helpers::*;

/// The `google.rpc.ErrorInfo` reason of a failed call.
pub fn reason(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

/// StoreToken through the generated client, so the status and its details can be read.
pub async fn raw_store(
    app: &TestApp,
    jwt: &str,
    tool: &str,
    token: TokenSet,
) -> Result<u64, tonic::Status> {
    let mut client = CredentialVaultClient::new(channel(&app.endpoint()).await);
    let mut request = tonic::Request::new(StoreTokenRequest {
        tool: tool.into(),
        token: Some(token.into()),
        ttl_seconds: 0,
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {jwt}").parse().expect("ASCII token"),
    );
    client
        .store_token(request)
        .await
        .map(|response| response.into_inner().generation)
}

#[tokio::test]
async fn store_token_needs_the_store_scope_and_an_agent_token_only_reads() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let agent_jwt = issuer.agent_token("agent-a", "alice");

    // A stolen refresh token handed in by an ordinary agent token is refused outright.
    let refused = raw_store(
        &app,
        &agent_jwt,
        "jira",
        oauth_token("at", "stolen-rt", 3600),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("vault:store"), "{refused:?}");
    let refused_admin = raw_store(
        &app,
        &issuer.admin_token("agent-a", "alice"),
        "jira",
        oauth_token("at", "rt", 3600),
    )
    .await
    .unwrap_err();
    assert_eq!(
        refused_admin.code(),
        tonic::Code::PermissionDenied,
        "admin is not store"
    );

    // The gateway stores; the agent reads with its ordinary token.
    let gateway = app.client(&issuer, "agent-a", "alice").await;
    store(&gateway, "jira", "at-1").await;
    let agent = app.client_with(&agent_jwt).await;
    assert_eq!(
        agent
            .get_token("jira", Duration::from_secs(60))
            .await
            .unwrap()
            .access_token,
        "at-1"
    );
    assert!(matches!(
        agent
            .store_token("jira", oauth_token("at-2", "rt-2", 3600), None)
            .await,
        Err(Error::PermissionDenied { .. })
    ));
}

#[tokio::test]
async fn the_store_scope_name_is_a_setting() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(&db, &issuer, &[("VAULT_STORE_SCOPE", "credentials.write")]).await;

    let default_scope = raw_store(
        &app,
        &issuer.token("agent-a", "alice"),
        "jira",
        oauth_token("at", "rt", 3600),
    )
    .await
    .unwrap_err();
    assert_eq!(default_scope.code(), tonic::Code::PermissionDenied);
    raw_store(
        &app,
        &issuer.scoped_token("agent-a", "alice", "openid credentials.write"),
        "jira",
        oauth_token("at", "rt", 3600),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn with_refresh_tokens_denied_only_access_tokens_may_be_stored() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(&db, &issuer, &[("VAULT_STORE_REFRESH_TOKENS", "deny")]).await;
    let jwt = issuer.token("agent-a", "alice");

    let refused = raw_store(&app, &jwt, "jira", oauth_token("at", "rt", 3600))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert_eq!(reason(&refused), "STORE_REFRESH_TOKEN_DENIED");

    // An access token alone is still accepted, and nothing of the refused call was kept.
    let vault = app.client_with(&jwt).await;
    assert!(matches!(
        vault.get_token("jira", Duration::ZERO).await,
        Err(Error::CredentialNotFound)
    ));
    raw_store(&app, &jwt, "jira", oauth_token("at-only", "", 3600))
        .await
        .unwrap();
    assert_eq!(
        vault
            .get_token("jira", Duration::from_secs(60))
            .await
            .unwrap()
            .access_token,
        "at-only"
    );
}

#[test]
fn a_bad_refresh_token_policy_is_named() {
    let (ok, output) = run_binary_to_exit(
        &["serve"],
        &[
            ("VAULT_DATABASE_URL", "sqlite::memory:"),
            ("VAULT_ROOT_KEY", ROOT_KEY),
            ("VAULT_JWT_ISSUER", "https://issuer.test"),
            ("VAULT_JWT_JWKS_FILE", "/nonexistent/jwks.json"),
            ("VAULT_STORE_REFRESH_TOKENS", "sometimes"),
        ],
    );
    assert!(!ok);
    assert!(output.contains("VAULT_STORE_REFRESH_TOKENS"), "{output}");
}

#[tokio::test]
async fn two_issuers_never_share_a_caller_even_with_the_same_agent_and_user() {
    let db = TestDb::new().await;
    let a = Issuer::named("https://issuer-a.test");
    let b = Issuer::named("https://issuer-b.test");
    let issuers = format!("{},{}", a.iss, b.iss);
    let jwks = format!("{},{}", a.jwks_path.display(), b.jwks_path.display());
    let app = spawn_with(
        &db,
        &a,
        &[
            ("VAULT_JWT_ISSUER", issuers.as_str()),
            ("VAULT_JWT_JWKS_FILE", jwks.as_str()),
        ],
    )
    .await;
    let from_a = app.client_with(&a.token("agent-a", "alice")).await;
    store(&from_a, "jira", "a-secret").await;

    let from_b = app.client_with(&b.token("agent-a", "alice")).await;
    assert!(matches!(
        from_b.get_token("jira", Duration::ZERO).await,
        Err(Error::CredentialNotFound)
    ));
    // Issuer B's admin cannot reach issuer A's agent either.
    let b_admin = app.client_with(&b.admin_token("agent-a", "alice")).await;
    let revoked = b_admin
        .revoke_for(owner("agent-a", "alice"), Some("jira"), false)
        .await
        .unwrap();
    assert_eq!(revoked.revoked, 0);
    assert_eq!(access_token(&from_a, "jira").await, "a-secret");

    // B stores its own; each reads its own.
    store(&from_b, "jira", "b-secret").await;
    assert_eq!(access_token(&from_b, "jira").await, "b-secret");
    assert_eq!(access_token(&from_a, "jira").await, "a-secret");

    // A token claiming issuer A but signed with issuer B's key is refused, even when B's key
    // carries a kid that issuer A also publishes.
    let mut forged_claims = a.claims("agent-a", "alice");
    forged_claims["scope"] = serde_json::json!("vault:store");
    let forged = b.keys[0].sign(&forged_claims);
    let forger = app.client_with(&forged).await;
    assert!(matches!(
        forger.get_token("jira", Duration::ZERO).await,
        Err(Error::Unauthenticated(_))
    ));
    let impostor = SigningKey::ed25519(&a.keys[0].kid);
    let mut b = b;
    b.keys.push(impostor);
    b.publish();
    let same_kid = b.keys[2].sign(&forged_claims);
    let forger = app.client_with(&same_kid).await;
    assert!(
        matches!(
            forger.get_token("jira", Duration::ZERO).await,
            Err(Error::Unauthenticated(_))
        ),
        "issuer A's kid in issuer B's key set verifies nothing for A"
    );
}

#[tokio::test]
async fn an_iss_array_or_an_audience_that_only_resembles_ours_is_refused() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    for (claim, value) in [
        ("iss", serde_json::json!([ISS])),
        ("aud", serde_json::json!("credential-vault-staging")),
        ("aud", serde_json::json!(["credential", "vault"])),
    ] {
        let mut claims = issuer.claims("agent-a", "alice");
        claims[claim] = value.clone();
        let vault = app.client_with(&issuer.keys[0].sign(&claims)).await;
        assert!(
            matches!(
                vault.get_token("jira", Duration::ZERO).await,
                Err(Error::Unauthenticated(_))
            ),
            "{claim} = {value}"
        );
    }
}

#[tokio::test]
async fn agents_stored_before_issuer_bound_identities_are_adopted_by_the_one_issuer() {
    use vault_server::crypto::RootKey;
    use vault_server::ids::{AgentId, IssuerId};

    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let vault = app.client(&issuer, "agent-a", "alice").await;
    store(&vault, "jira", "kept").await;
    app.stop().await;

    // Turn the registry row into what an older version left: no issuer, and the agent key
    // wrapped without one.
    let root = {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(ROOT_KEY)
            .unwrap();
        RootKey::from_bytes(bytes.try_into().unwrap())
    };
    let agent = AgentId::parse("agent-a").unwrap();
    let mut conn = db.connect().await;
    let wrapped: Vec<u8> =
        sqlx::query_scalar("SELECT wrapped_key FROM vault.agents WHERE agent_id = 'agent-a'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    let key = root
        .unwrap_agent_key(&IssuerId::parse(ISS).unwrap(), &agent, 1, &wrapped)
        .unwrap();
    sqlx::query("UPDATE vault.agents SET issuer = '', wrapped_key = $1 WHERE agent_id = 'agent-a'")
        .bind(root.wrap_legacy_agent_key(&agent, &key).unwrap())
        .execute(&mut conn)
        .await
        .unwrap();

    // With two issuers there is no safe owner: startup stops and names the setting.
    let other = Issuer::named("https://other.test");
    let issuers = format!("{},{}", issuer.iss, other.iss);
    let jwks = format!(
        "{},{}",
        issuer.jwks_path.display(),
        other.jwks_path.display()
    );
    let refused = try_spawn(
        &db,
        &issuer,
        &[
            ("VAULT_JWT_ISSUER", issuers.as_str()),
            ("VAULT_JWT_JWKS_FILE", jwks.as_str()),
        ],
    )
    .await
    .err()
    .expect("startup refuses");
    assert!(
        refused.to_string().contains("VAULT_JWT_ISSUER"),
        "{refused}"
    );

    // With the one issuer, the agent is adopted and its credential still opens.
    let app = spawn(&db, &issuer).await;
    let vault = app.client(&issuer, "agent-a", "alice").await;
    assert_eq!(access_token(&vault, "jira").await, "kept");
    let issuer_column: String =
        sqlx::query_scalar("SELECT issuer FROM vault.agents WHERE agent_id = 'agent-a'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(issuer_column, ISS);
}

#[tokio::test]
async fn a_key_removed_from_the_jwks_stops_verifying_within_the_refresh_period() {
    let db = TestDb::new().await;
    let mut issuer = Issuer::new();
    let app = spawn_with(&db, &issuer, &[("VAULT_JWKS_REFRESH_SECONDS", "1")]).await;
    let withdrawn_token = issuer.keys[0].sign(&issuer.claims("agent-a", "alice"));
    let kept_token = issuer.keys[1].sign(&issuer.claims("agent-a", "alice"));
    let withdrawn = app.client_with(&withdrawn_token).await;
    let kept = app.client_with(&kept_token).await;
    // Verified (and cached) before the key goes.
    assert!(matches!(
        withdrawn.get_token("jira", Duration::ZERO).await,
        Err(Error::CredentialNotFound)
    ));

    issuer.keys.remove(0);
    issuer.publish();

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        match withdrawn.get_token("jira", Duration::ZERO).await {
            Err(Error::Unauthenticated(_)) => break,
            Err(Error::CredentialNotFound) if std::time::Instant::now() < deadline => {
                tokio::task::yield_now().await;
            }
            other => panic!("the withdrawn key still verifies: {other:?}"),
        }
    }
    // The server kept running, and the remaining key still verifies.
    assert!(matches!(
        kept.get_token("jira", Duration::ZERO).await,
        Err(Error::CredentialNotFound)
    ));
}

#[test]
fn plaintext_grpc_on_a_network_address_does_not_start_silently() {
    // Refused while reading the settings: nothing is bound, nothing is sent.
    let (ok, output) = run_binary_to_exit(
        &["serve"],
        &[
            ("VAULT_LISTEN", "0.0.0.0:0"),
            ("VAULT_DATABASE_URL", "sqlite::memory:"),
            ("VAULT_ROOT_KEY", ROOT_KEY),
            ("VAULT_JWT_ISSUER", ISS),
            ("VAULT_JWT_JWKS_FILE", "/nonexistent/jwks.json"),
        ],
    );
    assert!(!ok);
    assert!(output.contains("VAULT_ALLOW_PLAINTEXT"), "{output}");
}

#[test]
fn a_database_without_verified_tls_is_refused_when_tls_is_required() {
    // Refused while reading the settings, before any connection is attempted.
    let (ok, output) = run_binary_to_exit(
        &["migrate"],
        &[
            (
                "VAULT_DATABASE_URL",
                "postgres://vault@db.vault.invalid/vault?sslmode=require",
            ),
            ("VAULT_DATABASE_REQUIRE_TLS", "true"),
        ],
    );
    assert!(!ok);
    assert!(output.contains("VAULT_DATABASE_REQUIRE_TLS"), "{output}");
    assert!(output.contains("verify-full"), "{output}");
}

/// Two login roles for one test database. Dropping this drops the database first (the owner
/// owns objects in it), then the roles.
struct DatabaseRoles {
    owner: String,
    server: String,
    admin_url: String,
    db_name: String,
    db_url: String,
}

impl DatabaseRoles {
    /// An owner that may create roles and schemas in `db`, and a serving login with nothing.
    async fn create(db: &TestDb) -> Self {
        let admin_url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let roles = Self {
            owner: format!("{}_owner", db.name),
            server: format!("{}_server", db.name),
            admin_url,
            db_name: db.name.clone(),
            db_url: db.url.clone(),
        };
        let mut admin = db.connect().await;
        sqlx::raw_sql(&format!(
            "CREATE ROLE {owner} LOGIN CREATEROLE;
             CREATE ROLE {server} LOGIN;
             GRANT CREATE ON DATABASE {db} TO {owner};
             REVOKE TEMPORARY ON DATABASE {db} FROM PUBLIC;",
            owner = roles.owner,
            server = roles.server,
            db = db.name,
        ))
        .execute(&mut admin)
        .await
        .unwrap();
        roles
    }

    fn url(db: &TestDb, role: &str) -> String {
        let mut url = url::Url::parse(&db.url).unwrap();
        url.set_username(role).unwrap();
        url.set_password(None).unwrap();
        url.to_string()
    }
}

impl Drop for DatabaseRoles {
    fn drop(&mut self) {
        // The database first: the owner owns objects in it.
        let sql = format!(
            "DROP ROLE IF EXISTS {}; DROP ROLE IF EXISTS {}",
            self.server, self.owner
        );
        drop_database(&self.admin_url, &self.db_url, &self.db_name, Some(sql));
    }
}

fn permission_denied<T: std::fmt::Debug>(result: Result<T, sqlx::Error>, what: &str) {
    match result {
        Err(sqlx::Error::Database(err)) => {
            assert_eq!(err.code().as_deref(), Some("42501"), "{what}: {err}")
        }
        other => panic!("{what}: expected a permission error, got {other:?}"),
    }
}

#[tokio::test]
async fn the_serving_role_owns_nothing_runs_no_ddl_and_reaches_one_agent_at_a_time() {
    let db = TestDb::new().await;
    let roles = DatabaseRoles::create(&db).await;
    let owner_url = DatabaseRoles::url(&db, &roles.owner);
    let server_url = DatabaseRoles::url(&db, &roles.server);
    let issuer = Issuer::new();

    // `migrate` as the owner makes the serving login a member of the serving group.
    let (ok, output) = run_binary_to_exit(
        &["migrate"],
        &[
            ("VAULT_DATABASE_URL", server_url.as_str()),
            ("VAULT_DATABASE_MIGRATE_URL", owner_url.as_str()),
            ("VAULT_DATABASE_SERVING_ROLE", roles.server.as_str()),
        ],
    );
    assert!(ok, "{output}");

    // The server connects as the serving role and never migrates.
    let app = spawn_with(
        &db,
        &issuer,
        &[
            ("VAULT_DATABASE_URL", server_url.as_str()),
            ("VAULT_DATABASE_MIGRATE_URL", owner_url.as_str()),
        ],
    )
    .await;
    for agent in ["agent-a", "agent-b"] {
        let vault = app.client(&issuer, agent, "alice").await;
        vault
            .store_token(
                "jira",
                oauth_token(&format!("{agent}-secret"), "rt", 3600),
                None,
            )
            .await
            .unwrap();
        assert_eq!(
            access_token(&vault, "jira").await,
            format!("{agent}-secret")
        );
    }
    let (a_schema, b_schema) = (schema_of("agent-a"), schema_of("agent-b"));

    let mut server = <sqlx::PgConnection as sqlx::Connection>::connect(&server_url)
        .await
        .unwrap();
    let a_role: String = sqlx::query_scalar("SELECT vault.agent_role($1)")
        .bind(&a_schema)
        .fetch_one(&mut server)
        .await
        .unwrap();
    let owned: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_namespace WHERE nspowner = current_user::regrole)
              + (SELECT count(*) FROM pg_class WHERE relowner = current_user::regrole)",
    )
    .fetch_one(&mut server)
    .await
    .unwrap();
    assert_eq!(owned, 0, "the serving role owns nothing");

    permission_denied(
        sqlx::raw_sql("CREATE TABLE public.planted (i int)")
            .execute(&mut server)
            .await,
        "CREATE TABLE",
    );
    permission_denied(
        sqlx::raw_sql("CREATE SCHEMA planted")
            .execute(&mut server)
            .await,
        "CREATE SCHEMA",
    );
    permission_denied(
        sqlx::raw_sql("CREATE TEMP TABLE planted (i int)")
            .execute(&mut server)
            .await,
        "CREATE TEMP TABLE",
    );
    permission_denied(
        sqlx::raw_sql(&format!("DROP SCHEMA \"{a_schema}\" CASCADE"))
            .execute(&mut server)
            .await,
        "DROP SCHEMA of an agent",
    );
    permission_denied(
        sqlx::raw_sql(&format!("SELECT * FROM \"{a_schema}\".credentials"))
            .execute(&mut server)
            .await,
        "an agent's rows without switching to its role",
    );
    let mut tx = sqlx::Connection::begin(&mut server).await.unwrap();
    sqlx::raw_sql(&format!("SET LOCAL ROLE \"{a_role}\""))
        .execute(&mut *tx)
        .await
        .unwrap();
    let own: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM \"{a_schema}\".credentials"))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(own, 1, "its own rows, under its role");
    permission_denied(
        sqlx::raw_sql(&format!("SELECT * FROM \"{b_schema}\".credentials"))
            .execute(&mut *tx)
            .await,
        "another agent's rows under SET LOCAL ROLE",
    );
    drop(tx);

    // The SECURITY DEFINER function checks the agent id like the server does.
    let hostile = sqlx::query("SELECT * FROM vault.create_agent($1, 'evil\u{7}', 'k', 1, 'kcv')")
        .bind(ISS)
        .execute(&mut server)
        .await;
    assert!(
        matches!(&hostile, Err(sqlx::Error::Database(err)) if err.code().as_deref() == Some("22023")),
        "{hostile:?}"
    );

    // The sweep's schedule is the serving role's to move (control migration 0016's column
    // grant): the stores above set it, and a sweep deletes what expired and moves it on.
    let scheduled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM vault.agents WHERE sweep_due IS NOT NULL")
            .fetch_one(&mut server)
            .await
            .unwrap();
    assert_eq!(scheduled, 2, "each store scheduled its agent's sweep");
    permission_denied(
        sqlx::raw_sql("UPDATE vault.agents SET wrapped_key = wrapped_key")
            .execute(&mut server)
            .await,
        "the registry's other columns",
    );
    drop(server);
    fast_forward(&db, Duration::from_secs(30 * 86_400 + 1)).await;
    let admin = app.admin(&issuer, "ops", "operator").await;
    assert_eq!(admin.sweep(0, false).await.unwrap().swept, 2);
    app.stop().await;
}

#[tokio::test]
async fn a_flood_of_new_agent_ids_is_throttled_per_issuer() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(&db, &issuer, &[("VAULT_AGENT_CREATION_PER_MINUTE", "2")]).await;
    for agent in ["agent-1", "agent-2"] {
        raw_store(
            &app,
            &issuer.token(agent, "alice"),
            "jira",
            oauth_token("at", "rt", 3600),
        )
        .await
        .unwrap();
    }
    let refused = raw_store(
        &app,
        &issuer.token("agent-3", "alice"),
        "jira",
        oauth_token("at", "rt", 3600),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert_eq!(reason(&refused), "AGENT_CREATION_RATE_LIMITED");
    assert!(
        refused.get_error_details().retry_info().is_some(),
        "says when to retry"
    );
    let mut conn = db.connect().await;
    let agents: i64 = sqlx::query_scalar("SELECT count(*) FROM vault.agents")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(agents, 2, "no schema for the refused agent");
    // Known agents are not new: they keep working.
    raw_store(
        &app,
        &issuer.token("agent-1", "bob"),
        "jira",
        oauth_token("at", "rt", 3600),
    )
    .await
    .unwrap();
}
