//! [`SqliteSagaStore`]: saga instances, history and timers in SQLite, with
//! the commands written into the `surety-outbox` table in the same
//! transaction, so the outbox [`Relay`](surety_outbox::Relay) sends them.
//!
//! ```
//! use sqlx::sqlite::SqlitePoolOptions;
//! use surety_saga::sqlite::{self, SqliteSagaStore};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
//! sqlite::migrate(&pool).await?; // the saga tables and the outbox's
//! let store = SqliteSagaStore::new(pool);
//! # let _ = store;
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use sqlx::Sqlite;
use sqlx::sqlite::SqlitePool;
use surety_outbox::SqliteOutbox;
use tokio::sync::oneshot;

use crate::sql::{backend, migrator, sql_saga_store};
use crate::store::{StoreError, Write};

pub use crate::sql::MIGRATIONS_TABLE;

/// The migrations, embedded from `migrations/sqlite/` (version, description,
/// SQL).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "create surety saga",
        include_str!("../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "saga created_at, history trace id, audit",
        include_str!("../migrations/sqlite/0002_created_at_and_trace.sql"),
    ),
    (
        3,
        "saga tombstones",
        include_str!("../migrations/sqlite/0003_tombstones.sql"),
    ),
    (
        4,
        "saga history from-state, commands and timer due, no-op records",
        include_str!("../migrations/sqlite/0004_history_detail_and_noops.sql"),
    ),
];

/// Creates or upgrades the saga tables (and the outbox tables, through
/// `surety_outbox::sqlite::migrate`). Safe to call on every start-up:
/// migrations run once, recorded in [`MIGRATIONS_TABLE`].
///
/// # Errors
///
/// [`StoreError::Backend`] when the database fails.
pub async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    surety_outbox::sqlite::migrate(pool)
        .await
        .map_err(backend)?;
    migrator(MIGRATIONS).run(pool).await.map_err(backend)?;
    Ok(())
}

/// Saga storage in SQLite. Cheap to clone (clones share the pool and the
/// queue of writes waiting to commit).
///
/// The write transaction starts with `BEGIN IMMEDIATE`: it takes SQLite's
/// write lock before it reads, so a concurrent writer waits (busy timeout)
/// instead of failing with `SQLITE_BUSY_SNAPSHOT`.
///
/// **Group commit.** SQLite has one writer at a time and a durable commit
/// costs a disk sync, so writes that arrive while another commits wait
/// and then commit together: one transaction, each write in its own
/// savepoint, so a write that fails (a version conflict, a timer that is
/// gone) rolls back alone and the others commit. A write returns once its
/// transaction committed. A lone write commits on its own, with no
/// savepoint and no hand-off. No background task: the first waiting
/// writer commits the group.
#[derive(Clone, Debug)]
pub struct SqliteSagaStore {
    pool: SqlitePool,
    group: Arc<Group>,
}

/// A write waiting for a group commit, with where its result goes.
type Job = (Write, oneshot::Sender<Result<(), StoreError>>);

/// The writes waiting to commit and the right to commit them.
#[derive(Debug, Default)]
struct Group {
    queue: Mutex<VecDeque<Job>>,
    committer: tokio::sync::Mutex<()>,
}

/// Writes per group commit, at most.
const GROUP_LIMIT: usize = 64;

impl Group {
    fn queue(&self) -> MutexGuard<'_, VecDeque<Job>> {
        // A panic while the lock is held leaves the queue consistent (a
        // push or a drain): keep using it.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl SqliteSagaStore {
    /// A store on `pool`; run [`migrate`] first.
    pub fn new(pool: SqlitePool) -> Self {
        Self {
            pool,
            group: Arc::default(),
        }
    }

    /// The pool.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    /// Queues `write` and waits for the group commit that carries it,
    /// committing a group itself when no one else is.
    async fn commit_write(&self, write: Write) -> Result<(), StoreError> {
        let (sender, mut result) = oneshot::channel();
        self.group.queue().push_back((write, sender));
        loop {
            tokio::select! {
                biased;
                answer = &mut result => return answer.unwrap_or_else(|_| Err(abandoned())),
                _committing = self.group.committer.lock() => {
                    let jobs: Vec<Job> = {
                        let mut queue = self.group.queue();
                        let n = queue.len().min(GROUP_LIMIT);
                        queue.drain(..n).collect()
                    };
                    if jobs.is_empty() {
                        // Someone else's group carried this write and
                        // answered before letting go of the commit.
                        continue;
                    }
                    let (writes, senders): (Vec<Write>, Vec<_>) = jobs.into_iter().unzip();
                    let results = self.commit_group(&writes).await;
                    for (sender, outcome) in senders.into_iter().zip(results) {
                        // A writer that stopped waiting: nothing to tell.
                        let _ = sender.send(outcome);
                    }
                }
            }
        }
    }

