//! The statements both backends run, and [`sql_checkpoints!`], which
//! writes a backend's store on top of them. SQLite and PostgreSQL both read
//! `$N` parameters, so the text is shared.

pub(super) const LOAD: &str = "SELECT next_offset FROM surety_projection_checkpoint \
WHERE projection = $1 AND topic = $2 AND partition = $3";

pub(super) const LOAD_APPLIED: &str = "SELECT applied_offset FROM surety_projection_applied \
WHERE projection = $1 AND topic = $2 AND partition = $3 ORDER BY applied_offset";

pub(super) const INSERT: &str = "INSERT INTO surety_projection_checkpoint \
(projection, topic, partition, next_offset, updated_at) VALUES ($1, $2, $3, $4, $5) \
ON CONFLICT (projection, topic, partition) DO NOTHING";

pub(super) const UPDATE: &str = "UPDATE surety_projection_checkpoint \
SET next_offset = $4, updated_at = $5 \
WHERE projection = $1 AND topic = $2 AND partition = $3 AND next_offset = $6";

pub(super) const FORGET: &str = "DELETE FROM surety_projection_applied \
WHERE projection = $1 AND topic = $2 AND partition = $3 AND applied_offset < $4";

pub(super) const MARK: &str = "INSERT INTO surety_projection_applied \
(projection, topic, partition, applied_offset) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING";

/// Whether the stored watermark already passed `$4`.
pub(super) const PASSED: &str = "SELECT COUNT(*) FROM surety_projection_checkpoint \
WHERE projection = $1 AND topic = $2 AND partition = $3 AND next_offset > $4";

pub(super) const ALL: &str = "SELECT partition, next_offset FROM surety_projection_checkpoint \
WHERE projection = $1 AND topic = $2 ORDER BY partition";

/// Unix milliseconds now.
pub(super) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub(super) fn migrator(
    migrations: &[(i64, &'static str, &'static str)],
) -> sqlx::migrate::Migrator {
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    let migrations = migrations
        .iter()
        .map(|&(version, description, sql)| {
            Migration::new(
                version,
                description.into(),
                MigrationType::Simple,
                sqlx::SqlStr::from_static(sql),
                false,
            )
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator
}

/// The table that records which migrations of this crate ran: its own, so
/// the versions never collide with another crate's or the application's.
pub const MIGRATIONS_TABLE: &str = "_surety_projection_migrations";

/// Writes a [`CheckpointStore`](super::CheckpointStore) for one backend.
macro_rules! sql_checkpoints {
    ($store:ident, $db:ty, $pool:ty, $begin:expr) => {
        /// The checkpoint store on this backend. Cheap to clone (it holds
        /// the pool).
        #[derive(Debug, Clone)]
        pub struct $store {
            pool: $pool,
        }

        impl $store {
            /// A store on `pool` (run [`migrate`] first).
            pub fn new(pool: $pool) -> Self {
                Self { pool }
            }
        }

        impl $crate::store::CheckpointStore for $store {
            type Db = $db;

            async fn begin(
                &self,
            ) -> Result<sqlx::Transaction<'static, $db>, $crate::error::ProjectionError> {
                Ok(self.pool.begin_with($begin).await?)
            }

            fn pool(&self) -> &sqlx::Pool<$db> {
                &self.pool
            }

            async fn load(
                &self,
                projection: &str,
                topic: &str,
                partition: i32,
            ) -> Result<$crate::store::Checkpoint, $crate::error::ProjectionError> {
                use $crate::store::sql;
                let next: Option<i64> = sqlx::query_scalar(sql::LOAD)
                    .bind(projection)
                    .bind(topic)
                    .bind(partition)
                    .fetch_optional(&self.pool)
                    .await?;
                let applied: Vec<i64> = sqlx::query_scalar(sql::LOAD_APPLIED)
                    .bind(projection)
                    .bind(topic)
                    .bind(partition)
                    .fetch_all(&self.pool)
                    .await?;
                let mut checkpoint = $crate::store::Checkpoint::default();
                checkpoint.next_offset = next;
                checkpoint.applied = applied
                    .into_iter()
                    .filter(|o| next.is_none_or(|n| *o >= n))
                    .collect();
                Ok(checkpoint)
            }

            async fn save(
                tx: &mut sqlx::Transaction<'static, $db>,
                projection: &str,
                topic: &str,
                partition: i32,
                expected: Option<i64>,
                next_offset: i64,
            ) -> Result<(), $crate::error::ProjectionError> {
                use $crate::store::sql;
                let done = match expected {
                    None => sqlx::query(sql::INSERT)
                        .bind(projection)
                        .bind(topic)
                        .bind(partition)
                        .bind(next_offset)
                        .bind(sql::now_ms())
                        .execute(&mut **tx)
                        .await?
                        .rows_affected(),
                    Some(expected) => sqlx::query(sql::UPDATE)
                        .bind(projection)
                        .bind(topic)
                        .bind(partition)
                        .bind(next_offset)
                        .bind(sql::now_ms())
                        .bind(expected)
                        .execute(&mut **tx)
                        .await?
                        .rows_affected(),
                };
                if done != 1 {
                    return Err($crate::error::ProjectionError::Fenced {
                        topic: topic.to_owned(),
                        partition,
                    });
                }
                sqlx::query(sql::FORGET)
                    .bind(projection)
                    .bind(topic)
                    .bind(partition)
                    .bind(next_offset)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }

            async fn mark_applied(
                tx: &mut sqlx::Transaction<'static, $db>,
                projection: &str,
                topic: &str,
                partition: i32,
                offsets: &[i64],
            ) -> Result<(), $crate::error::ProjectionError> {
                use $crate::store::sql;
                let fenced = || $crate::error::ProjectionError::Fenced {
                    topic: topic.to_owned(),
                    partition,
                };
                let Some(first) = offsets.iter().min() else {
                    return Ok(());
                };
                let passed: i64 = sqlx::query_scalar(sql::PASSED)
                    .bind(projection)
                    .bind(topic)
                    .bind(partition)
                    .bind(*first)
                    .fetch_one(&mut **tx)
                    .await?;
                if passed > 0 {
                    return Err(fenced());
                }
                for offset in offsets {
                    let done = sqlx::query(sql::MARK)
                        .bind(projection)
                        .bind(topic)
                        .bind(partition)
                        .bind(*offset)
                        .execute(&mut **tx)
                        .await?
                        .rows_affected();
                    if done != 1 {
                        return Err(fenced());
                    }
                }
                Ok(())
            }

            async fn checkpoints(
                &self,
                projection: &str,
                topic: &str,
            ) -> Result<Vec<(i32, i64)>, $crate::error::ProjectionError> {
                let rows: Vec<(i32, i64)> = sqlx::query_as($crate::store::sql::ALL)
                    .bind(projection)
                    .bind(topic)
                    .fetch_all(&self.pool)
                    .await?;
                Ok(rows)
            }
        }
    };
}

pub(crate) use sql_checkpoints;
