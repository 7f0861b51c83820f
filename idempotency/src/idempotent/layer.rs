//! [`IdempotencyLayer`]: the builder of idempotent handlers.

use std::sync::Arc;

use tower::Layer;

use super::{Guard, Idempotent};
use crate::key::{EnvelopeKey, KeyFn};
use crate::metrics::IdempotencyMetrics;
use crate::policy::LeasePolicy;
use crate::store::DedupStore;

/// A [`tower::Layer`] that makes a handler idempotent: every message's
/// effect happens once, however often the broker delivers it.
///
/// Wraps any core handler; see [`Idempotent`] for what happens per
/// delivery. For SQL stores,
/// [`inbox`](Self::inbox) builds a handler whose business write and "mark
/// processed" share one transaction.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use surety_core::consumer::{handler_fn, Incoming, Outcome};
/// use surety_core::{DeliveryInfo, Envelope};
/// use surety_core::tower::{Layer, ServiceExt};
/// use surety_idempotency::{IdempotencyLayer, MemoryDedupStore};
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
/// let handler = IdempotencyLayer::new(MemoryDedupStore::new()).layer(charge);
///
/// let env = Envelope::builder("/orders", "payment.requested").build();
/// let info = DeliveryInfo::new("memory", "payments", "billing");
/// let first = handler.clone().oneshot(Incoming::new(env.clone(), info.clone())).await?;
/// let again = handler.oneshot(Incoming::new(env, info)).await?;
/// assert_eq!((first.outcome, again.outcome), (Outcome::Handled, Outcome::Duplicate));
/// assert_eq!(charged.load(Ordering::SeqCst), 1);
/// # Ok(()) }
/// ```
///
/// Command/reply: the handler answers with a reply ([`Envelope::reply`]);
/// the layer stores the response's outputs with the key, and a duplicate of
/// the command answers with the very same outputs (same ids), which the
/// worker publishes again (see [`Worker::emit_to`]).
///
/// [`Envelope::reply`]: surety_core::Envelope::reply
/// [`Worker::emit_to`]: surety_core::consumer::Worker::emit_to
///
/// ```
/// use futures::StreamExt;
/// use serde::{Deserialize, Serialize};
/// use surety_core::consumer::{typed, Incoming, Worker};
/// use surety_core::{Envelope, Message, Publisher, Subscriber, memory::MemoryTransport};
/// use surety_core::tower::Layer;
/// use surety_idempotency::{IdempotencyLayer, MemoryDedupStore};
///
/// #[derive(Serialize, Deserialize)]
/// struct Capture { order_id: String }
/// impl Message for Capture { const TYPE: &'static str = "payment.capture"; }
/// #[derive(Serialize, Deserialize)]
/// struct Captured { order_id: String }
/// impl Message for Captured { const TYPE: &'static str = "payment.captured"; }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let transport = MemoryTransport::new();
/// let commands = transport.subscribe("payments", "payment-service").await?;
/// let mut replies = transport.subscribe("checkout.replies", "checkout").await?;
///
/// let capture = typed(|cmd: Capture, msg: Incoming| async move {
///     msg.envelope.reply("/payments", &Captured { order_id: cmd.order_id })
/// });
/// let handler = IdempotencyLayer::new(MemoryDedupStore::new()).layer(capture);
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let worker = Worker::new(handler).emit_to(transport.clone());
/// let worker = tokio::spawn(worker.run(commands, async { stopped.await.ok(); }));
///
/// // The same command, delivered twice.
/// let cmd = Envelope::message("/checkout", &Capture { order_id: "o-1".into() })?
///     .reply_to("checkout.replies")
///     .build();
/// transport.publish("payments", cmd.clone()).await?;
/// transport.publish("payments", cmd).await?;
///
/// let first = replies.next().await.expect("a reply")?;
/// let second = replies.next().await.expect("the same reply again")?;
/// assert_eq!(first.envelope(), second.envelope());
/// stop.send(()).ok();
/// let report = worker.await?;
/// assert_eq!((report.handled, report.duplicates), (1, 1));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct IdempotencyLayer<St, K = EnvelopeKey> {
    store: St,
    key: K,
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
            policy: LeasePolicy::default(),
            metrics: IdempotencyMetrics::default(),
        }
    }
}

impl<St, K> IdempotencyLayer<St, K> {
    /// Deduplicates by `key` instead of the envelope's source and id.
    pub fn key<K2: KeyFn>(self, key: K2) -> IdempotencyLayer<St, K2> {
        IdempotencyLayer {
            store: self.store,
            key,
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

    pub(crate) fn guard(&self) -> Arc<Guard<St, K>>
    where
        St: Clone,
        K: Clone,
    {
        Arc::new(Guard {
            store: self.store.clone(),
            key: self.key.clone(),
            policy: self.policy,
            metrics: self.metrics.clone(),
        })
    }
}

impl<S, St, K> Layer<S> for IdempotencyLayer<St, K>
where
    St: Clone,
    K: Clone,
{
    type Service = Idempotent<S, St, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotent {
            inner,
            guard: self.guard(),
        }
    }
}
