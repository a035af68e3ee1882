-- Onboarding in constant time (issue 18): an agent's role is granted its schema's tables and
-- sequences by name.
--
-- `GRANT … ON ALL TABLES IN SCHEMA s` finds the schema's tables by scanning the whole of
-- pg_class, which holds about twenty relations per agent: measured on PostgreSQL 15 with 8,000
-- agents (162,000 pg_class rows), that GRANT took 209 ms and its ALL SEQUENCES twin 56 ms, where
-- the same GRANT naming the table took 3.5 ms. Every new agent (and every spare schema) paid
-- that scan, so onboarding slowed from 46 to 10 agents per second over 8,000 agents, and would
-- take seconds per agent at 100,000. The schema's own relations are found instead through
-- pg_depend's index on the referenced object (each relation depends on its namespace), which
-- reads only this schema's rows.
CREATE OR REPLACE FUNCTION vault.grant_agent_role(schema_name text) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    agent_role text := vault.agent_role(schema_name);
    serving text := (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_serving';
    ns oid;
    tables text;
    sequences text;
BEGIN
    IF schema_name !~ '^agent_[0-9a-f]{40}$' THEN
        RAISE EXCEPTION 'not a vault agent schema: %', schema_name USING ERRCODE = '22023';
    END IF;
    ns := quote_ident(schema_name)::regnamespace::oid;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = agent_role) THEN
        EXECUTE format('CREATE ROLE %I NOLOGIN NOINHERIT', agent_role);
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %I', schema_name, agent_role);
    -- What ALL TABLES and ALL SEQUENCES IN SCHEMA would cover: the schema's tables (plain and
    -- partitioned; an agent schema has no views or foreign tables) and its sequences.
    SELECT string_agg(format('%I.%I', schema_name, c.relname), ', ' ORDER BY c.relname)
                FILTER (WHERE c.relkind IN ('r', 'p')),
           string_agg(format('%I.%I', schema_name, c.relname), ', ' ORDER BY c.relname)
                FILTER (WHERE c.relkind = 'S')
      INTO tables, sequences
      FROM pg_depend d JOIN pg_class c ON c.oid = d.objid
     WHERE d.refclassid = 'pg_namespace'::regclass AND d.refobjid = ns
       AND d.classid = 'pg_class'::regclass AND d.deptype = 'n' AND c.relnamespace = ns;
    IF tables IS NOT NULL THEN
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE %s TO %I', tables, agent_role);
    END IF;
    IF sequences IS NOT NULL THEN
        EXECUTE format('GRANT USAGE, SELECT, UPDATE ON SEQUENCE %s TO %I', sequences, agent_role);
    END IF;
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
