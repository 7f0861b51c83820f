//! [`MemoryStore`]: a bounded in-memory dedup store for tests, examples and
//! single-process deployments.

use std::collections::{HashMap, VecDeque, hash_map};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::{Claim, DedupStore, Lease, LeaseToken};
use crate::error::StoreError;

/// Default capacity of a [`MemoryStore`], in keys.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// A dedup store in process memory. Cheap to clone; clones share the keys.
///
/// It holds at most [`capacity`](Self::with_capacity) keys. When a new key
/// arrives and the store is full, the key completed longest ago is evicted
/// (so the dedup window shrinks under load rather than failing), then a
/// claim whose lease expired; when every key is claimed with a live lease,
/// the claim fails with [`StoreError::Full`]. Time is tokio's clock, so
/// tests can move it with `tokio::time::pause` and `advance`.
///
/// Nothing survives the process: a restarted service handles again what
/// it handled before. Use the SQLite or PostgreSQL store where that matters.
///
/// ```
/// use std::time::Duration;
/// use surety_idempotency::{Claim, DedupStore, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), surety_idempotency::StoreError> {
/// let store = MemoryStore::with_capacity(1);
/// let Claim::Acquired(lease) = store.claim("a", Duration::from_secs(5)).await? else { unreachable!() };
/// store.complete("a", &lease.token, None).await?;
/// // Full: "a" is evicted to make room for "b".
/// assert!(matches!(store.claim("b", Duration::from_secs(5)).await?, Claim::Acquired(_)));
/// assert_eq!(store.size().await?, 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    capacity: usize,
    keys: HashMap<Arc<str>, Entry>,
    /// Completed keys in completion order, oldest first, with their
    /// completion sequence. Completed keys leave the store only from the
    /// front (eviction and purge take the oldest first), so this stays in
    /// step with `keys`; an entry whose key no longer holds that sequence
    /// is skipped all the same.
    done_order: VecDeque<(u64, Arc<str>)>,
    next_seq: u64,
}

struct Entry {
    /// The key again, shared with `done_order`.
    key: Arc<str>,
    token: LeaseToken,
    state: State,
}

enum State {
    Claimed {
        lease_until: Instant,
    },
    Done {
        reply: Option<Bytes>,
        completed_at: Instant,
        seq: u64,
    },
}

impl MemoryStore {
    /// A store holding up to [`DEFAULT_CAPACITY`] keys.
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }

    /// A store holding up to `capacity` keys (0 is taken as 1).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                capacity: capacity.max(1),
                keys: HashMap::new(),
                done_order: VecDeque::new(),
                next_seq: 0,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update below leaves the maps consistent before it can panic.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("MemoryStore")
            .field("capacity", &inner.capacity)
            .field("keys", &inner.keys.len())
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
}

impl Inner {
    /// Removes the oldest completed key, if there is one.
    fn evict_oldest_done(&mut self) -> bool {
        while let Some((seq, key)) = self.done_order.pop_front() {
            if self.keys.get(&key).is_some_and(|e| e.is_done_as(seq)) {
                self.keys.remove(&key);
                return true;
            }
        }
        false
    }

