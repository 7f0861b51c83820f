//! [`MemoryDedupStore`]: a bounded in-memory dedup store for tests, examples and
//! single-process deployments.

use std::collections::{HashMap, VecDeque, hash_map};
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::{Claim, DedupStore, Immediate, Lease, LeaseToken};
use crate::error::StoreError;
use crate::metrics::IdempotencyMetrics;

/// Default capacity of a [`MemoryDedupStore`], in keys.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// A [`MemoryDedupStore`] that evicts completed keys logs a warning at most
/// once per this interval (the first eviction at once), with the number of
/// keys evicted since the last warning.
pub const EVICTION_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// A dedup store in process memory. Cheap to clone; clones share the keys.
///
/// It holds at most [`capacity`](Self::with_capacity) keys. When a new key
/// arrives and the store is full, the key completed longest ago is evicted
/// (so the dedup window shrinks under load rather than failing), then a
/// claim whose lease expired; when every key is claimed with a live lease,
/// the claim fails with [`StoreError::Full`]. Time is tokio's clock, so
/// tests can move it with `tokio::time::pause` and `advance`.
///
/// An eviction shortens the dedup window: a redelivery of an evicted key is
/// handled again. Evictions are counted ([`evictions`](Self::evictions), and
/// `surety_idempotency_store_evictions_total` once given
/// [`metrics`](Self::metrics)) and logged as a warning at most once per
/// [`EVICTION_WARNING_INTERVAL`]; when they happen, raise the capacity or
/// purge more often.
///
/// [`purge`](DedupStore::purge) counts a completed key's age from the
/// time of its claim or of its lease's last extension, whichever is later,
/// so that completing does not read the clock again: at most one renewal
/// period (without renewal, the handler's run time) before it completed.
/// Those times do not rise in completion order, and a purge pass stops at
/// the first key that is still young, so an older one behind it waits for
/// a later pass; no key stays longer than `older_than` after it completed.
///
/// Nothing survives the process: a restarted service handles again what
/// it handled before. Use the SQLite or PostgreSQL store where that matters.
///
/// ```
/// use std::time::Duration;
/// use surety_idempotency::{Claim, DedupStore, MemoryDedupStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), surety_idempotency::StoreError> {
/// let store = MemoryDedupStore::with_capacity(1);
/// let Claim::Acquired(lease) = store.claim("a", Duration::from_secs(5)).await? else { unreachable!() };
/// store.complete("a", &lease.token, None).await?;
/// // Full: "a" is evicted to make room for "b".
/// assert!(matches!(store.claim("b", Duration::from_secs(5)).await?, Claim::Acquired(_)));
/// assert_eq!(store.size().await?, 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MemoryDedupStore {
    shared: Arc<Shared>,
}

struct Shared {
    /// Hashes keys, outside the lock; seeded at random per store.
    hasher: KeyHasher,
    inner: Mutex<Inner>,
    /// Tests: every key gets the same hash.
    #[cfg(test)]
    collide: bool,
}

/// The hash of keys: foldhash, seeded at random per store.
type KeyHasher = foldhash::fast::RandomState;

/// The maps below are keyed by the key's hash, computed once per operation
/// before the lock is taken; their own hasher passes it through.
type ByHash = BuildHasherDefault<PassHash>;

/// A hasher for keys that are hashes already.
#[derive(Default)]
struct PassHash(u64);

