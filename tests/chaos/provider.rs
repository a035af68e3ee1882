//! A provider that hangs: GetToken for other tools keeps its latency, and the hung tool answers
//! PROVIDER_UNAVAILABLE after the configured timeout (or its still-valid token).

use std::time::Duration;

use vault_client::RetryPolicy;

use super::load::{for_a_while, ms, percentile};
use crate::helpers::*;
use crate::policy::hung_provider;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_provider_leaves_other_tools_at_their_latency() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let (_hung, _dir, providers) = hung_provider().await;
    let app = spawn_with(
        &db,
        &issuer,
        &[
            ("VAULT_PROVIDERS_FILE", providers.to_str().unwrap()),
            ("VAULT_PROVIDER_TIMEOUT_SECONDS", "1"),
            ("VAULT_PROVIDER_CONNECT_TIMEOUT_SECONDS", "1"),
        ],
    )
    .await;
    let callers = 4;
    let mut readers = Vec::new();
    let mut stuck = Vec::new();
    for i in 0..callers {
        let reader = app
            .client(&issuer, "agent-a", &format!("reader-{i}"))
            .await
            .with_retry(RetryPolicy::none());
        store(&reader, "jira", "at-jira").await;
        readers.push(reader);
        let user = app
            .client(&issuer, "agent-a", &format!("stuck-{i}"))
            .await
            .with_retry(RetryPolicy::none());
        user.store_token("slow", oauth_token("expired", "rt", -60), None)
            .await
            .unwrap();
        stuck.push(user);
    }
    let duration = super::pick(Duration::from_secs(2), Duration::from_secs(30));
    let read = |readers: Vec<vault_client::Client>| {
        move |i: usize, _| {
            let reader = readers[i].clone();
            async move { reader.get_token("jira", Duration::ZERO).await }
        }
    };
    let normal = for_a_while(callers, duration, read(readers.clone())).await;

    // The same load while as many callers wait on the hung provider.
    let hung = tokio::spawn(for_a_while(callers, duration, move |i, _| {
        let user = stuck[i].clone();
        async move { user.get_token("slow", Duration::ZERO).await }
    }));
    let during = for_a_while(callers, duration, read(readers)).await;
    let hung = hung.await.unwrap();

    let (p99_normal, p99_during) = (percentile(&normal.ok, 99.0), percentile(&during.ok, 99.0));
    let ratio = p99_during.as_secs_f64() / p99_normal.as_secs_f64().max(1e-6);
    super::report(
        "a provider that hangs",
        &[
            ("other tool, p99 alone", ms(p99_normal)),
            ("other tool, p99 while the provider hangs", ms(p99_during)),
            (
                "ratio (must be ≤ 2 in the long form)",
                format!("{ratio:.2}"),
            ),
            ("other tool failures", during.failure_summary()),
            ("hung tool answers", hung.failure_summary()),
            (
                "hung tool slowest answer",
                ms(percentile(
                    &hung.failed.values().flatten().copied().collect::<Vec<_>>(),
                    100.0,
                )),
            ),
        ],
    );
    assert_eq!(
        normal.failures() + during.failures(),
        0,
        "{}",
        during.failure_summary()
    );
    assert!(hung.ok.is_empty(), "an expired token is never served");
    assert!(
        hung.failed
            .keys()
            .all(|k| k == "UNAVAILABLE/PROVIDER_UNAVAILABLE"),
        "{}",
        hung.failure_summary()
    );
    // The provider timeout is 1 s: no answer waits much past it (connect + exchange + writes).
    let slowest = percentile(
        &hung.failed.values().flatten().copied().collect::<Vec<_>>(),
        100.0,
    );
    assert!(slowest < Duration::from_secs(10), "{}", ms(slowest));
    if super::long() {
        assert!(
            ratio <= 2.0,
            "p99 of other tools rose {ratio:.2}× while a provider hung"
        );
    }
}
