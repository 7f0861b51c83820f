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

pub(super) const COUNT_APPLIED: &str = "SELECT COUNT(*) FROM surety_projection_applied \
WHERE projection = $1 AND topic = $2 AND partition = $3 AND applied_offset < $4";

/// Whether the stored watermark already passed `$4`.
pub(super) const PASSED: &str = "SELECT COUNT(*) FROM surety_projection_checkpoint \
WHERE projection = $1 AND topic = $2 AND partition = $3 AND next_offset > $4";

pub(super) const ALL: &str = "SELECT partition, next_offset FROM surety_projection_checkpoint \
WHERE projection = $1 AND topic = $2 ORDER BY partition";

pub(super) const VERSIONS: &str = "SELECT live, previous, shadow FROM surety_projection_version \
WHERE projection = $1";

pub(super) const ENSURE_VERSION: &str = "INSERT INTO surety_projection_version \
(projection, live, previous, shadow, updated_at) VALUES ($1, 1, NULL, NULL, $2) \
ON CONFLICT (projection) DO NOTHING";

pub(super) const SET_SHADOW: &str = "UPDATE surety_projection_version SET shadow = $2, updated_at = $3 \
WHERE projection = $1 AND shadow IS NULL";

pub(super) const PROMOTE: &str = "UPDATE surety_projection_version \
SET previous = live, live = shadow, shadow = NULL, updated_at = $3 \
WHERE projection = $1 AND shadow = $2";

pub(super) const ROLLBACK: &str = "UPDATE surety_projection_version \
SET live = previous, previous = live, updated_at = $2 \
WHERE projection = $1 AND previous IS NOT NULL";

pub(super) const ABANDON: &str = "UPDATE surety_projection_version SET shadow = NULL, updated_at = $2 \
WHERE projection = $1";

pub(super) const PARK: &str = "INSERT INTO surety_projection_parked \
(projection, topic, partition, parked_offset, partition_key, dead_letter, parked_at) \
VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING";

pub(super) const PARKED_KEYS: &str = "SELECT DISTINCT partition_key FROM surety_projection_parked \
WHERE projection = $1 AND topic = $2";

pub(super) const PARKED_OF_KEY: &str = "SELECT partition, parked_offset, dead_letter \
FROM surety_projection_parked WHERE projection = $1 AND topic = $2 AND partition_key = $3 \
ORDER BY partition, parked_offset";

pub(super) const UNPARK: &str = "DELETE FROM surety_projection_parked \
WHERE projection = $1 AND topic = $2 AND partition = $3 AND parked_offset = $4";

