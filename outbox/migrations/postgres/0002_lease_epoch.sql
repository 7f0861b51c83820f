-- Fencing: every takeover of a relay's lease raises its epoch; the relay's
-- marks carry the epoch it holds and change nothing once it moved on.
ALTER TABLE surety_outbox_relay ADD COLUMN IF NOT EXISTS epoch BIGINT NOT NULL DEFAULT 0;
