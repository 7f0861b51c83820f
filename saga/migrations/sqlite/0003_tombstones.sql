-- Tombstones: a participant's record that it handled the compensation of
-- a step (`saga` is the command's source, `step` the step's name), so a late
-- command for that step is not applied; and the start of a purged instance
-- (`saga` is the saga's name, `step` is empty), so a redelivered start does
-- not recreate it. `at` is Unix milliseconds.
CREATE TABLE IF NOT EXISTS surety_saga_tombstone (
    saga    TEXT    NOT NULL,
    id      TEXT    NOT NULL,
    step    TEXT    NOT NULL,
    at      INTEGER NOT NULL,
    PRIMARY KEY (saga, id, step)
);
