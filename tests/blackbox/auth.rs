//! Caller authentication: every refusal the issue names, and the keys that are accepted.

use std::time::Duration;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use vault_client::Error;

use crate::helpers::*;

async fn get_with(app: &TestApp, token: &str) -> Result<vault_client::Token, Error> {
    app.client_with(token)
        .await
        .get_token("jira", Duration::ZERO)
        .await
}

/// A server with one stored credential for (agent-a, alice).
async fn fixture() -> (TestDb, Issuer, TestApp) {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    app.client(&issuer, "agent-a", "alice")
        .await
        .store_token("jira", oauth_token("at", "rt", 3600), None)
        .await
        .unwrap();
    (db, issuer, app)
}

fn assert_refused(result: Result<vault_client::Token, Error>, why: &str) {
    assert!(
        matches!(result, Err(Error::Unauthenticated(_))),
        "{why}: {result:?}"
    );
}

fn unsigned(header: &Value, claims: &Value) -> String {
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.", b64(header), b64(claims))
}

#[tokio::test]
async fn eddsa_and_es256_tokens_are_accepted() {
    let (_db, issuer, app) = fixture().await;
    let claims = issuer.claims("agent-a", "alice");
    for key in &issuer.keys {
        let token = get_with(&app, &key.sign(&claims)).await.unwrap();
        assert_eq!(token.access_token, "at", "{:?}", key.alg);
    }
}

#[tokio::test]
async fn a_call_without_a_token_is_refused() {
    let (_db, _issuer, app) = fixture().await;
    let anonymous = vault_client::Client::connect(app.endpoint()).await.unwrap();
    let result = anonymous.get_token("jira", Duration::ZERO).await;
    assert!(
        matches!(&result, Err(Error::Unauthenticated(m)) if m.contains("authorization")),
        "{result:?}"
    );
    assert_refused(get_with(&app, "not-a-jwt").await, "garbage");
}

#[tokio::test]
async fn an_expired_token_is_refused_past_the_leeway_only() {
    let (_db, issuer, app) = fixture().await;
    let mut claims = issuer.claims("agent-a", "alice");
    claims["iat"] = json!(now() - 1000);
    claims["exp"] = json!(now() - 400);
    assert_refused(
        get_with(&app, &issuer.keys[0].sign(&claims)).await,
        "expired 400 s ago",
    );
    claims["exp"] = json!(now() - 100);
    assert!(
        get_with(&app, &issuer.keys[0].sign(&claims)).await.is_ok(),
        "within the 300 s leeway"
    );
}

#[tokio::test]
async fn a_token_for_another_audience_is_refused() {
    let (_db, issuer, app) = fixture().await;
    let mut claims = issuer.claims("agent-a", "alice");
    claims["aud"] = json!("some-other-service");
    assert_refused(
        get_with(&app, &issuer.keys[0].sign(&claims)).await,
        "wrong aud",
    );
    claims["aud"] = json!(["some-other-service", AUDIENCE]);
    assert!(
        get_with(&app, &issuer.keys[0].sign(&claims)).await.is_ok(),
        "aud array containing ours"
    );
    claims.as_object_mut().unwrap().remove("aud");
    assert_refused(
        get_with(&app, &issuer.keys[0].sign(&claims)).await,
        "no aud",
    );
}

#[tokio::test]
async fn a_token_from_an_untrusted_issuer_is_refused() {
    let (_db, issuer, app) = fixture().await;
    let mut claims = issuer.claims("agent-a", "alice");
    claims["iss"] = json!("https://evil.example");
    assert_refused(
        get_with(&app, &issuer.keys[0].sign(&claims)).await,
        "wrong iss",
    );
}

#[tokio::test]
async fn a_token_with_an_unknown_kid_is_refused() {
    let (_db, issuer, app) = fixture().await;
    let stranger = SigningKey::ed25519("not-published");
    assert_refused(
        get_with(&app, &stranger.sign(&issuer.claims("agent-a", "alice"))).await,
        "unknown kid",
    );
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = None;
    let no_kid = jsonwebtoken::encode(
        &header,
        &issuer.claims("agent-a", "alice"),
        &issuer.keys[0].encoding,
    )
    .unwrap();
    assert_refused(get_with(&app, &no_kid).await, "no kid");
}

