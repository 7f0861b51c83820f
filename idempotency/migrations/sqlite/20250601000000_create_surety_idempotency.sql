-- Dedup keys of surety-idempotency: one row per message key.
-- status 'in_progress': claimed by the holder of `token` until `lease_until`.
-- status 'done': handled; `reply` is the stored reply, if any.
-- Times are Unix milliseconds.
CREATE TABLE IF NOT EXISTS surety_idempotency (
    key          TEXT PRIMARY KEY NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('in_progress', 'done')),
    token        TEXT NOT NULL,
    lease_until  INTEGER,
    claims       INTEGER NOT NULL DEFAULT 1,
    reply        BLOB,
    created_at   INTEGER NOT NULL,
    completed_at INTEGER
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS surety_idempotency_completed_at
    ON surety_idempotency (completed_at) WHERE status = 'done';
CREATE INDEX IF NOT EXISTS surety_idempotency_lease_until
    ON surety_idempotency (lease_until) WHERE status = 'in_progress';
