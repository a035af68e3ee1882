-- Refresh backoff and the revocation outbox.

-- Transient provider failures back off per credential: no provider call before
-- refresh_not_before, and the window doubles with each consecutive failure.
ALTER TABLE {schema}.credentials
    ADD COLUMN refresh_failures    integer NOT NULL DEFAULT 0,
    ADD COLUMN refresh_not_before  timestamptz;

-- Revocations owed to a provider. Revoke deletes the credential and writes this row in one
-- transaction, so a provider outage or a crash loses no revocation. The sealed token set moves
-- here unchanged (still bound to its agent, user, tool and generation).
CREATE TABLE {schema}.revocation_outbox (
    id                bigserial PRIMARY KEY,
    user_id           text NOT NULL,
    tool              text NOT NULL,
    generation        bigint NOT NULL,
    key_version       integer NOT NULL,
    wrapped_data_key  bytea NOT NULL,
    ciphertext        bytea NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    attempts          integer NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz NOT NULL DEFAULT now(),
    lease_owner       uuid,
    lease_until       timestamptz,
    last_error        text
);

CREATE INDEX revocation_outbox_next_attempt ON {schema}.revocation_outbox (next_attempt_at);