#[tokio::test]
async fn a_forged_signature_is_refused() {
    let (_db, issuer, app) = fixture().await;
    // Same kid as a published key, signed by a different private key.
    let impostor = SigningKey::ed25519(&issuer.keys[0].kid);
    assert_refused(
        get_with(&app, &impostor.sign(&issuer.claims("agent-a", "alice"))).await,
        "forged",
    );
    // A genuine token whose claims were edited after signing.
    let genuine = issuer.token("agent-a", "bob");
    let mut parts: Vec<&str> = genuine.split('.').collect();
    let edited = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(issuer.claims("agent-a", "alice").to_string());
    parts[1] = &edited;
    assert_refused(get_with(&app, &parts.join(".")).await, "edited claims");
}

#[tokio::test]
async fn alg_none_is_refused() {
    let (_db, issuer, app) = fixture().await;
    let claims = issuer.claims("agent-a", "alice");
    for alg in ["none", "None", "NONE"] {
        let token = unsigned(
            &json!({"alg": alg, "typ": "JWT", "kid": issuer.keys[0].kid}),
            &claims,
        );
        assert_refused(get_with(&app, &token).await, alg);
    }
}

#[tokio::test]
async fn hs256_keyed_with_the_public_key_is_refused() {
    let (_db, issuer, app) = fixture().await;
    let claims = issuer.claims("agent-a", "alice");
    for key in &issuer.keys {
        let jwk_x = key.jwk["x"].as_str().unwrap().to_string();
        for secret in [
            key.public_raw.clone(),
            jwk_x.into_bytes(),
            key.jwk.to_string().into_bytes(),
        ] {
            let mut header = Header::new(Algorithm::HS256);
            header.kid = Some(key.kid.clone());
            let token =
                jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&secret)).unwrap();
            assert_refused(get_with(&app, &token).await, "HS256 with public key");
        }
    }
}

#[tokio::test]
async fn a_token_living_longer_than_the_maximum_is_refused() {
    let (_db, issuer, app) = fixture().await;
    let mut claims = issuer.claims("agent-a", "alice");
    claims["iat"] = json!(now());
    claims["exp"] = json!(now() + 86_401);
    assert_refused(
        get_with(&app, &issuer.keys[0].sign(&claims)).await,
        "lifetime over 86400 s",
    );
    claims.as_object_mut().unwrap().remove("iat");
    assert_refused(
        get_with(&app, &issuer.keys[0].sign(&claims)).await,
        "no iat, exp too far",
    );
    claims["iat"] = json!(now() + 3600);
    claims["exp"] = json!(now() + 4000);
    assert_refused(
        get_with(&app, &issuer.keys[0].sign(&claims)).await,
        "issued in the future",
    );
}

#[tokio::test]
async fn a_token_without_the_agent_claim_or_sub_is_refused() {
    let (_db, issuer, app) = fixture().await;
    let mut claims = issuer.claims("agent-a", "alice");
    claims.as_object_mut().unwrap().remove("agent_id");
    assert_refused(
        get_with(&app, &issuer.keys[0].sign(&claims)).await,
        "no agent claim",
    );
    let mut claims = issuer.claims("agent-a", "alice");
    claims.as_object_mut().unwrap().remove("sub");
    assert_refused(
        get_with(&app, &issuer.keys[0].sign(&claims)).await,
        "no sub",
    );
    let mut claims = issuer.claims("agent-a", "alice");
    claims["agent_id"] = json!(42);
    assert_refused(
        get_with(&app, &issuer.keys[0].sign(&claims)).await,
        "agent claim not a string",
    );
    let mut claims = issuer.claims("agent-a", "alice");
    claims.as_object_mut().unwrap().remove("exp");
    assert_refused(
        get_with(&app, &issuer.keys[0].sign(&claims)).await,
        "no exp",
    );
}

#[tokio::test]
async fn the_agent_claim_name_is_configurable() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(&db, &issuer, &[("VAULT_JWT_AGENT_CLAIM", "azp")]).await;
    let mut claims = issuer.claims("ignored", "alice");
    claims["azp"] = json!("agent-from-azp");
    claims["scope"] = json!("vault:store");
    let vault = app.client_with(&issuer.keys[0].sign(&claims)).await;
    store(&vault, "jira", "at").await;
    let same_agent = app.client_with(&issuer.keys[1].sign(&claims)).await;
    assert_eq!(access_token(&same_agent, "jira").await, "at");
    assert_refused(
        get_with(&app, &issuer.token("agent-a", "alice")).await,
        "token without azp",
    );
}

