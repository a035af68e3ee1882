-- Spare agent schemas (issue 18): onboarding costs a row, not DDL.
--
-- Creating an agent's schema is about twenty relations, a role and its grants: tens of
-- milliseconds of catalog writes, on the first call of every new agent. A background job on
-- each replica keeps a few schemas made ahead of need (`VAULT_AGENT_SPARE_SCHEMAS`), complete
-- with their tables and role; registering an agent takes one and writes its registry row.
--
-- A spare's name is random (`agent_` and 40 hex digits, the shape of every agent schema), so the
-- registry, not the identity, says which schema is whose. That was already so for agents from
-- before issuers were part of the identity.
CREATE TABLE IF NOT EXISTS vault.spare_schemas (
    schema_name     text PRIMARY KEY CHECK (schema_name ~ '^agent_[0-9a-f]{40}$'),
    -- The last per-agent migration applied; only spares at the latest version are taken.
    schema_version  integer NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Makes one spare schema when fewer than `p_target` are ready, and says whether it did. One
-- replica refills at a time (the others get false at once); each spare is its own transaction,
-- so the catalog locks of one are held for one schema's DDL. A spare gets its agent role when
-- this vault has roles (the serving group exists), whatever the caller runs with: a spare must
-- be usable by every replica.
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
    m record;
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
    EXECUTE format('CREATE SCHEMA %I', ns);
    applied := 0;
    FOR m IN SELECT version, template FROM vault.agent_migrations ORDER BY version LOOP
        EXECUTE replace(m.template, '{schema}', quote_ident(ns));
        applied := m.version;
    END LOOP;
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

-- Takes a spare schema at the latest per-agent version (no row when none is ready), with the
-- version it is at, which is what the registry records. SKIP LOCKED: concurrent registrations
-- take different spares and never queue behind each other.
CREATE OR REPLACE FUNCTION vault.take_spare_schema()
RETURNS TABLE (schema_name text, schema_version integer)
LANGUAGE sql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM vault.spare_schemas s
    WHERE s.schema_name = (
        SELECT t.schema_name FROM vault.spare_schemas t
        WHERE t.schema_version = (SELECT coalesce(max(version), 0) FROM vault.agent_migrations)
        ORDER BY t.created_at LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING s.schema_name, s.schema_version
$$;
REVOKE ALL ON FUNCTION vault.take_spare_schema() FROM PUBLIC;

-- Registration takes a spare when one is ready, and makes the schema itself otherwise.
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
        EXECUTE format('CREATE SCHEMA %I', ns);
        latest_version := 0;
        FOR m IN SELECT v.version, v.template FROM vault.agent_migrations v ORDER BY v.version LOOP
            EXECUTE replace(m.template, '{schema}', quote_ident(ns));
            latest_version := m.version;
        END LOOP;
        PERFORM vault.grant_agent_role(ns);
    END IF;
    RETURN QUERY INSERT INTO vault.agents AS a
            (issuer, agent_id, schema_name, wrapped_key, key_version, schema_version)
        VALUES (p_issuer, p_agent, ns, p_wrapped_key, p_key_version, latest_version)
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
        EXECUTE format('GRANT EXECUTE ON FUNCTION vault.create_spare_schema(integer) TO %I', serving);
        EXECUTE format('GRANT SELECT ON vault.spare_schemas TO %I', serving);
    END IF;
END $$;
