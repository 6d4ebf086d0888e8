-- tokenwarden schema, version 1. Conventions: ids are BIGINT chosen by the application
-- (random below 2^53); timestamps are epoch milliseconds; flags are BIGINT 0/1; ciphertexts are
-- BLOB and never plain text; JSON is TEXT.

CREATE TABLE organizations (
    id                  INTEGER NOT NULL PRIMARY KEY,
    name                TEXT NOT NULL,
    secret_hash         BLOB NOT NULL UNIQUE,
    webhook_secret_enc  BLOB NOT NULL,
    created_at          BIGINT NOT NULL
);

CREATE TABLE users (
    id               INTEGER NOT NULL PRIMARY KEY,
    organization_id  BIGINT NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    name             TEXT NOT NULL,
    secret_hash      BLOB NOT NULL UNIQUE,
    created_at       BIGINT NOT NULL
);
CREATE INDEX users_organization ON users(organization_id);

CREATE TABLE connectors (
    organization_id  BIGINT NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    key              TEXT NOT NULL,
    definition       TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    PRIMARY KEY (organization_id, key)
);

CREATE TABLE oauth_states (
    state_hash         BLOB NOT NULL PRIMARY KEY,
    organization_id    BIGINT NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    element_key        TEXT NOT NULL,
    callback_url       TEXT NOT NULL,
    api_key            TEXT NOT NULL,
    code_verifier_enc  BLOB NULL,
    scope              TEXT NULL,
    expires_at         BIGINT NOT NULL
);
CREATE INDEX oauth_states_expiry ON oauth_states(expires_at);

CREATE TABLE instances (
    id                       INTEGER NOT NULL PRIMARY KEY,
    organization_id          BIGINT NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    element_key              TEXT NOT NULL,
    name                     TEXT NOT NULL,
    token_hash               BLOB NOT NULL UNIQUE,
    token_enc                BLOB NOT NULL,
    tags                     TEXT NOT NULL DEFAULT '[]',
    configuration            TEXT NOT NULL DEFAULT '{}',
    access_token_enc         BLOB NULL,
    refresh_token_enc        BLOB NULL,
    token_response_enc       BLOB NULL,
    client_secret_enc        BLOB NULL,
    state                    TEXT NOT NULL DEFAULT 'valid' CHECK (state IN ('valid', 'invalid')),
    state_reason             TEXT NULL,
    provider_message         TEXT NULL,
    disabled                 BIGINT NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
    token_version            BIGINT NOT NULL DEFAULT 0,
    access_expires_at        BIGINT NULL,
    refresh_expires_at       BIGINT NULL,
    last_refresh_at          BIGINT NULL,
    next_due_at              BIGINT NULL,
    refresh_lease_owner      TEXT NULL,
    refresh_lease_until      BIGINT NULL,
    refresh_in_flight_since  BIGINT NULL,
    failing_since            BIGINT NULL,
    failure_count            BIGINT NOT NULL DEFAULT 0,
    backoff_until            BIGINT NULL,
    last_failure             TEXT NULL,
    verification             TEXT NULL,
    created_by               BIGINT NULL,
    created_at               BIGINT NOT NULL,
    updated_at               BIGINT NOT NULL
);
CREATE INDEX instances_organization ON instances(organization_id, created_at);
-- The scheduler's index: only rows that can ever be due are in it, so the due query and
-- MIN(next_due_at) read just those.
CREATE INDEX instances_due ON instances(next_due_at)
    WHERE state = 'valid' AND disabled = 0 AND next_due_at IS NOT NULL;
CREATE INDEX instances_in_flight ON instances(refresh_in_flight_since)
    WHERE refresh_in_flight_since IS NOT NULL;

-- The outbox: events are written in the same transaction as the change they describe.
CREATE TABLE events (
    id               TEXT NOT NULL PRIMARY KEY,
    organization_id  BIGINT NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    instance_id      BIGINT NULL,
    element_key      TEXT NULL,
    event_type       TEXT NOT NULL,
    reason           TEXT NULL,
    occurred_at      BIGINT NOT NULL,
    payload          TEXT NOT NULL,
    delivery_state   TEXT NOT NULL DEFAULT 'none'
                     CHECK (delivery_state IN ('none', 'pending', 'delivered', 'failed')),
    attempts         BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT NULL,
    last_error       TEXT NULL,
    delivered_at     BIGINT NULL
);
CREATE INDEX events_organization ON events(organization_id, occurred_at);
CREATE INDEX events_instance ON events(instance_id, occurred_at);
CREATE INDEX events_pending ON events(next_attempt_at) WHERE delivery_state = 'pending';

CREATE TABLE audit_logs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    organization_id  BIGINT NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    user_id          BIGINT NULL,
    action           TEXT NOT NULL,
    target           TEXT NULL,
    request_id       TEXT NULL,
    detail           TEXT NULL,
    at               BIGINT NOT NULL
);
CREATE INDEX audit_logs_organization ON audit_logs(organization_id, at);
