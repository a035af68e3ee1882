//! kill -9 of the replica holding a refresh lease, mid-refresh: the other replica refreshes
//! once the lease expires, the provider sees exactly one successful refresh for the generation,
//! and the rotated refresh token is never lost.

use std::time::{Duration, Instant};

use vault_client::RetryPolicy;

use super::load::ms;
use crate::helpers::*;
use crate::provider::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_lease_holder_mid_refresh_leaves_one_refresh_and_the_rotated_token() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("provider-state");
    std::fs::create_dir_all(&state).unwrap();
    let provider = OidcProvider::start(&pki, &state, 0, 3600);
    let providers = providers_file(dir.path(), &provider.ready)
        .display()
        .to_string();
    let ca = pki.ca_path.display().to_string();
    let pairs = settings_pairs(
        &db,
        &issuer,
        &[
            ("VAULT_PROVIDERS_FILE", providers.as_str()),
            ("VAULT_PROVIDER_CA_FILE", ca.as_str()),
            // Longer than the provider's injected 30 s hang, so the holder is still waiting
            // when it is killed; the lease outlives it by 11 s.
            ("VAULT_PROVIDER_TIMEOUT_SECONDS", "40"),
            ("VAULT_PROVIDER_CONNECT_TIMEOUT_SECONDS", "1"),
            ("VAULT_REFRESH_COOLDOWN_SECONDS", "0"),
        ],
    );
    let mut holder = start_binary(&pairs).await;
    let other = start_binary(&pairs).await;
    let token = issuer.token("agent-a", "alice");

    let grant = provider.authorize("alice").await;
    let gateway = holder.client_with(&token).await;
    let stored = gateway
        .store_token(
            "jira",
            oauth_token(&grant.access_token, &grant.refresh_token, -60),
            None,
        )
        .await
        .unwrap();
    provider.reset_stats().await;
    provider.fail_next("timeout", 1).await;

    // The holder takes the lease and calls the provider, which hangs.
    let on_holder = holder
        .client_with(&token)
        .await
        .with_retry(RetryPolicy::none());
    let hung = tokio::spawn(async move { on_holder.get_token("jira", Duration::ZERO).await });
    eventually("the holder's refresh reaches the provider", || async {
        provider.stats().await.refresh_calls == 1
    })
    .await;
    holder.child.kill().unwrap();
    holder.child.wait().unwrap();
    let killed = Instant::now();
    assert!(
        hung.await.unwrap().is_err(),
        "the killed replica answered nothing"
    );

    // The short form moves the lease's end into the past; the long form waits for it.
    if !super::long() {
        fast_forward(&db, Duration::from_secs(60)).await;
    }
    let vault = other.client_with(&token).await.with_retry(RetryPolicy {
        deadline: Duration::from_secs(120),
        max_attempts: 100,
        ..RetryPolicy::default()
    });
    let refreshed = loop {
        match vault.get_token("jira", Duration::ZERO).await {
            Ok(token) if token.refreshed || token.generation > stored.generation => break token,
            // Still leased to the dead replica: the other one says so (or the wait for the
            // lease outlasts the client's own timeout) and is asked again.
            Err(vault_client::Error::ProviderUnavailable(_)) | Ok(_) => {
                assert!(
                    killed.elapsed() < Duration::from_secs(120),
                    "never refreshed"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(vault_client::Error::Other(status)) if status.code() == tonic::Code::Cancelled => {
                assert!(
                    killed.elapsed() < Duration::from_secs(120),
                    "never refreshed"
                );
            }
            Err(other) => panic!("{other:?}"),
        }
    };
    let took = killed.elapsed();
    let stats = provider.stats().await;
    // The rotated refresh token is the one the vault holds: the grant's first is spent, and a
    // forced refresh with the stored one succeeds.
    let again = vault.refresh("jira", None).await.unwrap();
    let (status, _) = provider.refresh_directly(&grant.refresh_token).await;
    super::report(
        "kill -9 of the replica holding a refresh lease, mid-refresh",
        &[
            ("refreshed by the other replica after the kill", ms(took)),
            (
                "provider refresh calls (the hung one, then the other replica's)",
                stats.refresh_calls.to_string(),
            ),
            (
                "generation before / after",
                format!("{} / {}", stored.generation, refreshed.generation),
            ),
            (
                "the grant's first refresh token at the provider afterwards",
                status.to_string(),
            ),
        ],
    );
    assert_eq!(
        refreshed.generation,
        stored.generation + 1,
        "one refresh, one generation"
    );
    assert_ne!(refreshed.access_token, grant.access_token);
    assert_eq!(
        stats.refresh_calls, 2,
        "exactly one refresh besides the one that hung"
    );
    assert_ne!(status, 200, "the first refresh token was rotated away");
    assert!(
        again.refreshed,
        "the stored, rotated refresh token still works"
    );
    assert_eq!(again.generation, refreshed.generation + 1);
}