    /// Commits `writes` in one transaction, one result per write.
    async fn commit_group(&self, writes: &[Write]) -> Vec<Result<(), StoreError>> {
        let mut tx = match self.begin_write().await {
            Ok(tx) => tx,
            Err(error) => return failed_all(backend(error), writes.len()),
        };
        if let [write] = writes {
            let outcome = match Self::write_in(&mut tx, write).await {
                Ok(()) => tx.commit().await.map_err(backend),
                // Dropping the transaction rolls it back.
                Err(error) => Err(error),
            };
            return vec![outcome];
        }
        let mut results = Vec::with_capacity(writes.len());
        for write in writes {
            let mut savepoint = match sqlx::Acquire::begin(&mut tx).await {
                Ok(savepoint) => savepoint,
                Err(error) => return failed_all(backend(error), writes.len()),
            };
            match Self::write_in(&mut savepoint, write).await {
                Ok(()) => {
                    if let Err(error) = savepoint.commit().await {
                        return failed_all(backend(error), writes.len());
                    }
                    results.push(Ok(()));
                }
                Err(error) => {
                    if let Err(rollback) = savepoint.rollback().await {
                        return failed_all(backend(rollback), writes.len());
                    }
                    results.push(Err(error));
                }
            }
        }
        match tx.commit().await {
            Ok(()) => results,
            Err(error) => {
                let error = backend(error);
                results
                    .into_iter()
                    .map(|outcome| outcome.and_then(|()| Err(copy(&error))))
                    .collect()
            }
        }
    }
}

/// `error` for each of `n` writes of a group that did not commit.
fn failed_all(error: StoreError, n: usize) -> Vec<Result<(), StoreError>> {
    (0..n).map(|_| Err(copy(&error))).collect()
}

/// The same failure again, for another write of the group: its kind (so
/// its class) and its message.
fn copy(error: &StoreError) -> StoreError {
    match error {
        StoreError::Backend(inner) => StoreError::Backend(surety_core::store::StoreError::new(
            inner.kind(),
            inner.to_string(),
        )),
        other => StoreError::Backend(surety_core::store::StoreError::new(
            surety_core::store::StoreErrorKind::Other,
            other.to_string(),
        )),
    }
}

/// The group carrying a write was dropped before it answered (the task
/// committing it was cancelled): the write may or may not have committed,
/// and a retry finds out from the instance's version.
fn abandoned() -> StoreError {
    StoreError::Backend(surety_core::store::StoreError::new(
        surety_core::store::StoreErrorKind::Other,
        "the group commit carrying this write was cancelled",
    ))
}

