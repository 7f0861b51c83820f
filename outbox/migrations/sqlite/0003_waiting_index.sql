-- A new row (next_attempt_at = 0) never waits for a retry: only rows that
-- failed are in the index that finds a key's waiting rows, so an insert,
-- the application's own transaction, maintains one index fewer.
DROP INDEX IF EXISTS surety_outbox_waiting;
CREATE INDEX IF NOT EXISTS surety_outbox_waiting ON surety_outbox (partition_key, next_attempt_at)
    WHERE status = 'pending' AND next_attempt_at > 0;
