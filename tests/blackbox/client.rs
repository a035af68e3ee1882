//! The vault-client crate against a real server: token sources, retries, TLS.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use vault_client::{Client, Error, RetryPolicy, TokenSource};

use crate::helpers::*;
use crate::provider::TestPki;

#[tokio::test]
async fn a_token_file_is_re_read_when_it_changes() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, issuer.token("agent-a", "alice")).unwrap();
    let vault = Client::builder(app.endpoint())
        .token(TokenSource::file(&file))
        .connect()
        .await
        .unwrap();
    store(&vault, "jira", "alice-at").await;

    std::fs::write(&file, format!("{}\n", issuer.token("agent-a", "bob"))).unwrap();
    assert!(
        matches!(
            vault.get_token("jira", Duration::ZERO).await,
            Err(Error::CredentialNotFound)
        ),
        "now acting for bob"
    );
    std::fs::write(&file, issuer.token("agent-a", "alice")).unwrap();
    assert_eq!(access_token(&vault, "jira").await, "alice-at");

    std::fs::remove_file(&file).unwrap();
    assert!(matches!(
        vault.get_token("jira", Duration::ZERO).await,
        Err(Error::TokenSource(_))
    ));
}

#[tokio::test]
async fn a_callback_source_is_asked_before_every_call() {
    let db = TestDb::new().await;
    let issuer = Arc::new(Issuer::new());
    let app = spawn(&db, &issuer).await;
    let asked = Arc::new(AtomicU32::new(0));
    let source = {
        let (issuer, asked) = (Arc::clone(&issuer), Arc::clone(&asked));
        TokenSource::callback(move || {
            let (issuer, asked) = (Arc::clone(&issuer), Arc::clone(&asked));
            async move {
                asked.fetch_add(1, Ordering::SeqCst);
                Ok(issuer.token("agent-a", "alice"))
            }
        })
    };
    let vault = Client::builder(app.endpoint())
        .token(source)
        .connect()
        .await
        .unwrap();
    store(&vault, "jira", "at").await;
    vault.get_token("jira", Duration::ZERO).await.unwrap();
    assert_eq!(asked.load(Ordering::SeqCst), 2);

    let failing =
        TokenSource::callback(|| async { Err::<String, _>("identity provider down".into()) });
    let broken = Client::builder(app.endpoint())
        .token(failing)
        .connect()
        .await
        .unwrap();
    assert!(
        matches!(broken.get_token("jira", Duration::ZERO).await, Err(Error::TokenSource(m)) if m.contains("identity provider down"))
    );
}

#[tokio::test]
async fn clones_with_different_callers_never_send_each_others_token() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn(&db, &issuer).await;
    let shared = Client::connect(app.endpoint()).await.unwrap();
    let alice = shared
        .clone()
        .with_bearer(&issuer.token("agent-a", "alice"))
        .unwrap();
    let bob = shared
        .clone()
        .with_bearer(&issuer.token("agent-a", "bob"))
        .unwrap();
    store(&alice, "jira", "alice-at").await;
    store(&bob, "jira", "bob-at").await;

    let mut calls = Vec::new();
    for i in 0..64 {
        let (client, expected) = if i % 2 == 0 {
            (alice.clone(), "alice-at")
        } else {
            (bob.clone(), "bob-at")
        };
        calls.push(tokio::spawn(async move {
            (
                client
                    .get_token("jira", Duration::ZERO)
                    .await
                    .unwrap()
                    .access_token,
                expected,
            )
        }));
    }
    for call in calls {
        let (got, expected) = call.await.unwrap();
        assert_eq!(got, expected);
    }
}

