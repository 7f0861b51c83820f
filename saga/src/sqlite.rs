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

use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::sqlite::SqlitePool;
use surety_outbox::SqliteOutbox;

use crate::store::{HistoryRecord, InstanceRecord, SagaStore, StoreError, TimerRecord, Write};

const SCHEMA: &str = include_str!("../migrations/sqlite/0001_init.sql");

/// Creates the saga tables (and the outbox tables, through
/// `surety_outbox::sqlite::migrate`). Safe to call on every start-up.
///
/// # Errors
///
/// [`StoreError::Backend`] when the database fails.
pub async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    surety_outbox::sqlite::migrate(pool)
        .await
        .map_err(backend)?;
    sqlx::raw_sql(SCHEMA).execute(pool).await.map_err(backend)?;
    Ok(())
}

/// Saga storage in SQLite. Cheap to clone (it holds the pool).
#[derive(Clone, Debug)]
pub struct SqliteSagaStore {
    pool: SqlitePool,
}

impl SqliteSagaStore {
    /// A store on `pool`; run [`migrate`] first.
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }
}

fn backend(error: impl Into<surety_core::BoxError>) -> StoreError {
    StoreError::Backend(error.into())
}

fn millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

fn from_millis(at: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(at).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn json(text: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text).map_err(backend)
}

fn count(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(backend)
}

impl SagaStore for SqliteSagaStore {
    async fn load(&self, saga: &str, id: &str) -> Result<Option<InstanceRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT state, state_name, version, finished FROM surety_saga_instance \
             WHERE saga = $1 AND id = $2",
        )
        .bind(saga)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?;
        let Some(row) = row else { return Ok(None) };
        let state: String = row.try_get("state").map_err(backend)?;
        let version: i64 = row.try_get("version").map_err(backend)?;
        Ok(Some(InstanceRecord {
            saga: saga.to_owned(),
            id: id.to_owned(),
            state: json(&state)?,
            state_name: row.try_get("state_name").map_err(backend)?,
            version: u64::try_from(version).map_err(backend)?,
            finished: row.try_get("finished").map_err(backend)?,
        }))
    }

    async fn write(&self, write: Write) -> Result<(), StoreError> {
        let instance = &write.instance;
        let (saga, id) = (instance.saga.as_str(), instance.id.as_str());
        let expected = instance.version.saturating_sub(1);
        // IMMEDIATE: take the write lock before reading the version, so the
        // check and the write cannot interleave with another writer.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let current: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM surety_saga_instance WHERE saga = $1 AND id = $2",
        )
        .bind(saga)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(backend)?;
        if current.unwrap_or(0) != count(expected)? {
            return Err(StoreError::Conflict {
                saga: saga.to_owned(),
                id: id.to_owned(),
                expected,
            });
        }
        if let Some(fired) = &write.fired_timer {
            let deleted = sqlx::query(
                "DELETE FROM surety_saga_timer WHERE saga = $1 AND id = $2 AND name = $3 AND due = $4",
            )
            .bind(&fired.saga)
            .bind(&fired.id)
            .bind(&fired.name)
            .bind(millis(fired.due))
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
            if deleted.rows_affected() == 0 {
                return Err(StoreError::TimerGone {
                    id: fired.id.clone(),
                    name: fired.name.clone(),
                });
            }
        }
        for name in &write.cancel_timers {
            sqlx::query("DELETE FROM surety_saga_timer WHERE saga = $1 AND id = $2 AND name = $3")
                .bind(saga)
                .bind(id)
                .bind(name)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        if instance.finished {
            sqlx::query("DELETE FROM surety_saga_timer WHERE saga = $1 AND id = $2")
                .bind(saga)
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        } else {
            for (name, due) in &write.set_timers {
                sqlx::query(
                    "INSERT INTO surety_saga_timer (saga, id, name, due) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (saga, id, name) DO UPDATE SET due = excluded.due",
                )
                .bind(saga)
                .bind(id)
                .bind(name)
                .bind(millis(*due))
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
            }
        }
        let state = instance.state.to_string();
        sqlx::query(
            "INSERT INTO surety_saga_instance (saga, id, state, state_name, version, finished, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (saga, id) DO UPDATE SET state = excluded.state, \
             state_name = excluded.state_name, version = excluded.version, \
             finished = excluded.finished, updated_at = excluded.updated_at",
        )
        .bind(saga)
        .bind(id)
        .bind(&state)
        .bind(&instance.state_name)
        .bind(count(instance.version)?)
        .bind(instance.finished)
        .bind(millis(write.history.at))
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        let history = &write.history;
        sqlx::query(
            "INSERT INTO surety_saga_history (saga, id, version, input, state, state_name, at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(saga)
        .bind(id)
        .bind(count(history.version)?)
        .bind(history.input.as_ref().map(serde_json::Value::to_string))
        .bind(history.state.to_string())
        .bind(&history.state_name)
        .bind(millis(history.at))
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        for (topic, envelope) in &write.commands {
            SqliteOutbox::enqueue(&mut tx, topic, envelope)
                .await
                .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(())
    }

    async fn due_timers(
        &self,
        saga: &str,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<TimerRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, due FROM surety_saga_timer WHERE saga = $1 AND due <= $2 \
             ORDER BY due LIMIT $3",
        )
        .bind(saga)
        .bind(millis(now))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        rows.into_iter()
            .map(|row| {
                Ok(TimerRecord {
                    saga: saga.to_owned(),
                    id: row.try_get("id").map_err(backend)?,
                    name: row.try_get("name").map_err(backend)?,
                    due: from_millis(row.try_get("due").map_err(backend)?),
                })
            })
            .collect()
    }

    async fn history(&self, saga: &str, id: &str) -> Result<Vec<HistoryRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT version, input, state, state_name, at FROM surety_saga_history \
             WHERE saga = $1 AND id = $2 ORDER BY version",
        )
        .bind(saga)
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .map_err(backend)?;
        rows.into_iter()
            .map(|row| {
                let version: i64 = row.try_get("version").map_err(backend)?;
                let input: Option<String> = row.try_get("input").map_err(backend)?;
                let state: String = row.try_get("state").map_err(backend)?;
                Ok(HistoryRecord {
                    version: u64::try_from(version).map_err(backend)?,
                    input: input.as_deref().map(json).transpose()?,
                    state: json(&state)?,
                    state_name: row.try_get("state_name").map_err(backend)?,
                    at: from_millis(row.try_get("at").map_err(backend)?),
                })
            })
            .collect()
    }
}
