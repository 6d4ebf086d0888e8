-- Webhooks of one instance go out in the order their events were written: `seq` is that order
-- (an event's row is written in the transaction of the change it reports, after the change).
-- Existing rows are numbered as they lie; only pending ones are ever compared. The column's
-- default rewrites the table once (a short lock while the events of the last 30 days are copied).
ALTER TABLE events ADD COLUMN seq BIGSERIAL;
CREATE INDEX events_pending_instance ON events(instance_id, seq) WHERE delivery_state = 'pending';
