//! The statements both SQL backends run, and [`sql_outbox!`], which writes
//! a backend's store on top of them.
//!
//! SQLite and PostgreSQL both read `$N` parameters and both support
//! `INSERT ... ON CONFLICT ... DO UPDATE ... WHERE ... RETURNING`, so the
//! text is shared; the schemas differ only in column types (see
//! `migrations/`).

pub(super) const INSERT: &str = "\
INSERT INTO surety_outbox (message_id, topic, partition_key, headers, payload, created_at, next_attempt_at)
VALUES ($1, $2, $3, $4, $5, $6, 0)
RETURNING seq";

/// The start of an insert of several rows (`enqueue_all`): the values
/// follow, as in [`INSERT`].
pub(super) const INSERT_HEAD: &str = "\
INSERT INTO surety_outbox (message_id, topic, partition_key, headers, payload, created_at, next_attempt_at)
VALUES ";

/// Pending rows that are due and whose key has no earlier pending row
/// waiting for its retry: rows stuck behind a failing row never fill a
/// batch, so the rest of the outbox goes on. (`next_attempt_at > 0` names
/// the partial index of rows that failed: the planner uses it only when the
/// query states its condition.)
pub(super) const PENDING: &str = "\
SELECT o.seq, o.topic, o.partition_key, o.headers, o.payload, o.attempts, o.next_attempt_at
FROM surety_outbox o
WHERE o.status = 'pending' AND o.next_attempt_at <= $2
  AND NOT EXISTS (
    SELECT 1 FROM surety_outbox w
    WHERE w.status = 'pending' AND w.next_attempt_at > 0
      AND w.partition_key = o.partition_key
      AND w.seq < o.seq AND w.next_attempt_at > $2)
ORDER BY o.seq LIMIT $1";

pub(super) const MARK_SENT_HEAD: &str = "UPDATE surety_outbox SET status = 'sent', sent_at = ";

/// The fencing condition the relay's writes carry (after `MARK_SENT_HEAD`'s
/// time, then name, holder and epoch are bound): the write changes nothing
/// unless the lease row still names this holder at this epoch.
pub(super) const MARK_SENT_FENCE: &str = " WHERE status = 'pending' AND EXISTS (
    SELECT 1 FROM surety_outbox_relay l WHERE l.name = ";

pub(super) const RETRY_LATER: &str = "\
UPDATE surety_outbox SET attempts = attempts + 1, last_error = $2, next_attempt_at = $3
WHERE seq = $1 AND status = 'pending' AND EXISTS (
    SELECT 1 FROM surety_outbox_relay l WHERE l.name = $4 AND l.holder = $5 AND l.epoch = $6)";

pub(super) const PARK: &str = "\
UPDATE surety_outbox SET status = 'parked', attempts = attempts + 1, last_error = $2
WHERE seq = $1 AND status = 'pending' AND EXISTS (
    SELECT 1 FROM surety_outbox_relay l WHERE l.name = $3 AND l.holder = $4 AND l.epoch = $5)";

/// Takes or renews the lease of relay `$1` for holder `$2` for `$3` ms by
/// the database's clock (`{now}`, replaced per backend). `$4` is the epoch
/// the caller last held (NULL for a fresh instance). A renewal (same
/// holder, same epoch) keeps the epoch; anything else that succeeds (an
/// expired lease, or a fresh instance of the same holder identity) raises
/// it, fencing off every earlier holder. Returns the epoch and the
/// milliseconds the lease runs from now.
pub(super) const ACQUIRE: &str = "\
INSERT INTO surety_outbox_relay (name, holder, lease_until, epoch) VALUES ($1, $2, {now} + $3, 1)
ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, lease_until = excluded.lease_until,
    epoch = CASE WHEN surety_outbox_relay.holder = excluded.holder AND surety_outbox_relay.epoch = $4
                 THEN surety_outbox_relay.epoch ELSE surety_outbox_relay.epoch + 1 END
WHERE (surety_outbox_relay.holder = excluded.holder AND ($4 IS NULL OR surety_outbox_relay.epoch = $4))
   OR surety_outbox_relay.lease_until <= {now}
RETURNING epoch, lease_until - {now}";

pub(super) const LEASE: &str =
    "SELECT holder, lease_until, epoch, {now} FROM surety_outbox_relay WHERE name = $1";

/// Ends the lease at once but keeps the row, so its epoch keeps rising.
pub(super) const RELEASE: &str = "\
UPDATE surety_outbox_relay SET lease_until = 0 WHERE name = $1 AND holder = $2 AND epoch = $3";

