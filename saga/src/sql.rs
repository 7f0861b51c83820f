//! The SQL saga stores, written once for SQLite and PostgreSQL: the same
//! tables and queries; only the pool type, the way a write transaction
//! begins and the embedded migrations differ.

/// The table that records which saga migrations ran: its own, so the
/// versions never collide with another crate's or the application's.
pub const MIGRATIONS_TABLE: &str = "_surety_saga_migrations";

/// Builds the migrator of one backend from its embedded migrations,
/// recording them in [`MIGRATIONS_TABLE`].
pub(crate) fn migrator(
    migrations: &[(i64, &'static str, &'static str)],
) -> sqlx::migrate::Migrator {
    surety_core::store::migrator(MIGRATIONS_TABLE, migrations)
}

/// What a database-side failure of the saga store can come from, each
/// given its store error kind once.
pub(crate) trait BackendError {
    fn into_store_error(self) -> surety_core::store::StoreError;
}

impl BackendError for sqlx::Error {
    fn into_store_error(self) -> surety_core::store::StoreError {
        self.into()
    }
}

impl BackendError for sqlx::migrate::MigrateError {
    fn into_store_error(self) -> surety_core::store::StoreError {
        self.into()
    }
}

impl BackendError for serde_json::Error {
    fn into_store_error(self) -> surety_core::store::StoreError {
        surety_core::store::StoreError::decode(self)
    }
}

impl BackendError for std::num::TryFromIntError {
    fn into_store_error(self) -> surety_core::store::StoreError {
        surety_core::store::StoreError::decode(self)
    }
}

impl BackendError for surety_outbox::OutboxError {
    fn into_store_error(self) -> surety_core::store::StoreError {
        use surety_core::Classify as _;
        use surety_core::store::{StoreError, StoreErrorKind};
        match self {
            Self::Store(error) | Self::Migration(error) => error,
            // A command the outbox refuses (an empty topic): not the
            // database's fault, and no retry changes it.
            other => {
                let kind = if other.class().is_retryable() {
                    StoreErrorKind::Other
                } else {
                    StoreErrorKind::Config
                };
                StoreError::new(kind, other)
            }
        }
    }
}

pub(crate) fn backend(error: impl BackendError) -> crate::store::StoreError {
    crate::store::StoreError::Backend(error.into_store_error())
}

pub(crate) fn millis(at: chrono::DateTime<chrono::Utc>) -> i64 {
    at.timestamp_millis()
}

pub(crate) fn from_millis(at: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_millis(at).unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC)
}

pub(crate) fn json(text: &str) -> Result<serde_json::Value, crate::store::StoreError> {
    serde_json::from_str(text).map_err(backend)
}

pub(crate) fn count(value: u64) -> Result<i64, crate::store::StoreError> {
    i64::try_from(value).map_err(backend)
}

/// Every row the SQL saga stores read, decoded in one place for both
/// backends: the queries name their columns, these functions turn a row
/// into its record.
pub(crate) mod rows {
    use crate::store::{
        AuditRecord, HistoryRecord, InstanceRecord, InstanceSummary, NoopRecord, StoreError,
        TimerRecord,
    };

    use super::{backend, from_millis, json};

    /// Typed column reads of a row of either backend, failing with the
    /// store's error.
    pub(crate) trait Columns {
        fn text(&self, column: &str) -> Result<String, StoreError>;
        fn maybe_text(&self, column: &str) -> Result<Option<String>, StoreError>;
        fn int(&self, column: &str) -> Result<i64, StoreError>;
        fn maybe_int(&self, column: &str) -> Result<Option<i64>, StoreError>;
        fn flag(&self, column: &str) -> Result<bool, StoreError>;

        fn count(&self, column: &str) -> Result<u64, StoreError> {
            u64::try_from(self.int(column)?).map_err(backend)
        }

        fn time(&self, column: &str) -> Result<chrono::DateTime<chrono::Utc>, StoreError> {
            self.int(column).map(from_millis)
        }

        fn json(&self, column: &str) -> Result<serde_json::Value, StoreError> {
            json(&self.text(column)?)
        }
    }

