-- Caller identity is (issuer, agent, user), as in the PostgreSQL control schema: agents are
-- keyed by issuer too. Rows from before have issuer '' until startup adopts them.
CREATE TABLE agents_by_issuer (
    issuer           TEXT NOT NULL DEFAULT '',
    agent_id         TEXT NOT NULL,
    namespace        TEXT NOT NULL UNIQUE,
    wrapped_key      BLOB NOT NULL,
    key_version      INTEGER NOT NULL,
    next_generation  INTEGER NOT NULL DEFAULT 1,
    created_at       INTEGER NOT NULL,
    PRIMARY KEY (issuer, agent_id)
);
INSERT INTO agents_by_issuer (issuer, agent_id, namespace, wrapped_key, key_version, next_generation, created_at)
    SELECT '', agent_id, namespace, wrapped_key, key_version, next_generation, created_at FROM agents;
DROP TABLE agents;
ALTER TABLE agents_by_issuer RENAME TO agents;
