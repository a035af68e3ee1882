//! Soak: mixed load for a long while (10 minutes in the long form); memory after warm-up grows
//! by less than 5 %, and nothing fails but shed calls.

use std::sync::Arc;
use std::time::Duration;

use vault_client::RetryPolicy;

use super::load::{for_a_while, ms, percentile};
use super::overload::memory_kib;
use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_of_mixed_load_keeps_memory_flat_and_fails_nothing() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let server = start_binary(&settings_pairs(&db, &issuer, &[])).await;
    let callers = 8;
    let mut clients = Vec::new();
    for i in 0..callers {
        let client = server
            .client_with(&issuer.token(&format!("agent-{}", i % 4), &format!("user-{i}")))
            .await
            .with_retry(RetryPolicy::none());
        store(&client, "jira", "at").await;
        clients.push(client);
    }
    let clients = Arc::new(clients);
    // Mostly reads; a write, a listing and a revoke-and-store in every ten calls.
    let mixed = move |i: usize, n: u64| {
        let client = clients[i].clone();
        async move {
            match n % 10 {
                0 => client
                    .store_token("jira", oauth_token(&format!("at-{n}"), "", 3600), None)
                    .await
                    .map(|_| ()),
                1 => client.list_credentials().await.map(|_| ()),
                2 => {
                    client.revoke(Some("slack"), false).await?;
                    client
                        .store_token("slack", oauth_token("at-slack", "", 3600), None)
                        .await
                        .map(|_| ())
                }
                _ => client.get_token("jira", Duration::ZERO).await.map(|_| ()),
            }
        }
    };
    let (warmup, soak) = if super::long() {
        (Duration::from_secs(60), Duration::from_secs(600))
    } else {
        (Duration::from_secs(1), Duration::from_secs(3))
    };
    let warm = for_a_while(callers, warmup, mixed.clone()).await;
    let (_, after_warmup) = memory_kib(server.child.id());
    let tally = for_a_while(callers, soak, mixed).await;
    let (peak, after) = memory_kib(server.child.id());
    let growth = after as f64 / after_warmup.max(1) as f64 - 1.0;
    super::report(
        "soak: mixed load",
        &[
            (
                "duration",
                format!("{} s after {} s warm-up", soak.as_secs(), warmup.as_secs()),
            ),
            ("calls", tally.ok.len().to_string()),
            ("failed", tally.failure_summary()),
            (
                "p50 / p99",
                format!(
                    "{} / {}",
                    ms(percentile(&tally.ok, 50.0)),
                    ms(percentile(&tally.ok, 99.0))
                ),
            ),
            (
                "RSS after warm-up / at the end / peak",
                format!(
                    "{} / {} / {} MiB",
                    after_warmup / 1024,
                    after / 1024,
                    peak / 1024
                ),
            ),
            (
                "RSS growth (must be < 5 % in the long form)",
                format!("{:.1} %", growth * 100.0),
            ),
        ],
    );
    let unexpected: Vec<_> = warm
        .failed
        .keys()
        .chain(tally.failed.keys())
        .filter(|k| *k != "RESOURCE_EXHAUSTED/OVERLOADED")
        .collect();
    assert!(unexpected.is_empty(), "{}", tally.failure_summary());
    if super::long() {
        assert!(
            growth < 0.05,
            "RSS grew {:.1} % over the soak",
            growth * 100.0
        );
    }
    server.terminate().await;
}
