-- Which version of each projection's read model serves (live), which
-- served before it (previous, for rollback) and which is being rebuilt
-- (shadow).
CREATE TABLE IF NOT EXISTS surety_projection_version (
    projection TEXT    PRIMARY KEY,
    live       BIGINT  NOT NULL,
    previous   BIGINT,
    shadow     BIGINT,
    updated_at BIGINT  NOT NULL
);
