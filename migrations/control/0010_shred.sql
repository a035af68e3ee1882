-- Crypto-shredding an agent (issue 17, `vault-server shred-agent`): the agent's key row is
-- deleted and its schema dropped. What stays is this tombstone, so that the identity cannot be
-- registered again: a replica that still holds the shredded key in memory must never find a
-- new agent of the same name (and the same schema name) to write into.
CREATE TABLE IF NOT EXISTS vault.shredded_agents (
    issuer       text NOT NULL,
    agent_id     text NOT NULL,
    schema_name  text NOT NULL,
    shredded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (issuer, agent_id)
);
DO $$
DECLARE
    serving text := (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_serving';
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = serving) THEN
        EXECUTE format('GRANT SELECT ON vault.shredded_agents TO %I', serving);
    END IF;
END $$;

-- Registration refuses a shredded identity (SQLSTATE V0001).
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
    IF EXISTS (SELECT 1 FROM vault.shredded_agents s
               WHERE s.issuer = p_issuer AND s.agent_id = p_agent) THEN
        RAISE EXCEPTION 'the agent was shredded' USING ERRCODE = 'V0001';
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
