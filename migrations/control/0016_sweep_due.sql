-- The sweep visits only the agents with something to sweep (issue 18).
--
-- The sweep opened a transaction on every agent schema on every pass: with 10,000 agents a pass
-- took about ten seconds of a database connection and CPU every five minutes, touched every
-- schema's catalog entries, and held up shutdown until it finished (`vault-bench --agents
-- 10000`: 10.2 s from SIGTERM to exit). With 100,000 it would never rest.
--
-- `sweep_due` is a lower bound of the agent's credentials' vault TTLs: no credential of the agent
-- expires before it. NULL means unknown (an agent from before this migration). A sweep visits an
-- agent when its `sweep_due` has passed or is NULL; it deletes what expired and sets `sweep_due`
-- to the earliest TTL left, holding the row FOR NO KEY UPDATE from before it reads the credentials
-- until it commits. A write of a credential lowers `sweep_due` after it commits, with an UPDATE
-- that also matches a row already due (the only rows a sweep holds), so that it waits for a sweep
-- holding the row: either the sweep saw the credential or the write's UPDATE comes after the
-- sweep's and lowers it. A sweep never sets it more than a day ahead (between half a day and a day
-- at random, so idle agents do not fall due together), so a write whose lowering was lost (the
-- process died between the two) is swept at most a day late; it is never served past its TTL.
ALTER TABLE vault.agents ADD COLUMN IF NOT EXISTS sweep_due timestamptz;
-- A new agent has nothing to sweep until its first credential lowers this (existing agents keep
-- NULL: visited once, then scheduled).
ALTER TABLE vault.agents ALTER COLUMN sweep_due SET DEFAULT now() + interval '1 day';
-- The sweep's listing: the agents due now, earliest (and unknown) first.
CREATE INDEX IF NOT EXISTS agents_sweep_due
    ON vault.agents ((coalesce(sweep_due, '-infinity'::timestamptz)));
-- The serving group moves the schedule (a store lowers it, a sweep locks the row and sets it):
-- the right to update this one column of the registry, nothing else in it.
DO $$
DECLARE
    serving text := (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_serving';
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = serving) THEN
        EXECUTE format('GRANT UPDATE (sweep_due) ON vault.agents TO %I', serving);
    END IF;
END $$;
