-- Saga instances: one row per (saga, id), guarded by `version`.
-- Times are Unix milliseconds.
CREATE TABLE IF NOT EXISTS surety_saga_instance (
    saga        TEXT    NOT NULL,
    id          TEXT    NOT NULL,
    state       TEXT    NOT NULL,
    state_name  TEXT    NOT NULL,
    version     BIGINT  NOT NULL,
    finished    BOOLEAN NOT NULL,
    updated_at  BIGINT  NOT NULL,
    PRIMARY KEY (saga, id)
);

-- One row per applied input (the first holds the start state).
CREATE TABLE IF NOT EXISTS surety_saga_history (
    saga        TEXT    NOT NULL,
    id          TEXT    NOT NULL,
    version     BIGINT  NOT NULL,
    input       TEXT,
    state       TEXT    NOT NULL,
    state_name  TEXT    NOT NULL,
    at          BIGINT  NOT NULL,
    PRIMARY KEY (saga, id, version)
);

-- Pending timers, polled by due time.
CREATE TABLE IF NOT EXISTS surety_saga_timer (
    saga        TEXT    NOT NULL,
    id          TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    due         BIGINT  NOT NULL,
    PRIMARY KEY (saga, id, name)
);

CREATE INDEX IF NOT EXISTS surety_saga_timer_due ON surety_saga_timer (saga, due);
