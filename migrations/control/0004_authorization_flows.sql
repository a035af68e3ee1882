-- Consent flows (authorization code + PKCE) between BeginAuthorization and
-- CompleteAuthorization. In the control schema, not an agent's: the provider's callback finds a
-- flow by the hash of its `state` before it knows which agent began it. Only the hash of the
-- state is kept; the PKCE verifier and the code are sealed under the agent key, and erased when
-- the flow ends.
CREATE TABLE IF NOT EXISTS vault.authorization_flows (
    id               text PRIMARY KEY,
    state_hash       bytea NOT NULL UNIQUE,
    issuer           text NOT NULL,
    agent_id         text NOT NULL,
    namespace        text NOT NULL,
    user_id          text NOT NULL,
    tool             text NOT NULL,
    -- Space-separated, as in OAuth's `scope` (a scope never contains a space).
    scopes           text NOT NULL,
    return_url       text,
    redirect_uri     text NOT NULL,
    -- FlowStatus::code: 0 pending, 1 callback received, 2 exchanging, 3 completed, 4 denied,
    -- 5 failed.
    status           smallint NOT NULL DEFAULT 0,
    error            text,
    sealed_verifier  bytea,
    sealed_code      bytea,
    expires_at       timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS authorization_flows_expires_at
    ON vault.authorization_flows (expires_at);

-- The serving group reads and writes flows like vault.leases (0003); without a serving group
-- (an owner without CREATEROLE) there is nothing to grant.
DO $$
DECLARE
    serving text := (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_serving';
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = serving) THEN
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON vault.authorization_flows TO %I', serving);
    END IF;
END $$;
