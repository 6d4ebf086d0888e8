-- Each running service says so every few seconds (`replicas`), and says goodbye at its stop:
-- `tokenwarden database copy` refuses a source a service still runs on, even an idle one that
-- changes nothing while it is read. A database copied away says where (`copied_to`, one row):
-- a service started on it again would refresh the grants the copy holds, and at providers that
-- rotate refresh tokens each side would end the other's; `tokenwarden database reopen` takes
-- the mark away.
CREATE TABLE replicas (
    id       TEXT NOT NULL PRIMARY KEY,
    seen_at  BIGINT NOT NULL
);
CREATE TABLE copied_to (
    id      BIGINT NOT NULL PRIMARY KEY,
    target  TEXT NOT NULL,
    at      BIGINT NOT NULL
);
