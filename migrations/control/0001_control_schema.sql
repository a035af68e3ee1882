-- Control schema: the root key's check value, the agent registry, and cross-replica leases.
-- Applied by sqlx's migrator with search_path = vault; names are qualified anyway.

CREATE TABLE IF NOT EXISTS vault.root_key (
    id          smallint PRIMARY KEY CHECK (id = 1),
    -- AES-GCM seal of a constant under the root key: a wrong key fails to open it.
    key_check   bytea NOT NULL,
    -- Present when the root key is derived from a passphrase with Argon2id.
    kdf_salt    bytea,
    kdf_m_cost  integer,
    kdf_t_cost  integer,
    kdf_p_cost  integer,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS vault.agents (
    agent_id        text PRIMARY KEY,
    -- Derived from a hash of agent_id, never from the id itself.
    schema_name     text NOT NULL UNIQUE,
    -- The agent key, AES-256-GCM-wrapped by the root key, bound to (agent_id, key_version).
    wrapped_key     bytea NOT NULL,
    key_version     integer NOT NULL,
    -- The last per-agent migration applied to schema_name.
    schema_version  integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS vault.leases (
    name        text PRIMARY KEY,
    holder      uuid NOT NULL,
    expires_at  timestamptz NOT NULL
);
