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
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;

use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::error::StoreError;

/// Identifies one claim on one key. Opaque; unique across claims. Cheap
/// to clone: a generated token is held inline, without an allocation.
#[derive(Clone)]
pub struct LeaseToken(Token);

#[derive(Clone)]
enum Token {
    /// A generated UUID as hyphenated lower-case hex (ASCII).
    Uuid([u8; uuid::fmt::Hyphenated::LENGTH]),
    /// Any text, as read back from a store.
    Stored(Arc<str>),
}

impl LeaseToken {
    /// A new, unique token (a UUIDv7).
    pub fn generate() -> Self {
        use std::time::{SystemTime, UNIX_EPOCH};
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| saturating_millis(d.as_millis()));
        Self::with_millis(millis)
    }

    /// [`generate`](Self::generate) at `now`, without reading the clock
    /// again: the Unix time comes from a wall-clock reading taken once per
    /// process and the monotonic time since. Only the UUID's timestamp
    /// field depends on it; nothing reads it back.
    pub(crate) fn generate_at(now: tokio::time::Instant) -> Self {
        static ANCHOR: std::sync::OnceLock<(std::time::Instant, u64)> = std::sync::OnceLock::new();
        let (at, millis) = *ANCHOR.get_or_init(|| {
            use std::time::{SystemTime, UNIX_EPOCH};
            let millis = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| saturating_millis(d.as_millis()));
            (std::time::Instant::now(), millis)
        });
        let since = now.into_std().saturating_duration_since(at).as_millis();
        Self::with_millis(millis.saturating_add(saturating_millis(since)))
    }

    fn with_millis(millis: u64) -> Self {
        let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
        token_uuid(millis).hyphenated().encode_lower(&mut text);
        Self(Token::Uuid(text))
    }

    /// A token read back from a store.
    pub fn from_stored(token: impl Into<String>) -> Self {
        Self(Token::Stored(Arc::from(token.into())))
    }

    /// The token as stored.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Always ASCII: `encode_lower` wrote it.
            Token::Uuid(text) => std::str::from_utf8(text).unwrap_or_default(),
            Token::Stored(text) => text,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Token::Uuid(text) => text,
            Token::Stored(text) => text.as_bytes(),
        }
    }
}

impl PartialEq for LeaseToken {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for LeaseToken {}

impl Hash for LeaseToken {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

/// A UUIDv7 for a lease token, without a system call: the 74 random bits
/// come from a per-thread SplitMix64 sequence seeded once from the
/// operating system (through std's hash keys). SplitMix64 is a bijection of
/// its state, so one thread never repeats a token, whatever the clock does;
/// different threads and processes start from independent random seeds.
/// (`Uuid::now_v7` asks the OS for randomness on every call, which was the
/// largest single cost of a claim in memory.)
fn token_uuid(millis: u64) -> uuid::Uuid {
    use std::cell::Cell;
    use std::hash::BuildHasher;

    /// SplitMix64's increment, the golden ratio.
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            std::hash::RandomState::new().hash_one(std::thread::current().id()),
        );
    }
    let state = STATE.with(|state| {
        let next = state.get().wrapping_add(GAMMA);
        state.set(next);
        next
    });
    let unique = mix(state).to_be_bytes();
    let extra = mix(state ^ GAMMA.rotate_left(32)).to_be_bytes();
    // `from_unix_timestamp_millis` keeps bytes 1 and 3..10 whole (version
    // and variant bits go into bytes 0 and 2): the unique 64 bits go there.
    let random = [
        extra[0], unique[0], extra[1], unique[1], unique[2], unique[3], unique[4], unique[5],
        unique[6], unique[7],
    ];
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

fn saturating_millis(millis: u128) -> u64 {
    u64::try_from(millis).unwrap_or(u64::MAX)
}

impl fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LeaseToken({})", self.as_str())
    }
}

impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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

/// The fast path of a [`DedupStore`] that answers at once, from this
/// process's memory: the same claims and completions as the store's
/// `claim` and `complete`, made without waiting. A store offers it through
/// [`DedupStore::immediate`].
pub trait Immediate: Send + Sync {
    /// [`DedupStore::claim`], answered at once.
    fn claim_now(&self, key: &str, lease: Duration) -> Result<Claim, StoreError>;

    /// [`DedupStore::complete`], answered at once.
    fn complete_now(
        &self,
        key: &str,
        token: &LeaseToken,
        reply: Option<&[u8]>,
    ) -> Result<(), StoreError>;
}

/// Remembers which messages were handled, with leases for the ones being
/// handled now.
///
/// Implementations must make [`claim`](Self::claim) atomic: of any number
/// of concurrent claims on a key that is absent (or whose lease expired),
/// exactly one is [`Acquired`](Claim::Acquired). The in-memory store
/// ([`MemoryDedupStore`](crate::MemoryDedupStore)) and the SQL stores implement it;
/// `surety_testkit::idempotency_store` is the shared test suite every
/// implementation passes.
///
/// ```
/// use std::time::Duration;
/// use surety_idempotency::{Claim, DedupStore, MemoryDedupStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), surety_idempotency::StoreError> {
/// let store = MemoryDedupStore::new();
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

    /// The store's immediate form, when it answers from this process's
    /// memory without waiting (like [`MemoryDedupStore`](crate::MemoryDedupStore));
    /// `None` (the default) for stores that do I/O.
    ///
    /// The layer then claims and completes through [`Immediate`] without a
    /// boxed future per delivery, and does not read the clock around the
    /// store's per-message operations: they are recorded in
    /// `surety_idempotency_store_duration_seconds` with a duration of zero
    /// (they take well under its first bucket, 0.1 ms; the counts by
    /// operation and outcome stay exact). [`Cleanup`](crate::Cleanup) times
    /// `purge` and `size` for every store.
    fn immediate(&self) -> Option<&dyn Immediate> {
        None
    }
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

    fn immediate(&self) -> Option<&dyn Immediate> {
        (**self).immediate()
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
    surety_core::store::migrator(MIGRATIONS_TABLE, migrations)
}

/// The table that records which migrations of this crate ran: its own, so
/// the versions never collide with another crate's or the application's
/// migrations in `_sqlx_migrations`.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub const MIGRATIONS_TABLE: &str = "_surety_idempotency_migrations";

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn tokens_are_unique_uuid_v7s() {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    (0..20_000)
                        .map(|_| LeaseToken::generate())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seen = HashSet::new();
        for thread in threads {
            for token in thread.join().unwrap() {
                let uuid = uuid::Uuid::parse_str(token.as_str()).unwrap();
                assert_eq!(uuid.get_version_num(), 7, "{token}");
                assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{token}");
                let now = uuid::Uuid::now_v7().get_timestamp().unwrap().to_unix();
                assert!(uuid.get_timestamp().unwrap().to_unix().0 <= now.0);
                assert_eq!(LeaseToken::from_stored(token.as_str()), token);
                assert_ne!(LeaseToken::generate_at(tokio::time::Instant::now()), token);
                assert!(seen.insert(token), "a token repeated");
            }
        }
    }
}
