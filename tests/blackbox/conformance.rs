//! Store conformance: the same behaviours, checked against PostgreSQL and the embedded SQLite
//! store through the `Store` handles alone.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest as _, Sha256};
use vault_server::config::{Database, DatabaseSettings};
use vault_server::crypto::{
    AgentKey, Binding, RootKey, RootKeySource, SealedCredential, open_client_secret,
    open_credential, seal_client_secret, seal_credential,
};
use vault_server::ids::{AgentId, Generation, IssuerId, Tool, UserId};
use vault_server::store::{
    AgentRecord, CredentialKey, CredentialState, FlowChange, FlowStatus, NewCredential, NewFlow,
    NewRegistration, NextRoot, PgStore, RefreshLease, Registration, RootKeyRecord, RotationSwitch,
    SealedRow, Store, StoreError, SweepOutcome, Upserted,
};
use vault_server::vault::{
    RootRotation, RotationOutcome, RotationProgress, UnlockError, UnlockedRoot, refresh_backoff,
    rotated_to, unlock_root_key,
};

use crate::helpers::{TestDb, eventually};

fn agent(id: &str) -> AgentId {
    AgentId::parse(id).unwrap()
}
fn iss() -> IssuerId {
    IssuerId::parse(crate::helpers::ISS).unwrap()
}
fn user(id: &str) -> UserId {
    UserId::parse(id).unwrap()
}
fn tool(id: &str) -> Tool {
    Tool::parse(id).unwrap()
}

fn sealed(tag: u8) -> SealedCredential {
    SealedCredential {
        wrapped_data_key: vec![tag; 60],
        ciphertext: vec![tag; 90],
        key_version: 1,
    }
}

fn key<'a>(agent: &'a AgentRecord, user: &'a UserId, tool: &'a Tool) -> CredentialKey<'a> {
    CredentialKey { agent, user, tool }
}

/// The vault's key check, recorded on first use: agents are registered under it.
async fn kcv(store: &Store) -> Vec<u8> {
    store
        .keys
        .init_root_key(&RootKeyRecord {
            key_check: b"conformance-kcv".to_vec(),
            kdf: None,
            wrapped_control_key: None,
            next: None,
        })
        .await
        .unwrap()
        .key_check
}

async fn registered(store: &Store, id: &str) -> AgentRecord {
    store
        .keys
        .create_agent(
            &iss(),
            &agent(id),
            b"wrapped-agent-key",
            1,
            &kcv(store).await,
        )
        .await
        .unwrap()
}

async fn put(
    store: &Store,
    a: &AgentRecord,
    u: &str,
    t: &str,
    tag: u8,
    ttl: u64,
) -> (Generation, Upserted) {
    let generation = store.credentials.next_generation(a).await.unwrap();
    let (u, t, s) = (user(u), tool(t), sealed(tag));
    let outcome = store
        .credentials
        .upsert(
            key(a, &u, &t),
            NewCredential {
                generation,
                sealed: &s,
                access_expires_at: None,
                ttl_seconds: ttl,
            },
            Vec::new(),
        )
        .await
        .unwrap();
    (generation, outcome)
}

