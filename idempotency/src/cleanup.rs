//! [`Cleanup`]: the retention task that deletes old keys.

use std::future::Future;
use std::time::Duration;

use crate::error::StoreError;
use crate::metrics::{IdempotencyMetrics, Op};
use crate::store::DedupStore;

/// Deletes keys completed longer ago than the retention, and claims whose
/// lease expired longer ago than that, in bounded batches, on an interval.
/// It also keeps the store size gauge up to date.
///
/// Run it on every instance: each batch is its own statement and
/// (PostgreSQL) skips rows another instance is deleting, so instances share
/// the work without waiting for each other.
///
/// The retention is the dedup window: a duplicate that arrives after its
/// key was deleted is handled again. Keep it well above the longest time a
/// message can spend in the broker (retry ladders, parked partitions, a
/// replay from the dead-letter queue).
///
/// ```
/// use std::time::Duration;
/// use surety_idempotency::{Cleanup, Claim, DedupStore, MemoryDedupStore};
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() -> Result<(), surety_idempotency::StoreError> {
/// let store = MemoryDedupStore::new();
/// let Claim::Acquired(lease) = store.claim("k", Duration::from_secs(5)).await? else { unreachable!() };
/// store.complete("k", &lease.token, None).await?;
///
/// let cleanup = Cleanup::new(store.clone(), Duration::from_secs(3_600));
/// assert_eq!(cleanup.run_once().await?, 0, "younger than the retention");
/// tokio::time::advance(Duration::from_secs(3_601)).await;
/// assert_eq!(cleanup.run_once().await?, 1);
///
/// // Or in the background until shutdown:
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let task = tokio::spawn(cleanup.run(async { stopped.await.ok(); }));
/// stop.send(()).ok();
/// task.await.ok();
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Cleanup<St> {
    store: St,
    retention: Duration,
    interval: Duration,
    batch_size: u32,
    metrics: IdempotencyMetrics,
}

impl<St: DedupStore> Cleanup<St> {
    /// Deletes keys of `store` older than `retention`, every minute, in
    /// batches of 1000.
    pub fn new(store: St, retention: Duration) -> Self {
        Self {
            store,
            retention,
            interval: Duration::from_secs(60),
            batch_size: 1_000,
            metrics: IdempotencyMetrics::default(),
        }
    }

    /// Sets how often a cleanup runs (at least 1 ms).
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Sets how many keys one statement deletes at most (at least 1).
    pub fn batch_size(mut self, batch_size: u32) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// Records into `metrics`.
    pub fn metrics(mut self, metrics: IdempotencyMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Deletes everything older than the retention, batch after batch,
    /// then updates the store size gauge. Returns how many keys it deleted.
    pub async fn run_once(&self) -> Result<u64, StoreError> {
        let mut deleted = 0;
        loop {
            let batch = self
                .metrics
                .timed(
                    Op::Purge,
                    true,
                    self.store.purge(self.retention, self.batch_size),
                )
                .await?;
            deleted += batch;
            if batch < u64::from(self.batch_size) {
                break;
            }
            // Let the instance's handlers at the database between batches.
            tokio::task::yield_now().await;
        }
        let size = self
            .metrics
            .timed(Op::Size, true, self.store.size())
            .await?;
        self.metrics.set_store_size(size);
        if deleted > 0 {
            tracing::debug!(deleted, size, "dedup store cleanup");
        }
        Ok(deleted)
    }

    /// Runs [`run_once`](Self::run_once) every interval until `shutdown`
    /// resolves. A failed run is logged and retried at the next interval.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                _ = ticks.tick() => {}
            }
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                result = self.run_once() => {
                    if let Err(err) = result {
                        tracing::warn!(error = %err, "dedup store cleanup failed; retrying at the next interval");
                    }
                }
            }
        }
    }
}