pub(super) const PENDING_STATS: &str =
    "SELECT COUNT(*), MIN(created_at) FROM surety_outbox WHERE status = 'pending'";

pub(super) const PARKED_COUNT: &str = "SELECT COUNT(*) FROM surety_outbox WHERE status = 'parked'";

pub(super) const REQUEUE: &str = "\
UPDATE surety_outbox SET status = 'pending', attempts = 0, next_attempt_at = $1, last_error = NULL
WHERE status = 'parked'";

pub(super) const PURGE: &str = "\
DELETE FROM surety_outbox WHERE seq IN (
    SELECT seq FROM surety_outbox WHERE status = 'sent' AND sent_at < $1
    ORDER BY sent_at LIMIT $2)";

/// Writes the store type `$store` over pool `$pool` of database `$db`:
/// `new`, `pool`, `enqueue` and [`OutboxStore`](super::OutboxStore).
macro_rules! sql_outbox {
    ($store:ident, $db:ty, $pool:ty, $backend:literal, $now:expr) => {
        impl $store {
            /// A store on `pool`. Run `migrate` first.
            pub fn new(pool: $pool) -> Self {
                Self { pool }
            }

            /// The pool.
            pub fn pool(&self) -> &$pool {
                &self.pool
            }

            #[doc = concat!("Writes `envelope` for `topic` into the outbox within `tx`, the caller's ", $backend, " transaction.")]
            ///
            /// The message is relayed only if `tx` commits, and exactly once
            /// it does (at least once to the broker: consumers deduplicate by
            /// message id). Returns the row's position. The current trace
            /// context is stored with it when the envelope carries none.
            ///
            /// # Errors
            ///
            /// [`OutboxError::InvalidMessage`] for an empty topic;
            /// [`OutboxError::Store`] when the insert fails (roll `tx`
            /// back).
            pub async fn enqueue(
                tx: &mut sqlx::Transaction<'_, $db>,
                topic: &str,
                envelope: &surety_core::Envelope,
            ) -> Result<i64, OutboxError> {
                let row = super::NewRow::new(topic, envelope)?;
                let now = super::to_millis(std::time::SystemTime::now());
                let seq: i64 = sqlx::query_scalar(super::sql::INSERT)
                    .bind(row.message_id)
                    .bind(topic)
                    .bind(row.partition_key)
                    .bind(row.headers)
                    .bind(row.payload)
                    .bind(now)
                    .fetch_one(&mut **tx)
                    .await?;
                Ok(seq)
            }

            #[doc = concat!("Writes `messages` (topic and envelope each) into the outbox within `tx`, the caller's ", $backend, " transaction, in order, with one statement.")]
            ///
            /// The same as [`enqueue`](Self::enqueue) for each message, in
            /// one round trip to the database instead of one per message.
            ///
            /// # Errors
            ///
            /// [`OutboxError::InvalidMessage`] for an empty topic (nothing is
            /// written); [`OutboxError::Store`] when the insert fails (roll
            /// `tx` back).
            pub async fn enqueue_all(
                tx: &mut sqlx::Transaction<'_, $db>,
                messages: &[(&str, &surety_core::Envelope)],
            ) -> Result<(), OutboxError> {
                // Bound values per row; SQLite allows 32 766 per statement.
                const CHUNK: usize = 1_000;
                let now = super::to_millis(std::time::SystemTime::now());
                for chunk in messages.chunks(CHUNK) {
                    let rows = chunk
                        .iter()
                        .map(|(topic, envelope)| super::NewRow::new(topic, envelope))
                        .collect::<Result<Vec<_>, _>>()?;
                    let mut sql = String::from(super::sql::INSERT_HEAD);
                    for i in 0..rows.len() {
                        let b = i * 6;
                        if i > 0 {
                            sql.push_str(", ");
                        }
                        sql.push_str(&format!(
                            "(${}, ${}, ${}, ${}, ${}, ${}, 0)",
                            b + 1,
                            b + 2,
                            b + 3,
                            b + 4,
                            b + 5,
                            b + 6
                        ));
                    }
                    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
                    for (row, (topic, _)) in rows.into_iter().zip(chunk) {
                        query = query
                            .bind(row.message_id)
                            .bind(*topic)
                            .bind(row.partition_key)
                            .bind(row.headers)
                            .bind(row.payload)
                            .bind(now);
                    }
                    query.execute(&mut **tx).await?;
                }
                Ok(())
            }

            #[doc = concat!("Writes a handler's outputs (replies, commands, events: a [`Response`](surety_core::consumer::Response)'s `outputs`) into the outbox within `tx`, the caller's ", $backend, " transaction, in order.")]
            ///
            /// The outbox way to emit from a handler: the outputs commit with
            /// the handler's own writes, the relay publishes them, and the
            /// handler answers without outputs (the worker has nothing left
            /// to send). See [`enqueue`](Self::enqueue) for the errors.
            pub async fn enqueue_outputs(
                tx: &mut sqlx::Transaction<'_, $db>,
                outputs: &[surety_core::consumer::Output],
            ) -> Result<(), OutboxError> {
                let messages: Vec<(&str, &surety_core::Envelope)> = outputs
                    .iter()
                    .map(|output| (output.destination.as_str(), &output.envelope))
                    .collect();
                Self::enqueue_all(tx, &messages).await
            }
        }

        impl super::OutboxStore for $store {
            async fn pending(&self, limit: usize) -> Result<Vec<super::OutboxRow>, OutboxError> {
                use sqlx::Row;
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                let now = super::to_millis(std::time::SystemTime::now());
                let rows = sqlx::query(super::sql::PENDING)
                    .bind(limit)
                    .bind(now)
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter()
                    .map(|row| {
                        // Only `seq` must read; any other column that does
                        // not makes the row unreadable, and the relay parks
                        // it with the reason instead of failing every cycle.
                        let seq: i64 = row.try_get("seq")?;
                        let mut problems = Vec::new();
                        let mut column = |name: &str, err: sqlx::Error| {
                            problems.push(format!("stored {name}: {err}"));
                        };
                        let topic: String = row.try_get("topic").unwrap_or_else(|err| {
                            column("topic", err);
                            String::new()
                        });
                        let partition_key: Option<String> =
                            row.try_get("partition_key").unwrap_or_else(|err| {
                                column("partition_key", err);
                                None
                            });
                        let attempts: i32 = row.try_get("attempts").unwrap_or_else(|err| {
                            column("attempts", err);
                            0
                        });
                        let next: i64 = row.try_get("next_attempt_at").unwrap_or_else(|err| {
                            column("next_attempt_at", err);
                            0
                        });
                        let headers: Option<String> =
                            row.try_get("headers").map(Some).unwrap_or_else(|err| {
                                column("headers", err);
                                None
                            });
                        let payload: Option<Vec<u8>> =
                            row.try_get("payload").map(Some).unwrap_or_else(|err| {
                                column("payload", err);
                                None
                            });
                        let message = match (headers, payload) {
                            (Some(headers), Some(payload)) if problems.is_empty() => {
                                super::decode_message(&headers, payload)
                            }
                            _ => Err(problems.join("; ")),
                        };
                        Ok(super::OutboxRow::new(
                            seq,
                            topic,
                            partition_key,
                            u32::try_from(attempts).unwrap_or(0),
                            super::from_millis(next),
                            message,
                        ))
                    })
                    .collect::<Result<Vec<_>, sqlx::Error>>()
                    .map_err(OutboxError::from)
            }

            async fn mark_sent(
                &self,
                lease: &super::Lease,
                seqs: &[i64],
            ) -> Result<u64, OutboxError> {
                let mut marked = 0;
                for chunk in seqs.chunks(super::MARK_CHUNK) {
                    let mut query = sqlx::QueryBuilder::<$db>::new(super::sql::MARK_SENT_HEAD);
                    query.push_bind(super::to_millis(std::time::SystemTime::now()));
                    query.push(super::sql::MARK_SENT_FENCE);
                    query.push_bind(lease.relay.clone());
                    query.push(" AND l.holder = ");
                    query.push_bind(lease.holder.clone());
                    query.push(" AND l.epoch = ");
                    query.push_bind(lease.epoch);
                    query.push(") AND seq IN (");
                    let mut list = query.separated(", ");
                    for seq in chunk {
                        list.push_bind(*seq);
                    }
                    query.push(")");
                    let done = query.build().execute(&self.pool).await?;
                    if done.rows_affected() == 0 {
                        // Fenced: a later chunk would be too.
                        break;
                    }
                    marked += done.rows_affected();
                }
                Ok(marked)
            }

            async fn retry_later(
                &self,
                lease: &super::Lease,
                seq: i64,
                error: &str,
                at: std::time::SystemTime,
            ) -> Result<(), OutboxError> {
                sqlx::query(super::sql::RETRY_LATER)
                    .bind(seq)
                    .bind(error)
                    .bind(super::to_millis(at))
                    .bind(&lease.relay)
                    .bind(&lease.holder)
                    .bind(lease.epoch)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn park(
                &self,
                lease: &super::Lease,
                seq: i64,
                error: &str,
            ) -> Result<(), OutboxError> {
                sqlx::query(super::sql::PARK)
                    .bind(seq)
                    .bind(error)
                    .bind(&lease.relay)
                    .bind(&lease.holder)
                    .bind(lease.epoch)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn acquire_lease(
                &self,
                relay: &str,
                holder: &str,
                held_epoch: Option<i64>,
                lease: std::time::Duration,
            ) -> Result<Option<super::Lease>, OutboxError> {
                // Read first: a standby writes nothing while another
                // holder's lease runs (on SQLite every write, even one that
                // changes nothing, takes the database's write lock).
                // The statements are constants with the backend's constant
                // clock expression put in: nothing from outside.
                let current: Option<(String, i64, i64, i64)> =
                    sqlx::query_as(sqlx::AssertSqlSafe(super::sql::LEASE.replace("{now}", $now)))
                        .bind(relay)
                        .fetch_optional(&self.pool)
                        .await?;
                if let Some((other, until, epoch, now)) = current {
                    let mine = other == holder && held_epoch.is_none_or(|held| held == epoch);
                    if !mine && until > now {
                        return Ok(None);
                    }
                }
                let got: Option<(i64, i64)> =
                    sqlx::query_as(sqlx::AssertSqlSafe(super::sql::ACQUIRE.replace("{now}", $now)))
                        .bind(relay)
                        .bind(holder)
                        .bind(super::duration_millis(lease))
                        .bind(held_epoch)
                        .fetch_optional(&self.pool)
                        .await?;
                Ok(got.map(|(epoch, remaining)| super::Lease {
                    relay: relay.to_owned(),
                    holder: holder.to_owned(),
                    epoch,
                    remaining: std::time::Duration::from_millis(
                        u64::try_from(remaining).unwrap_or(0),
                    ),
                }))
            }

            async fn release_lease(&self, lease: &super::Lease) -> Result<(), OutboxError> {
                sqlx::query(super::sql::RELEASE)
                    .bind(&lease.relay)
                    .bind(&lease.holder)
                    .bind(lease.epoch)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn backlog(&self) -> Result<super::Backlog, OutboxError> {
                let (pending, oldest): (i64, Option<i64>) =
                    sqlx::query_as(super::sql::PENDING_STATS)
                        .fetch_one(&self.pool)
                        .await?;
                let parked: i64 = sqlx::query_scalar(super::sql::PARKED_COUNT)
                    .fetch_one(&self.pool)
                    .await?;
                let oldest_pending = oldest.map(|created| {
                    std::time::SystemTime::now()
                        .duration_since(super::from_millis(created))
                        .unwrap_or_default()
                });
                Ok(super::Backlog {
                    pending: u64::try_from(pending).unwrap_or(0),
                    parked: u64::try_from(parked).unwrap_or(0),
                    oldest_pending,
                })
            }

            async fn requeue_parked(&self) -> Result<u64, OutboxError> {
                let done = sqlx::query(super::sql::REQUEUE)
                    .bind(super::to_millis(std::time::SystemTime::now()))
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }

            async fn purge_sent(
                &self,
                older_than: std::time::Duration,
                limit: u64,
            ) -> Result<u64, OutboxError> {
                let cutoff = std::time::SystemTime::now()
                    .checked_sub(older_than)
                    .unwrap_or(std::time::UNIX_EPOCH);
                let done = sqlx::query(super::sql::PURGE)
                    .bind(super::to_millis(cutoff))
                    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                    .execute(&self.pool)
                    .await?;
                Ok(done.rows_affected())
            }
        }
    };
}

pub(super) use sql_outbox;

/// Builds the migrator of one backend from its embedded migrations,
/// recording them in [`MIGRATIONS_TABLE`].
pub(super) fn migrator(
    migrations: &[(i64, &'static str, &'static str)],
) -> sqlx::migrate::Migrator {
    surety_core::store::migrator(MIGRATIONS_TABLE, migrations)
}

/// The table that records which migrations of this crate ran: its own, so
/// the versions never collide with another crate's or the application's.
pub const MIGRATIONS_TABLE: &str = "_surety_outbox_migrations";
