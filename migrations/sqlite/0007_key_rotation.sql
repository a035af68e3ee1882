-- Key lifecycle (issue 17): the control key, and root key rotation; the same columns as the
-- PostgreSQL control schema (migrations/control/0009_key_rotation.sql says what they hold).
ALTER TABLE root_key ADD COLUMN wrapped_control_key BLOB;
ALTER TABLE root_key ADD COLUMN next_key_check BLOB;
ALTER TABLE root_key ADD COLUMN next_kdf_salt BLOB;
ALTER TABLE root_key ADD COLUMN next_kdf_m_cost INTEGER;
ALTER TABLE root_key ADD COLUMN next_kdf_t_cost INTEGER;
ALTER TABLE root_key ADD COLUMN next_kdf_p_cost INTEGER;
ALTER TABLE root_key ADD COLUMN next_wrapped_control_key BLOB;
ALTER TABLE agents ADD COLUMN next_wrapped_key BLOB;
