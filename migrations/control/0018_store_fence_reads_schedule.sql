-- A store learns the agent's sweep schedule from its key fence (issue 18).
--
-- Control migration 0016 made every store lower its agent's `sweep_due` after its commit: one
-- more statement and round trip on every StoreToken (`vault-bench --quick --agents 0`: StoreToken
-- at c16 from about 1,160 to 960 calls/s), though almost every store writes a TTL later than the
-- schedule already says. This fence is `vault.fence_agent_key` that also answers the agent's
-- `sweep_due` when it is still ahead (NULL when it is unknown or already due), read under the
-- same FOR KEY SHARE lock. A store whose TTL is not earlier than that skips the lowering.
--
-- Why the skip is safe: a sweep raises `sweep_due` from what its snapshot of the credentials
-- shows, and a store in flight is not in that snapshot. A sweep therefore first tries to lock
-- the registry row FOR UPDATE, which conflicts with the fence's FOR KEY SHARE: when it gets it, no
-- store is between its fence and its commit, and none passes the fence until the sweep commits
-- (a store that fences after it reads the sweep's new `sweep_due`). When a store holds the fence
-- (a busy agent), the sweep takes FOR NO KEY UPDATE as before, sweeps, and leaves the agent due,
-- so that the next pass sees what the stores in flight wrote. A store that fenced while the agent
-- was due never skips: its lowering waits for a sweep holding the row, as before.
CREATE OR REPLACE FUNCTION vault.fence_agent_key_scheduled(
    p_schema text,
    p_key_version integer,
    OUT fenced boolean,
    OUT sweep_ahead timestamptz
)
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    due timestamptz;
BEGIN
    SELECT a.sweep_due INTO due FROM vault.agents a
        WHERE a.schema_name = p_schema AND a.key_version = p_key_version FOR KEY SHARE;
    fenced := FOUND;
    sweep_ahead := CASE WHEN due > now() THEN due END;
END
$$;
REVOKE ALL ON FUNCTION vault.fence_agent_key_scheduled(text, integer) FROM PUBLIC;

DO $$
DECLARE
    serving text := (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_serving';
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = serving) THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION vault.fence_agent_key_scheduled(text, integer) TO %I', serving);
    END IF;
END $$;
