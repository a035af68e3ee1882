-- The audit log (issue 15), as in PostgreSQL's per-agent `audit_log` and `vault.audit_log`, with
-- every chain in one table: `chain` is 'control' or the agent's namespace. Times are unix
-- milliseconds. Rows are only ever appended, and deleted as a prefix by retention.
CREATE TABLE audit_log (
    chain          TEXT NOT NULL,
    sequence       INTEGER NOT NULL,
    at             INTEGER NOT NULL,
    action         TEXT NOT NULL,
    agent          TEXT,
    user_id        TEXT,
    tool           TEXT,
    -- 'OK' or the ErrorInfo reason.
    outcome        TEXT NOT NULL,
    generation     INTEGER,
    caller_iss     TEXT,
    caller_jti     TEXT,
    -- A digest of the caller's token, never the token.
    caller_digest  BLOB,
    verified       INTEGER NOT NULL,
    peer           TEXT,
    trace_id       TEXT,
    target         TEXT,
    -- SHA-256(previous hash || canonical encoding of the record).
    hash           BLOB NOT NULL,
    PRIMARY KEY (chain, sequence)
) WITHOUT ROWID;

-- One row per chain, made by its first append: the last sequence and hash (what the next
-- append links on), the anchor (the last record retention deleted; 0 and 32 zero bytes while
-- none was), and the latest signed head (NULL until one is saved).
CREATE TABLE audit_heads (
    chain            TEXT PRIMARY KEY,
    last_sequence    INTEGER NOT NULL,
    last_hash        BLOB NOT NULL,
    anchor_sequence  INTEGER NOT NULL,
    anchor_hash      BLOB NOT NULL,
    signed_chain     TEXT,
    signed_sequence  INTEGER,
    signed_hash      BLOB,
    signed_mac       BLOB
);
