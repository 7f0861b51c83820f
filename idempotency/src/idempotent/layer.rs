//! [`IdempotencyLayer`]: the builder of idempotent handlers.

use std::sync::Arc;

use surety_core::Publisher;
use tower::Layer;

use super::{Guard, Idempotent};
use crate::key::{EnvelopeKey, KeyFn};
use crate::metrics::IdempotencyMetrics;
use crate::policy::LeasePolicy;
use crate::reply::NoReplies;
use crate::store::DedupStore;

/// A [`tower::Layer`] that makes a handler idempotent: every message's
/// effect happens once, however often the broker delivers it.
///
/// Wraps any core handler (a `Service<Incoming, Response = Outcome>`), or a
/// command handler whose response is a [`Reply`](crate::Reply); see
/// [`Idempotent`] for what happens per delivery. For SQL stores,
/// [`inbox`](Self::inbox) builds a handler whose business write and "mark
/// processed" share one transaction.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use surety_core::consumer::{handler_fn, Incoming, Outcome};
/// use surety_core::{DeliveryInfo, Envelope};
/// use surety_core::tower::{Layer, ServiceExt};
/// use surety_idempotency::{IdempotencyLayer, MemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let charged = Arc::new(AtomicU32::new(0));
/// let counter = Arc::clone(&charged);
/// let charge = handler_fn(move |_msg: Incoming| {
///     let counter = Arc::clone(&counter);
///     async move {
///         counter.fetch_add(1, Ordering::SeqCst);
///         Ok::<_, std::convert::Infallible>(())
///     }
/// });
/// let handler = IdempotencyLayer::new(MemoryStore::new()).layer(charge);
///
/// let env = Envelope::builder("/orders", "payment.requested").build();
/// let info = DeliveryInfo::new("memory", "payments", "billing");
/// let first = handler.clone().oneshot(Incoming::new(env.clone(), info.clone())).await?;
/// let again = handler.oneshot(Incoming::new(env, info)).await?;
/// assert_eq!((first, again), (Outcome::Handled, Outcome::Duplicate));
/// assert_eq!(charged.load(Ordering::SeqCst), 1);
/// # Ok(()) }
/// ```
///
/// Command/reply: the handler returns a [`Reply`](crate::Reply); the layer
/// stores it and publishes it through the publisher given to
/// [`replies`](Self::replies), now and for every duplicate.
///
/// ```
/// use futures::StreamExt;
/// use surety_core::consumer::{Incoming, Worker};
/// use surety_core::{Envelope, Publisher, Subscriber, memory::MemoryTransport};
/// use surety_core::tower::Layer;
/// use surety_idempotency::{reply_fn, IdempotencyLayer, MemoryStore, Reply};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let transport = MemoryTransport::new();
/// let commands = transport.subscribe("payments", "payment-service").await?;
/// let mut replies = transport.subscribe("checkout.replies", "checkout").await?;
///
/// let capture = reply_fn(|cmd: Incoming| async move {
///     let captured = cmd.envelope.caused_by("/payments", "payment.captured").build();
///     Ok::<_, std::convert::Infallible>(Reply::new("checkout.replies", captured))
/// });
/// let handler = IdempotencyLayer::new(MemoryStore::new())
///     .replies(transport.clone())
///     .layer(capture);
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let worker = tokio::spawn(Worker::new(handler).run(commands, async { stopped.await.ok(); }));
///
/// // The same command, delivered twice.
/// let cmd = Envelope::builder("/checkout", "payment.capture").build();
/// transport.publish("payments", cmd.clone()).await?;
/// transport.publish("payments", cmd).await?;
///
/// let first = replies.next().await.expect("a reply")?;
/// let second = replies.next().await.expect("the same reply again")?;
/// assert_eq!(first.envelope(), second.envelope());
/// stop.send(()).ok();
/// worker.await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct IdempotencyLayer<St, K = EnvelopeKey, P = NoReplies> {
    store: St,
    key: K,
    publisher: P,
    policy: LeasePolicy,
    metrics: IdempotencyMetrics,
}

impl<St: DedupStore> IdempotencyLayer<St> {
    /// A layer deduplicating by [`EnvelopeKey`] (source + id) in `store`,
    /// with the default [`LeasePolicy`] and no reply publisher.
    pub fn new(store: St) -> Self {
        Self {
            store,
            key: EnvelopeKey,
            publisher: NoReplies,
            policy: LeasePolicy::default(),
            metrics: IdempotencyMetrics::default(),
        }
    }
}

impl<St, K, P> IdempotencyLayer<St, K, P> {
    /// Deduplicates by `key` instead of the envelope's source and id.
    pub fn key<K2: KeyFn>(self, key: K2) -> IdempotencyLayer<St, K2, P> {
        IdempotencyLayer {
            store: self.store,
            key,
            publisher: self.publisher,
            policy: self.policy,
            metrics: self.metrics,
        }
    }

    /// Publishes the [`Reply`](crate::Reply) of command handlers through
    /// `publisher`: after the first run, and again for every duplicate.
    pub fn replies<P2: Publisher>(self, publisher: P2) -> IdempotencyLayer<St, K, P2> {
        IdempotencyLayer {
            store: self.store,
            key: self.key,
            publisher,
            policy: self.policy,
            metrics: self.metrics,
        }
    }

    /// Sets the [`LeasePolicy`].
    pub fn policy(mut self, policy: LeasePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Records into `metrics` (see [`IdempotencyMetrics::register`]).
    pub fn metrics(mut self, metrics: IdempotencyMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }

    pub(crate) fn guard(&self) -> Arc<Guard<St, K, P>>
    where
        St: Clone,
        K: Clone,
        P: Clone,
    {
        Arc::new(Guard {
            store: self.store.clone(),
            key: self.key.clone(),
            publisher: self.publisher.clone(),
            policy: self.policy,
            metrics: self.metrics.clone(),
        })
    }
}

impl<S, St, K, P> Layer<S> for IdempotencyLayer<St, K, P>
where
    St: Clone,
    K: Clone,
    P: Clone,
{
    type Service = Idempotent<S, St, K, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotent {
            inner,
            guard: self.guard(),
        }
    }
}
