//! Issue 16: the policy file (grants, scope ceilings, TTL maxima, step-up), its reloading, the
//! per-caller rate limits with `RetryInfo`, and load shedding, against a running server.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;
use vault_client::{Error, ErrorReason, RetryPolicy};

use crate::audit::list_audit;
use crate::hardening::reason;
use crate::helpers::*;

/// A policy file in a directory of its own.
pub(crate) struct PolicyFile {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl PolicyFile {
    pub(crate) fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, text).unwrap();
        Self { path, _dir: dir }
    }

    /// Replaces the contents at once (write, then rename), as an operator's tooling would.
    pub(crate) fn replace(&self, text: &str) {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(tmp, &self.path).unwrap();
    }

    pub(crate) fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

const POLICY: &str = r#"
[[grants]]
name = "support"
agents = ["support-*"]
tools = ["jira", "stripe"]

[tools.stripe]
scopes = ["read_only", "charges:read"]
max_ttl_seconds = 3600
approval = "required"

[approval]
acr = ["urn:example:mfa"]
max_age_seconds = 300
"#;

fn policy_denied(error: &Error) -> &str {
    match error {
        Error::PermissionDenied {
            reason: ErrorReason::PolicyDenied,
            message,
        } => message,
        other => panic!("expected POLICY_DENIED, got {other:?}"),
    }
}