async fn a_credential_round_trips_and_generations_never_repeat(store: &Store) {
    let a = registered(store, "agent-a").await;
    let (g1, outcome) = put(store, &a, "alice", "jira", 1, 3600).await;
    assert!(matches!(outcome, Upserted::Written { .. }));
    let loaded = store
        .credentials
        .load(key(&a, &user("alice"), &tool("jira")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (loaded.generation, loaded.state, loaded.sealed),
        (g1, CredentialState::Active, sealed(1))
    );

    assert_eq!(
        store
            .credentials
            .delete(&a, &user("alice"), Some(&tool("jira")), Vec::new())
            .await
            .unwrap(),
        1
    );
    assert!(
        store
            .credentials
            .load(key(&a, &user("alice"), &tool("jira")))
            .await
            .unwrap()
            .is_none()
    );
    let (g2, _) = put(store, &a, "alice", "jira", 2, 3600).await;
    assert!(
        g2 > g1,
        "a generation is never handed out twice, even after a delete"
    );
}

async fn an_older_generation_never_overwrites_a_newer_one(store: &Store) {
    let a = registered(store, "agent-a").await;
    let older = store.credentials.next_generation(&a).await.unwrap();
    let (newer, _) = put(store, &a, "alice", "jira", 2, 3600).await;
    let (u, t, s) = (user("alice"), tool("jira"), sealed(1));
    let late = store
        .credentials
        .upsert(
            key(&a, &u, &t),
            NewCredential {
                generation: older,
                sealed: &s,
                access_expires_at: None,
                ttl_seconds: 3600,
            },
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(late, Upserted::Superseded);
    assert_eq!(
        store
            .credentials
            .load(key(&a, &u, &t))
            .await
            .unwrap()
            .unwrap()
            .generation,
        newer
    );
}

async fn agents_and_users_do_not_see_each_other(store: &Store) {
    let a = registered(store, "agent-a").await;
    let b = registered(store, "agent-b").await;
    put(store, &a, "alice", "jira", 1, 3600).await;
    assert!(
        store
            .credentials
            .load(key(&b, &user("alice"), &tool("jira")))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .credentials
            .load(key(&a, &user("bob"), &tool("jira")))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store
            .credentials
            .delete(&b, &user("alice"), None, Vec::new())
            .await
            .unwrap(),
        0
    );
    assert!(
        store
            .credentials
            .load(key(&a, &user("alice"), &tool("jira")))
            .await
            .unwrap()
            .is_some()
    );
}

async fn the_first_agent_key_wins_a_creation_race(store: &Store) {
    let first = store
        .keys
        .create_agent(&iss(), &agent("agent-a"), b"first", 1, &kcv(store).await)
        .await
        .unwrap();
    let second = store
        .keys
        .create_agent(&iss(), &agent("agent-a"), b"second", 1, &kcv(store).await)
        .await
        .unwrap();
    assert_eq!(first.wrapped_key, b"first");
    assert_eq!(second.wrapped_key, b"first");
    assert_eq!(first.namespace, second.namespace);
    assert_eq!(
        store
            .keys
            .agent(&iss(), &agent("agent-a"))
            .await
            .unwrap()
            .unwrap()
            .wrapped_key,
        b"first"
    );
    assert!(
        store
            .keys
            .agent(&iss(), &agent("nobody"))
            .await
            .unwrap()
            .is_none()
    );
    let other = IssuerId::parse("https://other.test").unwrap();
    assert!(
        store
            .keys
            .agent(&other, &agent("agent-a"))
            .await
            .unwrap()
            .is_none(),
        "another issuer's agent of the same id is another agent"
    );
    let theirs = store
        .keys
        .create_agent(&other, &agent("agent-a"), b"theirs", 1, &kcv(store).await)
        .await
        .unwrap();
    assert_eq!(theirs.wrapped_key, b"theirs");
    assert_ne!(theirs.namespace, first.namespace);
}

async fn the_first_root_key_record_wins(store: &Store) {
    assert!(store.keys.root_key().await.unwrap().is_none());
    let first = store
        .keys
        .init_root_key(&RootKeyRecord {
            key_check: b"kcv-1".to_vec(),
            kdf: None,
            wrapped_control_key: Some(b"control-1".to_vec()),
            next: None,
        })
        .await
        .unwrap();
    let second = store
        .keys
        .init_root_key(&RootKeyRecord {
            key_check: b"kcv-2".to_vec(),
            kdf: None,
            wrapped_control_key: Some(b"control-2".to_vec()),
            next: None,
        })
        .await
        .unwrap();
    assert_eq!(first.key_check, b"kcv-1");
    assert_eq!(second.key_check, b"kcv-1");
    assert_eq!(
        second.wrapped_control_key.as_deref(),
        Some(&b"control-1"[..])
    );
}

async fn expired_credentials_are_hidden_then_swept_within_the_limit(store: &Store) {
    let a = registered(store, "agent-a").await;
    for i in 0..5 {
        put(store, &a, &format!("user-{i}"), "jira", 1, 0).await;
    }
    put(store, &a, "keeper", "jira", 2, 3600).await;
    // A TTL of zero is past as soon as it is written: every later read is at a later time.
    assert!(
        store
            .credentials
            .load(key(&a, &user("user-0"), &tool("jira")))
            .await
            .unwrap()
            .is_none(),
        "past TTL: never served"
    );
    assert_eq!(
        store.credentials.sweep(100, true, false).await.unwrap(),
        SweepOutcome {
            swept: 5,
            more: false
        }
    );
    assert_eq!(
        store.credentials.sweep(3, false, false).await.unwrap(),
        SweepOutcome {
            swept: 3,
            more: true
        }
    );
    assert_eq!(
        store.credentials.sweep(3, false, false).await.unwrap(),
        SweepOutcome {
            swept: 2,
            more: false
        }
    );
    assert!(
        store
            .credentials
            .load(key(&a, &user("keeper"), &tool("jira")))
            .await
            .unwrap()
            .is_some()
    );
}

async fn the_refresh_lease_admits_one_holder_and_the_write_is_fenced(store: &Store) {
    let a = registered(store, "agent-a").await;
    let (g1, _) = put(store, &a, "alice", "jira", 1, 3600).await;
    let (u, t) = (user("alice"), tool("jira"));
    let (me, other) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let lease = Duration::from_secs(30);
    assert_eq!(
        store
            .leases
            .try_refresh_lease(key(&a, &u, &t), g1, me, lease)
            .await
            .unwrap(),
        RefreshLease::Acquired { failures: 0 }
    );
    assert_eq!(
        store
            .leases
            .try_refresh_lease(key(&a, &u, &t), g1, other, lease)
            .await
            .unwrap(),
        RefreshLease::Held
    );

    let g2 = store.credentials.next_generation(&a).await.unwrap();
    let s = sealed(2);
    let new = || NewCredential {
        generation: g2,
        sealed: &s,
        access_expires_at: None,
        ttl_seconds: 0,
    };
    assert!(
        store
            .credentials
            .complete_refresh(key(&a, &u, &t), g1, new(), Vec::new())
            .await
            .unwrap()
    );
    assert!(
        !store
            .credentials
            .complete_refresh(key(&a, &u, &t), g1, new(), Vec::new())
            .await
            .unwrap(),
        "a stale generation never writes"
    );
    let loaded = store
        .credentials
        .load(key(&a, &u, &t))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((loaded.generation, loaded.sealed), (g2, sealed(2)));
    assert_eq!(
        store
            .leases
            .try_refresh_lease(key(&a, &u, &t), g1, other, lease)
            .await
            .unwrap(),
        RefreshLease::Changed
    );
    assert_eq!(
        store
            .leases
            .try_refresh_lease(key(&a, &u, &t), g2, other, lease)
            .await
            .unwrap(),
        RefreshLease::Acquired { failures: 0 },
        "released by the write"
    );
}

async fn an_expired_refresh_lease_can_be_taken_over(store: &Store) {
    let a = registered(store, "agent-a").await;
    let (g1, _) = put(store, &a, "alice", "jira", 1, 3600).await;
    let (u, t) = (user("alice"), tool("jira"));
    // A lease of zero length is expired the moment it is taken: a holder that crashed.
    let short = Duration::ZERO;
    assert_eq!(
        store
            .leases
            .try_refresh_lease(key(&a, &u, &t), g1, uuid::Uuid::new_v4(), short)
            .await
            .unwrap(),
        RefreshLease::Acquired { failures: 0 }
    );
    assert_eq!(
        store
            .leases
            .try_refresh_lease(key(&a, &u, &t), g1, uuid::Uuid::new_v4(), short)
            .await
            .unwrap(),
        RefreshLease::Acquired { failures: 0 },
        "a crashed holder does not wedge it"
    );
}

async fn failures_back_off_and_reauth_sticks(store: &Store) {
    let a = registered(store, "agent-a").await;
    let (g1, _) = put(store, &a, "alice", "jira", 1, 3600).await;
    let (u, t) = (user("alice"), tool("jira"));
    let me = uuid::Uuid::new_v4();
    let until = store
        .leases
        .record_refresh_failure(
            key(&a, &u, &t),
            g1,
            refresh_backoff(
                0,
                Some(Duration::from_secs(7)),
                Duration::from_secs(1),
                Duration::from_secs(300),
            ),
            true,
        )
        .await
        .unwrap()
        .expect("recorded");
    let wait = (until - chrono::Utc::now()).num_milliseconds();
    assert!(
        (6_000..=7_500).contains(&wait),
        "Retry-After honoured: {wait} ms"
    );
    assert!(matches!(
        store
            .leases
            .try_refresh_lease(key(&a, &u, &t), g1, me, Duration::from_secs(30))
            .await
            .unwrap(),
        RefreshLease::BackingOff { .. }
    ));
    // A call the vault never sent (its provider guard held it back) waits only as long as it
    // is told and is not counted: the next lease still knows of one failure.
    store
        .leases
        .record_refresh_failure(key(&a, &u, &t), g1, Duration::ZERO, false)
        .await
        .unwrap()
        .expect("recorded");
    assert_eq!(
        store
            .leases
            .try_refresh_lease(key(&a, &u, &t), g1, me, Duration::from_secs(30))
            .await
            .unwrap(),
        RefreshLease::Acquired { failures: 1 }
    );

    store
        .credentials
        .mark_reauth_required(key(&a, &u, &t), g1, Vec::new())
        .await
        .unwrap();
    assert_eq!(
        store
            .credentials
            .load(key(&a, &u, &t))
            .await
            .unwrap()
            .unwrap()
            .state,
        CredentialState::ReauthRequired
    );
    assert_eq!(
        store
            .leases
            .try_refresh_lease(key(&a, &u, &t), g1, me, Duration::from_secs(30))
            .await
            .unwrap(),
        RefreshLease::Changed
    );

    let (g2, _) = put(store, &a, "alice", "jira", 2, 3600).await;
    assert_eq!(
        store
            .credentials
            .load(key(&a, &u, &t))
            .await
            .unwrap()
            .unwrap()
            .state,
        CredentialState::Active,
        "a new token clears the mark"
    );
    assert_eq!(
        store
            .leases
            .try_refresh_lease(key(&a, &u, &t), g2, me, Duration::from_secs(30))
            .await
            .unwrap(),
        RefreshLease::Acquired { failures: 0 },
        "and the backoff"
    );
}

async fn revocations_queue_atomically_and_are_claimed_once(store: &Store) {
    let a = registered(store, "agent-a").await;
    put(store, &a, "alice", "jira", 1, 3600).await;
    put(store, &a, "alice", "canva", 2, 3600).await;
    let me = uuid::Uuid::new_v4();
    let lease = Duration::from_secs(60);
    let queued = store
        .outbox
        .delete_into_outbox(&a, &user("alice"), None, me, lease, Vec::new())
        .await
        .unwrap();
    assert_eq!(queued.len(), 2);
    assert!(
        store
            .credentials
            .load(key(&a, &user("alice"), &tool("jira")))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        queued
            .iter()
            .any(|q| q.tool == tool("canva") && q.sealed == sealed(2))
    );

    assert!(
        store
            .outbox
            .claim_outbox(uuid::Uuid::new_v4(), lease, 10)
            .await
            .unwrap()
            .is_empty(),
        "leased to the revoker"
    );
    store
        .outbox
        .retry_outbox(
            &a,
            queued[0].id,
            Duration::from_secs(3600),
            "provider down",
            true,
        )
        .await
        .unwrap();
    store.outbox.finish_outbox(&a, queued[1].id).await.unwrap();
    assert!(
        store
            .outbox
            .claim_outbox(uuid::Uuid::new_v4(), lease, 10)
            .await
            .unwrap()
            .is_empty(),
        "retry waits out its backoff"
    );
    // The wait is the caller's to choose (vault::outbox_backoff); one that is over at once
    // makes the entry due now. An attempt the vault's provider guard never sent is not counted.
    store
        .outbox
        .retry_outbox(&a, queued[0].id, Duration::ZERO, "paused", false)
        .await
        .unwrap();
    let claimed = store
        .outbox
        .claim_outbox(uuid::Uuid::new_v4(), lease, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        (claimed[0].1.id, claimed[0].1.attempts),
        (queued[0].id, 1),
        "the provider's failure counted, the guard's pause not"
    );
    assert_eq!(claimed[0].0.agent, agent("agent-a"));
    assert!(
        store
            .outbox
            .claim_outbox(uuid::Uuid::new_v4(), lease, 10)
            .await
            .unwrap()
            .is_empty(),
        "claimed once"
    );
}

async fn a_named_lease_has_one_holder(store: &Store) {
    let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    assert!(
        store
            .leases
            .try_lease("sweeper", a, Duration::from_secs(30))
            .await
            .unwrap()
    );
    assert!(
        !store
            .leases
            .try_lease("sweeper", b, Duration::from_secs(30))
            .await
            .unwrap()
    );
    assert!(
        store
            .leases
            .try_lease("sweeper", a, Duration::from_secs(30))
            .await
            .unwrap(),
        "renewal"
    );
    assert!(
        store
            .leases
            .try_lease("other", b, Duration::from_secs(30))
            .await
            .unwrap()
    );
}

/// Now plus `seconds` (negative: in the past), to the millisecond: stores keep times to the
/// millisecond.
fn in_seconds(seconds: i64) -> DateTime<Utc> {
    let at = Utc::now() + chrono::Duration::seconds(seconds);
    DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap()
}

/// What a test begins a consent flow with: owned, so a [`NewFlow`] can borrow it.
struct FlowSpec {
    id: String,
    state_hash: [u8; 32],
    issuer: IssuerId,
    agent: AgentId,
    namespace: String,
    user: UserId,
    tool: Tool,
    scopes: Vec<String>,
    return_url: Option<String>,
    redirect_uri: String,
    provider_binding: Option<String>,
    sealed_verifier: Vec<u8>,
    expires_at: DateTime<Utc>,
}

impl FlowSpec {
    /// A flow `id` of alice at agent-a for jira, expiring `expires_in` seconds from now.
    fn new(id: &str, expires_in: i64) -> Self {
        Self {
            id: id.to_string(),
            state_hash: Sha256::digest(format!("state-of-{id}")).into(),
            issuer: iss(),
            agent: agent("agent-a"),
            namespace: vault_server::store::namespace_for(&iss(), &agent("agent-a")),
            user: user("alice"),
            tool: tool("jira"),
            scopes: vec!["read".into(), "write:issues".into()],
            return_url: Some("https://app.example/back?x=1".into()),
            redirect_uri: "https://vault.example/oauth/callback".into(),
            provider_binding: Some(
                "mcp resource=https://mcp.example/mcp issuer=https://as.example client=c1".into(),
            ),
            sealed_verifier: versioned(1, &format!("sealed-verifier-of-{id}")),
            expires_at: in_seconds(expires_in),
        }
    }

    fn as_new(&self) -> NewFlow<'_> {
        NewFlow {
            id: &self.id,
            state_hash: &self.state_hash,
            issuer: &self.issuer,
            agent: &self.agent,
            namespace: &self.namespace,
            user: &self.user,
            tool: &self.tool,
            scopes: &self.scopes,
            return_url: self.return_url.as_deref(),
            redirect_uri: &self.redirect_uri,
            provider_binding: self.provider_binding.as_deref(),
            sealed_verifier: &self.sealed_verifier,
            expires_at: self.expires_at,
        }
    }
}

/// A flow secret as the vault seals it: the agent key version first, then the seal.
fn versioned(version: u32, seal: &str) -> Vec<u8> {
    let mut out = version.to_be_bytes().to_vec();
    out.extend_from_slice(seal.as_bytes());
    out
}

/// The sealed code the callback tests store (under agent key version 1).
const CODE: &[u8] = b"\0\0\0\x01sealed-code";

/// Begins the flow `id` of agent-a (registered first), expiring `expires_in` seconds from now.
async fn begun(store: &Store, id: &str, expires_in: i64) -> FlowSpec {
    registered(store, "agent-a").await;
    let spec = FlowSpec::new(id, expires_in);
    store.flows.create_flow(&spec.as_new()).await.unwrap();
    spec
}

/// A change from `from` to `to` with nothing else written, only while unexpired.
fn change(from: FlowStatus, to: FlowStatus) -> FlowChange<'static> {
    FlowChange {
        from,
        to,
        unexpired: true,
        sealed_code: None,
        error: None,
    }
}

