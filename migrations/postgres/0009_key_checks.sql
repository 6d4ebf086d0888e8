-- A value the first process to start on the database sealed under its master key (row 1; of
-- processes starting at once, the primary key keeps one), so that a replica given another key
-- is refused even before the database holds any other secret: two replicas started with
-- different keys on a new database sealed instances the other could not open. `keys rotate`
-- re-seals it.
CREATE TABLE key_checks (
    id BIGINT PRIMARY KEY,
    sealed BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);
