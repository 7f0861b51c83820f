-- When an instance started (for listing by age), the trace of the
-- input behind each history row (Unix milliseconds; 0 for rows written
-- before this migration), and the operator audit trail.
ALTER TABLE surety_saga_instance ADD COLUMN created_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE surety_saga_history ADD COLUMN trace_id TEXT;
-- The schema version of the stored state, for upcasting.
ALTER TABLE surety_saga_instance ADD COLUMN state_version BIGINT NOT NULL DEFAULT 1;
CREATE INDEX IF NOT EXISTS surety_saga_instance_listing ON surety_saga_instance (saga, finished, updated_at);

-- The operator audit trail: written before the action it records.
CREATE TABLE IF NOT EXISTS surety_saga_audit (
    seq     BIGSERIAL PRIMARY KEY,
    saga    TEXT    NOT NULL,
    id      TEXT    NOT NULL,
    actor   TEXT    NOT NULL,
    action  TEXT    NOT NULL,
    reason  TEXT    NOT NULL,
    at      BIGINT  NOT NULL
);
CREATE INDEX IF NOT EXISTS surety_saga_audit_instance ON surety_saga_audit (saga, id, seq);
