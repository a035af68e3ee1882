-- Per-agent schema template: {schema} is replaced by the quoted, hash-derived schema name.

-- Generations never repeat within an agent, even across delete and re-store, so an old
-- ciphertext (bound to its generation) can never be replayed as the current one.
CREATE SEQUENCE {schema}.generation_seq;

CREATE TABLE {schema}.credentials (
    user_id              text NOT NULL,
    tool                 text NOT NULL,
    generation           bigint NOT NULL,
    -- 0 = active, 1 = the provider rejected the grant: re-authorization required.
    state                smallint NOT NULL DEFAULT 0,
    key_version          integer NOT NULL,
    wrapped_data_key     bytea NOT NULL,
    ciphertext           bytea NOT NULL,
    access_expires_at    timestamptz,
    ttl_expires_at       timestamptz NOT NULL,
    refresh_lease_owner  uuid,
    refresh_lease_until  timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, tool)
);

CREATE INDEX credentials_ttl_expires_at ON {schema}.credentials (ttl_expires_at);
