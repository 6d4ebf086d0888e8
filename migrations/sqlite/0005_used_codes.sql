-- Authorization codes exchanged (hashed with the organization), for an hour: a creation or
-- re-authentication repeated with the same code is refused instead of presenting the code to
-- the provider a second time, which may revoke the tokens the first exchange gave
-- (RFC 6749 §4.1.2).
CREATE TABLE used_codes (
    code_hash        BLOB NOT NULL PRIMARY KEY,
    organization_id  BIGINT NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    expires_at       BIGINT NOT NULL
);
CREATE INDEX used_codes_expiry ON used_codes(expires_at);