#[tokio::test]
async fn a_rotated_issuer_key_is_picked_up_without_a_restart() {
    let db = TestDb::new().await;
    let mut issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let rotated = SigningKey::ed25519("ed-2");
    let mut claims = issuer.claims("agent-a", "alice");
    claims["scope"] = json!("vault:store");
    let early = rotated.sign(&claims);
    issuer.keys.push(rotated);
    issuer.publish();

    let vault = app.client_with(&early).await;
    store_and_read_back(&vault, "jira", "at").await;
}

#[tokio::test]
async fn sweep_needs_the_admin_scope() {
    let (_db, issuer, app) = fixture().await;
    let caller = app.client(&issuer, "agent-a", "alice").await;
    assert!(matches!(
        caller.sweep(0, true).await,
        Err(Error::PermissionDenied { .. })
    ));
    let admin = app.admin(&issuer, "agent-a", "alice").await;
    assert!(admin.sweep(0, true).await.is_ok());
}

/// The message of a refused call, which must be UNAUTHENTICATED.
fn refusal(result: Result<vault_client::Token, Error>) -> String {
    match result {
        Err(Error::Unauthenticated(message)) => message,
        other => panic!("expected UNAUTHENTICATED, got {other:?}"),
    }
}

#[tokio::test]
async fn a_refusal_names_the_audience_the_issuers_and_the_agent_claim_expected() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let other = Issuer::named("https://other-issuer.test");
    let issuers = format!("{},{}", issuer.iss, other.iss);
    let jwks = format!(
        "{},{}",
        issuer.jwks_path.display(),
        other.jwks_path.display()
    );
    let app = spawn_with(
        &db,
        &issuer,
        &[
            ("VAULT_JWT_ISSUER", issuers.as_str()),
            ("VAULT_JWT_JWKS_FILE", jwks.as_str()),
            ("VAULT_JWT_AGENT_CLAIM", "azp"),
        ],
    )
    .await;
    let key = &issuer.keys[0];
    let mut claims = issuer.claims("ignored", "alice");
    claims["azp"] = json!("agent-a");

    let mut wrong_aud = claims.clone();
    wrong_aud["aud"] = json!("some-other-service");
    let message = refusal(get_with(&app, &key.sign(&wrong_aud)).await);
    assert!(
        message.contains("audience mismatch")
            && message.contains(&format!("\"{AUDIENCE}\""))
            && message.contains("VAULT_JWT_AUDIENCE"),
        "{message}"
    );

    let mut wrong_iss = claims.clone();
    wrong_iss["iss"] = json!("https://evil.example");
    let message = refusal(get_with(&app, &key.sign(&wrong_iss)).await);
    assert!(
        message.contains("issuer not accepted")
            && message.contains(&format!("\"{}\"", issuer.iss))
            && message.contains(&format!("\"{}\"", other.iss))
            && message.contains("VAULT_JWT_ISSUER"),
        "{message}"
    );

    let mut no_agent = claims.clone();
    no_agent.as_object_mut().unwrap().remove("azp");
    let message = refusal(get_with(&app, &key.sign(&no_agent)).await);
    assert!(
        message.contains("agent claim \"azp\"")
            && message.contains("VAULT_JWT_AGENT_CLAIM")
            && message.contains("missing"),
        "{message}"
    );
    let mut bad_agent = claims.clone();
    bad_agent["azp"] = json!("");
    let message = refusal(get_with(&app, &key.sign(&bad_agent)).await);
    assert!(
        message.contains("agent claim \"azp\"") && message.contains("not a valid agent id"),
        "{message}"
    );

    // Public configuration only: nothing about where the keys are or what they are.
    for message in [
        refusal(get_with(&app, &key.sign(&wrong_aud)).await),
        refusal(get_with(&app, &key.sign(&wrong_iss)).await),
    ] {
        assert!(
            !message.contains("jwks") && !message.contains(&key.kid),
            "{message}"
        );
    }
}
