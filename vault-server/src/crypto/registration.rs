//! Sealing a dynamically registered client's secret (RFC 7591) under the control key, bound to the
//! registration: the secret is shared by every agent using the tool, so no agent key fits, and a
//! seal made for one (tool, issuer, client) opens for no other — a row copied onto another
//! tool's or issuer's registration, or left behind by a re-registration, does not open.

use zeroize::Zeroizing;

use super::{ControlKey, OpenError, associated_data, open, seal};
use crate::ids::Tool;

fn aad(tool: &Tool, issuer: &str, client_id: &str) -> Vec<u8> {
    associated_data(
        "client-secret",
        &[
            tool.as_str().as_bytes(),
            issuer.as_bytes(),
            client_id.as_bytes(),
        ],
    )
}

/// Seals the client secret `secret` that `issuer` issued to `client_id` for `tool`.
pub fn seal_client_secret(
    key: &ControlKey,
    tool: &Tool,
    issuer: &str,
    client_id: &str,
    secret: &[u8],
) -> Vec<u8> {
    seal(key.expose_bytes(), &aad(tool, issuer, client_id), secret)
}

/// Opens a secret sealed by [`seal_client_secret`] for exactly this tool, issuer and client.
pub fn open_client_secret(
    key: &ControlKey,
    tool: &Tool,
    issuer: &str,
    client_id: &str,
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, OpenError> {
    open(key.expose_bytes(), &aad(tool, issuer, client_id), sealed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUER: &str = "https://auth.example.com";

    #[test]
    fn a_client_secret_opens_only_for_its_tool_issuer_and_client() {
        let key = ControlKey::generate();
        let jira = Tool::parse("jira").unwrap();
        let sealed = seal_client_secret(&key, &jira, ISSUER, "client-1", b"secret-text");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));

        let opened = open_client_secret(&key, &jira, ISSUER, "client-1", &sealed).unwrap();
        assert_eq!(opened.as_slice(), b"secret-text");

        let zoom = Tool::parse("zoom").unwrap();
        assert!(open_client_secret(&key, &zoom, ISSUER, "client-1", &sealed).is_err());
        assert!(
            open_client_secret(
                &key,
                &jira,
                "https://other.example.com",
                "client-1",
                &sealed
            )
            .is_err()
        );
        assert!(open_client_secret(&key, &jira, ISSUER, "client-2", &sealed).is_err());
        assert!(open_client_secret(&key, &jira, ISSUER, "client-1", &sealed[..10]).is_err());
    }

    #[test]
    fn a_client_secret_does_not_open_under_another_control_key() {
        let jira = Tool::parse("jira").unwrap();
        let sealed = seal_client_secret(
            &ControlKey::generate(),
            &jira,
            ISSUER,
            "client-1",
            b"secret-text",
        );
        assert!(
            open_client_secret(&ControlKey::generate(), &jira, ISSUER, "client-1", &sealed)
                .is_err()
        );
    }
}
