-- Where each projection stands in each partition of each topic: the next
-- offset to apply (the contiguous watermark). Written in the same
-- transaction as the read-model change it accounts for.
CREATE TABLE IF NOT EXISTS surety_projection_checkpoint (
    projection  TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL,
    PRIMARY KEY (projection, topic, partition)
);

-- Offsets at or past the watermark that parallel lanes already applied:
-- skipped on restart, removed when the watermark passes them.
CREATE TABLE IF NOT EXISTS surety_projection_applied (
    projection     TEXT    NOT NULL,
    topic          TEXT    NOT NULL,
    partition      INTEGER NOT NULL,
    applied_offset BIGINT  NOT NULL,
    PRIMARY KEY (projection, topic, partition, applied_offset)
);