async fn a_flow_reads_back_whole_by_id_and_by_state(store: &Store) {
    let before = Utc::now() - chrono::Duration::seconds(60);
    let spec = begun(store, "flow-1", 600).await;
    let mut unbound = FlowSpec::new("flow-2", 600);
    unbound.return_url = None;
    unbound.scopes = Vec::new();
    store.flows.create_flow(&unbound.as_new()).await.unwrap();

    let by_id = store.flows.flow("flow-1").await.unwrap().expect("by id");
    let by_state = store
        .flows
        .flow_by_state(&spec.state_hash)
        .await
        .unwrap()
        .expect("by state");
    for flow in [&by_id, &by_state] {
        assert_eq!(flow.id, spec.id);
        assert_eq!(flow.issuer, spec.issuer);
        assert_eq!(flow.agent, spec.agent);
        assert_eq!(flow.namespace, spec.namespace);
        assert_eq!(flow.user, spec.user);
        assert_eq!(flow.tool, spec.tool);
        assert_eq!(flow.scopes, spec.scopes);
        assert_eq!(flow.return_url, spec.return_url);
        assert_eq!(flow.redirect_uri, spec.redirect_uri);
        assert_eq!(flow.provider_binding, spec.provider_binding);
        assert_eq!(flow.status, FlowStatus::Pending);
        assert_eq!(flow.error, None);
        assert_eq!(
            flow.sealed_verifier.as_deref(),
            Some(&spec.sealed_verifier[..])
        );
        assert_eq!(flow.sealed_code, None);
        assert_eq!(flow.expires_at, spec.expires_at);
        assert!(
            flow.created_at > before
                && flow.created_at < Utc::now() + chrono::Duration::seconds(60),
            "created now: {}",
            flow.created_at
        );
    }
    let unbound_read = store.flows.flow("flow-2").await.unwrap().unwrap();
    assert_eq!(unbound_read.return_url, None);
    assert!(unbound_read.scopes.is_empty());
    assert!(store.flows.flow("flow-3").await.unwrap().is_none());
    assert!(store.flows.flow_by_state(&[7; 32]).await.unwrap().is_none());

    let mut same_id = FlowSpec::new("flow-1", 600);
    same_id.state_hash = [9; 32];
    assert!(
        store.flows.create_flow(&same_id.as_new()).await.is_err(),
        "duplicate id"
    );
    let mut same_state = FlowSpec::new("flow-4", 600);
    same_state.state_hash = spec.state_hash;
    assert!(
        store.flows.create_flow(&same_state.as_new()).await.is_err(),
        "duplicate state hash"
    );
    assert!(store.flows.flow("flow-4").await.unwrap().is_none());
}

async fn a_flow_moves_once_and_only_from_the_expected_status(store: &Store) {
    begun(store, "flow-1", 600).await;
    let callback = FlowChange {
        sealed_code: Some(CODE),
        ..change(FlowStatus::Pending, FlowStatus::CallbackReceived)
    };
    assert!(store.flows.transition("flow-1", callback).await.unwrap());
    assert!(
        !store.flows.transition("flow-1", callback).await.unwrap(),
        "a replayed callback changes nothing"
    );
    assert!(
        !store
            .flows
            .transition(
                "flow-1",
                change(FlowStatus::Pending, FlowStatus::Exchanging)
            )
            .await
            .unwrap(),
        "not from a status the flow has left"
    );
    assert!(
        !store
            .flows
            .transition(
                "no-such-flow",
                change(FlowStatus::Pending, FlowStatus::Failed)
            )
            .await
            .unwrap()
    );
    let claim = change(FlowStatus::CallbackReceived, FlowStatus::Exchanging);
    assert!(store.flows.transition("flow-1", claim).await.unwrap());
    assert!(
        !store.flows.transition("flow-1", claim).await.unwrap(),
        "one completion claims it"
    );

    let flow = store.flows.flow("flow-1").await.unwrap().unwrap();
    assert_eq!(flow.status, FlowStatus::Exchanging);
    assert_eq!(
        flow.sealed_code.as_deref(),
        Some(CODE),
        "kept when not given"
    );
    assert!(flow.sealed_verifier.is_some());
    assert_eq!(flow.error, None);
}

async fn an_expired_flow_refuses_a_callback_but_can_still_be_ended(store: &Store) {
    begun(store, "flow-1", -60).await;
    let callback = FlowChange {
        sealed_code: Some(CODE),
        ..change(FlowStatus::Pending, FlowStatus::CallbackReceived)
    };
    assert!(!store.flows.transition("flow-1", callback).await.unwrap());
    let flow = store.flows.flow("flow-1").await.unwrap().unwrap();
    assert_eq!(flow.status, FlowStatus::Pending);
    assert_eq!(flow.sealed_code, None);

    let fail = FlowChange {
        unexpired: false,
        error: Some("the authorization expired"),
        ..change(FlowStatus::Pending, FlowStatus::Failed)
    };
    assert!(store.flows.transition("flow-1", fail).await.unwrap());
    let flow = store.flows.flow("flow-1").await.unwrap().unwrap();
    assert_eq!(flow.status, FlowStatus::Failed);
    assert_eq!(flow.error.as_deref(), Some("the authorization expired"));
}

async fn an_ended_flow_keeps_its_error_and_loses_its_secrets(store: &Store) {
    for (id, to) in [
        ("flow-completed", FlowStatus::Completed),
        ("flow-denied", FlowStatus::Denied),
        ("flow-failed", FlowStatus::Failed),
    ] {
        begun(store, id, 600).await;
        let callback = FlowChange {
            sealed_code: Some(CODE),
            ..change(FlowStatus::Pending, FlowStatus::CallbackReceived)
        };
        assert!(store.flows.transition(id, callback).await.unwrap());
        let error = (to != FlowStatus::Completed).then_some("access_denied by the user");
        // Even a code given with the final move is not kept.
        let end = FlowChange {
            sealed_code: Some(b"\0\0\0\x01another-sealed-code"),
            error,
            ..change(FlowStatus::CallbackReceived, to)
        };
        assert!(store.flows.transition(id, end).await.unwrap(), "{id}");
        let flow = store.flows.flow(id).await.unwrap().unwrap();
        assert_eq!(flow.status, to);
        assert_eq!(flow.sealed_verifier, None, "{id}: verifier erased");
        assert_eq!(flow.sealed_code, None, "{id}: code erased");
        assert_eq!(flow.error.as_deref(), error, "{id}");
    }
}

async fn expired_flows_are_swept_before_the_cut_off_within_the_limit(store: &Store) {
    for (id, expires_in) in [("old-1", -300), ("old-2", -200), ("old-3", -120)] {
        begun(store, id, expires_in).await;
    }
    begun(store, "recent", -10).await;
    begun(store, "live", 600).await;
    let cut_off = in_seconds(-60);
    assert_eq!(store.flows.sweep_flows(cut_off, 2).await.unwrap(), 2);
    assert_eq!(store.flows.sweep_flows(cut_off, 10).await.unwrap(), 1);
    assert_eq!(store.flows.sweep_flows(cut_off, 10).await.unwrap(), 0);
    for id in ["old-1", "old-2", "old-3"] {
        assert!(store.flows.flow(id).await.unwrap().is_none(), "{id} swept");
    }
    for id in ["recent", "live"] {
        assert!(store.flows.flow(id).await.unwrap().is_some(), "{id} kept");
    }
    // A flow kept past its expiry keeps its record, not its secrets.
    let recent = store.flows.flow("recent").await.unwrap().unwrap();
    assert!(recent.sealed_verifier.is_none() && recent.sealed_code.is_none());
    let live = store.flows.flow("live").await.unwrap().unwrap();
    assert!(live.sealed_verifier.is_some());
}

