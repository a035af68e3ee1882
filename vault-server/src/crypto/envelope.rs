//! Sealing one credential: a fresh data key per credential version, wrapped by the agent key;
//! the token set sealed by the data key. Both seals bind (agent, user, tool, generation,
//! agent key version).

use secrecy::ExposeSecret;
use zeroize::Zeroizing;

use super::{AgentKey, OpenError, associated_data, open, random_bytes, seal};
use crate::ids::{AgentId, Generation, Tool, UserId};
use crate::secret::TokenSet;

/// Where a ciphertext belongs. A seal made for one binding opens under no other.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    /// The owning agent.
    pub agent: &'a AgentId,
    /// The user the credential acts for.
    pub user: &'a UserId,
    /// The tool it unlocks.
    pub tool: &'a Tool,
    /// The credential version this ciphertext is.
    pub generation: Generation,
}

impl Binding<'_> {
    fn aad(&self, label: &str, key_version: u32) -> Vec<u8> {
        associated_data(
            label,
            &[
                self.agent.as_str().as_bytes(),
                self.user.as_str().as_bytes(),
                self.tool.as_str().as_bytes(),
                &self.generation.get().to_be_bytes(),
                &key_version.to_be_bytes(),
            ],
        )
    }
}

/// What the store keeps for one credential version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedCredential {
    /// The data key, sealed by the agent key.
    pub wrapped_data_key: Vec<u8>,
    /// The token set, sealed by the data key.
    pub ciphertext: Vec<u8>,
    /// The version of the agent key that wrapped the data key.
    pub key_version: u32,
}

/// Seals `tokens` for `binding` under a fresh single-use data key.
pub fn seal_credential(
    agent_key: &AgentKey,
    binding: Binding<'_>,
    tokens: &TokenSet,
) -> SealedCredential {
    let mut data_key = Zeroizing::new([0u8; 32]);
    random_bytes(data_key.as_mut());
    let version = agent_key.version;
    SealedCredential {
        wrapped_data_key: seal(
            agent_key.key.expose_secret(),
            &binding.aad("data-key", version),
            data_key.as_ref(),
        ),
        ciphertext: seal(
            &data_key,
            &binding.aad("payload", version),
            &tokens.to_plaintext(),
        ),
        key_version: version,
    }
}

/// Opens a credential sealed by [`seal_credential`] for exactly this binding.
pub fn open_credential(
    agent_key: &AgentKey,
    binding: Binding<'_>,
    sealed: &SealedCredential,
) -> Result<TokenSet, OpenError> {
    if sealed.key_version != agent_key.version {
        return Err(OpenError);
    }
    let version = agent_key.version;
    let data_key = open(
        agent_key.key.expose_secret(),
        &binding.aad("data-key", version),
        &sealed.wrapped_data_key,
    )?;
    let data_key: Zeroizing<[u8; 32]> =
        Zeroizing::new(data_key.as_slice().try_into().map_err(|_| OpenError)?);
    let plaintext = open(
        &data_key,
        &binding.aad("payload", version),
        &sealed.ciphertext,
    )?;
    TokenSet::from_plaintext(&plaintext).map_err(|_| OpenError)
}

#[cfg(test)]
mod tests {
    use secrecy::SecretString;

    use super::*;

    struct Ids {
        agent: AgentId,
        user: UserId,
        tool: Tool,
    }

    fn ids(agent: &str, user: &str, tool: &str) -> Ids {
        Ids {
            agent: AgentId::parse(agent).unwrap(),
            user: UserId::parse(user).unwrap(),
            tool: Tool::parse(tool).unwrap(),
        }
    }

