-- Who may do what to the audit log (issue 15).
--
-- Group commit: one transaction appends the records of many agents' chains, so it runs under
-- the serving group rather than one agent's role. The serving group may append records to
-- every agent's chain and move the end of its head; it may not read an agent's records (or
-- credentials), rewrite or delete a record, nor move an anchor.
--
-- Retention without a right to delete: until now the serving group (and each agent's role)
-- could DELETE audit records and move a chain's anchor, so whoever held the vault's database
-- login could delete any prefix of a chain, recent records included, and re-anchor it so that
-- `audit verify` still passed. Now only vault.audit_trim, owned by the owner, deletes: a
-- prefix of records older than the retention `migrate` last set here, never younger, with the
-- anchor moved in the same transaction. The serving group and the agent roles may only append,
-- move a head's end, and sign it.
ALTER TABLE vault.instance
    ADD COLUMN IF NOT EXISTS audit_retention_days integer NOT NULL DEFAULT 400
        CHECK (audit_retention_days >= 1);

-- Deletes up to `p_limit` of the oldest records of chain `p_chain` (`control` or an agent's
-- schema) stamped before `p_before`, or before the retention floor if that is earlier, stopping
-- at the first younger record; moves the chain's anchor to the last one deleted. Returns how
-- many were deleted.
CREATE OR REPLACE FUNCTION vault.audit_trim(p_chain text, p_before timestamptz, p_limit integer)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    floor_at timestamptz := now() - make_interval(
        days => (SELECT audit_retention_days FROM vault.instance WHERE id = 1));
    target text;
    cut_sequence bigint;
    cut_hash bytea;
    deleted bigint;
BEGIN
    IF p_chain = 'control' THEN
        target := 'vault';
    ELSIF p_chain ~ '^agent_[0-9a-f]{40}$'
          AND EXISTS (SELECT 1 FROM vault.agents WHERE schema_name = p_chain) THEN
        target := p_chain;
    ELSE
        RAISE EXCEPTION 'not an audit chain: %', p_chain USING ERRCODE = '22023';
    END IF;
    IF floor_at IS NULL THEN
        RAISE EXCEPTION 'no audit retention floor in vault.instance' USING ERRCODE = '55000';
    END IF;
    IF p_before IS NULL OR p_limit IS NULL OR p_limit < 1 THEN
        RETURN 0;
    END IF;
    -- Under the head's lock, so the anchor and the records deleted move together.
    EXECUTE format('SELECT 1 FROM %I.audit_head FOR UPDATE', target);
    -- Only a prefix: a record stamped late by a slow clock stops retention there.
    EXECUTE format(
        'SELECT sequence, hash FROM (
             SELECT sequence, hash, bool_and(at < $1) OVER (ORDER BY sequence) AS old
             FROM (SELECT sequence, hash, at FROM %I.audit_log ORDER BY sequence LIMIT $2) first
         ) prefix
         WHERE old ORDER BY sequence DESC LIMIT 1', target)
        INTO cut_sequence, cut_hash
        USING least(p_before, floor_at), p_limit;
    IF cut_sequence IS NULL THEN
        RETURN 0;
    END IF;
    EXECUTE format('DELETE FROM %I.audit_log WHERE sequence <= $1', target) USING cut_sequence;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    EXECUTE format('UPDATE %I.audit_head SET anchor_sequence = $1, anchor_hash = $2', target)
        USING cut_sequence, cut_hash;
    RETURN deleted;
END
$$;
REVOKE ALL ON FUNCTION vault.audit_trim(text, timestamptz, integer) FROM PUBLIC;

-- What an agent's role and the serving group may do to an agent's audit tables: append
-- records and read them, move the head's end and sign it; no DELETE, no UPDATE of a record or
-- of the anchor, no INSERT or DELETE of the head row.
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
        EXECUTE format('REVOKE UPDATE, DELETE ON %I.audit_log FROM %I', schema_name, agent_role);
        EXECUTE format('REVOKE INSERT, UPDATE, DELETE ON %I.audit_head FROM %I', schema_name, agent_role);
        EXECUTE format('GRANT UPDATE (last_sequence, last_hash, signed_chain, signed_sequence, signed_hash, signed_mac) ON %I.audit_head TO %I', schema_name, agent_role);
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', schema_name, serving);
        EXECUTE format('GRANT INSERT ON %I.audit_log TO %I', schema_name, serving);
        EXECUTE format('GRANT SELECT, UPDATE (last_sequence, last_hash) ON %I.audit_head TO %I', schema_name, serving);
    END IF;
    EXECUTE format('GRANT %I TO %I', agent_role, serving);
END
$$;
REVOKE ALL ON FUNCTION vault.grant_agent_role(text) FROM PUBLIC;

DO $$
DECLARE
    serving text := (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_serving';
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = serving) THEN
        EXECUTE format('REVOKE DELETE ON vault.audit_log FROM %I', serving);
        EXECUTE format('REVOKE UPDATE ON vault.audit_head FROM %I', serving);
        EXECUTE format('GRANT UPDATE (last_sequence, last_hash, signed_chain, signed_sequence, signed_hash, signed_mac) ON vault.audit_head TO %I', serving);
        EXECUTE format('GRANT EXECUTE ON FUNCTION vault.audit_trim(text, timestamptz, integer) TO %I', serving);
        PERFORM vault.grant_agent_role(schema_name) FROM vault.agents
        WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = vault.agent_role(schema_name));
    END IF;
END $$;