async fn a_users_credentials_are_listed_by_tool_past_their_ttl_included(store: &Store) {
    let a = registered(store, "agent-a").await;
    let b = registered(store, "agent-b").await;
    let (zoom_gen, _) = put(store, &a, "alice", "zoom", 3, 3600).await;
    let (github_gen, _) = put(store, &a, "alice", "github", 2, 0).await;
    let alice = user("alice");
    let jira = tool("jira");
    let jira_gen = store.credentials.next_generation(&a).await.unwrap();
    let access_expires_at = in_seconds(1800);
    store
        .credentials
        .upsert(
            key(&a, &alice, &jira),
            NewCredential {
                generation: jira_gen,
                sealed: &sealed(1),
                access_expires_at: Some(access_expires_at),
                ttl_seconds: 7200,
            },
            Vec::new(),
        )
        .await
        .unwrap();
    store
        .credentials
        .mark_reauth_required(key(&a, &alice, &tool("zoom")), zoom_gen, Vec::new())
        .await
        .unwrap();
    put(store, &a, "bob", "jira", 4, 3600).await;
    put(store, &b, "alice", "slack", 5, 3600).await;

    let listed = store.credentials.list(&a, &alice).await.unwrap();
    let tools: Vec<&str> = listed.iter().map(|c| c.tool.as_str()).collect();
    assert_eq!(tools, ["github", "jira", "zoom"]);
    let now = Utc::now();
    let (github, jira, zoom) = (&listed[0], &listed[1], &listed[2]);
    assert_eq!(github.generation, github_gen);
    assert_eq!(github.state, CredentialState::Active);
    assert_eq!(github.sealed, sealed(2));
    assert!(github.ttl_expires_at <= now, "past its TTL, still listed");
    assert_eq!(github.access_expires_at, None);
    assert_eq!(jira.generation, jira_gen);
    assert_eq!(jira.sealed, sealed(1));
    assert_eq!(jira.access_expires_at, Some(access_expires_at));
    assert!(jira.ttl_expires_at > now + chrono::Duration::seconds(7000));
    assert!(jira.updated_at <= now + chrono::Duration::seconds(60));
    assert!(jira.updated_at > now - chrono::Duration::seconds(60));
    assert_eq!(zoom.generation, zoom_gen);
    assert_eq!(zoom.state, CredentialState::ReauthRequired);

    let bobs = store.credentials.list(&a, &user("bob")).await.unwrap();
    assert_eq!(bobs.len(), 1);
    assert_eq!(bobs[0].sealed, sealed(4));
    let at_b = store.credentials.list(&b, &alice).await.unwrap();
    assert_eq!(at_b.len(), 1);
    assert_eq!(at_b[0].tool, tool("slack"));
    assert!(
        store
            .credentials
            .list(&a, &user("carol"))
            .await
            .unwrap()
            .is_empty()
    );
}

const AS_ISSUER: &str = "https://auth.example.com";

/// What a test saves as a client registration: owned, so a [`NewRegistration`] can borrow it.
struct RegistrationSpec {
    tool: Tool,
    issuer: String,
    client_id: String,
    sealed_secret: Option<Vec<u8>>,
    auth_method: String,
    secret_expires_at: Option<DateTime<Utc>>,
    redirect_uris: Vec<String>,
}

impl RegistrationSpec {
    /// A confidential client `client_id` for `tool` at `issuer`, its secret expiring in an hour.
    fn new(tool_name: &str, issuer: &str, client_id: &str) -> Self {
        Self {
            tool: tool(tool_name),
            issuer: issuer.to_string(),
            client_id: client_id.to_string(),
            sealed_secret: Some(format!("sealed-secret-of-{client_id}").into_bytes()),
            auth_method: "client_secret_basic".into(),
            secret_expires_at: Some(in_seconds(3600)),
            // Not in sorted order: the order saved is the order read back.
            redirect_uris: vec![
                "https://vault.example/oauth/callback".into(),
                "https://b.vault.example/oauth/callback?x=1&y=2".into(),
                "http://127.0.0.1:8080/cb".into(),
            ],
        }
    }

    /// The same client as a public one: no secret, nothing to expire.
    fn public(tool_name: &str, issuer: &str, client_id: &str) -> Self {
        Self {
            sealed_secret: None,
            auth_method: "none".into(),
            secret_expires_at: None,
            ..Self::new(tool_name, issuer, client_id)
        }
    }

    fn as_new(&self) -> NewRegistration<'_> {
        NewRegistration {
            tool: &self.tool,
            issuer: &self.issuer,
            client_id: &self.client_id,
            sealed_secret: self.sealed_secret.as_deref(),
            auth_method: &self.auth_method,
            secret_expires_at: self.secret_expires_at,
            redirect_uris: &self.redirect_uris,
        }
    }

    /// Saves it.
    async fn save(&self, store: &Store) {
        store
            .registrations
            .save_registration(&self.as_new())
            .await
            .unwrap();
    }

    /// Asserts that `read` is this registration, saved between `after` and now.
    fn assert_read_back(&self, read: &Registration, after: DateTime<Utc>) {
        assert_eq!(read.tool, self.tool);
        assert_eq!(read.issuer, self.issuer);
        assert_eq!(read.client_id, self.client_id);
        assert_eq!(read.sealed_secret, self.sealed_secret);
        assert_eq!(read.auth_method, self.auth_method);
        assert_eq!(read.secret_expires_at, self.secret_expires_at);
        assert_eq!(read.redirect_uris, self.redirect_uris);
        assert!(
            read.registered_at >= after
                && read.registered_at < Utc::now() + chrono::Duration::seconds(60),
            "registered now: {} (after {after})",
            read.registered_at
        );
    }
}

/// The registration of `tool_name` at `issuer`, if any.
async fn registration_of(store: &Store, tool_name: &str, issuer: &str) -> Option<Registration> {
    store
        .registrations
        .registration(&tool(tool_name), issuer)
        .await
        .unwrap()
}

async fn a_registration_reads_back_whole_with_or_without_a_secret(store: &Store) {
    let before = Utc::now() - chrono::Duration::seconds(60);
    assert!(registration_of(store, "jira", AS_ISSUER).await.is_none());

    let confidential = RegistrationSpec::new("jira", AS_ISSUER, "client-1");
    confidential.save(store).await;
    let public = RegistrationSpec::public("zoom", AS_ISSUER, "client-2");
    public.save(store).await;

    let read = registration_of(store, "jira", AS_ISSUER).await.unwrap();
    confidential.assert_read_back(&read, before);
    let read = registration_of(store, "zoom", AS_ISSUER).await.unwrap();
    public.assert_read_back(&read, before);
    assert_eq!(read.sealed_secret, None);
    assert_eq!(read.secret_expires_at, None);

    let mut no_uris = RegistrationSpec::new("slack", AS_ISSUER, "client-3");
    no_uris.redirect_uris = Vec::new();
    no_uris.save(store).await;
    let read = registration_of(store, "slack", AS_ISSUER).await.unwrap();
    assert!(read.redirect_uris.is_empty());

    let mut unstorable = RegistrationSpec::new("github", AS_ISSUER, "client-4");
    unstorable.redirect_uris = vec!["https://a.example/cb\nhttps://b.example/cb".into()];
    assert!(
        store
            .registrations
            .save_registration(&unstorable.as_new())
            .await
            .is_err(),
        "a redirect URI with a line break would read back as two"
    );
    assert!(registration_of(store, "github", AS_ISSUER).await.is_none());
}

async fn saving_a_registration_again_replaces_it(store: &Store) {
    RegistrationSpec::new("jira", AS_ISSUER, "client-1")
        .save(store)
        .await;
    let first = registration_of(store, "jira", AS_ISSUER).await.unwrap();

    // A public client in its place: every field is replaced, including the ones it lacks.
    let mut second = RegistrationSpec::public("jira", AS_ISSUER, "client-2");
    second.redirect_uris = vec!["https://vault.example/oauth/other-callback".into()];
    second.save(store).await;
    let read = registration_of(store, "jira", AS_ISSUER).await.unwrap();
    second.assert_read_back(&read, first.registered_at);

    let third = RegistrationSpec::new("jira", AS_ISSUER, "client-3");
    third.save(store).await;
    let read = registration_of(store, "jira", AS_ISSUER).await.unwrap();
    third.assert_read_back(&read, first.registered_at);
}

