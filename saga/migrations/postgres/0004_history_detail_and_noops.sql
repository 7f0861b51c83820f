-- Each history row names the step it left, the commands it sent (a JSON
-- array of {topic, message_type, id}; empty for rows written before this
-- migration) and, for a fired timer, the due time it was set to (Unix
-- milliseconds), so each firing is identifiable.
ALTER TABLE surety_saga_history ADD COLUMN from_state TEXT;
ALTER TABLE surety_saga_history ADD COLUMN commands TEXT NOT NULL DEFAULT '[]';
ALTER TABLE surety_saga_history ADD COLUMN timer_due BIGINT;

-- Inputs that changed nothing (duplicate and late replies), counted per
-- (instance version, input, outcome): one row however many arrive.
CREATE TABLE IF NOT EXISTS surety_saga_noop (
    saga      TEXT    NOT NULL,
    id        TEXT    NOT NULL,
    version   BIGINT NOT NULL,
    input     TEXT    NOT NULL,
    outcome   TEXT    NOT NULL,
    count     BIGINT NOT NULL,
    first_at  BIGINT NOT NULL,
    last_at   BIGINT NOT NULL,
    trace_id  TEXT,
    PRIMARY KEY (saga, id, version, input, outcome)
);
