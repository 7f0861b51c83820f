-- surety-dlq 0001: dead letters and the operator audit log (PostgreSQL).
-- Times are microseconds since the Unix epoch (UTC); `record` is the
-- DeadLetter as JSON (docs/reference/dlq-envelope.md); the other columns
-- are copies of its fields for filtering.
CREATE TABLE IF NOT EXISTS surety_dlq_letters (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    messaging_system TEXT NOT NULL,
    topic TEXT NOT NULL,
    consumer_group TEXT NOT NULL,
    error_class TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    handler TEXT NOT NULL,
    search_text TEXT NOT NULL,
    last_failed_at BIGINT NOT NULL,
    dead_lettered_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS surety_dlq_letters_by_source
    ON surety_dlq_letters (status, messaging_system, topic, consumer_group, error_class);
CREATE INDEX IF NOT EXISTS surety_dlq_letters_by_fingerprint ON surety_dlq_letters (fingerprint);
CREATE INDEX IF NOT EXISTS surety_dlq_letters_by_last_failure ON surety_dlq_letters (last_failed_at);
CREATE TABLE IF NOT EXISTS surety_dlq_audit (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    entry TEXT NOT NULL
);
