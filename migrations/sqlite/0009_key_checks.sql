-- A value sealed under each master key the service started with, so that a replica given
-- another key is refused even before the database holds any other secret: the first row must
-- open with the starting replica's keys (two replicas started with different keys on a new
-- database sealed instances the other could not open).
CREATE TABLE key_checks (
    id BIGINT PRIMARY KEY,
    sealed BLOB NOT NULL,
    created_at BIGINT NOT NULL
);
