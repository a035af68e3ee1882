-- New agent schemas in one pass (issue 18): onboarding must not slow down as agents accumulate.
--
-- A new agent schema (or spare) was made by applying every per-agent template in turn, and
-- template 0002 alters a table 0001 created (`ALTER TABLE credentials ADD COLUMN`). PostgreSQL
-- scans the whole of pg_index for that ALTER TABLE, about ten rows per agent: measured on
-- PostgreSQL 15 with 19,000 agents (193,000 pg_index rows), it took 147 ms of the schema's
-- 310 ms, and onboarding fell from 50 to 10 agents per second over those 19,000 agents
-- (`vault-bench --quick --agents 100000`, stopped there). The slowdown was linear in the agents,
-- so 100,000 would have cost about a second per agent.
--
-- A version may now carry `creates`: a template that makes a new, empty agent schema at that
-- version in one pass, the same schema its templates make one after another (a test compares
-- the two in the catalog). New schemas are made from the latest such template and then the
-- templates after it, if any; existing schemas are still upgraded template by template. The
-- server fills `creates` at `migrate` from migrations/agent/creates/.
ALTER TABLE vault.agent_migrations ADD COLUMN IF NOT EXISTS creates text;

-- Makes the agent schema `ns` at the latest per-agent version and answers that version. Called
-- by the functions below, which hold the owner's rights; not callable by anyone else.
CREATE OR REPLACE FUNCTION vault.make_agent_schema(ns text) RETURNS integer
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    applied integer := 0;
    base record;
    m record;
BEGIN
    IF ns !~ '^agent_[0-9a-f]{40}$' THEN
        RAISE EXCEPTION 'not a vault agent schema: %', ns USING ERRCODE = '22023';
    END IF;
    EXECUTE format('CREATE SCHEMA %I', ns);
    SELECT v.version, v.creates INTO base FROM vault.agent_migrations v
        WHERE v.creates IS NOT NULL ORDER BY v.version DESC LIMIT 1;
    IF FOUND THEN
        EXECUTE replace(base.creates, '{schema}', quote_ident(ns));
        applied := base.version;
    END IF;
    FOR m IN SELECT v.version, v.template FROM vault.agent_migrations v
             WHERE v.version > applied ORDER BY v.version LOOP
        EXECUTE replace(m.template, '{schema}', quote_ident(ns));
        applied := m.version;
    END LOOP;
    RETURN applied;
END
$$;
REVOKE ALL ON FUNCTION vault.make_agent_schema(text) FROM PUBLIC;

-- As in control migration 0012, with the schema made by vault.make_agent_schema.
CREATE OR REPLACE FUNCTION vault.create_spare_schema(p_target integer)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ns text;
    latest integer := (SELECT coalesce(max(version), 0) FROM vault.agent_migrations);
    applied integer;
BEGIN
    IF p_target IS NULL OR p_target NOT BETWEEN 0 AND 10000 THEN
        RAISE EXCEPTION 'invalid spare schema target' USING ERRCODE = '22023';
    END IF;
    -- "spare" in ASCII: one refiller at a time across replicas.
    IF NOT pg_try_advisory_xact_lock(x'7370617265'::bigint) THEN
        RETURN false;
    END IF;
    IF (SELECT count(*) FROM vault.spare_schemas WHERE schema_version = latest) >= p_target THEN
        RETURN false;
    END IF;
    ns := 'agent_' || substr(md5(gen_random_uuid()::text) || md5(gen_random_uuid()::text), 1, 40);
    applied := vault.make_agent_schema(ns);
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname =
               (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_serving') THEN
        PERFORM vault.grant_agent_role(ns);
    END IF;
    -- The version the loop applied, not the one read before it: `migrate` may add a template
    -- meanwhile.
    INSERT INTO vault.spare_schemas (schema_name, schema_version) VALUES (ns, applied);
    RETURN true;
END
$$;
REVOKE ALL ON FUNCTION vault.create_spare_schema(integer) FROM PUBLIC;

-- As in control migration 0012, with the schema made by vault.make_agent_schema.
CREATE OR REPLACE FUNCTION vault.create_agent(
    p_issuer text, p_agent text, p_wrapped_key bytea, p_key_version integer, p_key_check bytea)
RETURNS TABLE (out_issuer text, out_agent_id text, out_schema_name text,
               out_wrapped_key bytea, out_key_version integer)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    identity text;
    ns text;
    latest_version integer;
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
    identity := encode(sha256(
        int4send(octet_length(p_issuer)) || convert_to(p_issuer, 'UTF8') || convert_to(p_agent, 'UTF8')),
        'hex');
    -- The same lock key as the server's: two replicas creating one agent queue here.
    PERFORM pg_advisory_xact_lock(('x' || substr(identity, 1, 16))::bit(64)::bigint);
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
    SELECT t.schema_name, t.schema_version INTO ns, latest_version FROM vault.take_spare_schema() t;
    IF ns IS NULL THEN
        ns := 'agent_' || substr(identity, 1, 40);
        latest_version := vault.make_agent_schema(ns);
        PERFORM vault.grant_agent_role(ns);
    END IF;
    RETURN QUERY INSERT INTO vault.agents AS a
            (issuer, agent_id, schema_name, wrapped_key, key_version, schema_version)
        VALUES (p_issuer, p_agent, ns, p_wrapped_key, p_key_version, latest_version)
        RETURNING a.issuer, a.agent_id, a.schema_name, a.wrapped_key, a.key_version;
END
$$;
REVOKE ALL ON FUNCTION vault.create_agent(text, text, bytea, integer, bytea) FROM PUBLIC;
