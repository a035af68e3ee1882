-- The embedded (SQLite) store: the same data as the PostgreSQL layout, in one file. SQLite has
-- no schemas, so each agent's rows carry its namespace (the same hash of the agent id) as part
-- of their key. Times are unix milliseconds.

CREATE TABLE root_key (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    key_check   BLOB NOT NULL,
    kdf_salt    BLOB,
    kdf_m_cost  INTEGER,
    kdf_t_cost  INTEGER,
    kdf_p_cost  INTEGER,
    created_at  INTEGER NOT NULL
);

CREATE TABLE agents (
    agent_id         TEXT PRIMARY KEY,
    namespace        TEXT NOT NULL UNIQUE,
    wrapped_key      BLOB NOT NULL,
    key_version      INTEGER NOT NULL,
    -- Generations are never reused within an agent, even after deletion.
    next_generation  INTEGER NOT NULL DEFAULT 1,
    created_at       INTEGER NOT NULL
);

CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  INTEGER NOT NULL
);

CREATE TABLE credentials (
    namespace            TEXT NOT NULL,
    user_id              TEXT NOT NULL,
    tool                 TEXT NOT NULL,
    generation           INTEGER NOT NULL,
    state                INTEGER NOT NULL DEFAULT 0,
    key_version          INTEGER NOT NULL,
    wrapped_data_key     BLOB NOT NULL,
    ciphertext           BLOB NOT NULL,
    access_expires_at    INTEGER,
    ttl_expires_at       INTEGER NOT NULL,
    refresh_lease_owner  TEXT,
    refresh_lease_until  INTEGER,
    refresh_failures     INTEGER NOT NULL DEFAULT 0,
    refresh_not_before   INTEGER,
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL,
    PRIMARY KEY (namespace, user_id, tool)
) WITHOUT ROWID;

CREATE INDEX credentials_ttl_expires_at ON credentials (ttl_expires_at);

CREATE TABLE revocation_outbox (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace         TEXT NOT NULL,
    user_id           TEXT NOT NULL,
    tool              TEXT NOT NULL,
    generation        INTEGER NOT NULL,
    key_version       INTEGER NOT NULL,
    wrapped_data_key  BLOB NOT NULL,
    ciphertext        BLOB NOT NULL,
    created_at        INTEGER NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at   INTEGER NOT NULL,
    lease_owner       TEXT,
    lease_until       INTEGER,
    last_error        TEXT
);

CREATE INDEX revocation_outbox_next_attempt ON revocation_outbox (next_attempt_at);
