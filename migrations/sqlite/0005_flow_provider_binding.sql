-- As in the PostgreSQL control schema (0006): the provider binding a flow began with.
ALTER TABLE authorization_flows ADD COLUMN provider_binding TEXT;
