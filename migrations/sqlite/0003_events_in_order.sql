-- Webhooks of one instance go out in the order their events were written: SQLite's rowid is
-- that order (one writer at a time; a new row's rowid is above every existing one), and this
-- partial index holds it with the instance of each pending event.
CREATE INDEX events_pending_instance ON events(instance_id) WHERE delivery_state = 'pending';
