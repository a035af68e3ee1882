//! The production guide's caller-identity recipe (docs/production.md, "Tested recipe: the
//! repository's oidc-provider"), run as the guide writes it: the test reads the recipe's shell
//! block from the document, starts the repository's oidc-provider with the flag it names, runs
//! `vault-server keygen` and `vault-server serve` with the settings it names, and sends the
//! token request it shows (client credentials, Basic client authentication, the same form
//! fields). Only the ports differ (0 instead of 8443 and 50051), and the calls go through
//! `vault-client` instead of `buf curl`. A change to the recipe that the vault does not accept
//! fails here.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use vault_client::Error;

use crate::helpers::*;
use crate::provider::*;

/// The recipe's shell commands, continuation lines joined.
struct Recipe {
    commands: Vec<String>,
}

impl Recipe {
    fn from_doc() -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/production.md");
        let text = std::fs::read_to_string(&path).expect("docs/production.md exists");
        let section = text
            .split("### Tested recipe")
            .nth(1)
            .expect("docs/production.md has a \"Tested recipe\" section");
        let block = section
            .split("```sh\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("the tested recipe has a ```sh block");
        let commands = block
            .replace("\\\n", " ")
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .map(String::from)
            .collect();
        Self { commands }
    }

    /// The one command containing `needle`.
    fn command(&self, needle: &str) -> &str {
        let found: Vec<&String> = self
            .commands
            .iter()
            .filter(|c| c.contains(needle))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "the recipe has exactly one command with {needle:?}: {:?}",
            self.commands
        );
        found[0]
    }
}

/// The shell words of `command`, quotes removed and `$NAME` replaced from `vars`. Enough for
/// the recipe's commands, which quote only whole words.
fn words(command: &str, vars: &[(&str, String)]) -> Vec<String> {
    command
        .split_whitespace()
        .map(|word| {
            let mut word = word.replace(['"', '\''], "");
            for (name, value) in vars {
                word = word.replace(&format!("${name}"), value);
            }
            word
        })
        .collect()
}

/// The value after each `flag` in `words`.
fn after<'a>(words: &'a [String], flag: &str) -> Vec<&'a str> {
    words
        .windows(2)
        .filter(|pair| pair[0] == flag)
        .map(|pair| pair[1].as_str())
        .collect()
}

/// The recipe's token request, with the client's id and secret as `-u` names them.
struct TokenRequest {
    url: String,
    client_id: String,
    client_secret: String,
    form: Vec<(String, String)>,
}

impl TokenRequest {
    fn from_curl(words: &[String]) -> Self {
        let user = after(words, "-u");
        let (client_id, client_secret) = user
            .first()
            .and_then(|u| u.split_once(':'))
            .expect("the token request authenticates the client with -u id:secret");
        let form = after(words, "-d")
            .into_iter()
            .map(|pair| {
                let (k, v) = pair.split_once('=').expect("-d name=value");
                (k.to_string(), v.to_string())
            })
            .collect();
        let url = words
            .iter()
            .find(|w| w.starts_with("https://") && w.ends_with("/token"))
            .expect("the token request goes to the token endpoint")
            .clone();
        Self {
            url,
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            form,
        }
    }

    /// Sends the request as `client_id`/`client_secret` and returns the access token.
    async fn send_as(&self, http: &reqwest::Client, client_id: &str, secret: &str) -> String {
        let response = http
            .post(&self.url)
            .basic_auth(client_id, Some(secret))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(
                url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(&self.form)
                    .finish(),
            )
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert!(status.is_success(), "token request refused: {body}");
        body["access_token"]
            .as_str()
            .expect("an access token")
            .to_string()
    }
}

/// The JSON body of a `buf curl` command (`-d '{...}'`).
fn buf_curl_body(command: &str) -> Value {
    let body = command
        .split("-d '")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .expect("buf curl -d '{...}'");
    serde_json::from_str(body).unwrap()
}

/// The claims of a JWT, unverified (the vault verifies; this only shows what it was given).
fn claims(jwt: &str) -> Value {
    use base64::Engine as _;
    let payload = jwt.split('.').nth(1).expect("a JWS");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn the_production_recipe_mints_a_caller_token_the_vault_accepts() {
    // Arrange: the recipe, the provider it starts and the vault it configures.
    let recipe = Recipe::from_doc();
    let pki = TestPki::new();
    let dir = tempfile::tempdir().unwrap();

    let vars_line = words(&recipe.commands[0], &[]);
    let names: Vec<&str> = vars_line
        .iter()
        .filter_map(|w| w.split_once('=').map(|(k, _)| k))
        .collect();
    assert_eq!(names, ["IDP", "CA", "DIR"], "the recipe's first line");

    let provider_line = words(recipe.command("provider.mjs"), &[]);
    assert!(
        provider_line.iter().any(|w| w == "--caller-tokens"),
        "the recipe starts the provider with --caller-tokens"
    );
    let provider = OidcProvider::start_with_flags(
        &pki,
        &dir.path().join("idp"),
        0,
        3600,
        &[],
        &["--caller-tokens"],
    );
    let issuer = provider.ready.issuer.clone();
    let vars = [
        ("IDP", issuer.clone()),
        ("CA", pki.ca_path.display().to_string()),
        ("DIR", dir.path().display().to_string()),
    ];

    // What the doc says about the provider is what it serves: its discovery names the JWKS URL
    // the recipe gives the vault, and its token endpoint.
    let http = pki.client();
    let discovery: Value = http
        .get(format!("{issuer}/.well-known/openid-configuration"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(discovery["jwks_uri"], format!("{issuer}/jwks"));
    assert_eq!(discovery["token_endpoint"], format!("{issuer}/token"));

    let keygen = words(recipe.command("keygen"), &vars);
    let at = keygen.iter().position(|w| w == "keygen").unwrap();
    let args: Vec<&str> = keygen[at..].iter().map(String::as_str).collect();
    let (ok, stderr) = run_binary_to_exit(&args, &[]);
    assert!(ok, "{args:?} failed: {stderr}");

    let serve = words(recipe.command("vault-server serve"), &vars);
    let mut settings: Vec<(&str, &str)> = serve
        .iter()
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| k.starts_with("VAULT_"))
        .collect();
    let named: Vec<&str> = settings.iter().map(|(k, _)| *k).collect();
    for needed in [
        "VAULT_JWT_ISSUER",
        "VAULT_JWT_JWKS_URL",
        "VAULT_PROVIDER_CA_FILE",
    ] {
        assert!(named.contains(&needed), "the recipe sets {needed}");
    }
    settings.push(("VAULT_LISTEN", "127.0.0.1:0"));
    let vault = start_binary(&settings).await;

    let request = TokenRequest::from_curl(&words(recipe.command("$(curl"), &vars));
    let callers = provider
        .ready
        .caller_tokens
        .clone()
        .expect("--caller-tokens lists its clients");
    let gateway = callers
        .clients
        .iter()
        .find(|c| c.client_id == request.client_id)
        .expect("the recipe's client is one of the provider's caller clients");
    assert_eq!(request.client_secret, gateway.client_secret);
    assert!(
        request
            .form
            .contains(&("resource".to_string(), callers.resource.clone())),
        "the recipe asks for the vault's resource indicator"
    );
    let no_agent = callers
        .clients
        .iter()
        .find(|c| c.agent_id.is_none())
        .expect("the provider has a caller client without the agent claim");

    // Act: the token request as the recipe shows it, then StoreToken and GetToken with it.
    let token = request
        .send_as(&http, &request.client_id, &request.client_secret)
        .await;
    let seen = claims(&token);
    assert_eq!(seen["iss"], issuer.as_str());
    assert_eq!(seen["aud"], callers.audience.as_str());
    assert_eq!(callers.audience, AUDIENCE, "the vault's default audience");
    assert_eq!(seen["sub"], gateway.client_id.as_str());
    assert_eq!(
        seen[&callers.agent_claim],
        gateway.agent_id.as_deref().unwrap()
    );
    assert_eq!(seen["scope"], "vault:store");

    // StoreToken and GetToken with the bodies the recipe's buf curl commands send.
    let store_body = buf_curl_body(recipe.command("StoreToken"));
    let get_body = buf_curl_body(recipe.command("GetToken"));
    let tool = store_body["tool"].as_str().unwrap();
    assert_eq!(get_body["tool"], tool);
    let access = store_body["token"]["access_token"].as_str().unwrap();
    let expires_at =
        chrono::DateTime::parse_from_rfc3339(store_body["token"]["expires_at"].as_str().unwrap())
            .unwrap();
    let mut set = vault_client::TokenSet::bearer(access);
    set.expires_at = Some(
        SystemTime::UNIX_EPOCH + Duration::from_secs(expires_at.timestamp().try_into().unwrap()),
    );
    let client = vault.client_with(&token).await;
    let stored = client.store_token(tool, set, None).await;
    let read = client.get_token(tool, Duration::ZERO).await;

    // The same request as the client whose tokens lack the agent claim.
    let without_agent = request
        .send_as(&http, &no_agent.client_id, &no_agent.client_secret)
        .await;
    assert!(claims(&without_agent).get(&callers.agent_claim).is_none());
    let refused = vault
        .client_with(&without_agent)
        .await
        .get_token(tool, Duration::ZERO)
        .await;

    // Assert
    stored.expect("StoreToken with the provider's token");
    assert_eq!(
        read.expect("GetToken with the provider's token")
            .access_token,
        access
    );
    match refused {
        Err(Error::Unauthenticated(message)) => assert!(
            message.contains("agent"),
            "the refusal names the agent claim: {message}"
        ),
        other => panic!("a token without the agent claim was not refused: {other:?}"),
    }
}
