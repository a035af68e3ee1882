-- Dynamic client registrations (RFC 7591), one per (tool, issuer). In the control schema, not an
-- agent's: every agent and every replica uses the same client at an authorization server. The
-- client secret is sealed under the root key, bound to (tool, issuer, client_id).
CREATE TABLE IF NOT EXISTS vault.client_registrations (
    tool               text NOT NULL,
    issuer             text NOT NULL,
    client_id          text NOT NULL,
    -- NULL for a public client (token_endpoint_auth_method `none`).
    sealed_secret      bytea,
    auth_method        text NOT NULL,
    -- client_secret_expires_at; NULL when the secret does not expire.
    secret_expires_at  timestamptz,
    -- One per line, in the order registered (a URI never contains a line break).
    redirect_uris      text NOT NULL,
    registered_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tool, issuer)
);

-- The serving group reads and writes registrations like vault.authorization_flows (0004);
-- without a serving group (an owner without CREATEROLE) there is nothing to grant.
DO $$
DECLARE
    serving text := (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_serving';
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = serving) THEN
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON vault.client_registrations TO %I', serving);
    END IF;
END $$;
