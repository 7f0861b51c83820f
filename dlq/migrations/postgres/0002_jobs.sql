-- surety-dlq 0002: replay and discard jobs. `job` is the Job as JSON; a job
-- is written before it acts (its intent) and after every dead letter it
-- handles, so a restarted process resumes it where it stopped.
CREATE TABLE IF NOT EXISTS surety_dlq_jobs (
    id TEXT PRIMARY KEY,
    finished BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    job TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS surety_dlq_jobs_unfinished ON surety_dlq_jobs (finished, id);
