-- Per-agent migrations run online (issue 18). `migrate` no longer upgrades every agent schema
-- before it returns: with 100,000 agents that would hold a new version back for many minutes.
-- Each agent schema is upgraded by this function, in its own short transaction: by the replica
-- that first uses the agent after a new version, or by `vault-server migrate`, which walks every
-- agent still behind, in batches, while replicas serve. Whichever comes first does the work; the
-- other finds the schema at the latest version and does nothing.
CREATE OR REPLACE FUNCTION vault.upgrade_agent_schema(p_schema text) RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- The DDL locks the agent's tables; behind a long transaction on them it gives up (55P03, which
-- the caller retries) rather than queue every read of the agent behind it.
SET lock_timeout = '5s'
AS $$
DECLARE
    from_version integer;
    to_version integer;
    m record;
BEGIN
    -- NO KEY UPDATE: two upgrades of one agent queue here, while writes keep passing the key
    -- fence (FOR KEY SHARE); a key rotation's start (FOR UPDATE) waits for the upgrade.
    SELECT schema_version INTO from_version FROM vault.agents
        WHERE schema_name = p_schema FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'not a registered agent schema: %', p_schema USING ERRCODE = '22023';
    END IF;
    to_version := from_version;
    FOR m IN SELECT version, template FROM vault.agent_migrations
             WHERE version > from_version ORDER BY version LOOP
        EXECUTE replace(m.template, '{schema}', quote_ident(p_schema));
        to_version := m.version;
    END LOOP;
    IF to_version > from_version THEN
        -- New tables reach the agent's role, when this vault has roles.
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname =
                   (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_serving') THEN
            PERFORM vault.grant_agent_role(p_schema);
        END IF;
        UPDATE vault.agents SET schema_version = to_version WHERE schema_name = p_schema;
    END IF;
    RETURN to_version;
END
$$;
REVOKE ALL ON FUNCTION vault.upgrade_agent_schema(text) FROM PUBLIC;

DO $$
DECLARE
    serving text := (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_serving';
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = serving) THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION vault.upgrade_agent_schema(text) TO %I', serving);
        -- A serving replica checks that the per-agent templates are at its version.
        EXECUTE format('GRANT SELECT (version) ON vault.agent_migrations TO %I', serving);
    END IF;
END $$;