sql_saga_store!(SqliteSagaStore, Sqlite, SqliteOutbox);

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::Utc;
    use surety_core::Envelope;
    use surety_testkit::db::TempSqlite;

    use super::*;
    use crate::store::{HistoryRecord, InstanceRecord, SagaStore, TimerRecord};

    /// Version `version` of instance `id`, sending one command.
    fn write(id: &str, version: u64) -> Write {
        let now = Utc::now();
        Write {
            instance: InstanceRecord {
                saga: "pay".into(),
                id: id.into(),
                state: serde_json::json!(format!("v{version}")),
                state_name: format!("v{version}"),
                version,
                finished: false,
                updated_at: now,
                state_version: 1,
            },
            history: HistoryRecord {
                version,
                input: None,
                state: serde_json::json!(format!("v{version}")),
                state_name: format!("v{version}"),
                at: now,
                trace_id: None,
                from_state: None,
                commands: Vec::new(),
                timer_due: None,
            },
            commands: vec![(
                "payments".into(),
                Envelope::builder("/test", "payment.charge")
                    .id(format!("{id}:{version}"))
                    .build(),
            )],
            set_timers: vec![("payment".into(), now + chrono::Duration::seconds(30))],
            cancel_timers: Vec::new(),
            fired_timer: None,
        }
    }

    async fn outbox_ids(pool: &SqlitePool) -> Vec<String> {
        let mut ids: Vec<String> = sqlx::query_scalar("SELECT message_id FROM surety_outbox")
            .fetch_all(pool)
            .await
            .expect("the outbox answers");
        ids.sort();
        ids
    }

    /// Writes that arrive while another holds SQLite's write lock commit
    /// together once it lets go; a write of the group that fails after its
    /// first statement (a fired timer that is gone) and a start that loses
    /// to another start in the same group roll back alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_writes_commit_together_and_a_failing_one_alone() {
        let db = TempSqlite::new(4, Duration::from_secs(20)).await;
        migrate(&db.pool).await.expect("migrates");
        let store = SqliteSagaStore::new(db.pool.clone());
        store.write(write("gone", 1)).await.expect("starts");
        let timer = store
            .due_timers("pay", Utc::now() + chrono::Duration::seconds(31), 10)
            .await
            .expect("due timers")
            .into_iter()
            .find(|t| t.id == "gone")
            .expect("gone's timer");
        assert!(store.delete_timer(&timer).await.expect("deletes"));

        // Another connection holds the write lock.
        let mut holder = db.pool.acquire().await.expect("a connection");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *holder)
            .await
            .expect("takes the write lock");
        let mut writes = Vec::new();
        for i in 0..8 {
            writes.push(write(&format!("w{i}"), 1));
        }
        writes.push(write("dup", 1));
        writes.push(write("dup", 1));
        let mut fired = write("gone", 2);
        fired.fired_timer = Some(TimerRecord {
            saga: timer.saga.clone(),
            id: timer.id.clone(),
            name: timer.name.clone(),
            due: timer.due,
        });
        writes.push(fired);
        let spawn = |w: Write| {
            let store = store.clone();
            tokio::spawn(async move { store.write(w).await })
        };
        // The first write takes the commit and waits for the lock alone...
        let mut writes = writes.into_iter();
        let mut tasks = vec![spawn(writes.next().expect("a first write"))];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.group.committer.try_lock().is_ok() || !store.group.queue().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the first write waits for the lock"
            );
            tokio::task::yield_now().await;
        }
        // ...and the others queue behind it.
        let queued = writes.len();
        tasks.extend(writes.map(spawn));
        while store.group.queue().len() < queued {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the writes queue behind the one waiting for the lock"
            );
            tokio::task::yield_now().await;
        }
        sqlx::query("ROLLBACK")
            .execute(&mut *holder)
            .await
            .expect("lets go");
        drop(holder);

        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.expect("the write task"));
        }
        let conflicts = outcomes
            .iter()
            .filter(|o| matches!(o, Err(StoreError::Conflict { .. })))
            .count();
        let gone = outcomes
            .iter()
            .filter(|o| matches!(o, Err(StoreError::TimerGone { .. })))
            .count();
        let ok = outcomes.iter().filter(|o| o.is_ok()).count();
        assert_eq!((ok, conflicts, gone), (9, 1, 1), "{outcomes:?}");

        for i in 0..8 {
            let loaded = store.load("pay", &format!("w{i}")).await.expect("loads");
            assert_eq!(loaded.map(|r| r.version), Some(1));
        }
        let gone = store.load("pay", "gone").await.expect("loads");
        assert_eq!(
            gone.map(|r| r.version),
            Some(1),
            "the failed write's instance update rolled back"
        );
        assert_eq!(
            store.history("pay", "gone").await.expect("history").len(),
            1
        );
        let mut expected: Vec<String> = (0..8).map(|i| format!("w{i}:1")).collect();
        expected.extend(["dup:1".to_owned(), "gone:1".to_owned()]);
        expected.sort();
        assert_eq!(outbox_ids(&db.pool).await, expected);
    }

    /// A write whose caller stops waiting still commits with its group or
    /// not at all; a later write goes on as usual.
    #[tokio::test]
    async fn a_cancelled_writer_does_not_stall_the_next() {
        let db = TempSqlite::new(2, Duration::from_secs(5)).await;
        migrate(&db.pool).await.expect("migrates");
        let store = SqliteSagaStore::new(db.pool.clone());
        let cancelled = tokio::time::timeout(Duration::ZERO, store.write(write("a", 1))).await;
        assert!(cancelled.is_err(), "the first poll does not finish a write");
        store.write(write("b", 1)).await.expect("the next write");
        assert!(store.group.queue().is_empty());
        let versions = (
            store
                .load("pay", "a")
                .await
                .expect("loads")
                .map(|r| r.version),
            store
                .load("pay", "b")
                .await
                .expect("loads")
                .map(|r| r.version),
        );
        assert!(
            matches!(versions, (None | Some(1), Some(1))),
            "{versions:?}"
        );
    }
}
