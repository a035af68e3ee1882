//! Criterion micro-benchmarks of the CPU work on GetToken's path that the end-to-end bench
//! cannot separate from the network and the database: opening the credential envelope (two
//! AES-256-GCM opens and the token-set decode), sealing one (StoreToken's side), and verifying
//! the caller's EdDSA JWT exactly as the server's auth layer does, both for a token the
//! verifier has already seen and for one it has not.
//!
//! `cargo bench -p vault-bench --bench hot_path`

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use secrecy::SecretString;
use vault_bench::issuer::Issuer;
use vault_server::auth::Verifier;
use vault_server::config::{Settings, Source};
use vault_server::crypto::{AgentKey, Binding, open_credential, seal_credential};
use vault_server::ids::{AgentId, Generation, Tool, UserId};
use vault_server::secret::TokenSet;

/// A token set shaped like the ones vault-bench seeds: 67-byte access and refresh tokens.
fn token_set() -> TokenSet {
    TokenSet {
        access_token: SecretString::from(format!("at_{}", "a".repeat(64))),
        refresh_token: Some(SecretString::from(format!("rt_{}", "r".repeat(64)))),
        token_type: "Bearer".into(),
        expires_at: Some(1_900_000_000),
        scopes: vec!["read:jira-work".into(), "offline_access".into()],
        provider: Some("https://auth.atlassian.com".into()),
        obtained_at: Some(1_800_000_000),
    }
}

fn envelope(c: &mut Criterion) {
    let key = AgentKey::generate(1);
    // Ids of the bench's own shape; valid by construction.
    let agent = AgentId::parse("agent-042").expect("valid agent id");
    let user = UserId::parse("user-0042").expect("valid user id");
    let tool = Tool::parse("jira").expect("valid tool");
    let binding = Binding {
        agent: &agent,
        user: &user,
        tool: &tool,
        generation: Generation::new(7).expect("positive generation"),
    };
    let tokens = token_set();
    let sealed = seal_credential(&key, binding, &tokens);
    let mut group = c.benchmark_group("envelope");
    group.bench_function("open_credential", |b| {
        b.iter(|| open_credential(black_box(&key), black_box(binding), black_box(&sealed)))
    });
    group.bench_function("seal_credential", |b| {
        b.iter(|| seal_credential(black_box(&key), black_box(binding), black_box(&tokens)))
    });
    group.finish();
}

fn jwt(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds");
    let issuer = Issuer::generate().expect("issuer key and JWKS file");
    let jwks = issuer.jwks_path.to_str().expect("temp paths are UTF-8");
    // The JwtSettings come from the server's own settings loader, so the verifier runs with
    // exactly the defaults `serve` would use (leeway, lifetime cap, agent claim). The database
    // URL and root key are required by the loader but never used here.
    let settings = Settings::load(&Source::from_pairs([
        ("VAULT_DATABASE_URL", "postgres://unused@127.0.0.1:1/unused"),
        (
            "VAULT_ROOT_KEY",
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        ),
        ("VAULT_JWT_ISSUER", issuer.iss.as_str()),
        ("VAULT_JWT_JWKS_FILE", jwks),
    ]))
    .expect("valid settings");
    let verifier = runtime
        .block_on(Verifier::new(
            settings.jwt,
            vault_server::http::Outbound::new(&settings.providers.http()).expect("no CA file"),
        ))
        .expect("the JWKS file loads");
    let token = issuer
        .token("agent-042", "user-0042", Duration::from_secs(3600))
        .expect("token signs");
    // Fail loudly here rather than benchmark the rejection path.
    runtime
        .block_on(verifier.verify(&token))
        .expect("the bench token verifies");
    let mut group = c.benchmark_group("jwt");
    // The verifier remembers tokens it has verified, so a caller re-using its JWT pays for the
    // signature once: this is what every call after the first costs.
    group.bench_function("verify_eddsa_seen", |b| {
        b.to_async(&runtime)
            .iter(|| async { verifier.verify(black_box(&token)).await })
    });
    // A token the verifier has not seen: the full EdDSA check. Each iteration gets a token with
    // a new `sub` (signed outside the timing), since the same claims sign to the same token.
    let mut fresh = 0u64;
    let verifier = &verifier;
    group.bench_function("verify_eddsa_first_use", |b| {
        b.to_async(&runtime).iter_batched(
            || {
                fresh += 1;
                issuer
                    .token(
                        "agent-042",
                        &format!("user-{fresh}"),
                        Duration::from_secs(3600),
                    )
                    .expect("token signs")
            },
            |token| async move { verifier.verify(black_box(&token)).await },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, envelope, jwt);
criterion_main!(benches);
