-- The client secret given to GET /elements/{key}/oauth/url (`apiSecret`), sealed, kept with its
-- state for the code's exchange: a create whose configuration leaves the secret out uses it,
-- and the instance keeps it for its refreshes.
ALTER TABLE oauth_states ADD COLUMN api_secret_enc BLOB NULL;
