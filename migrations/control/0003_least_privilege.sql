-- Least privilege (DESIGN §4). The role that runs migrations (the owner) owns the control schema,
-- every agent schema and the functions below. The serving role owns nothing and has no DDL
-- right: it reads and writes the control tables it needs, creates an agent only through
-- vault.create_agent (SECURITY DEFINER, owned by the owner), and reaches an agent's tables only
-- by switching to that agent's own NOLOGIN role, which holds rights on that one schema.
--
-- Roles are cluster-wide while this schema is per database, so every role this vault makes
-- starts with a random prefix of its own: two vault databases on one cluster never share one.

CREATE TABLE IF NOT EXISTS vault.instance (
    id           smallint PRIMARY KEY CHECK (id = 1),
    role_prefix  text NOT NULL
);
INSERT INTO vault.instance (id, role_prefix)
VALUES (1, 'vault_' || substr(md5(gen_random_uuid()::text), 1, 8))
ON CONFLICT (id) DO NOTHING;

-- The per-agent schema template, written here by `migrate` so that vault.create_agent applies
-- exactly what the migrator does. `{schema}` is replaced by the quoted schema name.
CREATE TABLE IF NOT EXISTS vault.agent_migrations (
    version   integer PRIMARY KEY,
    template  text NOT NULL
);

-- The serving group: a NOLOGIN role holding the serving rights, granted to the login role the
-- vault serves as. NOINHERIT: it is a member of every agent role (so that a session may
-- SET ROLE to one) without inheriting their rights, so its members hold no agent's rights
-- until they switch.
--
-- Making roles needs CREATEROLE. An owner without it gets no serving group; the server then
-- refuses to start with per-agent roles on (VAULT_DATABASE_AGENT_ROLES) and says why.
DO $$
DECLARE
    serving text := (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_serving';
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = serving) THEN
        IF NOT (SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user) THEN
            RAISE NOTICE 'no CREATEROLE: the serving group role % is not created', serving;
            RETURN;
        END IF;
        EXECUTE format('CREATE ROLE %I NOLOGIN NOINHERIT', serving);
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA vault TO %I', serving);
    EXECUTE format('GRANT SELECT ON vault.agents, vault.root_key, vault.instance, vault._sqlx_migrations TO %I', serving);
    EXECUTE format('GRANT INSERT ON vault.root_key TO %I', serving);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON vault.leases TO %I', serving);
END $$;

-- The role of an agent schema: the vault's prefix and the schema's hash (55 bytes at most).
CREATE OR REPLACE FUNCTION vault.agent_role(schema_name text) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_' || substr(schema_name, 7)
$$;

-- Gives an agent schema its role (created when missing), rights on that schema alone, and the
-- serving group's membership. Idempotent: `migrate` runs it again after upgrading a schema.
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
    EXECUTE format('GRANT %I TO %I', agent_role, serving);
END
$$;
REVOKE ALL ON FUNCTION vault.grant_agent_role(text) FROM PUBLIC;

-- Registers an agent and creates its schema and role, for a caller that may not run DDL. The
-- schema name is computed here from the issuer and agent id (the same hash as the server's
-- namespace_for), never taken from the caller, and the ids are checked with the server's rules.
CREATE OR REPLACE FUNCTION vault.create_agent(
    p_issuer text, p_agent text, p_wrapped_key bytea, p_key_version integer)
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
REVOKE ALL ON FUNCTION vault.create_agent(text, text, bytea, integer) FROM PUBLIC;

-- Hands an agent registered before identities named their issuer to `p_issuer`, with its key
-- re-wrapped for it. Only rows without an issuer: the serving role can neither move an agent
-- from one issuer to another nor overwrite a key.
CREATE OR REPLACE FUNCTION vault.adopt_agent(p_agent text, p_issuer text, p_wrapped_key bytea)
RETURNS boolean
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_issuer IS NULL OR octet_length(p_issuer) NOT BETWEEN 1 AND 256 OR p_issuer ~ '[[:cntrl:]]'
       OR p_wrapped_key IS NULL OR octet_length(p_wrapped_key) > 1024 THEN
        RAISE EXCEPTION 'invalid adoption' USING ERRCODE = '22023';
    END IF;
    UPDATE vault.agents SET issuer = p_issuer, wrapped_key = p_wrapped_key
    WHERE issuer = '' AND agent_id = p_agent;
    RETURN FOUND;
END
$$;
REVOKE ALL ON FUNCTION vault.adopt_agent(text, text, bytea) FROM PUBLIC;
DO $$
DECLARE
    serving text := (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_serving';
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = serving) THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION vault.create_agent(text, text, bytea, integer) TO %I', serving);
        EXECUTE format('GRANT EXECUTE ON FUNCTION vault.adopt_agent(text, text, bytea) TO %I', serving);
    END IF;
END $$;
