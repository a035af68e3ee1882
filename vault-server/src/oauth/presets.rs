//! Endpoints the tested MCP providers publish, so a registry entry can say `preset = "canva"`
//! instead of copying URLs. Any key in the entry overrides the preset.

/// What a preset fills in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preset {
    /// RFC 6749 token endpoint.
    pub token_url: &'static str,
    /// RFC 7009 revocation endpoint, where the provider has one.
    pub revocation_url: Option<&'static str>,
    /// How the provider wants client credentials on token calls.
    pub auth_style: super::AuthStyle,
}

/// The preset named `name`, if there is one.
pub fn preset(name: &str) -> Option<Preset> {
    use super::AuthStyle::{Basic, Post};
    match name {
        // https://developer.atlassian.com/cloud/jira/platform/oauth-2-3lo-apps/ — token endpoint
        // with client_id/client_secret in the body. Atlassian documents no RFC 7009 endpoint;
        // users revoke app access from their account settings.
        "atlassian" => Some(Preset {
            token_url: "https://auth.atlassian.com/oauth/token",
            revocation_url: None,
            auth_style: Post,
        }),
        // https://docs.stripe.com/connect/oauth-reference — POST /oauth/token with the platform
        // secret as client_secret. Stripe disconnects accounts with /oauth/deauthorize, which is
        // not RFC 7009, so no revocation endpoint is preset.
        "stripe" => Some(Preset {
            token_url: "https://connect.stripe.com/oauth/token",
            revocation_url: None,
            auth_style: Post,
        }),
        // https://developers.cloudflare.com/fundamentals/oauth/integrate-with-cloudflare/
        "cloudflare" => Some(Preset {
            token_url: "https://dash.cloudflare.com/oauth2/token",
            revocation_url: Some("https://dash.cloudflare.com/oauth2/revoke"),
            auth_style: Basic,
        }),
        // https://www.canva.dev/docs/connect/api-reference/authentication/ — basic auth is the
        // recommended client authentication for both endpoints.
        "canva" => Some(Preset {
            token_url: "https://api.canva.com/rest/v1/oauth/token",
            revocation_url: Some("https://api.canva.com/rest/v1/oauth/revoke"),
            auth_style: Basic,
        }),
        _ => None,
    }
}

/// Every preset name, for error messages.
pub const NAMES: &str = "atlassian, stripe, cloudflare, canva";