async fn a_registration_is_forgotten_only_while_its_client_is_current(store: &Store) {
    RegistrationSpec::new("jira", AS_ISSUER, "client-1")
        .save(store)
        .await;
    let fresh = RegistrationSpec::new("jira", AS_ISSUER, "client-2");
    fresh.save(store).await;
    let jira = tool("jira");

    // A replica that saw client-1 rejected, after another saved client-2 in its place.
    assert!(
        !store
            .registrations
            .forget_registration(&jira, AS_ISSUER, "client-1")
            .await
            .unwrap(),
        "a stale client deletes nothing"
    );
    let kept = registration_of(store, "jira", AS_ISSUER).await.unwrap();
    assert_eq!(kept.client_id, "client-2");
    assert_eq!(kept.sealed_secret, fresh.sealed_secret);

    assert!(
        store
            .registrations
            .forget_registration(&jira, AS_ISSUER, "client-2")
            .await
            .unwrap()
    );
    assert!(registration_of(store, "jira", AS_ISSUER).await.is_none());
    assert!(
        !store
            .registrations
            .forget_registration(&jira, AS_ISSUER, "client-2")
            .await
            .unwrap(),
        "nothing left to forget"
    );
}

async fn registrations_of_other_tools_and_issuers_are_independent(store: &Store) {
    const OTHER_ISSUER: &str = "https://login.example.org/tenant-1";
    let specs = [
        RegistrationSpec::new("jira", AS_ISSUER, "jira-at-auth"),
        RegistrationSpec::new("jira", OTHER_ISSUER, "jira-at-login"),
        RegistrationSpec::public("zoom", AS_ISSUER, "zoom-at-auth"),
        RegistrationSpec::new("zoom", OTHER_ISSUER, "zoom-at-login"),
    ];
    let before = Utc::now() - chrono::Duration::seconds(60);
    for spec in &specs {
        spec.save(store).await;
    }
    for spec in &specs {
        let read = registration_of(store, spec.tool.as_str(), &spec.issuer)
            .await
            .unwrap();
        spec.assert_read_back(&read, before);
    }
    assert!(registration_of(store, "slack", AS_ISSUER).await.is_none());
    assert!(
        registration_of(store, "jira", "https://auth.example.com/")
            .await
            .is_none(),
        "the issuer is matched exactly"
    );

    // Replacing one and forgetting another leave the rest alone.
    let replaced = RegistrationSpec::new("jira", AS_ISSUER, "jira-at-auth-2");
    replaced.save(store).await;
    assert!(
        !store
            .registrations
            .forget_registration(&tool("zoom"), OTHER_ISSUER, "zoom-at-auth")
            .await
            .unwrap(),
        "another issuer's client of the same tool"
    );
    assert!(
        !store
            .registrations
            .forget_registration(&tool("jira"), OTHER_ISSUER, "zoom-at-login")
            .await
            .unwrap(),
        "another tool's client at the same issuer"
    );
    assert!(
        store
            .registrations
            .forget_registration(&tool("zoom"), OTHER_ISSUER, "zoom-at-login")
            .await
            .unwrap()
    );
    assert!(registration_of(store, "zoom", OTHER_ISSUER).await.is_none());
    let read = registration_of(store, "jira", AS_ISSUER).await.unwrap();
    replaced.assert_read_back(&read, before);
    for spec in [&specs[1], &specs[2]] {
        let read = registration_of(store, spec.tool.as_str(), &spec.issuer)
            .await
            .unwrap();
        spec.assert_read_back(&read, before);
    }
}

async fn agents_are_listed_in_pages_in_namespace_order(store: &Store) {
    assert!(store.keys.agents(None, 10).await.unwrap().is_empty());
    let other = IssuerId::parse("https://other.test").unwrap();
    let mut made = Vec::new();
    for id in ["agent-a", "agent-b", "agent-c", "agent-d", "agent-e"] {
        made.push(registered(store, id).await);
    }
    // The same agent id under another issuer is another agent.
    made.push(
        store
            .keys
            .create_agent(
                &other,
                &agent("agent-a"),
                b"wrapped-agent-key",
                1,
                &kcv(store).await,
            )
            .await
            .unwrap(),
    );
    let mut expected: Vec<_> = made.iter().map(|a| a.namespace.clone()).collect();
    expected.sort();

    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.keys.agents(after.as_deref(), 4).await.unwrap();
        assert!(page.len() <= 4);
        listed.extend(page.iter().map(|a| a.namespace.clone()));
        match page.last() {
            Some(last) if page.len() == 4 => after = Some(last.namespace.clone()),
            _ => break,
        }
    }
    assert_eq!(listed, expected, "every agent once, in namespace order");

    let whole = store.keys.agents(None, 100).await.unwrap();
    let a_other = whole.iter().find(|a| a.issuer == other).unwrap();
    assert_eq!(
        (a_other.agent.as_str(), a_other.wrapped_key.as_slice()),
        ("agent-a", &b"wrapped-agent-key"[..])
    );
    assert!(
        store
            .keys
            .agents(Some(expected.last().unwrap()), 100)
            .await
            .unwrap()
            .is_empty()
    );
}

fn root(byte: u8) -> RootKey {
    RootKey::from_bytes([byte; 32])
}

async fn unlock(store: &Store, byte: u8) -> Result<UnlockedRoot, UnlockError> {
    unlock_root_key(store, RootKeySource::Key(root(byte))).await
}

/// Whether `key` opens what `original` sealed: the same agent key.
fn same_key(original: &AgentKey, key: &AgentKey, id: &str) -> bool {
    let (a, u, t) = (agent(id), user("u"), tool("jira"));
    let binding = Binding {
        agent: &a,
        user: &u,
        tool: &t,
        generation: Generation::new(1).unwrap(),
    };
    let tokens = vault_server::secret::TokenSet {
        access_token: "access".to_string().into(),
        refresh_token: None,
        token_type: "Bearer".into(),
        expires_at: None,
        scopes: Vec::new(),
        provider: None,
        obtained_at: None,
    };
    open_credential(key, binding, &seal_credential(original, binding, &tokens)).is_ok()
}

/// Wraps each agent's key (`keys[i]` is the key of `ids[i]`) under `root(2)` and records it
/// for the rotation whose next key check is `kc`; each must be recorded.
async fn wrap_under_root_2(
    store: &Store,
    records: &[AgentRecord],
    ids: &[&str],
    keys: &[AgentKey],
    kc: &[u8],
) {
    for record in records {
        let index = ids
            .iter()
            .position(|id| *id == record.agent.as_str())
            .unwrap();
        let wrapped = root(2)
            .wrap_agent_key(&record.issuer, &record.agent, &keys[index])
            .unwrap();
        assert!(
            store
                .keys
                .set_next_wrap(record, &wrapped, kc)
                .await
                .unwrap()
        );
    }
}

