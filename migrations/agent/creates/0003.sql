-- A new agent schema at per-agent version 3 in one pass: what templates 0001 to 0003 make, in the
-- same column order, without their ALTER TABLE. An ALTER TABLE on a new table costs a scan of
-- the whole of pg_index (about ten rows per agent), so a new schema made template by template
-- got slower with every agent (control migration 0015). Existing schemas are still upgraded by
-- the templates; a test checks that both ways make the same schema. {schema} is replaced by the
-- quoted schema name.

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
    -- Transient provider failures back off per credential: no provider call before
    -- refresh_not_before, and the window doubles with each consecutive failure.
    refresh_failures     integer NOT NULL DEFAULT 0,
    refresh_not_before   timestamptz,
    PRIMARY KEY (user_id, tool)
);

CREATE INDEX credentials_ttl_expires_at ON {schema}.credentials (ttl_expires_at);

-- Revocations owed to a provider. Revoke deletes the credential and writes this row in one
-- transaction, so a provider outage or a crash loses no revocation.
CREATE TABLE {schema}.revocation_outbox (
    id                bigserial PRIMARY KEY,
    user_id           text NOT NULL,
    tool              text NOT NULL,
    generation        bigint NOT NULL,
    key_version       integer NOT NULL,
    wrapped_data_key  bytea NOT NULL,
    ciphertext        bytea NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    attempts          integer NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    lease_owner       uuid,
    lease_until       timestamptz,
    last_error        text
);

CREATE INDEX revocation_outbox_next_attempt ON {schema}.revocation_outbox (next_attempt_at);

-- The agent's audit chain (issue 15): appended only, deleted as a prefix by retention.
CREATE TABLE {schema}.audit_log (
    sequence       bigint PRIMARY KEY,
    at             timestamptz NOT NULL,
    action         text NOT NULL,
    agent          text,
    user_id        text,
    tool           text,
    -- 'OK' or the ErrorInfo reason.
    outcome        text NOT NULL,
    generation     bigint,
    caller_iss     text,
    caller_jti     text,
    -- A digest of the caller's token, never the token.
    caller_digest  bytea,
    verified       boolean NOT NULL,
    peer           text,
    trace_id       text,
    target         text,
    -- SHA-256(previous hash || canonical encoding of the record).
    hash           bytea NOT NULL
);

-- The chain's one head row: the last sequence and hash, the anchor, and the latest signed head.
CREATE TABLE {schema}.audit_head (
    id               boolean PRIMARY KEY DEFAULT true CHECK (id),
    last_sequence    bigint NOT NULL,
    last_hash        bytea NOT NULL,
    anchor_sequence  bigint NOT NULL,
    anchor_hash      bytea NOT NULL,
    signed_chain     text,
    signed_sequence  bigint,
    signed_hash      bytea,
    signed_mac       bytea
);
INSERT INTO {schema}.audit_head (last_sequence, last_hash, anchor_sequence, anchor_hash)
VALUES (0, decode(repeat('00', 32), 'hex'), 0, decode(repeat('00', 32), 'hex'));
