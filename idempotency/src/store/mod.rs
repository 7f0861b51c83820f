//! The [`DedupStore`] contract: claims with leases, completion with a
//! stored reply, release on failure, retention.
//!
//! A key moves through three states:
//!
//! | state | how it gets there | what a [`claim`](DedupStore::claim) returns |
//! |---|---|---|
//! | absent | never seen, [released](DedupStore::release), or [purged](DedupStore::purge) | [`Claim::Acquired`] with a new lease |
//! | claimed | a claim acquired it; the lease runs until `lease_until` | [`Claim::Busy`] while the lease runs; [`Claim::Acquired`] (a takeover) once it expired |
//! | done | the lease holder [completed](DedupStore::complete) it | [`Claim::Done`] with the stored reply |
//!
//! Every claim gets a fresh [`LeaseToken`]. Extending, completing and
//! releasing name the token, so a holder whose lease expired and was taken
//! over cannot complete the key any more (fencing): its
//! [`complete`](DedupStore::complete) fails with
//! [`StoreError::LeaseLost`].

pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::error::StoreError;

/// Identifies one claim on one key. Opaque; unique across claims.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LeaseToken(String);

impl LeaseToken {
    /// A new, unique token (a UUIDv7).
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// A token read back from a store.
    pub fn from_stored(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseToken({})", self.0)
    }
}

impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A claim that was acquired: the holder may run the handler.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lease {
    /// Names this claim in [`extend`](DedupStore::extend),
    /// [`complete`](DedupStore::complete) and
    /// [`release`](DedupStore::release).
    pub token: LeaseToken,
    /// Whether an earlier claim on the key existed and its lease had expired
    /// (its holder died or stalled): this claim took it over.
    pub took_over: bool,
}

impl Lease {
    /// A lease with `token`.
    pub fn new(token: LeaseToken, took_over: bool) -> Self {
        Self { token, took_over }
    }
}

/// The answer to a [`claim`](DedupStore::claim).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Claim {
    /// First delivery (or a takeover of an expired lease): run the handler,
    /// then complete or release.
    Acquired(Lease),
    /// Already handled: do not run the handler. `reply` is what the first run
    /// stored, if anything.
    Done {
        /// The stored reply.
        reply: Option<Bytes>,
    },
    /// Another delivery holds a live lease on the key.
    Busy {
        /// How long until that lease expires, as far as the store knows.
        retry_after: Duration,
    },
}

/// Remembers which messages were handled, with leases for the ones being
/// handled now.
///
/// Implementations must make [`claim`](Self::claim) atomic: of any number
/// of concurrent claims on a key that is absent (or whose lease expired),
/// exactly one is [`Acquired`](Claim::Acquired). The in-memory store
/// ([`MemoryStore`](crate::MemoryStore)) and the SQL stores implement it;
/// `surety_testkit::idempotency_store` is the shared test suite every
/// implementation passes.
///
/// ```
/// use std::time::Duration;
/// use surety_idempotency::{Claim, DedupStore, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), surety_idempotency::StoreError> {
/// let store = MemoryStore::new();
/// let lease = Duration::from_secs(30);
///
/// // The first delivery acquires the key and runs the handler...
/// let Claim::Acquired(first) = store.claim("/orders o-1", lease).await? else { unreachable!() };
/// // ...while a concurrent duplicate is told to wait.
/// assert!(matches!(store.claim("/orders o-1", lease).await?, Claim::Busy { .. }));
///
/// store.complete("/orders o-1", &first.token, Some(b"reply")).await?;
/// // Every later duplicate gets the stored reply and skips the handler.
/// let Claim::Done { reply } = store.claim("/orders o-1", lease).await? else { unreachable!() };
/// assert_eq!(reply.as_deref(), Some(&b"reply"[..]));
/// # Ok(()) }
/// ```
pub trait DedupStore: Send + Sync + 'static {
    /// Claims `key` for a lease of `lease`: acquires it when it is absent or
    /// its lease expired, reports it done with its stored reply, or busy.
    fn claim(
        &self,
        key: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Extends a held lease to `lease` from now. Fails with
    /// [`StoreError::LeaseLost`] when `token` no longer holds the claim.
    fn extend(
        &self,
        key: &str,
        token: &LeaseToken,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Marks `key` done and stores `reply`. Fails with
    /// [`StoreError::LeaseLost`] when `token` no longer holds the claim;
    /// completing again with the token that completed it succeeds (and
    /// replaces the reply).
    fn complete(
        &self,
        key: &str,
        token: &LeaseToken,
        reply: Option<&[u8]>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Gives up a claim (the handler failed), so the next delivery acquires
    /// the key at once. Does nothing when `token` no longer holds it.
    fn release(
        &self,
        key: &str,
        token: &LeaseToken,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes up to `limit` keys that were completed more than `older_than`
    /// ago, and claims whose lease expired more than `older_than` ago.
    /// Returns how many were deleted. Safe to run concurrently from many
    /// instances. A duplicate that arrives after its key was purged is
    /// handled again: keep `older_than` longer than any redelivery window.
    fn purge(
        &self,
        older_than: Duration,
        limit: u32,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// How many keys the store holds (claimed and done).
    fn size(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

impl<S: DedupStore> DedupStore for Arc<S> {
    fn claim(
        &self,
        key: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send {
        (**self).claim(key, lease)
    }

    fn extend(
        &self,
        key: &str,
        token: &LeaseToken,
        lease: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).extend(key, token, lease)
    }

    fn complete(
        &self,
        key: &str,
        token: &LeaseToken,
        reply: Option<&[u8]>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).complete(key, token, reply)
    }

    fn release(
        &self,
        key: &str,
        token: &LeaseToken,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).release(key, token)
    }

    fn purge(
        &self,
        older_than: Duration,
        limit: u32,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        (**self).purge(older_than, limit)
    }

    fn size(&self) -> impl Future<Output = Result<u64, StoreError>> + Send {
        (**self).size()
    }
}

/// Milliseconds of `d`, saturating, for SQL stores.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A duration from milliseconds a store computed; negative is zero.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn from_millis(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A migrator for `migrations` that records them in this crate's own
/// table, [`MIGRATIONS_TABLE`].
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub(crate) fn migrator(
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
/// the versions never collide with another crate's or the application's
/// migrations in `_sqlx_migrations`.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub const MIGRATIONS_TABLE: &str = "_surety_idempotency_migrations";
