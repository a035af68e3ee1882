//! SIGTERM to one of two replicas under load: its health says NOT_SERVING before it stops, no
//! call fails for a client that retries UNAVAILABLE (as vault-client does), and every
//! acknowledged write is kept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::load::{closed_loops, ms, percentile};
use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_one_of_two_replicas_under_load_fails_no_call_and_keeps_every_write() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let pairs = settings_pairs(&db, &issuer, &[("VAULT_SHUTDOWN_DELAY_SECONDS", "1")]);
    let mut leaving = start_binary(&pairs).await;
    let staying = start_binary(&pairs).await;
    let endpoints = [leaving.endpoint(), staying.endpoint()]
        .map(|e| tonic::transport::Endpoint::from_shared(e).unwrap());
    let channel = tonic::transport::Channel::balance_list(endpoints.into_iter());

    let (writers, readers) = (3usize, 3usize);
    let mut clients = Vec::new();
    for i in 0..writers + readers {
        let client = vault_client::Client::from_channel(channel.clone())
            .with_bearer(&issuer.token("agent-r", &format!("user-{i}")))
            .unwrap();
        store(&client, "jira", &format!("user-{i}-0")).await;
        clients.push(client);
    }
    let clients = Arc::new(clients);
    let acknowledged = Arc::new(Mutex::new(HashMap::<usize, u64>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (clients, acknowledged) = (Arc::clone(&clients), Arc::clone(&acknowledged));
        tokio::spawn(closed_loops(
            writers + readers,
            Arc::clone(&stop),
            move |i, n| {
                let (clients, acknowledged) = (Arc::clone(&clients), Arc::clone(&acknowledged));
                async move {
                    let client = &clients[i];
                    if i < writers {
                        let value = format!("user-{i}-{}", n + 1);
                        let result = client
                            .store_token("jira", oauth_token(&value, "", 3600), None)
                            .await;
                        if result.is_ok() {
                            acknowledged.lock().unwrap().insert(i, n + 1);
                        }
                        result.map(|_| ())
                    } else {
                        client.get_token("jira", Duration::ZERO).await.map(|_| ())
                    }
                }
            },
        ))
    };
    let phase = super::pick(Duration::from_secs(1), Duration::from_secs(20));
    tokio::time::sleep(phase).await;

    let endpoint = leaving.endpoint();
    let signalled = Instant::now();
    leaving.signal("TERM");
    // Health turns NOT_SERVING while the process still runs (the shutdown delay).
    eventually("the leaving replica reports NOT_SERVING", || async {
        !is_serving(&endpoint).await
    })
    .await;
    let not_serving_after = signalled.elapsed();
    assert!(
        leaving.child.try_wait().unwrap().is_none(),
        "NOT_SERVING is reported before the process stops"
    );
    let status = tokio::task::block_in_place(|| leaving.wait_exit(Duration::from_secs(30)));
    let exited_after = signalled.elapsed();
    assert!(status.success(), "{status:?}");
    tokio::time::sleep(phase).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let tally = load.await.unwrap();

    // Every acknowledged write is on the surviving replica (one database).
    let acknowledged = acknowledged.lock().unwrap().clone();
    let mut lost = Vec::new();
    for (i, last) in &acknowledged {
        let client = staying
            .client_with(&issuer.token("agent-r", &format!("user-{i}")))
            .await;
        let token = client.get_token("jira", Duration::ZERO).await.unwrap();
        let number: u64 = token
            .access_token
            .rsplit('-')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        if number < *last {
            lost.push(format!("user-{i}: acknowledged {last}, reads {number}"));
        }
    }
    super::report(
        "SIGTERM to one of two replicas under load",
        &[
            ("calls", (tally.ok.len() + tally.failures()).to_string()),
            (
                "failed (with the client's retries)",
                tally.failure_summary(),
            ),
            ("p99", ms(percentile(&tally.ok, 99.0))),
            ("NOT_SERVING after SIGTERM", ms(not_serving_after)),
            ("process exited after SIGTERM", ms(exited_after)),
            (
                "acknowledged writes lost",
                format!("{} of {}", lost.len(), acknowledged.len()),
            ),
        ],
    );
    assert_eq!(tally.failures(), 0, "{}", tally.failure_summary());
    assert!(lost.is_empty(), "{lost:?}");
}
