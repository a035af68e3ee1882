//! Endpoints the tested MCP providers publish, so a registry entry can say `preset = "canva"`
//! instead of copying URLs. Any key in the entry overrides the preset; the entry's
//! `extra_authorize_params` merge over the preset's.

/// What a preset fills in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    /// RFC 6749 §3.1 authorization endpoint, where the user consents.
    pub authorization_url: &'static str,
    /// Parameters the provider requires on the authorization URL beyond the standard ones.
    pub authorize_params: &'static [(&'static str, &'static str)],
    /// RFC 6749 token endpoint.
    pub token_url: &'static str,
    /// RFC 7009 revocation endpoint, where the provider has one.
    pub revocation_url: Option<&'static str>,
    /// How the provider wants client credentials on token calls.
    pub auth_style: super::AuthStyle,
    /// The provider's published remote MCP server, used when the entry names no `client_id`:
    /// discovery and registration replace the app registration the REST endpoints need.
    pub mcp_server: &'static str,
}

/// The preset named `name`, if there is one.
pub fn preset(name: &str) -> Option<Preset> {
    use super::AuthStyle::{Basic, Post};
    match name {
        // https://developer.atlassian.com/cloud/jira/platform/oauth-2-3lo-apps/ — token endpoint
        // with client_id/client_secret in the body. Atlassian documents no RFC 7009 endpoint;
        // users revoke app access from their account settings. The authorization URL must name
        // the API gateway as `audience`, and `prompt=consent` is what the docs' URL carries.
        "atlassian" => Some(Preset {
            authorization_url: "https://auth.atlassian.com/authorize",
            authorize_params: &[("audience", "api.atlassian.com"), ("prompt", "consent")],
            token_url: "https://auth.atlassian.com/oauth/token",
            revocation_url: None,
            auth_style: Post,
            // https://support.atlassian.com/atlassian-rovo-mcp-server/ (Streamable HTTP).
            mcp_server: "https://mcp.atlassian.com/v1/mcp",
        }),
        // https://docs.stripe.com/connect/oauth-reference — POST /oauth/token with the platform
        // secret as client_secret. Stripe disconnects accounts with /oauth/deauthorize, which is
        // not RFC 7009, so no revocation endpoint is preset. Consent starts at
        // GET /oauth/authorize (Standard accounts).
        "stripe" => Some(Preset {
            authorization_url: "https://connect.stripe.com/oauth/authorize",
            authorize_params: &[],
            token_url: "https://connect.stripe.com/oauth/token",
            revocation_url: None,
            auth_style: Post,
            // https://docs.stripe.com/mcp (remote server, OAuth).
            mcp_server: "https://mcp.stripe.com",
        }),
        // https://developers.cloudflare.com/fundamentals/oauth/integrate-with-cloudflare/ — the
        // authorization, token and revoke endpoints are listed together there.
        "cloudflare" => Some(Preset {
            authorization_url: "https://dash.cloudflare.com/oauth2/auth",
            authorize_params: &[],
            token_url: "https://dash.cloudflare.com/oauth2/token",
            revocation_url: Some("https://dash.cloudflare.com/oauth2/revoke"),
            auth_style: Basic,
            // https://developers.cloudflare.com/agents/model-context-protocol/mcp-servers-for-cloudflare/
            // (the Workers Bindings server; the others differ only in the host name).
            mcp_server: "https://bindings.mcp.cloudflare.com/mcp",
        }),
        // https://www.canva.dev/docs/connect/api-reference/authentication/ — basic auth is the
        // recommended client authentication for both endpoints. The authorization URL is from
        // https://www.canva.dev/docs/connect/authentication/ (PKCE with SHA-256 is mandatory;
        // the docs spell the method `s256`, the vault sends RFC 7636's `S256`).
        "canva" => Some(Preset {
            authorization_url: "https://www.canva.com/api/oauth/authorize",
            authorize_params: &[],
            token_url: "https://api.canva.com/rest/v1/oauth/token",
            revocation_url: Some("https://api.canva.com/rest/v1/oauth/revoke"),
            auth_style: Basic,
            // https://www.canva.dev/docs/mcp/ (Canva's remote MCP server).
            mcp_server: "https://mcp.canva.com/mcp",
        }),
        _ => None,
    }
}

/// Every preset name, for error messages.
pub const NAMES: &str = "atlassian, stripe, cloudflare, canva";

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Preset> {
        NAMES
            .split(", ")
            .map(|name| preset(name).expect("every listed name is a preset"))
            .collect()
    }

    #[test]
    fn every_preset_endpoint_is_https() {
        for preset in all() {
            for url in [
                preset.authorization_url,
                preset.token_url,
                preset.mcp_server,
            ]
            .into_iter()
            .chain(preset.revocation_url)
            {
                assert_eq!(url::Url::parse(url).unwrap().scheme(), "https", "{url}");
            }
        }
    }

    #[test]
    fn no_preset_sets_a_parameter_the_vault_sets_itself() {
        for preset in all() {
            for (key, _) in preset.authorize_params {
                assert!(!super::super::is_reserved_authorize_param(key), "{key}");
            }
        }
    }
}
