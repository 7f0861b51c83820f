-- The outbox: one row per message written by an application transaction.
-- `seq` orders the rows; times are Unix milliseconds.
CREATE TABLE IF NOT EXISTS surety_outbox (
    seq             BIGSERIAL PRIMARY KEY,
    message_id      TEXT      NOT NULL,
    topic           TEXT      NOT NULL,
    partition_key   TEXT,
    headers         TEXT      NOT NULL,
    payload         BYTEA     NOT NULL,
    created_at      BIGINT    NOT NULL,
    status          TEXT      NOT NULL DEFAULT 'pending'
                              CHECK (status IN ('pending', 'sent', 'parked')),
    attempts        INTEGER   NOT NULL DEFAULT 0,
    next_attempt_at BIGINT    NOT NULL,
    last_error      TEXT,
    sent_at         BIGINT
);

CREATE INDEX IF NOT EXISTS surety_outbox_pending ON surety_outbox (seq) WHERE status = 'pending';
-- Finds a key's pending rows that wait for a retry (such a row holds back its key).
CREATE INDEX IF NOT EXISTS surety_outbox_waiting ON surety_outbox (partition_key, next_attempt_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS surety_outbox_sent ON surety_outbox (sent_at) WHERE status = 'sent';
CREATE INDEX IF NOT EXISTS surety_outbox_parked ON surety_outbox (seq) WHERE status = 'parked';

-- One row per relay name: who holds the right to publish, and until when.
CREATE TABLE IF NOT EXISTS surety_outbox_relay (
    name        TEXT   PRIMARY KEY,
    holder      TEXT   NOT NULL,
    lease_until BIGINT NOT NULL
);