async fn a_root_rotation_moves_every_agent_key_and_fences_the_old_root(store: &Store) {
    let current = unlock(store, 1).await.unwrap();
    assert!(!current.pending);
    let ids = ["agent-a", "agent-b", "agent-c", "agent-d", "agent-e"];
    let mut keys = Vec::new();
    for id in ids {
        let key = AgentKey::generate(1);
        let wrapped = root(1).wrap_agent_key(&iss(), &agent(id), &key).unwrap();
        store
            .keys
            .create_agent(&iss(), &agent(id), &wrapped, 1, &current.key_check)
            .await
            .unwrap();
        keys.push(key);
    }

    // Begun: the next root's key check and the control key under it. A second begin (another
    // run with another key) finds the first one's.
    let next = NextRoot {
        key_check: root(2).key_check().unwrap(),
        kdf: None,
        wrapped_control_key: root(2).wrap_control_key(&current.control).unwrap(),
    };
    let begun = store.keys.begin_root_rotation(&next).await.unwrap();
    assert_eq!(begun.key_check, current.key_check, "the root is unchanged");
    let other = NextRoot {
        key_check: root(3).key_check().unwrap(),
        kdf: None,
        wrapped_control_key: root(3).wrap_control_key(&current.control).unwrap(),
    };
    let again = store.keys.begin_root_rotation(&other).await.unwrap();
    assert_eq!(again.next.unwrap().key_check, next.key_check);

    // A replica started on the next root is admitted as pending, with the same control key.
    let pending = unlock(store, 2).await.unwrap();
    assert!(pending.pending);
    let jira = tool("jira");
    let sealed = seal_client_secret(&current.control, &jira, "https://as.test", "c", b"secret");
    assert!(open_client_secret(&pending.control, &jira, "https://as.test", "c", &sealed).is_ok());
    assert!(matches!(
        unlock(store, 3).await,
        Err(UnlockError::WrongRootKey)
    ));
    // It may not register agents before the switch: no old-root wrap could exist for them.
    let refused = store
        .keys
        .create_agent(&iss(), &agent("agent-new"), b"k", 1, &pending.key_check)
        .await;
    assert!(
        matches!(refused, Err(StoreError::RootKeyChanged)),
        "{refused:?}"
    );

    // As `rotate-root` records it before it begins (the switch below then goes unrecorded,
    // as if the run were killed between the two).
    store
        .audit
        .append(
            vault_server::store::Chain::Control,
            vec![vault_server::audit::event_without_user(
                vault_server::vault::ROOT_ROTATION_STARTED,
            )],
        )
        .await
        .unwrap();

    // Two re-wrapped; the switch names the rest and changes nothing.
    let kc = next.key_check.clone();
    let first = store.keys.agents_to_rewrap(2).await.unwrap();
    assert_eq!(first.len(), 2);
    wrap_under_root_2(store, &first, &ids, &keys, &kc).await;
    assert_eq!(store.keys.rewrap_progress().await.unwrap(), (2, 5));
    let missing = match store.keys.finish_root_rotation(&kc).await.unwrap() {
        RotationSwitch::Missing(missing) => missing,
        other => panic!("switched with agents missing: {other:?}"),
    };
    assert_eq!(missing.len(), 3);
    // A wrap or a switch for another rotation than the one in progress is refused.
    assert!(
        !store
            .keys
            .set_next_wrap(&missing[0], b"wrap", &other.key_check)
            .await
            .unwrap()
    );
    assert!(matches!(
        store
            .keys
            .finish_root_rotation(&other.key_check)
            .await
            .unwrap(),
        RotationSwitch::NotPending
    ));
    assert_eq!(
        store.keys.root_key().await.unwrap().unwrap().key_check,
        current.key_check
    );
    // A wrap for a key that changed meanwhile is not recorded.
    let mut stale = missing[0].clone();
    stale.wrapped_key = b"another key".to_vec();
    assert!(
        !store
            .keys
            .set_next_wrap(&stale, b"wrap", &kc)
            .await
            .unwrap()
    );
    wrap_under_root_2(store, &missing, &ids, &keys, &kc).await;
    assert!(matches!(
        store.keys.finish_root_rotation(&kc).await.unwrap(),
        RotationSwitch::Done { agents: 5 }
    ));
    assert!(matches!(
        store.keys.finish_root_rotation(&kc).await.unwrap(),
        RotationSwitch::NotPending
    ));
    // A re-run that finds the switch made records it, once.
    let control = vault_server::store::Chain::Control;
    vault_server::vault::record_switch_if_missing(store)
        .await
        .unwrap();
    let head = store.audit.head(control).await.unwrap();
    let last = store
        .audit
        .records(control, head.sequence - 1, 1)
        .await
        .unwrap();
    assert_eq!(last[0].record.action, vault_server::vault::ROOT_ROTATED);
    vault_server::vault::record_switch_if_missing(store)
        .await
        .unwrap();
    assert_eq!(
        store.audit.head(control).await.unwrap().sequence,
        head.sequence
    );

    // Every agent key now opens under the new root only, and is the same key.
    for (id, original) in ids.iter().zip(&keys) {
        let record = store.keys.agent(&iss(), &agent(id)).await.unwrap().unwrap();
        assert!(record.next_wrapped_key.is_none());
        assert!(
            root(1)
                .unwrap_agent_key(&iss(), &agent(id), 1, &record.wrapped_key)
                .is_err()
        );
        let key = root(2)
            .unwrap_agent_key(&iss(), &agent(id), 1, &record.wrapped_key)
            .unwrap();
        assert!(same_key(original, &key, id));
    }
    // The old root no longer starts a server nor registers an agent; the new one does both.
    assert!(matches!(
        unlock(store, 1).await,
        Err(UnlockError::WrongRootKey)
    ));
    let refused = store
        .keys
        .create_agent(&iss(), &agent("agent-new"), b"k", 1, &current.key_check)
        .await;
    assert!(
        matches!(refused, Err(StoreError::RootKeyChanged)),
        "{refused:?}"
    );
    let now = unlock(store, 2).await.unwrap();
    assert!(!now.pending);
    assert!(open_client_secret(&now.control, &jira, "https://as.test", "c", &sealed).is_ok());
    let wrapped = root(2)
        .wrap_agent_key(&iss(), &agent("agent-f"), &AgentKey::generate(1))
        .unwrap();
    store
        .keys
        .create_agent(&iss(), &agent("agent-f"), &wrapped, 1, &now.key_check)
        .await
        .unwrap();

    // Abandoned halfway: the next root and its wraps are forgotten.
    let other_kc = store
        .keys
        .begin_root_rotation(&other)
        .await
        .unwrap()
        .next
        .unwrap()
        .key_check;
    let page = store.keys.agents_to_rewrap(1).await.unwrap();
    assert!(
        store
            .keys
            .set_next_wrap(&page[0], b"wrap", &other_kc)
            .await
            .unwrap()
    );
    assert!(store.keys.abort_root_rotation().await.unwrap());
    assert!(!store.keys.abort_root_rotation().await.unwrap());
    assert!(store.keys.root_key().await.unwrap().unwrap().next.is_none());
    assert_eq!(store.keys.rewrap_progress().await.unwrap(), (0, 6));
    assert!(
        !store
            .keys
            .set_next_wrap(&page[0], b"wrap", &other_kc)
            .await
            .unwrap(),
        "no wrap is recorded without a rotation in progress"
    );

    // The whole rotation as `rotate-root` runs it, reporting each batch; a re-run finds it done.
    let mut seen = Vec::new();
    let rotation = RootRotation::new(store.clone(), now, root(4), None, 4).unwrap();
    let outcome = rotation
        .run(&mut |p: RotationProgress| seen.push((p.done, p.total)))
        .await
        .unwrap();
    assert_eq!(outcome, RotationOutcome::Rotated { agents: 6 });
    assert_eq!(seen, vec![(4, 6), (6, 6), (6, 6)]);
    assert!(rotated_to(store, &root(4)).await.unwrap());
    assert!(!rotated_to(store, &root(2)).await.unwrap());
    let last = unlock(store, 4).await.unwrap();
    for (id, original) in ids.iter().zip(&keys) {
        let record = store.keys.agent(&iss(), &agent(id)).await.unwrap().unwrap();
        let key = root(4)
            .unwrap_agent_key(&iss(), &agent(id), 1, &record.wrapped_key)
            .unwrap();
        assert!(same_key(original, &key, id));
    }
    assert!(open_client_secret(&last.control, &jira, "https://as.test", "c", &sealed).is_ok());
}

async fn postgres(db: &TestDb) -> Store {
    migrated_pg(db, 4).await.1
}

async fn sqlite(dir: &tempfile::TempDir) -> Store {
    let settings = DatabaseSettings {
        max_connections: 4,
        ..DatabaseSettings::new(Database::SqliteFile(dir.path().join("vault.db")))
    };
    let store = vault_server::store::open(&settings).await.unwrap();
    store.schema.migrate().await.unwrap();
    store
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod on_postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    let db = crate::helpers::TestDb::new().await;
                    super::$case(&super::postgres(&db).await).await;
                }
            )*
        }
        mod on_sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let dir = tempfile::tempdir().unwrap();
                    super::$case(&super::sqlite(&dir).await).await;
                }
            )*
        }
    };
}

/// A credential sealed under `version`, tagged `tag`.
fn sealed_at(version: u32, tag: u8) -> SealedCredential {
    SealedCredential {
        key_version: version,
        ..sealed(tag)
    }
}

