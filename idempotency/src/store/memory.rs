//! [`MemoryStore`]: a bounded in-memory dedup store for tests, examples and
//! single-process deployments.

use std::collections::{BTreeMap, HashMap};
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
    keys: HashMap<String, Entry>,
    /// Completed keys by completion sequence, oldest first.
    done_order: BTreeMap<u64, String>,
    next_seq: u64,
}

struct Entry {
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
                done_order: BTreeMap::new(),
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

impl Inner {
    fn remove(&mut self, key: &str) {
        if let Some(Entry {
            state: State::Done { seq, .. },
            ..
        }) = self.keys.remove(key)
        {
            self.done_order.remove(&seq);
        }
    }

    /// Makes room for one more key, if the store is full.
    fn make_room(&mut self, now: Instant) -> Result<(), StoreError> {
        if self.keys.len() < self.capacity {
            return Ok(());
        }
        if let Some((_, key)) = self.done_order.pop_first() {
            self.keys.remove(&key);
            return Ok(());
        }
        let expired = self
            .keys
            .iter()
            .find(|(_, e)| matches!(e.state, State::Claimed { lease_until } if lease_until <= now))
            .map(|(k, _)| k.clone());
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

    fn holds(&self, key: &str, token: &LeaseToken) -> bool {
        matches!(self.keys.get(key), Some(e) if &e.token == token && matches!(e.state, State::Claimed { .. }))
    }
}

fn lease_until(now: Instant, lease: Duration) -> Instant {
    now.checked_add(lease)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

impl DedupStore for MemoryStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let took_over = match inner.keys.get(key) {
            Some(Entry {
                state: State::Done { reply, .. },
                ..
            }) => {
                return Ok(Claim::Done {
                    reply: reply.clone(),
                });
            }
            Some(Entry {
                state: State::Claimed { lease_until },
                ..
            }) if *lease_until > now => {
                return Ok(Claim::Busy {
                    retry_after: *lease_until - now,
                });
            }
            Some(_) => true,
            None => {
                inner.make_room(now)?;
                false
            }
        };
        let token = LeaseToken::generate();
        inner.keys.insert(
            key.to_owned(),
            Entry {
                token: token.clone(),
                state: State::Claimed {
                    lease_until: lease_until(now, lease),
                },
            },
        );
        Ok(Claim::Acquired(Lease::new(token, took_over)))
    }

    async fn extend(
        &self,
        key: &str,
        token: &LeaseToken,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.keys.get_mut(key) {
            Some(Entry {
                token: held,
                state: State::Claimed { lease_until: until },
            }) if held == token => {
                *until = lease_until(now, lease);
                Ok(())
            }
            _ => Err(StoreError::LeaseLost {
                key: key.to_owned(),
            }),
        }
    }

    async fn complete(
        &self,
        key: &str,
        token: &LeaseToken,
        reply: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut inner = self.lock();
        if !inner.holds(key, token) {
            return match inner.keys.get_mut(key) {
                Some(Entry {
                    token: held,
                    state: State::Done { reply: stored, .. },
                }) if held == token => {
                    *stored = reply.map(Bytes::copy_from_slice);
                    Ok(())
                }
                _ => Err(StoreError::LeaseLost {
                    key: key.to_owned(),
                }),
            };
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.done_order.insert(seq, key.to_owned());
        if let Some(entry) = inner.keys.get_mut(key) {
            entry.state = State::Done {
                reply: reply.map(Bytes::copy_from_slice),
                completed_at: now,
                seq,
            };
        }
        Ok(())
    }

    async fn release(&self, key: &str, token: &LeaseToken) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if inner.holds(key, token) {
            inner.remove(key);
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
        let mut doomed: Vec<String> = Vec::new();
        for key in inner.done_order.values() {
            if doomed.len() >= limit {
                break;
            }
            match inner.keys.get(key) {
                Some(Entry {
                    state: State::Done { completed_at, .. },
                    ..
                }) if *completed_at < cutoff => doomed.push(key.clone()),
                _ => break,
            }
        }
        if doomed.len() < limit {
            let room = limit - doomed.len();
            doomed.extend(
                inner
                    .keys
                    .iter()
                    .filter(|(_, e)| matches!(e.state, State::Claimed { lease_until } if lease_until < cutoff))
                    .map(|(k, _)| k.clone())
                    .take(room),
            );
        }
        for key in &doomed {
            inner.remove(key);
        }
        Ok(doomed.len() as u64)
    }

    async fn size(&self) -> Result<u64, StoreError> {
        Ok(self.lock().keys.len() as u64)
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