    /// Makes room for one more key, if the store is full.
    fn make_room(&mut self, now: Instant) -> Result<(), StoreError> {
        if self.keys.len() < self.capacity || self.evict_oldest_done() {
            return Ok(());
        }
        let expired = self
            .keys
            .values()
            .find(|e| matches!(e.state, State::Claimed { lease_until } if lease_until <= now))
            .map(|e| Arc::clone(&e.key));
        match expired {
            Some(key) => {
                self.keys.remove(&key);
                Ok(())
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

impl DedupStore for MemoryStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StoreError> {
        // Everything that allocates happens before the lock; a duplicate
        // wastes it, a first delivery (the common case) keeps the lock short.
        let now = Instant::now();
        let until = lease_until(now, lease);
        let token = LeaseToken::generate_at(now);
        let owned: Arc<str> = Arc::from(key);
        let mut inner = self.lock();
        let inner = &mut *inner;
        if inner.keys.len() < inner.capacity {
            // One hash for the common case: a key not seen before.
            match inner.keys.entry(owned) {
                hash_map::Entry::Vacant(vacant) => {
                    let key = Arc::clone(vacant.key());
                    vacant.insert(Entry {
                        key,
                        token: token.clone(),
                        state: State::Claimed { lease_until: until },
                    });
                    Ok(Claim::Acquired(Lease::new(token, false)))
                }
                hash_map::Entry::Occupied(mut occupied) => {
                    Ok(claim_existing(occupied.get_mut(), now, until, token))
                }
            }
        } else if let Some(entry) = inner.keys.get_mut(key) {
            Ok(claim_existing(entry, now, until, token))
        } else {
            inner.make_room(now)?;
            inner.keys.insert(
                Arc::clone(&owned),
                Entry {
                    key: owned,
                    token: token.clone(),
                    state: State::Claimed { lease_until: until },
                },
            );
            Ok(Claim::Acquired(Lease::new(token, false)))
        }
    }

    async fn extend(
        &self,
        key: &str,
        token: &LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let until = lease_until(Instant::now(), lease);
        let mut inner = self.lock();
        match inner.keys.get_mut(key) {
            Some(Entry {
                token: held,
                state: State::Claimed { lease_until },
                ..
            }) if held == token => {
                *lease_until = until;
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
        let now = Instant::now();
        let reply = reply.map(Bytes::copy_from_slice);
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(entry) = inner.keys.get_mut(key).filter(|e| e.token == *token) else {
            return Err(lease_lost(key));
        };
        match &mut entry.state {
            State::Claimed { .. } => {
                let seq = inner.next_seq;
                inner.next_seq += 1;
                inner.done_order.push_back((seq, Arc::clone(&entry.key)));
                entry.state = State::Done {
                    reply,
                    completed_at: now,
                    seq,
                };
            }
            // Completed before with this token: the last reply wins.
            State::Done { reply: stored, .. } => *stored = reply,
        }
        Ok(())
    }

    async fn release(&self, key: &str, token: &LeaseToken) -> Result<(), StoreError> {
        let mut inner = self.lock();
        // Only a live claim is released; a completed key stays done.
        if inner
            .keys
            .get(key)
            .is_some_and(|e| e.token == *token && matches!(e.state, State::Claimed { .. }))
        {
            inner.keys.remove(key);
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
            let Some((seq, key)) = inner.done_order.front() else {
                break;
            };
            match inner.keys.get(key) {
                Some(entry) if entry.is_done_as(*seq) => {
                    if !entry.completed_before(cutoff) {
                        break;
                    }
                    inner.keys.remove(key);
                    purged += 1;
                }
                // Not that completion any more: skip the stale entry.
                _ => {}
            }
            inner.done_order.pop_front();
        }
        if purged < limit {
            let abandoned: Vec<Arc<str>> = inner
                .keys
                .values()
                .filter(
                    |e| matches!(e.state, State::Claimed { lease_until } if lease_until < cutoff),
                )
                .map(|e| Arc::clone(&e.key))
                .take(limit - purged)
                .collect();
            for key in &abandoned {
                inner.keys.remove(key);
            }
            purged += abandoned.len();
        }
        Ok(purged as u64)
    }

    async fn size(&self) -> Result<u64, StoreError> {
        Ok(self.lock().keys.len() as u64)
    }

    fn in_memory(&self) -> bool {
        true
    }
}

/// A claim on a key the store holds: done, busy, or an expired claim taken
/// over with `token`.
fn claim_existing(entry: &mut Entry, now: Instant, until: Instant, token: LeaseToken) -> Claim {
    match &entry.state {
        State::Done { reply, .. } => Claim::Done {
            reply: reply.clone(),
        },
        State::Claimed { lease_until } if *lease_until > now => Claim::Busy {
            retry_after: *lease_until - now,
        },
        State::Claimed { .. } => {
            entry.token = token.clone();
            entry.state = State::Claimed { lease_until: until };
            Claim::Acquired(Lease::new(token, true))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(10);

    async fn acquire(store: &MemoryStore, key: &str) -> Lease {
        match store.claim(key, LEASE).await.unwrap() {
            Claim::Acquired(lease) => lease,
            other => panic!("expected to acquire {key}, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_lease_is_taken_over_and_the_stale_holder_is_fenced() {
        let store = MemoryStore::new();
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

    #[tokio::test(start_paused = true)]
    async fn a_full_store_evicts_the_oldest_completed_key_first() {
        let store = MemoryStore::with_capacity(2);
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

    #[tokio::test(start_paused = true)]
    async fn purge_takes_old_keys_in_bounded_batches() {
        let store = MemoryStore::new();
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
