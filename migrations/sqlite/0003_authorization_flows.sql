-- Consent flows, as in the PostgreSQL control schema (vault.authorization_flows): found by id or
-- by the hash of their `state`, never by agent. Times are unix milliseconds.
CREATE TABLE authorization_flows (
    id               TEXT PRIMARY KEY,
    state_hash       BLOB NOT NULL UNIQUE,
    issuer           TEXT NOT NULL,
    agent_id         TEXT NOT NULL,
    namespace        TEXT NOT NULL,
    user_id          TEXT NOT NULL,
    tool             TEXT NOT NULL,
    -- Space-separated, as in OAuth's `scope`.
    scopes           TEXT NOT NULL,
    return_url       TEXT,
    redirect_uri     TEXT NOT NULL,
    -- FlowStatus::code.
    status           INTEGER NOT NULL DEFAULT 0,
    error            TEXT,
    sealed_verifier  BLOB,
    sealed_code      BLOB,
    expires_at       INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);

CREATE INDEX authorization_flows_expires_at ON authorization_flows (expires_at);