#[tokio::test]
async fn idempotent_calls_retry_until_the_vault_is_up_and_stores_only_while_unreached() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    // The port is the test's from start to end: bound but not listening (calls are refused),
    // then listening, then the vault's.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let endpoint = format!("http://{}", socket.local_addr().unwrap());
    let token = issuer.token("agent-a", "alice");

    let once = Client::builder(&endpoint)
        .retry(RetryPolicy::none())
        .connect_lazy()
        .unwrap()
        .with_bearer(&token)
        .unwrap();
    assert!(
        matches!(
            once.get_token("jira", Duration::ZERO).await,
            Err(Error::Unavailable { .. })
        ),
        "nothing listens yet"
    );
    // A store is tried again only while it certainly never reached a vault (here: nothing
    // listens), within the deadline; then it fails as unavailable.
    let store = Client::builder(&endpoint)
        .retry(RetryPolicy {
            deadline: Duration::from_millis(300),
            ..RetryPolicy::default()
        })
        .connect_lazy()
        .unwrap()
        .with_bearer(&token)
        .unwrap();
    assert!(matches!(
        store
            .store_token("jira", oauth_token("at", "rt", 3600), None)
            .await,
        Err(Error::Unavailable { .. })
    ));

    let policy = RetryPolicy {
        max_attempts: 50,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(300),
        deadline: Duration::from_secs(20),
    };
    let patient = Client::builder(&endpoint)
        .retry(policy)
        .connect_lazy()
        .unwrap()
        .with_bearer(&token)
        .unwrap();
    let listener = socket.listen(16).unwrap();
    let call = tokio::spawn(async move { patient.get_token("jira", Duration::ZERO).await });
    // Its first attempt meets a port that hangs up on it, so what follows is a retry.
    drop(listener.accept().await.unwrap());
    let _app = try_spawn_on(&db, &issuer, &[], Some(listener))
        .await
        .unwrap();
    let result = call.await.unwrap();
    assert!(
        matches!(result, Err(Error::CredentialNotFound)),
        "reached the vault once it was up: {result:?}"
    );
}

#[tokio::test]
async fn the_client_speaks_tls_and_mutual_tls() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let pki = TestPki::new();
    let (cert, key, ca) = (
        pki.cert_path.display().to_string(),
        pki.key_path.display().to_string(),
        pki.ca_path.display().to_string(),
    );
    let token = issuer.token("agent-a", "alice");

    let tls = spawn_with(
        &db,
        &issuer,
        &[
            ("VAULT_TLS_CERT_FILE", cert.as_str()),
            ("VAULT_TLS_KEY_FILE", key.as_str()),
        ],
    )
    .await;
    let endpoint = format!("https://127.0.0.1:{}", tls.addr.port());
    let vault = Client::builder(&endpoint)
        .tls_ca_pem(&pki.ca_pem)
        .connect()
        .await
        .unwrap()
        .with_bearer(&token)
        .unwrap();
    store_and_read_back(&vault, "jira", "over-tls").await;
    let untrusting = Client::builder(&endpoint)
        .tls_native_roots()
        .retry(RetryPolicy::none())
        .connect()
        .await;
    assert!(
        untrusting.is_err(),
        "a certificate from an unknown CA is refused"
    );

    let mtls = spawn_with(
        &db,
        &issuer,
        &[
            ("VAULT_TLS_CERT_FILE", cert.as_str()),
            ("VAULT_TLS_KEY_FILE", key.as_str()),
            ("VAULT_TLS_CLIENT_CA_FILE", ca.as_str()),
        ],
    )
    .await;
    let endpoint = format!("https://127.0.0.1:{}", mtls.addr.port());
    let anonymous = Client::builder(&endpoint)
        .tls_ca_pem(&pki.ca_pem)
        .retry(RetryPolicy::none())
        .connect()
        .await;
    let refused = match anonymous {
        Err(_) => true,
        Ok(client) => client
            .with_bearer(&token)
            .unwrap()
            .get_token("jira", Duration::ZERO)
            .await
            .is_err(),
    };
    assert!(refused, "no client certificate, no service");
    let gateway = Client::builder(&endpoint)
        .tls_ca_pem(&pki.ca_pem)
        .tls_identity(&pki.client_cert_pem, &pki.client_key_pem)
        .connect()
        .await
        .unwrap()
        .with_bearer(&token)
        .unwrap();
    assert_eq!(access_token(&gateway, "jira").await, "over-tls");
}