    fn binding(ids: &Ids, generation: u64) -> Binding<'_> {
        Binding {
            agent: &ids.agent,
            user: &ids.user,
            tool: &ids.tool,
            generation: Generation::new(generation).unwrap(),
        }
    }

    fn tokens() -> TokenSet {
        TokenSet {
            access_token: SecretString::from("access-abc"),
            refresh_token: Some(SecretString::from("refresh-xyz")),
            token_type: "Bearer".into(),
            expires_at: Some(1_900_000_000),
            scopes: vec!["read:jira-work".into()],
            provider: None,
            obtained_at: None,
        }
    }

    #[test]
    fn a_sealed_credential_opens_for_its_own_binding() {
        let key = AgentKey::generate(1);
        let at = ids("agent", "alice", "jira");
        let sealed = seal_credential(&key, binding(&at, 4), &tokens());
        let opened = open_credential(&key, binding(&at, 4), &sealed).unwrap();
        assert_eq!(opened.access_token.expose_secret(), "access-abc");
        assert_eq!(opened.refresh_token.unwrap().expose_secret(), "refresh-xyz");
        assert_eq!(opened.scopes, vec!["read:jira-work".to_string()]);
    }

    #[test]
    fn the_ciphertext_contains_no_plaintext() {
        let key = AgentKey::generate(1);
        let at = ids("agent", "alice", "jira");
        let sealed = seal_credential(&key, binding(&at, 1), &tokens());
        for blob in [&sealed.ciphertext, &sealed.wrapped_data_key] {
            assert!(!blob.windows(6).any(|w| w == b"access" || w == b"refres"));
        }
    }

    #[test]
    fn a_ciphertext_moved_to_another_user_does_not_open() {
        let key = AgentKey::generate(1);
        let alice = ids("agent", "alice", "jira");
        let bob = ids("agent", "bob", "jira");
        let sealed = seal_credential(&key, binding(&alice, 1), &tokens());
        assert_eq!(
            open_credential(&key, binding(&bob, 1), &sealed).unwrap_err(),
            OpenError
        );
    }

    #[test]
    fn a_ciphertext_moved_to_another_tool_agent_or_generation_does_not_open() {
        let key = AgentKey::generate(1);
        let home = ids("agent", "alice", "jira");
        let sealed = seal_credential(&key, binding(&home, 2), &tokens());
        let other_tool = ids("agent", "alice", "stripe");
        let other_agent = ids("agent-2", "alice", "jira");
        assert!(open_credential(&key, binding(&other_tool, 2), &sealed).is_err());
        assert!(open_credential(&key, binding(&other_agent, 2), &sealed).is_err());
        assert!(open_credential(&key, binding(&home, 1), &sealed).is_err());
        assert!(open_credential(&AgentKey::generate(1), binding(&home, 2), &sealed).is_err());
    }

    #[test]
    fn a_flipped_bit_anywhere_is_detected() {
        let key = AgentKey::generate(1);
        let at = ids("agent", "alice", "jira");
        let sealed = seal_credential(&key, binding(&at, 1), &tokens());
        for i in 0..sealed.ciphertext.len() {
            let mut bad = sealed.clone();
            bad.ciphertext[i] ^= 1;
            assert!(
                open_credential(&key, binding(&at, 1), &bad).is_err(),
                "byte {i}"
            );
        }
        let mut bad = sealed.clone();
        bad.wrapped_data_key[20] ^= 0x80;
        assert!(open_credential(&key, binding(&at, 1), &bad).is_err());
    }

    #[test]
    fn swapping_data_keys_between_rows_does_not_open() {
        let key = AgentKey::generate(1);
        let alice = ids("agent", "alice", "jira");
        let bob = ids("agent", "bob", "jira");
        let a = seal_credential(&key, binding(&alice, 1), &tokens());
        let b = seal_credential(&key, binding(&bob, 1), &tokens());
        let franken = SealedCredential {
            wrapped_data_key: b.wrapped_data_key.clone(),
            ciphertext: a.ciphertext.clone(),
            key_version: 1,
        };
        assert!(open_credential(&key, binding(&alice, 1), &franken).is_err());
        assert!(open_credential(&key, binding(&bob, 1), &franken).is_err());
    }
}
