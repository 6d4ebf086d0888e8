-- The instance an exchanged code landed on (0: the code was spent without one; NULL while its
-- exchange runs): a creation or re-authentication repeated with the code (a client retrying
-- after a timeout, or sending twice) is answered with that instance instead of an error, and
-- one that comes while the first still runs waits for it.
ALTER TABLE used_codes ADD COLUMN instance_id BIGINT NULL;
