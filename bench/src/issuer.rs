//! A generated caller-token issuer: one Ed25519 key, published as a JWKS file in a temporary
//! directory that the vault server reads, and the EdDSA JWTs that key signs.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

/// The audience the vault expects by default (`VAULT_JWT_AUDIENCE`).
pub const AUDIENCE: &str = "credential-vault";
/// The claim the vault reads the agent from by default (`VAULT_JWT_AGENT_CLAIM`).
pub const AGENT_CLAIM: &str = "agent_id";

/// The trusted issuer of the run.
pub struct Issuer {
    /// The `iss` of every token; configure it as `VAULT_JWT_ISSUER`.
    pub iss: String,
    /// The JWKS file holding the public key; configure it as `VAULT_JWT_JWKS_FILE`.
    pub jwks_path: PathBuf,
    kid: String,
    encoding: EncodingKey,
    /// Owns the directory of `jwks_path`; removed with the issuer.
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("iss", &self.iss)
            .field("jwks_path", &self.jwks_path)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// Generates a key and writes its JWKS.
    pub fn generate() -> anyhow::Result<Self> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        let kid = "bench-ed25519".to_owned();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key_raw());
        let jwks = json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "use": "sig", "alg": "EdDSA"
        }]});
        let dir = tempfile::tempdir()?;
        let jwks_path = dir.path().join("jwks.json");
        std::fs::write(&jwks_path, jwks.to_string())?;
        Ok(Self {
            iss: "https://issuer.vault-bench.test".into(),
            jwks_path,
            kid,
            encoding: EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes())?,
            _dir: dir,
        })
    }

    /// A caller token for `agent` acting for `user`, valid for `lifetime` from now.
    pub fn token(&self, agent: &str, user: &str, lifetime: Duration) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let claims = json!({
            "iss": self.iss, "aud": AUDIENCE, "sub": user, AGENT_CLAIM: agent,
            "iat": now, "exp": now + lifetime.as_secs(),
            // The bench stores as a gateway and reads as the agent with one token.
            "scope": "vault:store",
        });
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&header, &claims, &self.encoding)?)
    }
}
