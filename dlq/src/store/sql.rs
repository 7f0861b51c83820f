//! The SQL shared by the SQLite and PostgreSQL stores: one implementation,
//! instantiated per backend by `sql_store!`, with queries built by sqlx's
//! `QueryBuilder` (runtime-checked, placeholders per backend).

use chrono::{DateTime, Utc};

use super::StoreError;
use crate::letter::DeadLetter;

/// The table that records applied migrations (not `_sqlx_migrations`, so it
/// never collides with the application's own sqlx migrations).
pub(crate) const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS surety_dlq_migrations (
    version BIGINT PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at BIGINT NOT NULL
)";

pub(crate) fn backend(err: sqlx::Error) -> StoreError {
    StoreError::Backend(err.into())
}

pub(crate) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(crate) fn from_micros(us: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(us)
        .ok_or_else(|| StoreError::Corrupt(format!("time {us} is out of range")))
}

pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A page out of `rows` of (`seq`, JSON text), fetched with a limit of
/// `limit + 1`: the first `limit` rows decoded, and the last one's `seq` as
/// the next cursor when the extra row showed there are more.
pub(crate) fn page_of<R, T>(rows: &[R], limit: i64) -> Result<super::Page<T>, StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    i64: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    String: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    T: serde::de::DeserializeOwned,
{
    let more = rows.len() as i64 > limit;
    let mut items = Vec::with_capacity(rows.len());
    let mut last = None;
    for row in rows.iter().take(usize::try_from(limit).unwrap_or(0)) {
        let seq: i64 = row.try_get(0).map_err(backend)?;
        last = Some(seq);
        let text: String = row.try_get(1).map_err(backend)?;
        // One unreadable record does not hide the others: it is left out
        // of the page (and logged); `get` of its id still reports it.
        match decode(&text) {
            Ok(item) => items.push(item),
            Err(err) => {
                tracing::error!(seq, error = %err, "DLQ store: skipping an unreadable record")
            }
        }
    }
    let next = if more {
        last.map(|s| s.to_string())
    } else {
        None
    };
    Ok(super::Page::new(items, next))
}

/// The values of the filter columns of `letter`.
pub(crate) struct Columns {
    pub(crate) record: String,
    pub(crate) search_text: String,
    pub(crate) last_failed_at: i64,
    pub(crate) dead_lettered_at: i64,
}

impl Columns {
    pub(crate) fn of(letter: &DeadLetter) -> Result<Self, StoreError> {
        Ok(Self {
            record: encode(letter)?,
            search_text: letter.search_text(),
            last_failed_at: micros(letter.last_failed_at),
            dead_lettered_at: micros(letter.dead_lettered_at),
        })
    }
}

