-- The master key each running service seals under (its id, never the key): `tokenwarden keys
-- rotate` refuses to run while a replica still seals under another key than its own, which
-- would seal again under the old key what the command re-seals (a rotation run after the
-- first round of restarts, or with a replica forgotten). Empty for a service of an older
-- release until its next presence write.
ALTER TABLE replicas ADD COLUMN sealing_key TEXT;
