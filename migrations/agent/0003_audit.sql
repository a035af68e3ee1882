-- The agent's audit chain (issue 15). Rows are only ever appended, and deleted as a prefix by
-- retention; the agent's role may not UPDATE them (vault.grant_agent_role, control migration
-- 0007).
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

-- The chain's one head row, locked by every append so appends queue and sequences have no
-- gaps: the last sequence and hash, the anchor (the last record retention deleted; 0 and 32
-- zero bytes while none was), and the latest signed head (NULL until one is saved).
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
