-- Dynamic client registrations, as in the PostgreSQL control schema
-- (vault.client_registrations): one per (tool, issuer). Times are unix milliseconds.
CREATE TABLE client_registrations (
    tool               TEXT NOT NULL,
    issuer             TEXT NOT NULL,
    client_id          TEXT NOT NULL,
    -- NULL for a public client.
    sealed_secret      BLOB,
    auth_method        TEXT NOT NULL,
    -- NULL when the secret does not expire.
    secret_expires_at  INTEGER,
    -- One per line, in order.
    redirect_uris      TEXT NOT NULL,
    registered_at      INTEGER NOT NULL,
    PRIMARY KEY (tool, issuer)
);
