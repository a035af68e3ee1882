-- Group commit of the audit log (issue 15): one transaction appends the records of many agents'
-- chains, so it runs under the serving group rather than one agent's role. The serving group
-- may read each agent chain's head, append records, and move the head's end; it may not
-- UPDATE or DELETE a record, nor move the anchor or the signed head (those stay with the
-- agent's role: retention and signing). Its agent roles keep everything they had.
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
        PERFORM vault.grant_agent_role(schema_name) FROM vault.agents
        WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = vault.agent_role(schema_name));
    END IF;
END $$;
