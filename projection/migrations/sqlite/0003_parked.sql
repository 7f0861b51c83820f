-- Events a projection could not apply, parked per key with their dead
-- letter (the envelope and the failure): later events of a parked key are
-- parked behind them, in offset order, until the key is replayed.
CREATE TABLE IF NOT EXISTS surety_projection_parked (
    projection    TEXT    NOT NULL,
    topic         TEXT    NOT NULL,
    partition     INTEGER NOT NULL,
    parked_offset INTEGER NOT NULL,
    partition_key TEXT    NOT NULL,
    dead_letter   TEXT    NOT NULL,
    parked_at     INTEGER NOT NULL,
    PRIMARY KEY (projection, topic, partition, parked_offset)
);

CREATE INDEX IF NOT EXISTS surety_projection_parked_key
    ON surety_projection_parked (projection, topic, partition_key, partition, parked_offset);
