-- The authorization server and client a consent flow began with (a provider binding, as
-- credentials record it): the callback and the code exchange hold the flow to them, so a
-- discovery answer that changes mid-flow cannot redirect the code and verifier elsewhere.
ALTER TABLE vault.authorization_flows ADD COLUMN IF NOT EXISTS provider_binding text;
