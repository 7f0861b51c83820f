//! The claim / run / complete protocol shared by the layer and the inbox
//! handler.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use surety_core::consumer::{Outcome, Response};
use surety_core::{ErrorClass, HandlerError};
use tokio::time::Instant;

use crate::error::StoreError;
use crate::key::KeyFn;
use crate::metrics::{IdempotencyMetrics, Op, Series};
use crate::policy::LeasePolicy;
use crate::reply;
use crate::store::{Claim, DedupStore, Lease, LeaseToken};

/// Everything a guarded handler needs besides the handler itself.
#[derive(Debug)]
pub(crate) struct Guard<St, K> {
    pub(crate) store: St,
    pub(crate) key: K,
    pub(crate) policy: LeasePolicy,
    pub(crate) metrics: IdempotencyMetrics,
}

/// What to do after claiming.
pub(crate) enum Step {
    /// Run the handler under this lease.
    Run { lease: Lease },
    /// Finished without running the handler.
    Skip(Response),
}

/// The error of a delivery whose key another delivery holds.
#[derive(Debug, thiserror::Error)]
#[error("message {key:?} is being handled by another delivery; retry in {retry_after:?}")]
pub(crate) struct Busy {
    key: String,
    retry_after: Duration,
}

/// Where a delivery is in waiting for a busy key: started at its first
/// `Busy`, so that deliveries that never meet one never read the clock for
/// it.
pub(crate) struct BusyWait {
    deadline: Instant,
    pause: Duration,
}

/// Shortest and longest pause between claims of a busy key.
const BUSY_POLL_MIN: Duration = Duration::from_millis(5);
const BUSY_POLL_MAX: Duration = Duration::from_millis(250);

/// How often completing a handled message is tried before giving up.
const COMPLETE_ATTEMPTS: u32 = 3;

/// The instant `after` from now, or one decades away when that does not
/// fit in an `Instant`: a busy wait of `Duration::MAX` waits as long as it
/// takes, and never overflows the clock.
fn deadline_after(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .or_else(|| now.checked_add(Duration::from_secs(86_400 * 365 * 30)))
        .unwrap_or(now)
}

fn store_failure(error: StoreError) -> HandlerError {
    HandlerError::new(error)
}

