-- Agent key rotation (issue 17, `vault-server rotate-agent-key` and the RotateAgentKey RPC).
--
-- The start and the end of a rotation notify `vault_audit` with `key:<schema>`, so that every
-- replica drops its cached keys of the agent.
--
-- Rotating an agent key makes a new version current at once and keeps the old one as the
-- retiring key, wrapped by the root as before, until no row of the agent is sealed under it any
-- more: credentials, queued revocations and consent-flow secrets are re-sealed in batches, and
-- then one statement destroys the retiring key. No root rotation runs alongside (each refuses
-- to start while the other is in progress), so a retiring key is always wrapped by the current
-- root.
ALTER TABLE vault.agents
    ADD COLUMN IF NOT EXISTS retiring_wrapped_key bytea,
    ADD COLUMN IF NOT EXISTS retiring_key_version integer;

-- The fence every write of a new seal passes, in the writing transaction: it holds the agent's
-- registry row FOR KEY SHARE while its key is still `p_key_version`, and answers false once a
-- rotation made another version current. A rotation's switch locks the row FOR UPDATE, so it
-- waits for every write sealed under the old version to commit (and re-seals it), and every
-- write after it is sealed under the new one: no row can appear under a retiring key behind the
-- rotation's back. KEY SHARE does not conflict with the registry's other updates (a root
-- rotation's re-wraps).
CREATE OR REPLACE FUNCTION vault.fence_agent_key(p_schema text, p_key_version integer)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM 1 FROM vault.agents
        WHERE schema_name = p_schema AND key_version = p_key_version FOR KEY SHARE;
    RETURN FOUND;
END
$$;
REVOKE ALL ON FUNCTION vault.fence_agent_key(text, integer) FROM PUBLIC;

-- Starts a rotation of one agent's key: the new key (already wrapped by the current root)
-- becomes current and the old one retiring. Only from the key the caller read (its version and
-- its wrap, which a finished root rotation changes), with no rotation of this agent in progress
-- (false otherwise: the caller re-reads the registry), and not while a root rotation is in
-- progress (SQLSTATE V0002).
CREATE OR REPLACE FUNCTION vault.begin_agent_key_rotation(
    p_schema text, p_from_version integer, p_from_wrapped_key bytea, p_wrapped_key bytea,
    p_key_version integer)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    current_version integer;
    current_wrap bytea;
    retiring integer;
BEGIN
    IF p_wrapped_key IS NULL OR octet_length(p_wrapped_key) > 1024
       OR p_key_version IS NULL OR p_from_version IS NULL OR p_key_version <= p_from_version THEN
        RAISE EXCEPTION 'invalid agent key' USING ERRCODE = '22023';
    END IF;
    -- A root rotation's start locks this row FOR UPDATE and then looks for retiring keys.
    PERFORM 1 FROM vault.root_key WHERE id = 1 AND next_key_check IS NULL FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'a root key rotation is in progress' USING ERRCODE = 'V0002';
    END IF;
    SELECT key_version, wrapped_key, retiring_key_version
        INTO current_version, current_wrap, retiring
        FROM vault.agents WHERE schema_name = p_schema FOR UPDATE;
    IF NOT FOUND OR retiring IS NOT NULL OR current_version <> p_from_version
       OR current_wrap <> p_from_wrapped_key THEN
        RETURN false;
    END IF;
    UPDATE vault.agents
        SET retiring_wrapped_key = wrapped_key, retiring_key_version = key_version,
            wrapped_key = p_wrapped_key, key_version = p_key_version, next_wrapped_key = NULL
        WHERE schema_name = p_schema;
    -- Every replica drops its cached keys of the agent at commit (on the audit wake-up
    -- channel, which watch streams ignore for this payload).
    PERFORM pg_notify('vault_audit', 'key:' || p_schema);
    RETURN true;
END
$$;
REVOKE ALL ON FUNCTION vault.begin_agent_key_rotation(text, integer, bytea, bytea, integer) FROM PUBLIC;

-- Ends a rotation: counts the agent's rows still sealed under the retiring version (credentials
-- and queued revocations in one statement, so a revocation queued meanwhile is counted in
-- exactly one place; then consent-flow secrets, whose first four bytes are the version) and,
-- when there are none, destroys the retiring key. Answers the count (0: destroyed), or -1 when
-- `p_retiring_version` is not retiring (another run finished, or the agent is gone).
CREATE OR REPLACE FUNCTION vault.finish_agent_key_rotation(p_schema text, p_retiring_version integer)
RETURNS bigint
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    retiring integer;
    owner_issuer text;
    owner_agent text;
    remaining bigint;
    prefix bytea := int4send(p_retiring_version);
BEGIN
    SELECT retiring_key_version, issuer, agent_id INTO retiring, owner_issuer, owner_agent
        FROM vault.agents WHERE schema_name = p_schema FOR UPDATE;
    IF NOT FOUND OR retiring IS DISTINCT FROM p_retiring_version THEN
        RETURN -1;
    END IF;
    EXECUTE format(
        'SELECT (SELECT count(*) FROM %1$I.credentials WHERE key_version = $1)
              + (SELECT count(*) FROM %1$I.revocation_outbox WHERE key_version = $1)',
        p_schema) INTO remaining USING p_retiring_version;
    remaining := remaining + (
        SELECT count(*) FROM vault.authorization_flows
        WHERE issuer = owner_issuer AND agent_id = owner_agent
          AND (substring(sealed_verifier FROM 1 FOR 4) = prefix
               OR substring(sealed_code FROM 1 FOR 4) = prefix));
    IF remaining = 0 THEN
        UPDATE vault.agents SET retiring_wrapped_key = NULL, retiring_key_version = NULL
            WHERE schema_name = p_schema;
        -- No replica keeps the destroyed version in memory past the commit (one that misses
        -- the wake-up drops it when it next sees the agent's rows or registry entry).
        PERFORM pg_notify('vault_audit', 'key:' || p_schema);
    END IF;
    RETURN remaining;
END
$$;
REVOKE ALL ON FUNCTION vault.finish_agent_key_rotation(text, integer) FROM PUBLIC;

DO $$
DECLARE
    serving text := (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_serving';
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = serving) THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION vault.fence_agent_key(text, integer) TO %I', serving);
        EXECUTE format('GRANT EXECUTE ON FUNCTION vault.begin_agent_key_rotation(text, integer, bytea, bytea, integer) TO %I', serving);
        EXECUTE format('GRANT EXECUTE ON FUNCTION vault.finish_agent_key_rotation(text, integer) TO %I', serving);
    END IF;
END $$;