async fn an_agent_key_rotation_fences_old_seals_reseals_every_row_and_destroys_the_old_key(
    store: &Store,
) {
    let a = registered(store, "agent-a").await;
    put(store, &a, "alice", "jira", 1, 3600).await;
    put(store, &a, "bob", "jira", 2, 3600).await;
    let queued = store
        .outbox
        .delete_into_outbox(
            &a,
            &user("bob"),
            None,
            uuid::Uuid::new_v4(),
            Duration::from_secs(60),
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(queued.len(), 1);
    begun(store, "flow-r", 600).await;
    let other = registered(store, "agent-b").await;
    put(store, &other, "alice", "jira", 3, 3600).await;

    // A start from a wrap that is no longer the agent's (a root rotation re-wrapped it since it
    // was read) changes nothing: its new key would be wrapped under a root that is gone.
    let rewrapped_since = AgentRecord {
        wrapped_key: b"wrapped-under-the-old-root".to_vec(),
        ..a.clone()
    };
    assert!(
        !store
            .agent_keys
            .begin_agent_key_rotation(&rewrapped_since, b"wrapped-v2", 2, Vec::new())
            .await
            .unwrap()
    );
    assert!(
        store
            .agent_keys
            .begin_agent_key_rotation(&a, b"wrapped-v2", 2, Vec::new())
            .await
            .unwrap()
    );
    assert!(
        !store
            .agent_keys
            .begin_agent_key_rotation(&a, b"wrapped-v3", 3, Vec::new())
            .await
            .unwrap(),
        "one rotation of an agent at a time"
    );
    let a = store
        .keys
        .agent(&iss(), &agent("agent-a"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (a.key_version, a.wrapped_key.as_slice()),
        (2, &b"wrapped-v2"[..])
    );
    assert_eq!(
        a.retiring,
        Some(vault_server::store::RetiringKey {
            version: 1,
            wrapped_key: b"wrapped-agent-key".to_vec()
        })
    );

    // The fence: a write sealed under version 1 changes nothing; under version 2 it lands.
    let generation = store.credentials.next_generation(&a).await.unwrap();
    let (alice, carol, jira) = (user("alice"), user("carol"), tool("jira"));
    let stale = store
        .credentials
        .upsert(
            key(&a, &alice, &jira),
            NewCredential {
                generation,
                sealed: &sealed_at(1, 9),
                access_expires_at: None,
                ttl_seconds: 3600,
            },
            Vec::new(),
        )
        .await;
    assert!(
        matches!(stale, Err(StoreError::AgentKeyRotated)),
        "{stale:?}"
    );
    let kept = store
        .credentials
        .load(key(&a, &alice, &jira))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.sealed, sealed(1), "the fenced write changed nothing");
    let generation = store.credentials.next_generation(&a).await.unwrap();
    store
        .credentials
        .upsert(
            key(&a, &carol, &jira),
            NewCredential {
                generation,
                sealed: &sealed_at(2, 8),
                access_expires_at: None,
                ttl_seconds: 3600,
            },
            Vec::new(),
        )
        .await
        .unwrap();
    let mut stale_flow = FlowSpec::new("flow-stale", 600);
    stale_flow.state_hash = [5; 32];
    let refused = store.flows.create_flow(&stale_flow.as_new()).await;
    assert!(
        matches!(refused, Err(StoreError::AgentKeyRotated)),
        "{refused:?}"
    );
    assert!(store.flows.flow("flow-stale").await.unwrap().is_none());
    let refused = store
        .flows
        .transition(
            "flow-r",
            FlowChange {
                sealed_code: Some(CODE),
                ..change(FlowStatus::Pending, FlowStatus::CallbackReceived)
            },
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::AgentKeyRotated)),
        "{refused:?}"
    );
    assert_eq!(
        store.flows.flow("flow-r").await.unwrap().unwrap().status,
        FlowStatus::Pending
    );
    // Other agents are not fenced.
    put(store, &other, "bob", "jira", 4, 3600).await;

    // No root rotation while an agent key is retiring.
    let next = NextRoot {
        key_check: b"next-kcv".to_vec(),
        kdf: None,
        wrapped_control_key: b"next-control".to_vec(),
    };
    let refused = store.keys.begin_root_rotation(&next).await;
    assert!(
        matches!(refused, Err(StoreError::KeyRotationInProgress(_))),
        "{refused:?}"
    );

    // Every row under version 1, one of each kind; re-sealing them is a compare-and-set.
    let rows = store.agent_keys.sealed_under(&a, 1, 100).await.unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(store.agent_keys.count_sealed_under(&a, 1).await.unwrap(), 3);
    assert!(matches!(&rows[0], SealedRow::Credential { user, .. } if *user == alice));
    assert!(matches!(&rows[1], SealedRow::Revocation { user, .. } if user.as_str() == "bob"));
    assert!(matches!(&rows[2], SealedRow::Flow { id, .. } if id == "flow-r"));
    let resealed = |row: &SealedRow| match row.clone() {
        SealedRow::Credential {
            user,
            tool,
            generation,
            ..
        } => SealedRow::Credential {
            user,
            tool,
            generation,
            sealed: sealed_at(2, 7),
        },
        SealedRow::Revocation {
            id,
            user,
            tool,
            generation,
            ..
        } => SealedRow::Revocation {
            id,
            user,
            tool,
            generation,
            sealed: sealed_at(2, 6),
        },
        SealedRow::Flow {
            id,
            user,
            tool,
            code,
            ..
        } => SealedRow::Flow {
            id,
            user,
            tool,
            verifier: Some(versioned(2, "resealed-verifier")),
            code,
        },
    };
    assert!(
        store
            .agent_keys
            .reseal(&a, &rows[0], &resealed(&rows[0]))
            .await
            .unwrap()
    );
    assert!(
        !store
            .agent_keys
            .reseal(&a, &rows[0], &resealed(&rows[0]))
            .await
            .unwrap(),
        "a row that changed since it was read is left alone"
    );
    assert!(
        store
            .agent_keys
            .reseal(&a, &rows[1], &resealed(&rows[1]))
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .agent_keys
            .finish_agent_key_rotation(&a, 1, Vec::new())
            .await
            .unwrap(),
        Some(1),
        "a row is left under version 1: the old key stays"
    );
    assert!(
        store
            .keys
            .agent(&iss(), &agent("agent-a"))
            .await
            .unwrap()
            .unwrap()
            .retiring
            .is_some()
    );
    assert!(
        store
            .agent_keys
            .reseal(&a, &rows[2], &resealed(&rows[2]))
            .await
            .unwrap()
    );
    assert_eq!(store.agent_keys.count_sealed_under(&a, 1).await.unwrap(), 0);
    assert_eq!(
        store
            .agent_keys
            .finish_agent_key_rotation(&a, 1, Vec::new())
            .await
            .unwrap(),
        Some(0)
    );
    let done = store
        .keys
        .agent(&iss(), &agent("agent-a"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((done.key_version, done.retiring), (2, None));
    assert_eq!(
        store
            .agent_keys
            .finish_agent_key_rotation(&a, 1, Vec::new())
            .await
            .unwrap(),
        None
    );
    let read = store
        .credentials
        .load(key(&a, &alice, &jira))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.sealed, sealed_at(2, 7));
    let flow = store.flows.flow("flow-r").await.unwrap().unwrap();
    assert_eq!(
        flow.sealed_verifier,
        Some(versioned(2, "resealed-verifier"))
    );
    // A root rotation may start again.
    store.keys.begin_root_rotation(&next).await.unwrap();
}

conformance!(
    a_credential_round_trips_and_generations_never_repeat,
    an_older_generation_never_overwrites_a_newer_one,
    agents_and_users_do_not_see_each_other,
    the_first_agent_key_wins_a_creation_race,
    the_first_root_key_record_wins,
    expired_credentials_are_hidden_then_swept_within_the_limit,
    the_refresh_lease_admits_one_holder_and_the_write_is_fenced,
    an_expired_refresh_lease_can_be_taken_over,
    failures_back_off_and_reauth_sticks,
    revocations_queue_atomically_and_are_claimed_once,
    a_named_lease_has_one_holder,
    a_flow_reads_back_whole_by_id_and_by_state,
    a_flow_moves_once_and_only_from_the_expected_status,
    an_expired_flow_refuses_a_callback_but_can_still_be_ended,
    an_ended_flow_keeps_its_error_and_loses_its_secrets,
    expired_flows_are_swept_before_the_cut_off_within_the_limit,
    a_users_credentials_are_listed_by_tool_past_their_ttl_included,
    a_registration_reads_back_whole_with_or_without_a_secret,
    saving_a_registration_again_replaces_it,
    a_registration_is_forgotten_only_while_its_client_is_current,
    registrations_of_other_tools_and_issuers_are_independent,
    agents_are_listed_in_pages_in_namespace_order,
    a_root_rotation_moves_every_agent_key_and_fences_the_old_root,
    an_agent_key_rotation_fences_old_seals_reseals_every_row_and_destroys_the_old_key,
);

#[tokio::test]
async fn the_server_runs_on_the_embedded_store_and_keeps_tokens_across_restarts() {
    use crate::helpers::*;
    let db = TestDb::new().await;
    let issuer = Issuer::new();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("vault.db").display());
    let extra = [("VAULT_DATABASE_URL", url.as_str())];
    let app = spawn_with(&db, &issuer, &extra).await;
    let vault = app.client(&issuer, "agent-a", "alice").await;
    store(&vault, "jira", "embedded-at").await;
    assert!(matches!(
        app.client(&issuer, "agent-a", "bob")
            .await
            .get_token("jira", Duration::ZERO)
            .await,
        Err(vault_client::Error::CredentialNotFound)
    ));
    app.stop().await;

    let app = spawn_with(&db, &issuer, &extra).await;
    assert_eq!(
        access_token(&app.client(&issuer, "agent-a", "alice").await, "jira").await,
        "embedded-at"
    );
    let memory = spawn_with(&db, &issuer, &[("VAULT_DATABASE_URL", "sqlite::memory:")]).await;
    let vault = memory.client(&issuer, "agent-a", "alice").await;
    store_and_read_back(&vault, "jira", "in-memory").await;
}

/// The PostgreSQL store on `db` with `max_connections`, migrated: the backend itself (for
/// its diagnostics) and the store over it.
async fn migrated_pg(db: &TestDb, max_connections: u32) -> (PgStore, Store) {
    let settings = DatabaseSettings {
        max_connections,
        // The audit records these tests make are stamped in 2025; a floor of a day lets
        // retention reach them (the floor itself is tested with the serving role).
        audit_retention_days: 1,
        ..DatabaseSettings::new(Database::Postgres(db.url.clone().into()))
    };
    let pg = PgStore::connect(&settings).await.unwrap();
    let store = Store::new(pg.clone());
    store.schema.migrate().await.unwrap();
    (pg, store)
}

/// Reads alice's jira credential of each of `agents` (none is stored: the read runs all the same).
async fn load_each(store: &Store, agents: &[AgentRecord]) {
    for a in agents {
        store
            .credentials
            .load(key(a, &user("alice"), &tool("jira")))
            .await
            .unwrap();
    }
}

/// Each agent schema has its own SQL text, so the statement cache must hold far more than
/// sqlx's default 100 statements, or a busy vault re-parses its hot query on most calls.
#[tokio::test]
async fn the_hot_statements_of_many_agents_stay_prepared_on_one_connection() {
    let db = TestDb::new().await;
    let (pg, store) = migrated_pg(&db, 1).await;
    let mut agents = Vec::new();
    for n in 0..130 {
        agents.push(registered(&store, &format!("agent-{n}")).await);
    }
    load_each(&store, &agents).await;
    // One read connection, so its session prepared them all.
    let prepared: i64 = pg.prepared_read_statements().await.unwrap().iter().sum();
    assert!(
        prepared >= 130,
        "only {prepared} agent statements stayed prepared"
    );
}

