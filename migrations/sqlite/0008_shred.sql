-- Crypto-shredding an agent (issue 17): the tombstone that keeps a shredded identity from being
-- registered again (migrations/control/0010_shred.sql says why).
CREATE TABLE shredded_agents (
    issuer       TEXT NOT NULL,
    agent_id     TEXT NOT NULL,
    namespace    TEXT NOT NULL,
    shredded_at  INTEGER NOT NULL,
    PRIMARY KEY (issuer, agent_id)
);
