-- When an instance started (for listing by age) and the trace of the
-- input behind each history row. Unix milliseconds; 0 for rows written
-- before this migration.
ALTER TABLE surety_saga_instance ADD COLUMN created_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE surety_saga_history ADD COLUMN trace_id TEXT;
CREATE INDEX IF NOT EXISTS surety_saga_instance_listing ON surety_saga_instance (saga, finished, updated_at);