/// The outcomes the control chain recorded for `action` on `tool`.
async fn recorded(app: &TestApp, issuer: &Issuer, action: &str, tool: &str) -> Vec<String> {
    let page = list_audit(
        app,
        &issuer.admin_token("support-ops", "ops"),
        vault_client::proto::ListAuditEventsRequest {
            limit: 1000,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    page.events
        .into_iter()
        .filter(|e| e.action == action && e.tool == tool)
        .map(|e| e.outcome)
        .collect()
}

#[tokio::test]
async fn the_policy_allows_what_it_grants_and_denies_the_rest_naming_the_rule_and_auditing_it() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let policy = PolicyFile::new(POLICY);
    let app = spawn_with(&db, &issuer, &[("VAULT_POLICY_FILE", policy.path())]).await;

    let support = app.client(&issuer, "support-7", "alice").await;
    store_and_read_back(&support, "jira", "at-jira").await;

    let other_tool = support
        .store_token("confluence", oauth_token("at", "", 3600), None)
        .await
        .unwrap_err();
    let message = policy_denied(&other_tool);
    assert!(
        message.contains("\"support-7\"") && message.contains("grants[0] (\"support\")"),
        "{message}"
    );
    let stranger = app.client(&issuer, "billing", "alice").await;
    let denied = stranger
        .get_token("jira", Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        policy_denied(&denied).contains("no grant matches"),
        "{denied}"
    );

    // The rule is in the ErrorInfo, for a gateway to act on.
    let status = crate::hardening::raw_store(
        &app,
        &issuer.token("support-7", "alice"),
        "confluence",
        oauth_token("at", "", 3600),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(reason(&status), "POLICY_DENIED");
    use tonic_types::StatusExt as _;
    let info = status.get_error_details().error_info().cloned().unwrap();
    assert_eq!(
        info.metadata.get("rule").map(String::as_str),
        Some("grants")
    );

    // Both refusals are in the audit log.
    assert_eq!(
        recorded(&app, &issuer, "StoreToken", "confluence").await,
        ["POLICY_DENIED", "POLICY_DENIED"]
    );
    assert_eq!(
        recorded(&app, &issuer, "GetToken", "jira").await,
        ["POLICY_DENIED"]
    );
}

#[tokio::test]
async fn scopes_over_the_ceiling_are_refused_and_the_tools_ttl_maximum_applies() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let policy = PolicyFile::new(POLICY);
    let app = spawn_with(&db, &issuer, &[("VAULT_POLICY_FILE", policy.path())]).await;
    let gateway = app.client(&issuer, "support-1", "alice").await;

    let mut wide = oauth_token("at", "", 3600);
    wide.scopes = vec!["read_only".into(), "charges:write".into()];
    match gateway.store_token("stripe", wide, None).await.unwrap_err() {
        Error::InvalidArgument { field, message } => {
            assert_eq!(field, "token.scopes");
            assert!(
                message.contains("charges:write over the ceiling of tools.stripe.scopes"),
                "{message}"
            );
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    assert_eq!(
        recorded(&app, &issuer, "StoreToken", "stripe").await,
        ["INVALID_ARGUMENT"]
    );

    let mut narrow = oauth_token("at", "", 3600);
    narrow.scopes = vec!["read_only".into()];
    let before = now();
    let stored = gateway
        .store_token("stripe", narrow, Some(Duration::from_secs(86_400)))
        .await
        .unwrap();
    let ttl = unix(stored.ttl_expires_at) - before;
    assert!(
        (3590..=3610).contains(&ttl),
        "TTL capped at the tool's 3600 s, got {ttl}"
    );
    // A tool without a maximum keeps the vault's.
    let other = gateway
        .store_token(
            "jira",
            oauth_token("at", "", 3600),
            Some(Duration::from_secs(86_400)),
        )
        .await
        .unwrap();
    assert!(unix(other.ttl_expires_at) - before >= 86_390);
}

#[tokio::test]
async fn a_tool_that_requires_approval_is_released_only_to_a_recent_step_up() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let policy = PolicyFile::new(POLICY);
    let app = spawn_with(&db, &issuer, &[("VAULT_POLICY_FILE", policy.path())]).await;
    let gateway = app.client(&issuer, "support-1", "alice").await;
    let mut token = oauth_token("at-stripe", "", 3600);
    token.scopes = vec!["read_only".into()];
    gateway.store_token("stripe", token, None).await.unwrap();
    // Storing needs no step-up; releasing does.
    let plain = gateway
        .get_token("stripe", Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        policy_denied(&plain).contains("requires a recent step-up"),
        "{plain}"
    );
    let forced = gateway.refresh("stripe", None).await.unwrap_err();
    policy_denied(&forced);
    // jira needs none.
    store_and_read_back(&gateway, "jira", "at-jira").await;

    let signed = |acr: &str, auth_time: i64| {
        let mut claims = issuer.claims("support-1", "alice");
        claims["acr"] = json!(acr);
        claims["auth_time"] = json!(auth_time);
        issuer.keys[0].sign(&claims)
    };
    let stepped = app
        .client_with(&signed("urn:example:mfa", now() - 10))
        .await;
    assert_eq!(
        stepped
            .get_token("stripe", Duration::ZERO)
            .await
            .unwrap()
            .access_token,
        "at-stripe"
    );
    let stale = app
        .client_with(&signed("urn:example:mfa", now() - 301))
        .await;
    assert!(
        policy_denied(&stale.get_token("stripe", Duration::ZERO).await.unwrap_err())
            .contains("auth_time")
    );
    let weak = app.client_with(&signed("urn:example:pwd", now())).await;
    assert!(
        policy_denied(&weak.get_token("stripe", Duration::ZERO).await.unwrap_err()).contains("acr")
    );
}

/// A vault under `policy`, checking the file for changes every second.
async fn reloading_vault(db: &TestDb, issuer: &Issuer, policy: &PolicyFile) -> TestApp {
    spawn_with(
        db,
        issuer,
        &[
            ("VAULT_POLICY_FILE", policy.path()),
            ("VAULT_POLICY_RELOAD_SECONDS", "1"),
        ],
    )
    .await
}

#[tokio::test]
async fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_old_policy() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let policy = PolicyFile::new(POLICY);
    let app = reloading_vault(&db, &issuer, &policy).await;
    let support = app.client(&issuer, "support-1", "alice").await;
    store_and_read_back(&support, "jira", "at-jira").await;

    // jira is taken away: the next check of the file notices.
    policy.replace(&POLICY.replace("tools = [\"jira\", \"stripe\"]", "tools = [\"stripe\"]"));
    eventually("the reloaded policy denies jira", || async {
        matches!(
            support.get_token("jira", Duration::ZERO).await,
            Err(Error::PermissionDenied {
                reason: ErrorReason::PolicyDenied,
                ..
            })
        )
    })
    .await;

    // A broken file is refused; the policy in force stays (jira still denied, stripe still
    // granted), and a fixed file is picked up again.
    let logs = captured_logs();
    policy.replace("[[grants]\nthis is not toml");
    eventually("the broken file is reported", || async {
        String::from_utf8_lossy(&logs.lock().unwrap()).contains("the policy file did not load")
    })
    .await;
    policy_denied(&support.get_token("jira", Duration::ZERO).await.unwrap_err());
    let mut token = oauth_token("at-stripe", "", 3600);
    token.scopes = vec!["read_only".into()];
    support.store_token("stripe", token, None).await.unwrap();
    policy.replace(POLICY);
    eventually("the fixed file grants jira again", || async {
        support.get_token("jira", Duration::ZERO).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn sighup_reloads_the_policy_and_a_file_that_does_not_validate_stops_startup() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let policy = PolicyFile::new(POLICY);
    let mut pairs = settings_pairs(&db, &issuer, &[]);
    pairs.push(("VAULT_POLICY_FILE", policy.path()));
    // Far longer than the test: only the signal can reload it.
    pairs.push(("VAULT_POLICY_RELOAD_SECONDS", "3600"));
    let server = start_binary(&pairs).await;
    let support = server
        .client_with(&issuer.token("support-1", "alice"))
        .await;
    store_and_read_back(&support, "jira", "at-jira").await;

    policy.replace(&POLICY.replace("tools = [\"jira\", \"stripe\"]", "tools = [\"stripe\"]"));
    server.signal("HUP");
    eventually("SIGHUP reloads the policy", || async {
        support.get_token("jira", Duration::ZERO).await.is_err()
    })
    .await;
    policy.replace("[tools.jira]\nmax_ttl_seconds = 0\n");
    server.signal("HUP");
    eventually(
        "the invalid file is reported in one line naming the rule",
        || async {
            server.stderr_lines.lock().unwrap().iter().any(|line| {
                line.contains("the policy file did not load")
                    && line.contains("tools.jira.max_ttl_seconds")
            })
        },
    )
    .await;
    assert!(
        support.get_token("jira", Duration::ZERO).await.is_err(),
        "old policy kept"
    );
    drop(server);

    // The same file stops startup, naming the setting and the rule.
    let (ok, stderr) = run_binary_to_exit(&["serve"], &pairs);
    assert!(!ok);
    assert!(
        stderr.contains("VAULT_POLICY_FILE") && stderr.contains("tools.jira.max_ttl_seconds"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_spent_rate_limit_answers_retry_info_and_the_client_retries_after_it() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    // Global: 1 call a second per (agent, user), no burst. The policy adds 2 a second per agent
    // for jira.
    let policy = PolicyFile::new(
        "[[grants]]\nagents = [\"*\"]\ntools = [\"*\"]\n[tools.jira]\nlimits.agent = { per_second = 2, burst = 1 }\n",
    );
    let app = spawn_with(
        &db,
        &issuer,
        &[
            ("VAULT_POLICY_FILE", policy.path()),
            ("VAULT_LIMIT_USER_PER_SECOND", "1"),
            ("VAULT_LIMIT_USER_BURST", "1"),
        ],
    )
    .await;
    let alice = app
        .client(&issuer, "agent-a", "alice")
        .await
        .with_retry(RetryPolicy::none());
    store(&alice, "slack", "at").await;
    let refused = alice.get_token("slack", Duration::ZERO).await.unwrap_err();
    let Error::ResourceExhausted {
        reason: ErrorReason::RateLimited,
        retry_after: Some(after),
        ..
    } = refused
    else {
        panic!("expected RATE_LIMITED with RetryInfo, got {refused:?}");
    };
    assert!(
        after > Duration::ZERO && after <= Duration::from_secs(1),
        "{after:?}"
    );
    // Another user of the agent is not held back by alice's bucket.
    let bob = app.client(&issuer, "agent-a", "bob").await;
    store(&bob, "slack", "at-bob").await;

    // The default client waits what RetryInfo says and is admitted: recovery after the window.
    let patient = app.client(&issuer, "agent-a", "alice").await;
    assert_eq!(access_token(&patient, "slack").await, "at");

    // The tool's own agent bucket: shared by alice and bob for jira.
    let carol = app
        .client(&issuer, "agent-a", "carol")
        .await
        .with_retry(RetryPolicy::none());
    store(&carol, "jira", "at-carol").await;
    let dave = app
        .client(&issuer, "agent-a", "dave")
        .await
        .with_retry(RetryPolicy::none());
    match dave
        .store_token("jira", oauth_token("at", "", 60), None)
        .await
    {
        Err(Error::ResourceExhausted {
            reason: ErrorReason::RateLimited,
            retry_after: Some(_),
            ..
        }) => {}
        other => panic!("expected jira's agent bucket to refuse, got {other:?}"),
    }
}

/// A provider that accepts connections and never answers (tool `slow`): a refresh through it
/// holds its call in flight for as long as the test needs. Returns its listener (accept on it
/// to know a call reached it), the directory holding the providers file, and the file's path.
pub async fn hung_provider() -> (tokio::net::TcpListener, tempfile::TempDir, PathBuf) {
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let providers = dir.path().join("providers.toml");
    std::fs::write(
        &providers,
        format!(
            "[tools.slow]\ntoken_url = \"https://{addr}/token\"\nrevocation_url = \"https://{addr}/revoke\"\nclient_id = \"c\"\nclient_secret = \"s\"\n",
            addr = hung.local_addr().unwrap()
        ),
    )
    .unwrap();
    (hung, dir, providers)
}

#[tokio::test]
async fn past_the_concurrency_limit_a_call_is_shed_at_once_and_health_still_answers() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let (hung, _dir, providers) = hung_provider().await;
    let app = spawn_with(
        &db,
        &issuer,
        &[
            ("VAULT_PROVIDERS_FILE", providers.to_str().unwrap()),
            ("VAULT_PROVIDER_TIMEOUT_SECONDS", "120"),
            ("VAULT_MAX_CONCURRENT_CALLS", "1"),
        ],
    )
    .await;
    let alice = app
        .client(&issuer, "agent-a", "alice")
        .await
        .with_retry(RetryPolicy::none());
    alice
        .store_token("slow", oauth_token("expired", "rt", -60), None)
        .await
        .unwrap();

    let holding = tokio::spawn({
        let alice = alice.clone();
        async move { alice.get_token("slow", Duration::ZERO).await }
    });
    // The vault has reached the provider: the call holds the only permit.
    let (_connection, _) = tokio::time::timeout(Duration::from_secs(20), hung.accept())
        .await
        .expect("the refresh reaches the provider")
        .unwrap();
    let shed = alice.get_token("slow", Duration::ZERO).await.unwrap_err();
    match &shed {
        Error::ResourceExhausted {
            reason: ErrorReason::Overloaded,
            retry_after: Some(after),
            ..
        } => assert!(*after <= Duration::from_secs(1)),
        other => panic!("expected OVERLOADED, got {other:?}"),
    }
    assert!(is_serving(&app.endpoint()).await, "health is never shed");
    holding.abort();
}

/// An HTTP/2 connection opened by hand, with calls on it whose request messages never finish.
struct StalledStreams {
    /// Each call's answer (trailers-only when the vault refuses it).
    answers: Vec<h2::client::ResponseFuture>,
    /// The calls' request streams and the connection, open for as long as this is held.
    _held: (
        Vec<h2::SendStream<bytes::Bytes>>,
        h2::client::SendRequest<bytes::Bytes>,
        h2::PingPong,
    ),
}

/// Opens an HTTP/2 connection to `addr` and starts `streams` calls of `method` on it as the
/// caller `jwt`, each sending `first` and then nothing more; returns once the server has
/// answered a PING sent after them, so it has read them all.
async fn open_stalled_streams(
    addr: std::net::SocketAddr,
    jwt: &str,
    method: &str,
    first: &[u8],
    streams: usize,
) -> StalledStreams {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let mut ping = connection.ping_pong().expect("the first ping_pong");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let (mut answers, mut held) = (Vec::new(), Vec::new());
    for _ in 0..streams {
        send = send.ready().await.unwrap();
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/vault.v1.CredentialVault/{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", format!("Bearer {jwt}"))
            .body(())
            .unwrap();
        let (response, mut stream) = send.send_request(request, false).unwrap();
        stream
            .send_data(bytes::Bytes::copy_from_slice(first), false)
            .unwrap();
        answers.push(response);
        held.push(stream);
    }
    ping.ping(h2::Ping::opaque()).await.unwrap();
    StalledStreams {
        answers,
        _held: (held, send, ping),
    }
}

#[tokio::test]
async fn a_stream_flood_and_slowloris_connections_leave_a_well_behaved_client_served() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let app = spawn_with(
        &db,
        &issuer,
        &[
            ("VAULT_MAX_CONCURRENT_CALLS", "4"),
            ("VAULT_HTTP2_MAX_CONCURRENT_STREAMS", "8"),
        ],
    )
    .await;
    let good = app
        .client(&issuer, "agent-a", "alice")
        .await
        .with_retry(RetryPolicy::none());
    store(&good, "jira", "at-good").await;

    // A stream flood from a verified caller: three connections with every stream they may open
    // stalled mid-request, six times the concurrency limit. They hold no place in it.
    let flooder = issuer.token("agent-b", "mallory");
    let mut flood = Vec::new();
    for _ in 0..3 {
        // Two bytes of the five-byte prefix, then nothing.
        flood.push(open_stalled_streams(app.addr, &flooder, "GetToken", &[0, 0], 8).await);
    }
    for _ in 0..20 {
        assert_eq!(
            good.get_token("jira", Duration::ZERO)
                .await
                .unwrap()
                .access_token,
            "at-good"
        );
    }

    // Slowloris: connections that send a piece of the HTTP/2 preface and stall.
    let mut stalled = Vec::new();
    for _ in 0..64 {
        let mut tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut tcp, b"PRI * HTTP/2.0\r\n")
            .await
            .unwrap();
        stalled.push(tcp);
    }
    for _ in 0..20 {
        assert_eq!(
            good.get_token("jira", Duration::ZERO)
                .await
                .unwrap()
                .access_token,
            "at-good"
        );
    }
    drop((flood, stalled));
}

#[tokio::test]
async fn unfinished_messages_are_held_only_within_the_buffer_budget_and_an_agents_share() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    // 8 MiB in all, so 2 MiB for one agent: three unfinished 512 KiB messages fit, a fourth not.
    let app = spawn_with(
        &db,
        &issuer,
        &[("VAULT_MAX_BUFFERED_REQUEST_BYTES", "8388608")],
    )
    .await;
    let good = app
        .client(&issuer, "agent-a", "alice")
        .await
        .with_retry(RetryPolicy::none());
    store(&good, "jira", "at-good").await;

    // Four StoreToken calls whose prefix declares 512 KiB; 1 KiB of it comes, then nothing.
    let mut first = vec![0u8];
    first.extend_from_slice(&(512u32 * 1024).to_be_bytes());
    first.extend_from_slice(&[0; 1024]);
    let jwt = issuer.token("agent-b", "mallory");
    let mut stalled = open_stalled_streams(app.addr, &jwt, "StoreToken", &first, 4).await;
    let mut answers = tokio::task::JoinSet::new();
    for response in stalled.answers.drain(..) {
        answers.spawn(async move {
            let response = response.await.unwrap();
            tonic::Status::from_header_map(response.headers())
        });
    }
    // One of the four does not fit the agent's share and is answered at once; the others wait
    // for the rest of their messages (the 20 s bound only keeps a missing budget from hanging).
    let status = tokio::time::timeout(Duration::from_secs(20), answers.join_next())
        .await
        .expect("a message past the agent's share is refused at once")
        .unwrap()
        .unwrap()
        .expect("a trailers-only gRPC answer");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "OVERLOADED");
    // Another agent is served as before.
    for _ in 0..5 {
        assert_eq!(access_token(&good, "jira").await, "at-good");
    }
    drop((stalled, answers));
}

#[tokio::test]
async fn a_hung_provider_holds_at_most_its_cap_and_other_callers_and_tools_are_served() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let (hung, _dir, providers) = hung_provider().await;
    let app = spawn_with(
        &db,
        &issuer,
        &[
            ("VAULT_PROVIDERS_FILE", providers.to_str().unwrap()),
            ("VAULT_PROVIDER_TIMEOUT_SECONDS", "120"),
            ("VAULT_PROVIDER_MAX_CONCURRENT_CALLS", "1"),
            // Every GetToken that wants a fresher token tries the provider.
            ("VAULT_REFRESH_COOLDOWN_SECONDS", "0"),
        ],
    )
    .await;
    let client = |user: &'static str| {
        let app = &app;
        let issuer = &issuer;
        async move {
            app.client(issuer, "agent-a", user)
                .await
                .with_retry(RetryPolicy::none())
        }
    };
    let (alice, bob, carol) = (
        client("alice").await,
        client("bob").await,
        client("carol").await,
    );
    for user in [&alice, &bob] {
        user.store_token("slow", oauth_token("expired", "rt", -60), None)
            .await
            .unwrap();
    }
    // Carol's token is valid for 20 s more: a GetToken asking for 60 s refreshes it.
    carol
        .store_token("slow", oauth_token("still-valid", "rt", 20), None)
        .await
        .unwrap();
    store(&carol, "jira", "at-jira").await;

    let holding = tokio::spawn({
        let alice = alice.clone();
        async move { alice.get_token("slow", Duration::ZERO).await }
    });
    let (_connection, _) = tokio::time::timeout(Duration::from_secs(20), hung.accept())
        .await
        .expect("alice's refresh reaches the provider")
        .unwrap();
    // The provider's one place is taken: bob is answered at once, not after the provider's
    // 120 s (the 20 s bound only keeps a broken cap from hanging the test).
    async fn answered<T>(call: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(20), call)
            .await
            .expect("answered without waiting for the hung provider")
    }
    let refused = answered(bob.get_token("slow", Duration::ZERO))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, Error::ProviderUnavailable(m) if m.contains("calls in flight")),
        "{refused:?}"
    );
    // Nothing was sent for bob, so his credential has no failure to back off from: asked again,
    // he is held back by the cap, not by a backoff the cap's refusal would have started.
    let again = answered(bob.get_token("slow", Duration::ZERO))
        .await
        .unwrap_err();
    assert!(
        matches!(&again, Error::ProviderUnavailable(m) if m.contains("calls in flight")),
        "{again:?}"
    );
    // Carol gets her still-valid token, and another tool is untouched.
    let token = answered(carol.get_token("slow", Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(
        (token.access_token.as_str(), token.refreshed),
        ("still-valid", false)
    );
    assert_eq!(access_token(&carol, "jira").await, "at-jira");

    // Bob revokes at the provider while its one place is still taken: the revocation is queued,
    // not sent, and the guard's refusal is not counted against it (its backoff stays short).
    let revoked = answered(bob.revoke(Some("slow"), true)).await.unwrap();
    assert_eq!((revoked.revoked, revoked.provider_revoked), (1, 0));
    let (attempts, error): (i32, Option<String>) = sqlx::query_as(&format!(
        "SELECT attempts, last_error FROM \"{}\".revocation_outbox",
        schema_of("agent-a")
    ))
    .fetch_one(&mut db.connect().await)
    .await
    .unwrap();
    assert_eq!(
        attempts, 0,
        "a revocation the guard did not send is not a failed attempt"
    );
    assert!(
        error.is_some_and(|e| e.contains("calls in flight")),
        "the outbox says why it waits"
    );
    holding.abort();
}

#[tokio::test]
async fn a_credential_over_a_ceiling_tightened_later_is_not_released() {
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let policy = PolicyFile::new(POLICY);
    let app = reloading_vault(&db, &issuer, &policy).await;
    let support = app.client(&issuer, "support-1", "alice").await;
    // Stored with `read:jira-work offline_access` while jira has no ceiling.
    store_and_read_back(&support, "jira", "at-jira").await;
    policy.replace(&format!(
        "{POLICY}\n[tools.jira]\nscopes = [\"read:jira-work\"]\n"
    ));
    eventually(
        "the tightened ceiling refuses the stored credential",
        || async {
            match support.get_token("jira", Duration::ZERO).await {
                Err(Error::PermissionDenied {
                    reason: ErrorReason::PolicyDenied,
                    message,
                }) => message.contains("offline_access over the ceiling of tools.jira.scopes"),
                _ => false,
            }
        },
    )
    .await;
    policy_denied(&support.refresh("jira", None).await.unwrap_err());
}