/// Unix milliseconds now.
pub(super) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub(super) fn migrator(
    migrations: &[(i64, &'static str, &'static str)],
) -> sqlx::migrate::Migrator {
    surety_core::store::migrator(MIGRATIONS_TABLE, migrations)
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

        impl $crate::store::VersionStore for $store {
            async fn versions(
                &self,
                projection: &str,
            ) -> Result<$crate::store::Versions, $crate::error::ProjectionError> {
                let row: Option<(i64, Option<i64>, Option<i64>)> =
                    sqlx::query_as($crate::store::sql::VERSIONS)
                        .bind(projection)
                        .fetch_optional(&self.pool)
                        .await?;
                let to_u32 = |v: i64| u32::try_from(v).unwrap_or_default();
                Ok(match row {
                    None => $crate::store::Versions::default(),
                    Some((live, previous, shadow)) => $crate::store::Versions {
                        live: to_u32(live),
                        previous: previous.map(to_u32),
                        shadow: shadow.map(to_u32),
                    },
                })
            }

            async fn start_shadow(
                &self,
                projection: &str,
            ) -> Result<u32, $crate::error::ProjectionError> {
                use $crate::store::sql;
                let mut tx = self.pool.begin_with($begin).await?;
                sqlx::query(sql::ENSURE_VERSION)
                    .bind(projection)
                    .bind(sql::now_ms())
                    .execute(&mut *tx)
                    .await?;
                let (live, previous, shadow): (i64, Option<i64>, Option<i64>) =
                    sqlx::query_as(sql::VERSIONS)
                        .bind(projection)
                        .fetch_one(&mut *tx)
                        .await?;
                let version = match shadow {
                    Some(shadow) => shadow,
                    None => {
                        let next = live.max(previous.unwrap_or(0)) + 1;
                        sqlx::query(sql::SET_SHADOW)
                            .bind(projection)
                            .bind(next)
                            .bind(sql::now_ms())
                            .execute(&mut *tx)
                            .await?;
                        next
                    }
                };
                tx.commit().await?;
                Ok(u32::try_from(version).unwrap_or_default())
            }

            async fn promote(
                &self,
                projection: &str,
                shadow: u32,
            ) -> Result<(), $crate::error::ProjectionError> {
                let done = sqlx::query($crate::store::sql::PROMOTE)
                    .bind(projection)
                    .bind(i64::from(shadow))
                    .bind($crate::store::sql::now_ms())
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                if done == 1 {
                    Ok(())
                } else {
                    Err($crate::error::ProjectionError::Version(format!(
                        "version {shadow} of {projection} is not its shadow"
                    )))
                }
            }

            async fn rollback(
                &self,
                projection: &str,
            ) -> Result<u32, $crate::error::ProjectionError> {
                let done = sqlx::query($crate::store::sql::ROLLBACK)
                    .bind(projection)
                    .bind($crate::store::sql::now_ms())
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                if done != 1 {
                    return Err($crate::error::ProjectionError::Version(format!(
                        "{projection} has no previous version to roll back to"
                    )));
                }
                Ok(self.versions(projection).await?.live)
            }

            async fn abandon_shadow(
                &self,
                projection: &str,
            ) -> Result<(), $crate::error::ProjectionError> {
                sqlx::query($crate::store::sql::ABANDON)
                    .bind(projection)
                    .bind($crate::store::sql::now_ms())
                    .execute(&self.pool)
                    .await?;
                Ok(())
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
                known_applied: u64,
            ) -> Result<(), $crate::error::ProjectionError> {
                use $crate::store::sql;
                let recorded: i64 = sqlx::query_scalar(sql::COUNT_APPLIED)
                    .bind(projection)
                    .bind(topic)
                    .bind(partition)
                    .bind(next_offset)
                    .fetch_one(&mut **tx)
                    .await?;
                if u64::try_from(recorded).unwrap_or(0) > known_applied {
                    return Err($crate::error::ProjectionError::Fenced {
                        topic: topic.to_owned(),
                        partition,
                    });
                }
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

            async fn park(
                tx: &mut sqlx::Transaction<'static, $db>,
                projection: &str,
                topic: &str,
                parked: &$crate::store::Parked,
            ) -> Result<(), $crate::error::ProjectionError> {
                let letter = serde_json::to_string(&parked.letter)
                    .map_err($crate::error::ProjectionError::store)?;
                sqlx::query($crate::store::sql::PARK)
                    .bind(projection)
                    .bind(topic)
                    .bind(parked.partition)
                    .bind(parked.offset)
                    .bind(&parked.key)
                    .bind(letter)
                    .bind($crate::store::sql::now_ms())
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }

            async fn unpark(
                tx: &mut sqlx::Transaction<'static, $db>,
                projection: &str,
                topic: &str,
                partition: i32,
                offset: i64,
            ) -> Result<(), $crate::error::ProjectionError> {
                sqlx::query($crate::store::sql::UNPARK)
                    .bind(projection)
                    .bind(topic)
                    .bind(partition)
                    .bind(offset)
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            }

            async fn parked_keys(
                &self,
                projection: &str,
                topic: &str,
            ) -> Result<std::collections::HashSet<String>, $crate::error::ProjectionError> {
                let keys: Vec<String> = sqlx::query_scalar($crate::store::sql::PARKED_KEYS)
                    .bind(projection)
                    .bind(topic)
                    .fetch_all(&self.pool)
                    .await?;
                Ok(keys.into_iter().collect())
            }

            async fn parked(
                &self,
                projection: &str,
                topic: &str,
                key: &str,
            ) -> Result<Vec<$crate::store::Parked>, $crate::error::ProjectionError> {
                let rows: Vec<(i32, i64, String)> =
                    sqlx::query_as($crate::store::sql::PARKED_OF_KEY)
                        .bind(projection)
                        .bind(topic)
                        .bind(key)
                        .fetch_all(&self.pool)
                        .await?;
                rows.into_iter()
                    .map(|(partition, offset, letter)| {
                        Ok($crate::store::Parked {
                            key: key.to_owned(),
                            partition,
                            offset,
                            letter: serde_json::from_str(&letter)
                                .map_err($crate::error::ProjectionError::store)?,
                        })
                    })
                    .collect()
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