impl Hasher for PassHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64`s are hashed with it (`write_u64`); fold anything else.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

struct Inner {
    capacity: usize,
    /// The entries, where `keys` and `collided` point. New keys go to the
    /// end (or to a slot freed before), so a claim writes to memory next
    /// to the last one instead of to a random place in a large table.
    slots: Vec<Option<Entry>>,
    /// Free places in `slots`.
    free: Vec<usize>,
    /// Where each key is in `slots`, by the key's hash: a small table
    /// (16 bytes a key), mostly in cache. A key whose hash another key
    /// holds here (a 64-bit collision: practically never) goes to
    /// `collided`; when the key holding the hash goes, a collided one with
    /// the same hash takes its place, so a hash absent here is absent.
    keys: HashMap<u64, usize, ByHash>,
    /// Places of keys whose hash `keys` holds for another key.
    collided: Vec<usize>,
    /// Completed keys in completion order, oldest first, as their place
    /// and completion sequence. Completed keys leave the store only from
    /// the front (eviction and purge take the oldest first), so this stays
    /// in step with the keys; an entry whose place no longer holds that
    /// completion is skipped all the same.
    done_order: VecDeque<(usize, u64)>,
    next_seq: u64,
    evictions: Evictions,
}

/// Completed keys evicted to make room, counted and reported.
#[derive(Default)]
struct Evictions {
    total: u64,
    /// Evicted since the last warning.
    unreported: u64,
    warned_at: Option<Instant>,
    metrics: Option<IdempotencyMetrics>,
}

impl Evictions {
    /// Counts one eviction; returns the number to report when a warning is
    /// due.
    fn record(&mut self, now: Instant) -> Option<u64> {
        self.total += 1;
        self.unreported += 1;
        if let Some(metrics) = &self.metrics {
            metrics.store_evicted(1);
        }
        let due = self
            .warned_at
            .is_none_or(|at| now.saturating_duration_since(at) >= EVICTION_WARNING_INTERVAL);
        due.then(|| {
            self.warned_at = Some(now);
            std::mem::take(&mut self.unreported)
        })
    }
}

struct Entry {
    key: Box<str>,
    hash: u64,
    token: LeaseToken,
    state: State,
}

enum State {
    Claimed {
        lease_until: Instant,
        /// When the key was claimed or its lease last extended: what
        /// `complete` records as the completion time, without reading
        /// the clock again.
        since: Instant,
    },
    Done {
        completed_at: Instant,
        seq: u64,
        /// Boxed: replies are rare, and every entry would pay their size.
        reply: Option<Box<Bytes>>,
    },
}

impl MemoryDedupStore {
    /// A store holding up to [`DEFAULT_CAPACITY`] keys.
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }

    /// A store holding up to `capacity` keys (0 is taken as 1).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                hasher: KeyHasher::default(),
                inner: Mutex::new(Inner {
                    capacity: capacity.max(1),
                    slots: Vec::new(),
                    free: Vec::new(),
                    keys: HashMap::default(),
                    collided: Vec::new(),
                    done_order: VecDeque::new(),
                    next_seq: 0,
                    evictions: Evictions::default(),
                }),
                #[cfg(test)]
                collide: false,
            }),
        }
    }

    /// Counts this store's evictions in `metrics`
    /// (`surety_idempotency_store_evictions_total`), for every clone of the
    /// store.
    pub fn metrics(self, metrics: &IdempotencyMetrics) -> Self {
        self.lock().evictions.metrics = Some(metrics.clone());
        self
    }

    /// Completed keys evicted so far to make room for new ones.
    pub fn evictions(&self) -> u64 {
        self.lock().evictions.total
    }

    fn hash(&self, key: &str) -> u64 {
        #[cfg(test)]
        if self.shared.collide {
            return 7;
        }
        self.shared.hasher.hash_one(key)
    }

    fn claim_sync(&self, key: &str, lease: Duration) -> Result<Claim, StoreError> {
        // Everything that allocates or hashes happens before the lock; a
        // duplicate wastes it, a first delivery (the common case) keeps the
        // lock short.
        let now = Instant::now();
        let until = lease_until(now, lease);
        let token = LeaseToken::generate_at(now);
        let hash = self.hash(key);
        let entry = Entry {
            key: Box::from(key),
            hash,
            token: token.clone(),
            state: State::Claimed {
                lease_until: until,
                since: now,
            },
        };
        let mut guard = self.lock();
        let inner = &mut *guard;
        let full = inner.len() >= inner.capacity;
        // One probe for the common cases: a key not seen before, or seen.
        match inner.keys.entry(hash) {
            hash_map::Entry::Vacant(vacant) if !full => {
                let at = match inner.free.pop() {
                    Some(at) => {
                        inner.slots[at] = Some(entry);
                        at
                    }
                    None => {
                        inner.slots.push(Some(entry));
                        inner.slots.len() - 1
                    }
                };
                vacant.insert(at);
                return Ok(Claim::Acquired(Lease::new(token, false)));
            }
            hash_map::Entry::Occupied(occupied) => {
                if let Some(held) = inner.slots[*occupied.get()]
                    .as_mut()
                    .filter(|e| *e.key == *key)
                {
                    return Ok(claim_existing(held, now, until, token));
                }
            }
            hash_map::Entry::Vacant(_) => {}
        }
        // A full store, or another key with the same hash.
        if let Some(held) = inner.get_mut(hash, key) {
            return Ok(claim_existing(held, now, until, token));
        }
        let evicted = inner.make_room(now)?;
        inner.insert(entry);
        let capacity = inner.capacity;
        drop(guard);
        if let Some(evicted) = evicted {
            tracing::warn!(
                evicted,
                capacity,
                "in-memory dedup store full: evicted the oldest completed keys, so their redeliveries would be handled again; raise the capacity or purge more often"
            );
        }
        Ok(Claim::Acquired(Lease::new(token, false)))
    }

    fn complete_sync(
        &self,
        key: &str,
        token: &LeaseToken,
        reply: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let reply = reply.map(|reply| Box::new(Bytes::copy_from_slice(reply)));
        let hash = self.hash(key);
        let mut inner = self.lock();
        let inner = &mut *inner;
        let seq = inner.next_seq;
        let Some(at) = inner.find(hash, key) else {
            return Err(lease_lost(key));
        };
        let Some(entry) = inner.slots[at].as_mut().filter(|e| e.token == *token) else {
            return Err(lease_lost(key));
        };
        match &mut entry.state {
            &mut State::Claimed { since, .. } => {
                entry.state = State::Done {
                    completed_at: since,
                    seq,
                    reply,
                };
                inner.next_seq += 1;
                inner.done_order.push_back((at, seq));
            }
            // Completed before with this token: the last reply wins.
            State::Done { reply: stored, .. } => *stored = reply,
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update below leaves the maps consistent before it can panic.
        self.shared
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for MemoryDedupStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryDedupStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("MemoryDedupStore")
            .field("capacity", &inner.capacity)
            .field("keys", &inner.len())
            .field("evictions", &inner.evictions.total)
            .finish()
    }
}

impl Entry {
    fn is_done_as(&self, seq: u64) -> bool {
        matches!(self.state, State::Done { seq: s, .. } if s == seq)
    }

    fn completed_before(&self, cutoff: Instant) -> bool {
        matches!(self.state, State::Done { completed_at, .. } if completed_at < cutoff)
    }

    fn expired_by(&self, now: Instant) -> bool {
        matches!(self.state, State::Claimed { lease_until, .. } if lease_until <= now)
    }
}

impl Inner {
    fn len(&self) -> usize {
        self.keys.len() + self.collided.len()
    }

    fn entry(&self, at: usize) -> Option<&Entry> {
        self.slots.get(at).and_then(Option::as_ref)
    }

    /// Where `key`, whose hash is `hash`, is in `slots`.
    fn find(&self, hash: u64, key: &str) -> Option<usize> {
        let at = *self.keys.get(&hash)?;
        if self.entry(at).is_some_and(|e| *e.key == *key) {
            return Some(at);
        }
        self.collided.iter().copied().find(|&at| {
            self.entry(at)
                .is_some_and(|e| e.hash == hash && *e.key == *key)
        })
    }

    fn get_mut(&mut self, hash: u64, key: &str) -> Option<&mut Entry> {
        let at = self.find(hash, key)?;
        self.slots[at].as_mut()
    }

    /// Puts an entry in a free place.
    fn place(&mut self, entry: Entry) -> usize {
        match self.free.pop() {
            Some(at) => {
                self.slots[at] = Some(entry);
                at
            }
            None => {
                self.slots.push(Some(entry));
                self.slots.len() - 1
            }
        }
    }

    /// Adds an entry for a key the store does not hold.
    fn insert(&mut self, entry: Entry) {
        let hash = entry.hash;
        let at = self.place(entry);
        match self.keys.entry(hash) {
            hash_map::Entry::Vacant(vacant) => {
                vacant.insert(at);
            }
            hash_map::Entry::Occupied(_) => self.collided.push(at),
        }
    }

    /// Removes the entry at `at`.
    fn remove(&mut self, at: usize) {
        let Some(entry) = self.slots.get_mut(at).and_then(Option::take) else {
            return;
        };
        self.free.push(at);
        let hash = entry.hash;
        if self.keys.get(&hash) == Some(&at) {
            let same_hash = self
                .collided
                .iter()
                .position(|&other| self.entry(other).is_some_and(|e| e.hash == hash));
            match same_hash {
                Some(i) => {
                    let other = self.collided.swap_remove(i);
                    self.keys.insert(hash, other);
                }
                None => {
                    self.keys.remove(&hash);
                }
            }
        } else if let Some(i) = self.collided.iter().position(|&other| other == at) {
            self.collided.swap_remove(i);
        }
    }

    /// Removes the oldest completed key, if there is one.
    fn evict_oldest_done(&mut self) -> bool {
        while let Some((at, seq)) = self.done_order.pop_front() {
            if self.entry(at).is_some_and(|e| e.is_done_as(seq)) {
                self.remove(at);
                return true;
            }
        }
        false
    }

    /// Makes room for one more key, if the store is full. Returns the
    /// evictions to warn about, when a warning is due.
    fn make_room(&mut self, now: Instant) -> Result<Option<u64>, StoreError> {
        if self.len() < self.capacity {
            return Ok(None);
        }
        if self.evict_oldest_done() {
            return Ok(self.evictions.record(now));
        }
        let expired = self
            .slots
            .iter()
            .position(|slot| slot.as_ref().is_some_and(|e| e.expired_by(now)));
        match expired {
            Some(at) => {
                self.remove(at);
                Ok(None)
            }
            None => Err(StoreError::Full {
                capacity: self.capacity,
            }),
        }
    }
}

fn lease_until(now: Instant, lease: Duration) -> Instant {
    now.checked_add(lease)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

fn lease_lost(key: &str) -> StoreError {
    StoreError::LeaseLost {
        key: key.to_owned(),
    }
}

impl DedupStore for MemoryDedupStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StoreError> {
        self.claim_sync(key, lease)
    }

    async fn extend(
        &self,
        key: &str,
        token: &LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let until = lease_until(now, lease);
        let hash = self.hash(key);
        let mut inner = self.lock();
        match inner.get_mut(hash, key) {
            Some(Entry {
                token: held,
                state: State::Claimed { lease_until, since },
                ..
            }) if held == token => {
                *lease_until = until;
                *since = now;
                Ok(())
            }
            _ => Err(lease_lost(key)),
        }
    }

    async fn complete(
        &self,
        key: &str,
        token: &LeaseToken,
        reply: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        self.complete_sync(key, token, reply)
    }

    async fn release(&self, key: &str, token: &LeaseToken) -> Result<(), StoreError> {
        let hash = self.hash(key);
        let mut inner = self.lock();
        // Only a live claim is released; a completed key stays done.
        if let Some(at) = inner.find(hash, key).filter(|&at| {
            inner
                .entry(at)
                .is_some_and(|e| e.token == *token && matches!(e.state, State::Claimed { .. }))
        }) {
            inner.remove(at);
        }
        Ok(())
    }

    async fn purge(&self, older_than: Duration, limit: u32) -> Result<u64, StoreError> {
        let now = Instant::now();
        let Some(cutoff) = now.checked_sub(older_than) else {
            return Ok(0);
        };
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut purged = 0;
        // Completed keys, oldest first, up to the first one young enough.
        while purged < limit {
            let Some(&(at, seq)) = inner.done_order.front() else {
                break;
            };
            match inner.entry(at).filter(|e| e.is_done_as(seq)) {
                Some(entry) if !entry.completed_before(cutoff) => break,
                Some(_) => {
                    inner.remove(at);
                    purged += 1;
                }
                // Not that completion any more: skip the stale entry.
                None => {}
            }
            inner.done_order.pop_front();
        }
        // Abandoned claims: leases that expired before the cutoff.
        if purged < limit {
            let abandoned: Vec<usize> = (0..inner.slots.len())
                .filter(|&at| {
                    inner.entry(at).is_some_and(|e| {
                        matches!(e.state, State::Claimed { lease_until, .. } if lease_until < cutoff)
                    })
                })
                .take(limit - purged)
                .collect();
            for &at in &abandoned {
                inner.remove(at);
            }
            purged += abandoned.len();
        }
        Ok(purged as u64)
    }

    async fn size(&self) -> Result<u64, StoreError> {
        Ok(self.lock().len() as u64)
    }

    fn immediate(&self) -> Option<&dyn Immediate> {
        Some(self)
    }
}

impl Immediate for MemoryDedupStore {
    fn claim_now(&self, key: &str, lease: Duration) -> Result<Claim, StoreError> {
        self.claim_sync(key, lease)
    }

    fn complete_now(
        &self,
        key: &str,
        token: &LeaseToken,
        reply: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        self.complete_sync(key, token, reply)
    }
}

/// A claim on a key the store holds: done, busy, or an expired claim taken
/// over with `token`.
fn claim_existing(entry: &mut Entry, now: Instant, until: Instant, token: LeaseToken) -> Claim {
    match &entry.state {
        State::Done { reply, .. } => Claim::Done {
            reply: reply.as_deref().cloned(),
        },
        State::Claimed { lease_until, .. } if *lease_until > now => Claim::Busy {
            retry_after: *lease_until - now,
        },
        State::Claimed { .. } => {
            entry.token = token.clone();
            entry.state = State::Claimed {
                lease_until: until,
                since: now,
            };
            Claim::Acquired(Lease::new(token, true))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);

    /// Stores to run each test on: an ordinary one, and one where every
    /// key has the same hash.
    fn stores(capacity: usize) -> [MemoryDedupStore; 2] {
        let colliding = MemoryDedupStore::with_capacity(capacity);
        let mut shared = Arc::into_inner(colliding.shared).unwrap();
        shared.collide = true;
        [
            MemoryDedupStore::with_capacity(capacity),
            MemoryDedupStore {
                shared: Arc::new(shared),
            },
        ]
    }

    async fn acquire(store: &MemoryDedupStore, key: &str) -> Lease {
        match store.claim(key, LEASE).await.unwrap() {
            Claim::Acquired(lease) => lease,
            other => panic!("expected to acquire {key}, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn evictions_are_counted_in_the_metric() {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = IdempotencyMetrics::register(&mut registry);
        let store = MemoryDedupStore::with_capacity(2).metrics(&metrics);
        for key in ["a", "b"] {
            let lease = acquire(&store, key).await;
            store.complete(key, &lease.token, None).await.unwrap();
        }
        // Full of completed keys: each new key evicts the oldest.
        acquire(&store, "c").await;
        acquire(&store, "d").await;
        // Full of claims: an expired one makes room, which is no eviction
        // of a completed key.
        tokio::time::advance(LEASE).await;
        acquire(&store, "e").await;
        assert_eq!(store.evictions(), 2);
        assert_eq!(store.clone().evictions(), 2, "clones share the count");

        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("surety_idempotency_store_evictions_total 2"),
            "{text}"
        );
    }

    #[test]
    fn eviction_warnings_come_at_most_once_per_interval() {
        let start = Instant::now();
        let mut evictions = Evictions::default();
        assert_eq!(evictions.record(start), Some(1), "the first warns at once");
        assert_eq!(evictions.record(start), None);
        let almost = start + EVICTION_WARNING_INTERVAL - Duration::from_millis(1);
        assert_eq!(evictions.record(almost), None);
        let later = start + EVICTION_WARNING_INTERVAL;
        assert_eq!(
            evictions.record(later),
            Some(3),
            "the next warning counts everything since the last"
        );
        assert_eq!(evictions.total, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_lease_is_taken_over_and_the_stale_holder_is_fenced() {
        for store in stores(DEFAULT_CAPACITY) {
            let stale = acquire(&store, "k").await;
            assert!(matches!(
                store.claim("k", LEASE).await.unwrap(),
                Claim::Busy { retry_after } if retry_after == LEASE
            ));
            tokio::time::advance(LEASE).await;
            let fresh = acquire(&store, "k").await;
            assert!(fresh.took_over);
            assert!(
                store
                    .complete("k", &stale.token, None)
                    .await
                    .unwrap_err()
                    .is_lease_lost()
            );
            assert!(
                store
                    .extend("k", &stale.token, LEASE)
                    .await
                    .unwrap_err()
                    .is_lease_lost()
            );
            store.release("k", &stale.token).await.unwrap();
            store.complete("k", &fresh.token, Some(b"r")).await.unwrap();
            store.complete("k", &fresh.token, Some(b"r")).await.unwrap();
            assert_eq!(
                store.claim("k", LEASE).await.unwrap(),
                Claim::Done {
                    reply: Some(Bytes::from_static(b"r"))
                }
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_store_evicts_the_oldest_completed_key_first() {
        for store in stores(2) {
            let a = acquire(&store, "a").await;
            let b = acquire(&store, "b").await;
            assert!(matches!(
                store.claim("c", LEASE).await.unwrap_err(),
                StoreError::Full { capacity: 2 }
            ));
            store.complete("b", &b.token, None).await.unwrap();
            store.complete("a", &a.token, None).await.unwrap();
            acquire(&store, "c").await;
            // "b" completed first, so it went first.
            assert!(matches!(
                store.claim("a", LEASE).await.unwrap(),
                Claim::Done { .. }
            ));
            assert_eq!(store.size().await.unwrap(), 2);
            // "a" was evicted to make room for "b".
            assert!(matches!(
                store.claim("b", LEASE).await.unwrap(),
                Claim::Acquired(_)
            ));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn purge_takes_old_keys_in_bounded_batches() {
        for store in stores(DEFAULT_CAPACITY) {
            for key in ["a", "b", "c"] {
                let lease = acquire(&store, key).await;
                store.complete(key, &lease.token, None).await.unwrap();
            }
            let _live = acquire(&store, "live").await;
            tokio::time::advance(Duration::from_secs(60)).await;
            assert_eq!(store.purge(Duration::from_secs(30), 2).await.unwrap(), 2);
            assert_eq!(
                store.purge(Duration::from_secs(30), 2).await.unwrap(),
                2,
                "c and the expired claim"
            );
            assert_eq!(store.purge(Duration::from_secs(30), 2).await.unwrap(), 0);
            assert_eq!(store.size().await.unwrap(), 0);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keys_with_the_same_hash_stay_apart() {
        let [_, store] = stores(DEFAULT_CAPACITY);
        let a = acquire(&store, "a").await;
        let b = acquire(&store, "b").await;
        let _c = acquire(&store, "c").await;
        store.complete("b", &b.token, Some(b"b")).await.unwrap();
        // "a" holds the hash; releasing it hands the hash to another key.
        store.release("a", &a.token).await.unwrap();
        assert_eq!(store.size().await.unwrap(), 2);
        assert!(matches!(
            store.claim("c", LEASE).await.unwrap(),
            Claim::Busy { .. }
        ));
        assert_eq!(
            store.claim("b", LEASE).await.unwrap(),
            Claim::Done {
                reply: Some(Bytes::from_static(b"b"))
            }
        );
        let a = acquire(&store, "a").await;
        assert!(!a.took_over);
        assert!(matches!(
            store.claim("a", LEASE).await.unwrap(),
            Claim::Busy { .. }
        ));
        assert!(
            store
                .complete("c", &a.token, None)
                .await
                .unwrap_err()
                .is_lease_lost()
        );
        store.complete("a", &a.token, None).await.unwrap();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(store.purge(Duration::from_secs(30), 10).await.unwrap(), 3);
        assert_eq!(store.size().await.unwrap(), 0);
    }
}
