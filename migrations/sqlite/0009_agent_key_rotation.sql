-- Agent key rotation (issue 17): the key a rotation in progress retires, wrapped by the root,
-- until no row of the agent is sealed under it; the same columns as the PostgreSQL registry
-- (migrations/control/0011_agent_key_rotation.sql says how they are used).
ALTER TABLE agents ADD COLUMN retiring_wrapped_key BLOB;
ALTER TABLE agents ADD COLUMN retiring_key_version INTEGER;