/// Each agent has a home lane among the read connections, so its catalog entries and
/// statements stay warm on one backend instead of being loaded on each in turn.
#[tokio::test]
async fn each_agents_reads_go_to_its_own_lane() {
    let db = TestDb::new().await;
    // Four connections for the reads.
    let (pg, store) = migrated_pg(&db, 8).await;
    let mut agents = Vec::new();
    for n in 0..40 {
        agents.push(registered(&store, &format!("agent-{n}")).await);
    }
    load_each(&store, &agents).await;
    let first = pg.prepared_read_statements().await.unwrap();
    load_each(&store, &agents).await;
    let again = pg.prepared_read_statements().await.unwrap();
    assert_eq!(
        again, first,
        "a second read of each agent prepared its statement again"
    );
    // One after the other, each read found its home lane idle. Forty agents on four lanes: the
    // chance that a fair hash leaves two lanes without any is about 5e-12.
    let used = first.iter().filter(|&&count| count > 0).count();
    assert!(
        used >= 3,
        "the agents' statements sit on {used} of 4 lanes: {first:?}"
    );
    assert!(first.iter().sum::<i64>() >= 40, "{first:?}");
}

/// A backend caches catalog entries for every schema it touched: a read connection that has
/// served `VAULT_DATABASE_SCHEMAS_PER_CONNECTION` agent schemas is replaced by a fresh one.
#[tokio::test]
async fn a_read_connection_is_replaced_once_it_has_served_enough_agent_schemas() {
    let db = TestDb::new().await;
    let settings = DatabaseSettings {
        max_connections: 1,
        schemas_per_connection: 16,
        ..DatabaseSettings::new(Database::Postgres(db.url.clone().into()))
    };
    let pg = PgStore::connect(&settings).await.unwrap();
    let store = Store::new(pg.clone());
    store.schema.migrate().await.unwrap();
    let mut agents = Vec::new();
    for n in 0..40 {
        agents.push(registered(&store, &format!("agent-{n}")).await);
    }
    load_each(&store, &agents).await;
    // One read connection: it was replaced after 16 and 32 schemas, and its successor has
    // prepared only what the last 8 agents needed.
    let prepared: i64 = pg.prepared_read_statements().await.unwrap().iter().sum();
    assert!(
        (1..16).contains(&prepared),
        "{prepared} agent statements prepared on the read connection"
    );
}

/// The write pool's connections are closed once their statement cache is full (each agent's
/// SQL is its own, so a full cache means many agents served), and only then.
#[tokio::test]
async fn a_pool_connection_whose_statement_cache_filled_is_closed() {
    let db = TestDb::new().await;
    let settings = DatabaseSettings {
        max_connections: 2,
        statement_cache: 256,
        ..DatabaseSettings::new(Database::Postgres(db.url.clone().into()))
    };
    let pg = PgStore::connect(&settings).await.unwrap();
    let store = Store::new(pg);
    store.schema.migrate().await.unwrap();
    let backends = || async {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'vault-server'
             ORDER BY pid",
        )
        .fetch_all(&mut db.connect().await)
        .await
        .unwrap();
        pids
    };
    let first = registered(&store, "agent-first").await;
    put(&store, &first, "alice", "jira", 1, 3600).await;
    let before = backends().await;
    // The control statements alone leave the connection be.
    for _ in 0..20 {
        put(&store, &first, "alice", "jira", 1, 3600).await;
    }
    assert_eq!(
        backends().await,
        before,
        "a connection is kept while few agents use it"
    );
    // Each agent adds its own statements: 256 fill up well before 150 agents.
    for n in 0..150 {
        let a = registered(&store, &format!("agent-{n}")).await;
        put(&store, &a, "alice", "jira", 1, 3600).await;
    }
    eventually("a backend that served the first agent is gone", || async {
        let now = backends().await;
        before.iter().any(|pid| !now.contains(pid))
    })
    .await;
}

#[tokio::test]
async fn a_cancelled_or_severed_read_leaves_the_read_connections_usable() {
    let db = TestDb::new().await;
    let (_, store) = migrated_pg(&db, 2).await;
    let a = registered(&store, "agent-a").await;
    put(&store, &a, "alice", "jira", 7, 3600).await;
    let (alice, jira) = (user("alice"), tool("jira"));
    let read = || store.credentials.load(key(&a, &alice, &jira));
    assert_eq!(read().await.unwrap().unwrap().sealed, sealed(7));

    // A read stuck behind a lock and cancelled by its caller's deadline.
    let mut lock = db.connect().await;
    sqlx::raw_sql(&format!(
        "BEGIN; LOCK TABLE \"{}\".credentials IN ACCESS EXCLUSIVE MODE",
        a.namespace
    ))
    .execute(&mut lock)
    .await
    .unwrap();
    let cancelled = tokio::time::timeout(std::time::Duration::from_millis(300), read()).await;
    assert!(cancelled.is_err(), "the read waits for the lock");
    sqlx::raw_sql("ROLLBACK").execute(&mut lock).await.unwrap();
    assert_eq!(read().await.unwrap().unwrap().sealed, sealed(7));

    // The server ends every vault session: at most one read fails, then reads work again.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'vault-server' AND datname = current_database()",
    )
    .execute(&mut lock)
    .await
    .unwrap();
    let _ = read().await;
    assert_eq!(read().await.unwrap().unwrap().sealed, sealed(7));
}

/// A login role with no rights of its own, as docs/database-roles.md has operators create for
/// serving. It owns nothing and holds no rights of its own, so it can be dropped whether or not
/// the database still exists.
struct ServingLogin {
    name: String,
    admin_url: String,
}

impl ServingLogin {
    async fn create(db: &TestDb) -> Self {
        let login = Self {
            name: format!("{}_server", db.name),
            admin_url: std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
        };
        sqlx::raw_sql(&format!("CREATE ROLE {} LOGIN", login.name))
            .execute(&mut db.connect().await)
            .await
            .unwrap();
        login
    }

    fn url(&self, db: &TestDb) -> String {
        let mut url = url::Url::parse(&db.url).unwrap();
        url.set_username(&self.name).unwrap();
        url.set_password(None).unwrap();
        url.to_string()
    }
}

impl Drop for ServingLogin {
    fn drop(&mut self) {
        let (admin_url, sql) = (
            self.admin_url.clone(),
            format!("DROP ROLE IF EXISTS {}", self.name),
        );
        // Drop cannot await: a short-lived runtime on its own thread, as for TestDb.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                if let Ok(mut admin) =
                    <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url).await
                {
                    let _ = sqlx::raw_sql(&sql).execute(&mut admin).await;
                }
            });
        })
        .join();
    }
}

/// Flows and client registrations live in the control schema: a serving login that owns nothing
/// reaches them through the serving group (migrations 0004's and 0005's grants), while a listing
/// reads under the agent's own role.
#[tokio::test]
async fn a_separate_serving_role_keeps_flows_and_registrations_and_lists_credentials() {
    let db = TestDb::new().await;
    let login = ServingLogin::create(&db).await;
    let owner = PgStore::connect(&DatabaseSettings {
        serving_role: Some(login.name.clone()),
        ..DatabaseSettings::new(Database::Postgres(db.url.clone().into()))
    })
    .await
    .unwrap();
    Store::new(owner).schema.migrate().await.unwrap();

    let serving = Store::new(
        PgStore::connect(&DatabaseSettings::new(Database::Postgres(
            login.url(&db).into(),
        )))
        .await
        .unwrap(),
    );
    serving.schema.ready().await.unwrap();

    let spec = begun(&serving, "flow-1", 600).await;
    begun(&serving, "flow-old", -600).await;
    assert_eq!(
        serving
            .flows
            .flow_by_state(&spec.state_hash)
            .await
            .unwrap()
            .unwrap()
            .id,
        "flow-1"
    );
    assert!(
        serving
            .flows
            .transition(
                "flow-1",
                change(FlowStatus::Pending, FlowStatus::CallbackReceived)
            )
            .await
            .unwrap()
    );
    assert_eq!(
        serving.flows.sweep_flows(in_seconds(0), 10).await.unwrap(),
        1
    );

    RegistrationSpec::new("jira", AS_ISSUER, "client-1")
        .save(&serving)
        .await;
    RegistrationSpec::new("jira", AS_ISSUER, "client-2")
        .save(&serving)
        .await;
    assert_eq!(
        registration_of(&serving, "jira", AS_ISSUER)
            .await
            .unwrap()
            .client_id,
        "client-2"
    );
    assert!(
        serving
            .registrations
            .forget_registration(&tool("jira"), AS_ISSUER, "client-2")
            .await
            .unwrap()
    );

    let a = registered(&serving, "agent-a").await;
    put(&serving, &a, "alice", "jira", 1, 3600).await;
    let listed = serving.credentials.list(&a, &user("alice")).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].sealed, sealed(1));
    drop(serving);
    drop(db);
    drop(login);
}

mod audit;
