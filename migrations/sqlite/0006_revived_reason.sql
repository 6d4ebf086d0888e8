-- The reason of the invalidation a refresh's commit undid ("refresh interrupted: …"), written
-- by that commit (NULL by every other): read back from the commit's answer, so that a revival
-- is announced by an event of its own.
ALTER TABLE instances ADD COLUMN revived_reason TEXT;