impl<St, K> Guard<St, K>
where
    St: DedupStore,
    K: KeyFn,
{
    /// Claims the message's key: run, skip as a duplicate (with the stored
    /// outputs to emit again), or fail as busy. `first` is the answer to a first
    /// claim made already ([`Immediate::claim_now`](crate::store::Immediate::claim_now)), if there was one.
    pub(crate) async fn claim(
        &self,
        series: &Series<'_>,
        key: &str,
        mut first: Option<Result<Claim, StoreError>>,
    ) -> Result<Step, HandlerError> {
        let mut busy = None;
        loop {
            let claim = match first.take() {
                Some(claimed) => claimed,
                None => {
                    series
                        .timed(
                            Op::Claim,
                            self.store.immediate().is_none(),
                            self.store.claim(key, self.policy.lease()),
                        )
                        .await
                }
            }
            .map_err(store_failure)?;
            match claim {
                Claim::Acquired(lease) => {
                    self.took_over(series, key, &lease);
                    return Ok(Step::Run { lease });
                }
                // The rarer paths are boxed, so that the future of every
                // delivery stays small (it is moved into a box and polled
                // once per message).
                Claim::Done { reply } => {
                    return Box::pin(self.duplicate(series, key, reply))
                        .await
                        .map(Step::Skip);
                }
                Claim::Busy { retry_after } => {
                    let wait = busy.get_or_insert_with(|| self.busy_wait());
                    Box::pin(self.wait_busy(series, key, retry_after, wait)).await?;
                }
            }
        }
    }

    /// Acknowledges a duplicate: counts it and answers with its stored
    /// outputs, which the worker emits again.
    pub(crate) async fn duplicate(
        &self,
        series: &Series<'_>,
        key: &str,
        stored: Option<Bytes>,
    ) -> Result<Response, HandlerError> {
        series.duplicate();
        tracing::debug!(dedup_key = %key, "duplicate delivery; the handler does not run");
        let outputs = match stored {
            Some(bytes) => reply::decode(&bytes).map_err(store_failure)?,
            None => Vec::new(),
        };
        Ok(Response::from(outputs).with_outcome(Outcome::Duplicate))
    }

    /// The key is busy: waits before the next claim while the busy wait
    /// lasts, or fails with a transient error.
    pub(crate) async fn wait_busy(
        &self,
        series: &Series<'_>,
        key: &str,
        retry_after: Duration,
        wait: &mut BusyWait,
    ) -> Result<(), HandlerError> {
        let BusyWait { deadline, pause } = wait;
        if Instant::now() + *pause > *deadline {
            series.busy();
            let retry_after = retry_after.max(BUSY_POLL_MIN);
            return Err(HandlerError::with_class(
                ErrorClass::Transient {
                    retry_after: Some(retry_after),
                },
                Busy {
                    key: key.to_owned(),
                    retry_after,
                },
            ));
        }
        tokio::time::sleep((*pause).min(retry_after.max(BUSY_POLL_MIN))).await;
        *pause = (*pause * 2).min(BUSY_POLL_MAX);
        Ok(())
    }

    /// A busy wait that starts now.
    pub(crate) fn busy_wait(&self) -> BusyWait {
        BusyWait {
            deadline: deadline_after(self.policy.busy_wait_for()),
            pause: BUSY_POLL_MIN,
        }
    }

    /// Counts a takeover of an expired lease.
    pub(crate) fn took_over(&self, series: &Series<'_>, key: &str, lease: &Lease) {
        if lease.took_over {
            series.lease_takeover();
            tracing::warn!(
                dedup_key = %key,
                "took over an expired lease: the previous holder died or stalled"
            );
        }
    }

    /// Finishes a message whose transaction committed with its mark:
    /// counts it and answers with its outputs.
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub(crate) fn committed(
        &self,
        series: &Series<'_>,
        outputs: Vec<surety_core::consumer::Output>,
    ) -> Response {
        series.processed();
        Response::from(outputs)
    }

    /// Runs `handler` while renewing the lease, if the policy says so.
    ///
    /// A handler that finishes on its first poll (no I/O) gets no timer at
    /// all; one that waits is raced against one boxed renewal future that
    /// sleeps a renewal period, extends, and sleeps again (no task, no
    /// `Interval`).
    pub(crate) async fn hold<F: Future>(
        &self,
        series: &Series<'_>,
        key: &str,
        lease: &Lease,
        handler: F,
    ) -> F::Output {
        let Some(every) = self.policy.renew_every() else {
            return handler.await;
        };
        let mut handler = pin!(handler);
        if let Poll::Ready(out) = futures::poll!(handler.as_mut()) {
            return out;
        }
        // Boxed: only handlers that wait pay for the renewal's state.
        let mut renew = Box::pin(self.renew(series, key, &lease.token, every));
        let mut renewing = true;
        loop {
            tokio::select! {
                out = &mut handler => return out,
                () = &mut renew, if renewing => renewing = false,
            }
        }
    }

    /// Extends the lease every `every`, until it is lost.
    pub(crate) async fn renew(
        &self,
        series: &Series<'_>,
        key: &str,
        token: &LeaseToken,
        every: Duration,
    ) {
        loop {
            tokio::time::sleep(every).await;
            let extended = series
                .timed(
                    Op::Extend,
                    self.store.immediate().is_none(),
                    self.store.extend(key, token, self.policy.lease()),
                )
                .await;
            match extended {
                Ok(()) => {}
                Err(err) if err.is_lease_lost() => {
                    tracing::warn!(
                        dedup_key = %key,
                        "lost the lease while the handler runs; it will not be marked done"
                    );
                    return;
                }
                Err(err) => {
                    tracing::warn!(dedup_key = %key, error = %err, "renewing the lease failed")
                }
            }
        }
    }

    /// Completes or releases the claim from the handler's result (storing
    /// its outputs with the key), and counts. `completed` is the answer to a first
    /// `complete` made already ([`Immediate::complete_now`](crate::store::Immediate::complete_now)), if there was
    /// one.
    pub(crate) async fn finish(
        &self,
        series: &Series<'_>,
        key: &str,
        lease: &Lease,
        result: Result<Response, HandlerError>,
        completed: Option<Result<(), StoreError>>,
    ) -> Result<Response, HandlerError> {
        let finished = match result {
            Ok(finished) => finished,
            Err(err) => {
                Box::pin(self.release(series, key, lease)).await;
                return Err(err);
            }
        };
        if !matches!(finished.outcome, Outcome::Handled | Outcome::Duplicate) {
            // Scheduled for a retry or dead-lettered by an inner layer: the
            // message was not handled, and a later delivery (a retry, a
            // replay from the dead-letter queue) must run it.
            Box::pin(self.release(series, key, lease)).await;
            return Ok(finished);
        }
        let stored = reply::encode(&finished.outputs).map_err(store_failure)?;
        self.complete(series, key, lease, stored.as_deref(), completed)
            .await?;
        series.processed();
        Ok(finished)
    }

    async fn complete(
        &self,
        series: &Series<'_>,
        key: &str,
        lease: &Lease,
        reply: Option<&[u8]>,
        mut first: Option<Result<(), StoreError>>,
    ) -> Result<(), HandlerError> {
        let mut attempt = 1;
        loop {
            let completed = match first.take() {
                Some(completed) => completed,
                None => {
                    series
                        .timed(
                            Op::Complete,
                            self.store.immediate().is_none(),
                            self.store.complete(key, &lease.token, reply),
                        )
                        .await
                }
            };
            match completed {
                Ok(()) => return Ok(()),
                Err(err) if err.is_lease_lost() || attempt >= COMPLETE_ATTEMPTS => {
                    tracing::error!(
                        dedup_key = %key,
                        error = %err,
                        "the handler ran but its message could not be marked done; a redelivery may run it again"
                    );
                    return Err(store_failure(err));
                }
                Err(err) => {
                    tracing::warn!(dedup_key = %key, error = %err, attempt, "marking a message done failed; retrying");
                    Box::pin(tokio::time::sleep(Duration::from_millis(20) * attempt)).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn release(&self, series: &Series<'_>, key: &str, lease: &Lease) {
        let released = series
            .timed(
                Op::Release,
                self.store.immediate().is_none(),
                self.store.release(key, &lease.token),
            )
            .await;
        if let Err(err) = released {
            // The lease expires on its own; the next delivery waits for it.
            tracing::warn!(dedup_key = %key, error = %err, "releasing a claim failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use surety_core::consumer::{Incoming, handler_fn};
    use surety_core::{DeliveryInfo, Envelope};
    use tower::{Layer, ServiceExt};

    use super::*;
    use crate::{IdempotencyLayer, MemoryDedupStore};

    /// A busy wait of `Duration::MAX` waits for the holder's lease to run
    /// out, takes the key over and runs the handler.
    #[tokio::test(start_paused = true)]
    async fn a_busy_wait_of_duration_max_waits_instead_of_panicking() {
        let store = MemoryDedupStore::new();
        let env = Envelope::builder("/orders", "payment.requested").build();
        let lease = Duration::from_secs(1);
        // Another delivery of the same message holds the key, then dies.
        let held = store.claim(&env.dedup_key(), lease).await.unwrap();
        assert!(matches!(held, Claim::Acquired(_)));

        let runs = Arc::new(AtomicU32::new(0));
        let counter = Arc::clone(&runs);
        let handler = handler_fn(move |_msg: Incoming| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, std::convert::Infallible>(()) }
        });
        let service = IdempotencyLayer::new(store)
            .policy(LeasePolicy::new(lease).busy_wait(Duration::MAX))
            .layer(handler);
        let info = DeliveryInfo::new("memory", "payments", "billing");
        service.oneshot(Incoming::new(env, info)).await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
