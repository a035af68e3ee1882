//! Sealing a consent flow's secrets (the PKCE verifier, then the authorization code) under the
//! agent key, bound to the flow: a seal made for one flow, or for one kind of secret, opens for
//! no other, and never as a credential.

use secrecy::ExposeSecret;
use zeroize::Zeroizing;

use super::{AgentKey, OpenError, associated_data, open, seal};
use crate::ids::{AgentId, Tool, UserId};

/// Which secret of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowSecret {
    /// The PKCE code verifier.
    Verifier,
    /// The authorization code from the callback.
    Code,
}

/// The flow a secret belongs to.
#[derive(Debug, Clone, Copy)]
pub struct FlowBinding<'a> {
    /// The agent that began the flow.
    pub agent: &'a AgentId,
    /// The user it acts for.
    pub user: &'a UserId,
    /// The tool.
    pub tool: &'a Tool,
    /// The flow's `authorization_id`.
    pub flow: &'a str,
}

impl FlowBinding<'_> {
    fn aad(&self, secret: FlowSecret, key_version: u32) -> Vec<u8> {
        let label = match secret {
            FlowSecret::Verifier => "flow-verifier",
            FlowSecret::Code => "flow-code",
        };
        associated_data(
            label,
            &[
                self.agent.as_str().as_bytes(),
                self.user.as_str().as_bytes(),
                self.tool.as_str().as_bytes(),
                self.flow.as_bytes(),
                &key_version.to_be_bytes(),
            ],
        )
    }
}

/// Seals `secret` for `binding`: the agent key's version (4 bytes, big-endian), then the seal.
pub fn seal_flow_secret(
    agent_key: &AgentKey,
    binding: FlowBinding<'_>,
    kind: FlowSecret,
    secret: &[u8],
) -> Vec<u8> {
    let version = agent_key.version;
    let mut out = version.to_be_bytes().to_vec();
    out.extend(seal(
        agent_key.key.expose_secret(),
        &binding.aad(kind, version),
        secret,
    ));
    out
}

/// The agent key version a flow secret was sealed under (its first four bytes).
pub fn flow_secret_version(sealed: &[u8]) -> Option<u32> {
    sealed.first_chunk::<4>().map(|v| u32::from_be_bytes(*v))
}

/// Opens a secret sealed by [`seal_flow_secret`] for exactly this binding and kind.
pub fn open_flow_secret(
    agent_key: &AgentKey,
    binding: FlowBinding<'_>,
    kind: FlowSecret,
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, OpenError> {
    let (version, blob) = sealed.split_first_chunk::<4>().ok_or(OpenError)?;
    let version = u32::from_be_bytes(*version);
    if version != agent_key.version {
        return Err(OpenError);
    }
    open(
        agent_key.key.expose_secret(),
        &binding.aad(kind, version),
        blob,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_secret_opens_only_for_its_flow_and_kind() {
        let key = AgentKey::generate(1);
        let agent = AgentId::parse("agent").unwrap();
        let user = UserId::parse("alice").unwrap();
        let tool = Tool::parse("jira").unwrap();
        let binding = FlowBinding {
            agent: &agent,
            user: &user,
            tool: &tool,
            flow: "flow-1",
        };
        let sealed = seal_flow_secret(&key, binding, FlowSecret::Verifier, b"verifier-text");
        assert!(!sealed.windows(8).any(|w| w == b"verifier"));
        let opened = open_flow_secret(&key, binding, FlowSecret::Verifier, &sealed).unwrap();
        assert_eq!(opened.as_slice(), b"verifier-text");
        assert!(open_flow_secret(&key, binding, FlowSecret::Code, &sealed).is_err());
        let other_flow = FlowBinding {
            flow: "flow-2",
            ..binding
        };
        assert!(open_flow_secret(&key, other_flow, FlowSecret::Verifier, &sealed).is_err());
        let bob = UserId::parse("bob").unwrap();
        let other_user = FlowBinding {
            user: &bob,
            ..binding
        };
        assert!(open_flow_secret(&key, other_user, FlowSecret::Verifier, &sealed).is_err());
        assert!(
            open_flow_secret(
                &AgentKey::generate(1),
                binding,
                FlowSecret::Verifier,
                &sealed
            )
            .is_err()
        );
        assert!(open_flow_secret(&key, binding, FlowSecret::Verifier, &sealed[..3]).is_err());
    }
}