    macro_rules! columns {
        ($row:ty) => {
            impl Columns for $row {
                fn text(&self, column: &str) -> Result<String, StoreError> {
                    sqlx::Row::try_get(self, column).map_err(backend)
                }

                fn maybe_text(&self, column: &str) -> Result<Option<String>, StoreError> {
                    sqlx::Row::try_get(self, column).map_err(backend)
                }

                fn int(&self, column: &str) -> Result<i64, StoreError> {
                    sqlx::Row::try_get(self, column).map_err(backend)
                }

                fn maybe_int(&self, column: &str) -> Result<Option<i64>, StoreError> {
                    sqlx::Row::try_get(self, column).map_err(backend)
                }

                fn flag(&self, column: &str) -> Result<bool, StoreError> {
                    sqlx::Row::try_get(self, column).map_err(backend)
                }
            }
        };
    }

    #[cfg(feature = "sqlite")]
    columns!(sqlx::sqlite::SqliteRow);
    #[cfg(feature = "postgres")]
    columns!(sqlx::postgres::PgRow);

    /// `state, state_name, version, finished, updated_at, state_version`
    /// of instance `id` of `saga`.
    pub(crate) fn instance(
        saga: &str,
        id: &str,
        row: &impl Columns,
    ) -> Result<InstanceRecord, StoreError> {
        Ok(InstanceRecord {
            saga: saga.to_owned(),
            id: id.to_owned(),
            state: row.json("state")?,
            state_name: row.text("state_name")?,
            version: row.count("version")?,
            finished: row.flag("finished")?,
            updated_at: row.time("updated_at")?,
            state_version: u32::try_from(row.int("state_version")?).map_err(backend)?,
        })
    }

    /// `saga, id, state, state_name, version, finished, created_at,
    /// updated_at`.
    pub(crate) fn summary(row: &impl Columns) -> Result<InstanceSummary, StoreError> {
        Ok(InstanceSummary {
            saga: row.text("saga")?,
            id: row.text("id")?,
            state_name: row.text("state_name")?,
            version: row.count("version")?,
            finished: row.flag("finished")?,
            created_at: row.time("created_at")?,
            updated_at: row.time("updated_at")?,
            state: row.json("state")?,
        })
    }

    /// `version, input, state, state_name, at, trace_id, from_state,
    /// commands, timer_due`.
    pub(crate) fn history(row: &impl Columns) -> Result<HistoryRecord, StoreError> {
        Ok(HistoryRecord {
            version: row.count("version")?,
            input: row.maybe_text("input")?.as_deref().map(json).transpose()?,
            state: row.json("state")?,
            state_name: row.text("state_name")?,
            at: row.time("at")?,
            trace_id: row.maybe_text("trace_id")?,
            from_state: row.maybe_text("from_state")?,
            commands: serde_json::from_str(&row.text("commands")?).map_err(backend)?,
            timer_due: row.maybe_int("timer_due")?.map(from_millis),
        })
    }

    /// `id, name, due` of a timer of `saga`.
    pub(crate) fn timer(saga: &str, row: &impl Columns) -> Result<TimerRecord, StoreError> {
        Ok(TimerRecord {
            saga: saga.to_owned(),
            id: row.text("id")?,
            name: row.text("name")?,
            due: row.time("due")?,
        })
    }

    /// `version, input, outcome, count, first_at, last_at, trace_id`.
    pub(crate) fn noop(row: &impl Columns) -> Result<NoopRecord, StoreError> {
        let mut noop = NoopRecord::new(
            row.count("version")?,
            row.text("input")?,
            row.text("outcome")?,
            row.time("first_at")?,
            row.maybe_text("trace_id")?,
        );
        noop.count = row.count("count")?;
        noop.last_at = row.time("last_at")?;
        Ok(noop)
    }

    /// `actor, action, reason, at` of an audit entry on instance `id` of
    /// `saga`.
    pub(crate) fn audit(
        saga: &str,
        id: &str,
        row: &impl Columns,
    ) -> Result<AuditRecord, StoreError> {
        let mut entry = AuditRecord::new(
            saga,
            id,
            row.text("actor")?,
            row.text("action")?,
            row.text("reason")?,
        );
        entry.at = row.time("at")?;
        Ok(entry)
    }

