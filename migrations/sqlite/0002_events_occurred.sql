-- The retention purge deletes old events by time, across organizations.
CREATE INDEX events_occurred ON events(occurred_at);
