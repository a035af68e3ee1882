-- The revocation outbox's pass visits only the agents with a revocation queued (issue 18).
--
-- Every replica's outbox pass opened a transaction on every agent schema every
-- `VAULT_REVOCATION_RETRY_INTERVAL_SECONDS` (10 s by default), to find the revocations due: 1,000
-- transactions a second per replica at 10,000 agents, for nothing, since almost every outbox is
-- empty, and a pass in progress held up shutdown (`vault-bench --quick --agents 10000`: 4.2 s
-- from SIGTERM to exit after the sweep stopped visiting every agent).
--
-- `outbox_due` is a lower bound of when the agent's next queued revocation may be claimed. A
-- write that queues a revocation (Revoke at the provider, or a sweep with revocation on) or
-- releases one for a retry moves it no later than when its entry becomes claimable, in the same
-- transaction, having locked the agent's row first. The pass visits an agent whose `outbox_due`
-- has passed, holding its row FOR NO KEY UPDATE SKIP LOCKED while it claims, and sets it to when
-- the earliest entry left becomes claimable (a claimed entry: when its lease ends). So an entry
-- is never left behind a later `outbox_due`: a write either comes before the pass (the pass
-- skips the held row, or sees the entry) or waits for it and lowers what it set. The pass never
-- sets it more than a day ahead (between half a day and a day at random, so idle agents do not
-- fall due together), and a new agent starts a day ahead: a revocation queued by a replica that
-- does not know this column (an older version, during a rolling upgrade) waits a day at most.
ALTER TABLE vault.agents ADD COLUMN IF NOT EXISTS outbox_due timestamptz;
-- Agents from before this migration may have revocations queued: each is visited once soon.
UPDATE vault.agents SET outbox_due = '-infinity' WHERE outbox_due IS NULL;
ALTER TABLE vault.agents ALTER COLUMN outbox_due SET DEFAULT now() + interval '1 day';
-- The pass's listing: the agents due, earliest first.
CREATE INDEX IF NOT EXISTS agents_outbox_due ON vault.agents (outbox_due);
-- The serving group moves it, and nothing else of the registry.
DO $$
DECLARE
    serving text := (SELECT role_prefix FROM vault.instance WHERE id = 1) || '_serving';
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = serving) THEN
        EXECUTE format('GRANT UPDATE (outbox_due) ON vault.agents TO %I', serving);
    END IF;
END $$;