/// Implements `DlqStore` and `migrate` for `$store { pool }` on `$db`.
/// `$lock` is SQL run first in the migration transaction (an advisory lock
/// on PostgreSQL), or empty.
macro_rules! sql_store {
    ($store:ident, $db:ty, $lock:expr, $migrations:expr, $position:expr, $nul_free:expr) => {
        impl $store {
            /// Creates or upgrades the store's tables (`surety_dlq_letters`,
            /// `surety_dlq_audit`, and `surety_dlq_migrations`, which records
            /// the applied versions). Idempotent; safe to run from several
            /// processes at once.
            pub(crate) async fn migrate(&self) -> Result<(), $crate::store::StoreError> {
                use $crate::store::sql::backend;
                let mut tx = self.pool.begin().await.map_err(backend)?;
                let lock: &'static str = $lock;
                if !lock.is_empty() {
                    sqlx::query(lock).execute(&mut *tx).await.map_err(backend)?;
                }
                sqlx::query($crate::store::sql::MIGRATIONS_TABLE)
                    .execute(&mut *tx)
                    .await
                    .map_err(backend)?;
                let applied: Vec<i64> =
                    sqlx::query_scalar("SELECT version FROM surety_dlq_migrations")
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(backend)?;
                let migrations: &[(i64, &str, &'static str)] = $migrations;
                for (version, description, sql) in migrations {
                    if applied.contains(version) {
                        continue;
                    }
                    sqlx::raw_sql(*sql).execute(&mut *tx).await.map_err(backend)?;
                    let mut qb = sqlx::QueryBuilder::<$db>::new(
                        "INSERT INTO surety_dlq_migrations (version, description, applied_at) VALUES (",
                    );
                    qb.push_bind(*version)
                        .push(", ")
                        .push_bind(description.to_string())
                        .push(", ")
                        .push_bind($crate::store::sql::micros(chrono::Utc::now()))
                        .push(")");
                    qb.build().execute(&mut *tx).await.map_err(backend)?;
                }
                tx.commit().await.map_err(backend)
            }

            /// Adds `filter` as ` AND ...` conditions: exactly
            /// [`Filter::matches`]($crate::store::Filter::matches), for any text.
            fn push_filter(qb: &mut sqlx::QueryBuilder<$db>, filter: &$crate::store::Filter) {
                let equal = [
                    ("messaging_system", &filter.system),
                    ("topic", &filter.topic),
                    ("consumer_group", &filter.group),
                    ("fingerprint", &filter.fingerprint),
                    ("handler", &filter.handler),
                ];
                let nul_free: bool = $nul_free;
                if nul_free
                    && equal
                        .iter()
                        .filter_map(|(_, v)| v.as_deref())
                        .chain(filter.text.as_deref())
                        .any(|v| v.contains('\0'))
                {
                    qb.push(" AND 1 = 0");
                    return;
                }
                for (column, value) in equal {
                    if let Some(value) = value {
                        qb.push(" AND ").push(column).push(" = ").push_bind(value.clone());
                    }
                }
                if let Some(class) = filter.class {
                    qb.push(" AND error_class = ").push_bind(class.as_str());
                }
                if !filter.status.is_empty() {
                    // At most one variable per distinct status, however long
                    // the list.
                    let statuses: std::collections::BTreeSet<&'static str> =
                        filter.status.iter().map(|s| s.as_str()).collect();
                    qb.push(" AND status IN (");
                    let mut list = qb.separated(", ");
                    for status in statuses {
                        list.push_bind(status.to_owned());
                    }
                    qb.push(")");
                }
                if let Some(from) = filter.from {
                    qb.push(" AND last_failed_at >= ")
                        .push_bind($crate::store::sql::micros(from));
                }
                if let Some(to) = filter.to {
                    qb.push(" AND last_failed_at < ")
                        .push_bind($crate::store::sql::micros(to));
                }
                if let Some(text) = &filter.text {
                    // A plain substring test of the lower-cased text, as
                    // `Filter::matches` does: no wildcards, no escapes.
                    let position: &'static str = $position;
                    qb.push(" AND ")
                        .push(position)
                        .push("(search_text, ")
                        .push_bind(text.to_lowercase())
                        .push(") > 0");
                }
            }

            async fn write_record(
                tx: &mut sqlx::Transaction<'static, $db>,
                letter: &$crate::DeadLetter,
            ) -> Result<(), $crate::store::StoreError> {
                use $crate::store::sql::{Columns, backend, micros};
                let c = Columns::of(letter)?;
                let mut qb = sqlx::QueryBuilder::<$db>::new("UPDATE surety_dlq_letters SET status = ");
                qb.push_bind(letter.status.as_str().to_owned())
                    .push(", messaging_system = ")
                    .push_bind(letter.source.system.clone())
                    .push(", topic = ")
                    .push_bind(letter.source.topic.clone())
                    .push(", consumer_group = ")
                    .push_bind(letter.source.group.clone())
                    .push(", error_class = ")
                    .push_bind(letter.error.class.as_str())
                    .push(", fingerprint = ")
                    .push_bind(letter.fingerprint.clone())
                    .push(", handler = ")
                    .push_bind(letter.handler.clone())
                    .push(", search_text = ")
                    .push_bind(c.search_text)
                    .push(", last_failed_at = ")
                    .push_bind(c.last_failed_at)
                    .push(", dead_lettered_at = ")
                    .push_bind(c.dead_lettered_at)
                    .push(", updated_at = ")
                    .push_bind(micros(chrono::Utc::now()))
                    .push(", record = ")
                    .push_bind(c.record)
                    .push(" WHERE id = ")
                    .push_bind(letter.id.clone());
                qb.build().execute(&mut **tx).await.map_err(backend)?;
                Ok(())
            }

            async fn read_record(
                tx: &mut sqlx::Transaction<'static, $db>,
                id: &str,
            ) -> Result<Option<$crate::DeadLetter>, $crate::store::StoreError> {
                use $crate::store::sql::{backend, decode};
                let mut qb =
                    sqlx::QueryBuilder::<$db>::new("SELECT record FROM surety_dlq_letters WHERE id = ");
                qb.push_bind(id.to_owned());
                let record: Option<String> = qb
                    .build_query_scalar()
                    .fetch_optional(&mut **tx)
                    .await
                    .map_err(backend)?;
                record.as_deref().map(decode).transpose()
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::DlqStore for $store {
            async fn put(&self, letter: &$crate::DeadLetter) -> Result<(), $crate::store::StoreError> {
                use $crate::store::sql::{Columns, backend, micros};
                let c = Columns::of(letter)?;
                let mut tx = self.pool.begin().await.map_err(backend)?;
                // Insert first: on a conflict this takes the row's write
                // lock before anything is read, so concurrent puts of one id
                // merge one after the other.
                let mut qb = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO surety_dlq_letters (id, status, messaging_system, topic, consumer_group, \
                     error_class, fingerprint, handler, search_text, last_failed_at, dead_lettered_at, \
                     updated_at, record) ",
                );
                qb.push_values([letter], |mut row, l| {
                    row.push_bind(l.id.clone())
                        .push_bind(l.status.as_str().to_owned())
                        .push_bind(l.source.system.clone())
                        .push_bind(l.source.topic.clone())
                        .push_bind(l.source.group.clone())
                        .push_bind(l.error.class.as_str())
                        .push_bind(l.fingerprint.clone())
                        .push_bind(l.handler.clone())
                        .push_bind(c.search_text.clone())
                        .push_bind(c.last_failed_at)
                        .push_bind(c.dead_lettered_at)
                        .push_bind(micros(chrono::Utc::now()))
                        .push_bind(c.record.clone());
                });
                qb.push(" ON CONFLICT (id) DO UPDATE SET updated_at = excluded.updated_at");
                qb.build().execute(&mut *tx).await.map_err(backend)?;
                let Some(mut existing) = Self::read_record(&mut tx, &letter.id).await? else {
                    return Err($crate::store::StoreError::Corrupt(format!(
                        "record {} vanished while it was written",
                        letter.id
                    )));
                };
                if existing != *letter {
                    existing.merge(letter.clone());
                    Self::write_record(&mut tx, &existing).await?;
                }
                tx.commit().await.map_err(backend)
            }

            async fn get(&self, id: &str) -> Result<Option<$crate::DeadLetter>, $crate::store::StoreError> {
                use $crate::store::sql::{backend, decode};
                let mut qb =
                    sqlx::QueryBuilder::<$db>::new("SELECT record FROM surety_dlq_letters WHERE id = ");
                qb.push_bind(id.to_owned());
                let record: Option<String> = qb
                    .build_query_scalar()
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(backend)?;
                record.as_deref().map(decode).transpose()
            }

            async fn list(
                &self,
                filter: &$crate::store::Filter,
                page: &$crate::store::PageRequest,
            ) -> Result<$crate::store::Page<$crate::DeadLetter>, $crate::store::StoreError> {
                use $crate::store::sql::backend;
                let after = $crate::store::parse_cursor(page.cursor.as_deref())?.unwrap_or(0);
                let limit = i64::from(page.clamped_limit());
                let mut qb =
                    sqlx::QueryBuilder::<$db>::new("SELECT seq, record FROM surety_dlq_letters WHERE seq > ");
                qb.push_bind(after);
                Self::push_filter(&mut qb, filter);
                qb.push(" ORDER BY seq LIMIT ").push_bind(limit + 1);
                let rows = qb.build().fetch_all(&self.pool).await.map_err(backend)?;
                $crate::store::sql::page_of(&rows, limit)
            }

            async fn count(&self, filter: &$crate::store::Filter) -> Result<u64, $crate::store::StoreError> {
                let mut qb =
                    sqlx::QueryBuilder::<$db>::new("SELECT COUNT(*) FROM surety_dlq_letters WHERE 1 = 1");
                Self::push_filter(&mut qb, filter);
                let n: i64 = qb
                    .build_query_scalar()
                    .fetch_one(&self.pool)
                    .await
                    .map_err($crate::store::sql::backend)?;
                Ok(u64::try_from(n).unwrap_or(0))
            }

            async fn transition(
                &self,
                id: &str,
                transition: &$crate::store::Transition,
            ) -> Result<Option<$crate::DeadLetter>, $crate::store::StoreError> {
                use $crate::store::sql::{backend, micros};
                if transition.from.is_empty() {
                    return Ok(None);
                }
                let mut tx = self.pool.begin().await.map_err(backend)?;
                // Claim the row with a conditional write first, so that of
                // two concurrent transitions exactly one sees the old status.
                let mut qb = sqlx::QueryBuilder::<$db>::new("UPDATE surety_dlq_letters SET status = ");
                qb.push_bind(transition.event.status.as_str().to_owned())
                    .push(", updated_at = ")
                    .push_bind(micros(chrono::Utc::now()))
                    .push(" WHERE id = ")
                    .push_bind(id.to_owned())
                    .push(" AND status IN (");
                let mut list = qb.separated(", ");
                for status in &transition.from {
                    list.push_bind(status.as_str().to_owned());
                }
                qb.push(")");
                let claimed = qb.build().execute(&mut *tx).await.map_err(backend)?.rows_affected();
                if claimed == 0 {
                    return Ok(None);
                }
                let Some(mut letter) = Self::read_record(&mut tx, id).await? else {
                    return Ok(None);
                };
                // The claimed row's status column said yes; the record agrees
                // unless it was written by hand.
                if !transition.from.contains(&letter.status) {
                    letter.status = transition.from[0];
                }
                if !transition.apply(&mut letter) {
                    return Ok(None);
                }
                Self::write_record(&mut tx, &letter).await?;
                tx.commit().await.map_err(backend)?;
                Ok(Some(letter))
            }

            async fn append_audit(&self, entry: &$crate::store::AuditEntry) -> Result<(), $crate::store::StoreError> {
                use $crate::store::sql::{backend, encode, micros};
                let mut qb = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO surety_dlq_audit (id, at, actor, action, entry) VALUES (",
                );
                qb.push_bind(entry.id.clone())
                    .push(", ")
                    .push_bind(micros(entry.at))
                    .push(", ")
                    .push_bind(entry.actor.clone())
                    .push(", ")
                    .push_bind(entry.action.clone())
                    .push(", ")
                    .push_bind(encode(entry)?)
                    .push(")");
                qb.push(" ON CONFLICT (id) DO UPDATE SET entry = excluded.entry");
                qb.build().execute(&self.pool).await.map_err(backend)?;
                Ok(())
            }

            async fn audit_log(
                &self,
                page: &$crate::store::PageRequest,
            ) -> Result<$crate::store::Page<$crate::store::AuditEntry>, $crate::store::StoreError> {
                use $crate::store::sql::backend;
                let before = $crate::store::parse_cursor(page.cursor.as_deref())?;
                let limit = i64::from(page.clamped_limit());
                let mut qb = sqlx::QueryBuilder::<$db>::new("SELECT seq, entry FROM surety_dlq_audit");
                if let Some(before) = before {
                    qb.push(" WHERE seq < ").push_bind(before);
                }
                qb.push(" ORDER BY seq DESC LIMIT ").push_bind(limit + 1);
                let rows = qb.build().fetch_all(&self.pool).await.map_err(backend)?;
                $crate::store::sql::page_of(&rows, limit)
            }

            async fn depth(&self) -> Result<Vec<$crate::store::Depth>, $crate::store::StoreError> {
                use sqlx::Row as _;
                use $crate::store::sql::{backend, from_micros};
                let mut qb = sqlx::QueryBuilder::<$db>::new(
                    "SELECT messaging_system, topic, consumer_group, error_class, COUNT(*), MIN(dead_lettered_at) \
                     FROM surety_dlq_letters WHERE status IN ('dead', 'parked') \
                     GROUP BY messaging_system, topic, consumer_group, error_class \
                     ORDER BY messaging_system, topic, consumer_group, error_class",
                );
                let rows = qb.build().fetch_all(&self.pool).await.map_err(backend)?;
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    let class: String = row.try_get(3).map_err(backend)?;
                    let class = class
                        .parse()
                        .map_err(|e: $crate::letter::UnknownClass| StoreError::Corrupt(e.to_string()))?;
                    let count: i64 = row.try_get(4).map_err(backend)?;
                    let oldest: i64 = row.try_get(5).map_err(backend)?;
                    out.push($crate::store::Depth {
                        system: row.try_get(0).map_err(backend)?,
                        topic: row.try_get(1).map_err(backend)?,
                        group: row.try_get(2).map_err(backend)?,
                        class,
                        count: u64::try_from(count).unwrap_or(0),
                        oldest: from_micros(oldest)?,
                    });
                }
                Ok(out)
            }

            async fn put_job(&self, job: &$crate::job::Job) -> Result<(), $crate::store::StoreError> {
                use $crate::store::sql::{backend, encode, micros};
                let mut qb = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO surety_dlq_jobs (id, finished, updated_at, job) VALUES (",
                );
                qb.push_bind(job.id.clone())
                    .push(", ")
                    .push_bind(i64::from(job.finished))
                    .push(", ")
                    .push_bind(micros(chrono::Utc::now()))
                    .push(", ")
                    .push_bind(encode(job)?)
                    .push(
                        ") ON CONFLICT (id) DO UPDATE SET finished = excluded.finished, \
                         updated_at = excluded.updated_at, job = excluded.job",
                    );
                qb.build().execute(&self.pool).await.map_err(backend)?;
                Ok(())
            }

            async fn get_job(&self, id: &str) -> Result<Option<$crate::job::Job>, $crate::store::StoreError> {
                use $crate::store::sql::{backend, decode};
                let mut qb =
                    sqlx::QueryBuilder::<$db>::new("SELECT job FROM surety_dlq_jobs WHERE id = ");
                qb.push_bind(id.to_owned());
                let job: Option<String> = qb
                    .build_query_scalar()
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(backend)?;
                job.as_deref().map(decode).transpose()
            }

            async fn unfinished_jobs(&self) -> Result<Vec<$crate::job::Job>, $crate::store::StoreError> {
                use $crate::store::sql::{backend, decode};
                let mut qb = sqlx::QueryBuilder::<$db>::new(
                    "SELECT job FROM surety_dlq_jobs WHERE finished = 0 ORDER BY id LIMIT ",
                );
                qb.push_bind(i64::from($crate::store::MAX_PAGE_SIZE));
                let jobs: Vec<String> = qb
                    .build_query_scalar()
                    .fetch_all(&self.pool)
                    .await
                    .map_err(backend)?;
                jobs.iter().map(|j| decode(j)).collect()
            }
        }
    };
}

pub(crate) use sql_store;
