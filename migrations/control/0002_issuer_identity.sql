-- Caller identity is (issuer, agent, user): an agent is registered under the issuer that vouched
-- for it, and two issuers' agents of the same id are different agents with their own schema and
-- key. Rows from before this migration have issuer '' until startup adopts them for the one
-- configured issuer (re-wrapping their keys bound to it); with several issuers configured the
-- server refuses to start while any remain.
ALTER TABLE vault.agents ADD COLUMN IF NOT EXISTS issuer text NOT NULL DEFAULT '';
ALTER TABLE vault.agents DROP CONSTRAINT IF EXISTS agents_pkey;
ALTER TABLE vault.agents ADD PRIMARY KEY (issuer, agent_id);
