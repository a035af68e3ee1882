-- The audit log (issue 15): the control plane's chain here, each agent's in its own schema
-- (agent migration 0003, same columns).
CREATE TABLE IF NOT EXISTS vault.audit_log (
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

-- The chain's one head row, locked by every append: the last sequence and hash, the anchor
-- (the last record retention deleted; 0 and 32 zero bytes while none was), and the latest
-- signed head (NULL until one is saved).
CREATE TABLE IF NOT EXISTS vault.audit_head (
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
INSERT INTO vault.audit_head (last_sequence, last_hash, anchor_sequence, anchor_hash)
VALUES (0, decode(repeat('00', 32), 'hex'), 0, decode(repeat('00', 32), 'hex'))
ON CONFLICT (id) DO NOTHING;

-- The serving group appends and reads records and moves the head. It may not UPDATE a record:
-- the log is append-only to it. It may DELETE, because retention deletes the old prefix under
-- the serving role (a DELETE right cannot be limited to a prefix; `audit verify` catches a
-- deletion anywhere but the start, and the signed head one at the end).
DO $$
DECLARE
    serving text := (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_serving';
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = serving) THEN
        EXECUTE format('GRANT SELECT, INSERT, DELETE ON vault.audit_log TO %I', serving);
        EXECUTE format('GRANT SELECT, UPDATE ON vault.audit_head TO %I', serving);
    END IF;
END $$;

-- An agent's role gets every right on its own schema's tables, as before, except on the audit
-- tables: no UPDATE of its records (append and retention's DELETE only), and no INSERT or
-- DELETE of its one head row. Idempotent; `migrate` runs it again after upgrading a schema.
CREATE OR REPLACE FUNCTION vault.grant_agent_role(schema_name text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    agent_role text := vault.agent_role(schema_name);
    serving text := (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_serving';
BEGIN
    IF schema_name !~ '^agent_[0-9a-f]{40}$' THEN
        RAISE EXCEPTION 'not a vault agent schema: %', schema_name USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = agent_role) THEN
        EXECUTE format('CREATE ROLE %I NOLOGIN NOINHERIT', agent_role);
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', schema_name, agent_role);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %I TO %I', schema_name, agent_role);
    EXECUTE format('GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA %I TO %I', schema_name, agent_role);
    IF to_regclass(format('%I.audit_log', schema_name)) IS NOT NULL THEN
        EXECUTE format('REVOKE UPDATE ON %I.audit_log FROM %I', schema_name, agent_role);
        EXECUTE format('REVOKE INSERT, DELETE ON %I.audit_head FROM %I', schema_name, agent_role);
    END IF;
    EXECUTE format('GRANT %I TO %I', agent_role, serving);
END
$$;
REVOKE ALL ON FUNCTION vault.grant_agent_role(text) FROM PUBLIC;
