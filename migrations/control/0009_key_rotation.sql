-- Key lifecycle (issue 17): the control key, and root key rotation.
--
-- The control key is 32 random bytes wrapped by the root key. The vault keeps under it what
-- belongs to no agent (audit head signatures, dynamically registered client secrets), so that
-- the root key itself only ever wraps and unwraps, which an HSM can do without the key leaving
-- it, and so that rotating the root re-wraps keys, never data. A vault initialised before this
-- has none (NULL): its control key is the root key's own bytes, wrapped here at its first
-- rotation.
--
-- A root rotation in progress: the next root's key check (and Argon2id salt and costs, for a
-- passphrase), the control key wrapped under it, and each agent's key wrapped under it
-- (vault.agents.next_wrapped_key), filled in batches. One transaction then makes them current.
ALTER TABLE vault.root_key
    ADD COLUMN IF NOT EXISTS wrapped_control_key      bytea,
    ADD COLUMN IF NOT EXISTS next_key_check           bytea,
    ADD COLUMN IF NOT EXISTS next_kdf_salt            bytea,
    ADD COLUMN IF NOT EXISTS next_kdf_m_cost          integer,
    ADD COLUMN IF NOT EXISTS next_kdf_t_cost          integer,
    ADD COLUMN IF NOT EXISTS next_kdf_p_cost          integer,
    ADD COLUMN IF NOT EXISTS next_wrapped_control_key bytea;

ALTER TABLE vault.agents ADD COLUMN IF NOT EXISTS next_wrapped_key bytea;

-- A server whose root key is no longer the vault's (a rotation finished while it ran) must not
-- register an agent under it: nothing could open that agent's key afterwards. The caller passes
-- the key check it verified at startup; the agent is created only while that is still the
-- current one. The root key row is locked FOR SHARE, so a rotation's switch (which locks it FOR
-- UPDATE) either waits for this registration, and re-wraps it, or goes first and fences it.
DROP FUNCTION IF EXISTS vault.create_agent(text, text, bytea, integer);
CREATE OR REPLACE FUNCTION vault.create_agent(
    p_issuer text, p_agent text, p_wrapped_key bytea, p_key_version integer, p_key_check bytea)
RETURNS TABLE (out_issuer text, out_agent_id text, out_schema_name text,
               out_wrapped_key bytea, out_key_version integer)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ns text;
    m record;
BEGIN
    IF p_issuer IS NULL OR octet_length(p_issuer) NOT BETWEEN 1 AND 256 OR p_issuer ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'invalid issuer' USING ERRCODE = '22023';
    END IF;
    IF p_agent IS NULL OR octet_length(p_agent) NOT BETWEEN 1 AND 256 OR p_agent ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'invalid agent id' USING ERRCODE = '22023';
    END IF;
    IF p_wrapped_key IS NULL OR octet_length(p_wrapped_key) > 1024
       OR p_key_version IS NULL OR p_key_version < 1 THEN
        RAISE EXCEPTION 'invalid agent key' USING ERRCODE = '22023';
    END IF;
    ns := 'agent_' || substr(encode(sha256(
              int4send(octet_length(p_issuer)) || convert_to(p_issuer, 'UTF8') || convert_to(p_agent, 'UTF8')),
          'hex'), 1, 40);
    -- The same lock key as the server's: two replicas creating one agent queue here.
    PERFORM pg_advisory_xact_lock(('x' || substr(ns, 7, 16))::bit(64)::bigint);
    RETURN QUERY SELECT a.issuer, a.agent_id, a.schema_name, a.wrapped_key, a.key_version
        FROM vault.agents a WHERE a.issuer = p_issuer AND a.agent_id = p_agent;
    IF FOUND THEN
        RETURN;
    END IF;
    PERFORM 1 FROM vault.root_key WHERE id = 1 AND key_check = p_key_check FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'the root key changed' USING ERRCODE = '55000';
    END IF;
    EXECUTE format('CREATE SCHEMA %I', ns);
    FOR m IN SELECT version, template FROM vault.agent_migrations ORDER BY version LOOP
        EXECUTE replace(m.template, '{schema}', quote_ident(ns));
    END LOOP;
    PERFORM vault.grant_agent_role(ns);
    RETURN QUERY INSERT INTO vault.agents AS a
            (issuer, agent_id, schema_name, wrapped_key, key_version, schema_version)
        VALUES (p_issuer, p_agent, ns, p_wrapped_key, p_key_version,
                (SELECT coalesce(max(version), 0) FROM vault.agent_migrations))
        RETURNING a.issuer, a.agent_id, a.schema_name, a.wrapped_key, a.key_version;
END
$$;
REVOKE ALL ON FUNCTION vault.create_agent(text, text, bytea, integer, bytea) FROM PUBLIC;
DO $$
DECLARE
    serving text := (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_serving';
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = serving) THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION vault.create_agent(text, text, bytea, integer, bytea) TO %I', serving);
    END IF;
END $$;