    /// `state_name, all_count, idle_count`.
    pub(crate) fn step_count(row: &impl Columns) -> Result<(String, u64, u64), StoreError> {
        Ok((
            row.text("state_name")?,
            row.count("all_count")?,
            row.count("idle_count")?,
        ))
    }
}

/// `impl SagaStore` for a SQL store on database `$db`: `$store` has a
/// `pool` field and defines `begin_write` (opens a write transaction) and
/// `commit_write` (commits one [`Write`](crate::store::Write), through the
/// generated `write_in`); `$outbox` enqueues commands.
///
/// A write is optimistic on both backends: the instance row is inserted (a
/// new instance; a unique violation is a conflict) or updated `WHERE
/// version = <loaded>` (no row updated is a conflict), first in the
/// transaction, so a losing writer rolls back before it touches timers,
/// history or the outbox.
macro_rules! sql_saga_store {
    ($store:ident, $db:ty, $outbox:ty) => {
        impl $store {
            /// Applies `write` within `tx` (the caller commits): the
            /// instance row first, so a losing writer fails before it
            /// touches timers, history or the outbox.
            pub(crate) async fn write_in(
                tx: &mut sqlx::Transaction<'_, $db>,
                write: &$crate::store::Write,
            ) -> Result<(), $crate::store::StoreError> {
                use $crate::sql::{backend, count, millis};
                use $crate::store::StoreError;
                let instance = &write.instance;
                let (saga, id) = (instance.saga.as_str(), instance.id.as_str());
                let expected = instance.version.saturating_sub(1);
                let conflict = || StoreError::Conflict {
                    saga: saga.to_owned(),
                    id: id.to_owned(),
                    expected,
                };
                let state = instance.state.to_string();
                let at = millis(write.history.at);
                if expected == 0 {
                    let inserted = sqlx::query(
                        "INSERT INTO surety_saga_instance \
                         (saga, id, state, state_name, version, finished, created_at, updated_at, \
                         state_version) VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8)",
                    )
                    .bind(saga)
                    .bind(id)
                    .bind(&state)
                    .bind(&instance.state_name)
                    .bind(count(instance.version)?)
                    .bind(instance.finished)
                    .bind(at)
                    .bind(i64::from(instance.state_version))
                    .execute(&mut **tx)
                    .await;
                    match inserted {
                        Ok(_) => {}
                        Err(sqlx::Error::Database(error)) if error.is_unique_violation() => {
                            return Err(conflict());
                        }
                        Err(error) => return Err(backend(error)),
                    }
                    // Checked after the insert: an insert racing a purge of
                    // the same id waits for the purge to commit, and this
                    // read then sees its tombstone.
                    let purged: Option<i64> = sqlx::query_scalar(
                        "SELECT at FROM surety_saga_tombstone \
                         WHERE saga = $1 AND id = $2 AND step = ''",
                    )
                    .bind(saga)
                    .bind(id)
                    .fetch_optional(&mut **tx)
                    .await
                    .map_err(backend)?;
                    if purged.is_some() {
                        return Err(StoreError::Purged {
                            saga: saga.to_owned(),
                            id: id.to_owned(),
                        });
                    }
                } else {
                    let updated = sqlx::query(
                        "UPDATE surety_saga_instance SET state = $3, state_name = $4, \
                         version = $5, finished = $6, updated_at = $7, state_version = $9 \
                         WHERE saga = $1 AND id = $2 AND version = $8",
                    )
                    .bind(saga)
                    .bind(id)
                    .bind(&state)
                    .bind(&instance.state_name)
                    .bind(count(instance.version)?)
                    .bind(instance.finished)
                    .bind(at)
                    .bind(count(expected)?)
                    .bind(i64::from(instance.state_version))
                    .execute(&mut **tx)
                    .await
                    .map_err(backend)?;
                    if updated.rows_affected() == 0 {
                        return Err(conflict());
                    }
                }
                if let Some(fired) = &write.fired_timer {
                    let deleted = sqlx::query(
                        "DELETE FROM surety_saga_timer \
                         WHERE saga = $1 AND id = $2 AND name = $3 AND due = $4",
                    )
                    .bind(&fired.saga)
                    .bind(&fired.id)
                    .bind(&fired.name)
                    .bind(millis(fired.due))
                    .execute(&mut **tx)
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
                    sqlx::query(
                        "DELETE FROM surety_saga_timer WHERE saga = $1 AND id = $2 AND name = $3",
                    )
                    .bind(saga)
                    .bind(id)
                    .bind(name)
                    .execute(&mut **tx)
                    .await
                    .map_err(backend)?;
                }
                if instance.finished {
                    sqlx::query("DELETE FROM surety_saga_timer WHERE saga = $1 AND id = $2")
                        .bind(saga)
                        .bind(id)
                        .execute(&mut **tx)
                        .await
                        .map_err(backend)?;
                } else {
                    for (name, due) in &write.set_timers {
                        sqlx::query(
                            "INSERT INTO surety_saga_timer (saga, id, name, due) \
                             VALUES ($1, $2, $3, $4) \
                             ON CONFLICT (saga, id, name) DO UPDATE SET due = excluded.due",
                        )
                        .bind(saga)
                        .bind(id)
                        .bind(name)
                        .bind(millis(*due))
                        .execute(&mut **tx)
                        .await
                        .map_err(backend)?;
                    }
                }
                let history = &write.history;
                sqlx::query(
                    "INSERT INTO surety_saga_history \
                     (saga, id, version, input, state, state_name, at, trace_id, from_state, \
                     commands, timer_due) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                )
                .bind(saga)
                .bind(id)
                .bind(count(history.version)?)
                .bind(history.input.as_ref().map(serde_json::Value::to_string))
                .bind(history.state.to_string())
                .bind(&history.state_name)
                .bind(millis(history.at))
                .bind(history.trace_id.as_deref())
                .bind(history.from_state.as_deref())
                .bind(serde_json::to_string(&history.commands).map_err(backend)?)
                .bind(history.timer_due.map(millis))
                .execute(&mut **tx)
                .await
                .map_err(backend)?;
                if !write.commands.is_empty() {
                    let commands: Vec<(&str, &surety_core::Envelope)> = write
                        .commands
                        .iter()
                        .map(|(topic, envelope)| (topic.as_str(), envelope))
                        .collect();
                    <$outbox>::enqueue_all(tx, &commands).await.map_err(backend)?;
                }
                Ok(())
            }
        }

        impl $crate::store::SagaStore for $store {
            async fn load(
                &self,
                saga: &str,
                id: &str,
            ) -> Result<Option<$crate::store::InstanceRecord>, $crate::store::StoreError> {
                use $crate::sql::backend;
                let row = sqlx::query(
                    "SELECT state, state_name, version, finished, updated_at, state_version \
                     FROM surety_saga_instance \
                     WHERE saga = $1 AND id = $2",
                )
                .bind(saga)
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(backend)?;
                row.map(|row| $crate::sql::rows::instance(saga, id, &row))
                    .transpose()
            }

            async fn write(
                &self,
                write: $crate::store::Write,
            ) -> Result<(), $crate::store::StoreError> {
                self.commit_write(write).await
            }

            async fn due_timers(
                &self,
                saga: &str,
                now: chrono::DateTime<chrono::Utc>,
                limit: usize,
            ) -> Result<Vec<$crate::store::TimerRecord>, $crate::store::StoreError> {
                use $crate::sql::{backend, millis};
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
                rows.iter()
                    .map(|row| $crate::sql::rows::timer(saga, row))
                    .collect()
            }

            async fn history(
                &self,
                saga: &str,
                id: &str,
            ) -> Result<Vec<$crate::store::HistoryRecord>, $crate::store::StoreError> {
                use $crate::sql::backend;
                let rows = sqlx::query(
                    "SELECT version, input, state, state_name, at, trace_id, from_state, commands, \
                     timer_due \
                     FROM surety_saga_history WHERE saga = $1 AND id = $2 ORDER BY version",
                )
                .bind(saga)
                .bind(id)
                .fetch_all(&self.pool)
                .await
                .map_err(backend)?;
                rows.iter().map($crate::sql::rows::history).collect()
            }

            async fn record_noop(
                &self,
                saga: &str,
                id: &str,
                noop: $crate::store::NoopRecord,
            ) -> Result<(), $crate::store::StoreError> {
                use $crate::sql::{backend, count, millis};
                sqlx::query(
                    "INSERT INTO surety_saga_noop \
                     (saga, id, version, input, outcome, count, first_at, last_at, trace_id) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                     ON CONFLICT (saga, id, version, input, outcome) DO UPDATE SET \
                     count = surety_saga_noop.count + excluded.count, \
                     last_at = excluded.last_at, trace_id = excluded.trace_id",
                )
                .bind(saga)
                .bind(id)
                .bind(count(noop.version)?)
                .bind(&noop.input)
                .bind(&noop.outcome)
                .bind(count(noop.count)?)
                .bind(millis(noop.first_at))
                .bind(millis(noop.last_at))
                .bind(noop.trace_id.as_deref())
                .execute(&self.pool)
                .await
                .map_err(backend)?;
                Ok(())
            }

            async fn noops(
                &self,
                saga: &str,
                id: &str,
            ) -> Result<Vec<$crate::store::NoopRecord>, $crate::store::StoreError> {
                use $crate::sql::backend;
                let rows = sqlx::query(
                    "SELECT version, input, outcome, count, first_at, last_at, trace_id \
                     FROM surety_saga_noop WHERE saga = $1 AND id = $2 \
                     ORDER BY version, input, outcome",
                )
                .bind(saga)
                .bind(id)
                .fetch_all(&self.pool)
                .await
                .map_err(backend)?;
                rows.iter().map($crate::sql::rows::noop).collect()
            }

            async fn unfinished_counts(
                &self,
                saga: &str,
                idle_since: chrono::DateTime<chrono::Utc>,
            ) -> Result<Vec<(String, u64, u64)>, $crate::store::StoreError> {
                use $crate::sql::{backend, millis};
                let rows = sqlx::query(
                    "SELECT state_name, COUNT(*) AS all_count, \
                     SUM(CASE WHEN updated_at <= $2 THEN 1 ELSE 0 END) AS idle_count \
                     FROM surety_saga_instance WHERE saga = $1 AND finished = FALSE \
                     GROUP BY state_name ORDER BY state_name",
                )
                .bind(saga)
                .bind(millis(idle_since))
                .fetch_all(&self.pool)
                .await
                .map_err(backend)?;
                rows.iter().map($crate::sql::rows::step_count).collect()
            }

            async fn list(
                &self,
                filter: &$crate::store::ListFilter,
            ) -> Result<Vec<$crate::store::InstanceSummary>, $crate::store::StoreError> {
                use $crate::sql::{backend, millis};
                let rows = sqlx::query(
                    "SELECT saga, id, state, state_name, version, finished, created_at, updated_at \
                     FROM surety_saga_instance \
                     WHERE ($1 IS NULL OR saga = $1) AND ($2 IS NULL OR state_name = $2) \
                     AND ($3 IS NULL OR finished = $3) AND ($4 IS NULL OR created_at <= $4) \
                     AND ($5 IS NULL OR (finished = FALSE AND updated_at <= $5)) \
                     ORDER BY updated_at, id LIMIT $6",
                )
                .bind(filter.saga.as_deref())
                .bind(filter.state_name.as_deref())
                .bind(filter.finished)
                .bind(filter.started_before.map(millis))
                .bind(filter.idle_since.map(millis))
                .bind(i64::try_from(filter.limit).unwrap_or(i64::MAX))
                .fetch_all(&self.pool)
                .await
                .map_err(backend)?;
                rows.iter().map($crate::sql::rows::summary).collect()
            }

            async fn delete_timer(
                &self,
                timer: &$crate::store::TimerRecord,
            ) -> Result<bool, $crate::store::StoreError> {
                use $crate::sql::{backend, millis};
                let deleted = sqlx::query(
                    "DELETE FROM surety_saga_timer \
                     WHERE saga = $1 AND id = $2 AND name = $3 AND due = $4",
                )
                .bind(&timer.saga)
                .bind(&timer.id)
                .bind(&timer.name)
                .bind(millis(timer.due))
                .execute(&self.pool)
                .await
                .map_err(backend)?;
                Ok(deleted.rows_affected() > 0)
            }

            async fn purge_finished(
                &self,
                saga: &str,
                before: chrono::DateTime<chrono::Utc>,
                limit: usize,
            ) -> Result<u64, $crate::store::StoreError> {
                use $crate::sql::{backend, millis};
                let ids: Vec<String> = sqlx::query_scalar(
                    "SELECT id FROM surety_saga_instance \
                     WHERE saga = $1 AND finished = TRUE AND updated_at < $2 LIMIT $3",
                )
                .bind(saga)
                .bind(millis(before))
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&self.pool)
                .await
                .map_err(backend)?;
                let mut deleted = 0;
                for id in ids {
                    let mut tx = self.begin_write().await.map_err(backend)?;
                    // Only if still finished: a finished instance takes no input.
                    let gone = sqlx::query(
                        "DELETE FROM surety_saga_instance \
                         WHERE saga = $1 AND id = $2 AND finished = TRUE",
                    )
                    .bind(saga)
                    .bind(&id)
                    .execute(&mut *tx)
                    .await
                    .map_err(backend)?;
                    if gone.rows_affected() == 0 {
                        continue;
                    }
                    for table in ["DELETE FROM surety_saga_history WHERE saga = $1 AND id = $2",
                                  "DELETE FROM surety_saga_noop WHERE saga = $1 AND id = $2",
                                  "DELETE FROM surety_saga_timer WHERE saga = $1 AND id = $2"] {
                        sqlx::query(table)
                            .bind(saga)
                            .bind(&id)
                            .execute(&mut *tx)
                            .await
                            .map_err(backend)?;
                    }
                    sqlx::query(
                        "INSERT INTO surety_saga_tombstone (saga, id, step, at) \
                         VALUES ($1, $2, '', $3) ON CONFLICT (saga, id, step) DO NOTHING",
                    )
                    .bind(saga)
                    .bind(&id)
                    .bind(millis(chrono::Utc::now()))
                    .execute(&mut *tx)
                    .await
                    .map_err(backend)?;
                    tx.commit().await.map_err(backend)?;
                    deleted += 1;
                }
                Ok(deleted)
            }

            async fn audit(
                &self,
                entry: $crate::store::AuditRecord,
            ) -> Result<(), $crate::store::StoreError> {
                use $crate::sql::{backend, millis};
                sqlx::query(
                    "INSERT INTO surety_saga_audit (saga, id, actor, action, reason, at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&entry.saga)
                .bind(&entry.id)
                .bind(&entry.actor)
                .bind(&entry.action)
                .bind(&entry.reason)
                .bind(millis(entry.at))
                .execute(&self.pool)
                .await
                .map_err(backend)?;
                Ok(())
            }

            async fn audit_log(
                &self,
                saga: &str,
                id: &str,
            ) -> Result<Vec<$crate::store::AuditRecord>, $crate::store::StoreError> {
                use $crate::sql::backend;
                let rows = sqlx::query(
                    "SELECT actor, action, reason, at FROM surety_saga_audit \
                     WHERE saga = $1 AND id = $2 ORDER BY seq",
                )
                .bind(saga)
                .bind(id)
                .fetch_all(&self.pool)
                .await
                .map_err(backend)?;
                rows.iter()
                    .map(|row| $crate::sql::rows::audit(saga, id, row))
                    .collect()
            }
        }

        impl $crate::participant::Tombstones for $store {
            async fn record(
                &self,
                saga: &str,
                id: &str,
                step: &str,
            ) -> Result<(), $crate::store::StoreError> {
                use $crate::sql::{backend, millis};
                sqlx::query(
                    "INSERT INTO surety_saga_tombstone (saga, id, step, at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT (saga, id, step) DO NOTHING",
                )
                .bind(saga)
                .bind(id)
                .bind(step)
                .bind(millis(chrono::Utc::now()))
                .execute(&self.pool)
                .await
                .map_err(backend)?;
                Ok(())
            }

            async fn contains(
                &self,
                saga: &str,
                id: &str,
                step: &str,
            ) -> Result<bool, $crate::store::StoreError> {
                use $crate::sql::backend;
                let found: Option<i64> = sqlx::query_scalar(
                    "SELECT at FROM surety_saga_tombstone \
                     WHERE saga = $1 AND id = $2 AND step = $3",
                )
                .bind(saga)
                .bind(id)
                .bind(step)
                .fetch_optional(&self.pool)
                .await
                .map_err(backend)?;
                Ok(found.is_some())
            }
        }
    };
}

pub(crate) use sql_saga_store;
