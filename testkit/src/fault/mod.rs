//! Fault injection: [`FaultyTransport`] wraps any transport and injects the
//! failures a real deployment sees, seeded and reproducible.
//!
//! | fault | side | effect |
//! |---|---|---|
//! | [drop](FaultPlan::drop) | consume | the delivery never reaches the consumer and is left unsettled, so the wrapped transport delivers it again (a consumer that crashed before handling it) |
//! | [duplicate](FaultPlan::duplicate) | publish | the message is published twice |
//! | [reorder](FaultPlan::reorder) | consume | the delivery is held back and yielded after the next one |
//! | [delay](FaultPlan::delay_publish) | both | the publish or the delivery waits, up to a maximum |
//! | [fail publish](FaultPlan::fail_publish) | publish | `send` fails with [`TransportErrorKind::Connection`] and nothing is published |
//! | [fail ack](FaultPlan::fail_ack) | consume | `ack` fails with [`TransportErrorKind::Ack`] and the message is left unsettled, so it comes back |
//!
//! Drops and failed acks rely on the wrapped transport redelivering a
//! delivery whose settler was dropped, as the [`Settle`](surety_core::Settle)
//! contract asks. The in-memory transport does so at once; RabbitMQ only
//! when the channel closes.
//!
//! # Reproducibility
//!
//! One `StdRng` seeded from [`FaultPlan::seed`] makes every decision, behind
//! one lock, in the order the transport is called: publish-side decisions
//! when [`send`](surety_core::Publisher::send) is called, consume-side
//! decisions when a delivery arrives from the wrapped stream (a failed ack
//! is decided then too, not when `ack` is called). The same seed and the
//! same sequence of calls give the same faults; concurrent publishers or
//! several subscriptions interleave their calls as the scheduler runs them.
//! `StdRng`'s algorithm is fixed for the pinned `rand` version, not across
//! `rand` releases.

mod plan;
mod settle;
mod shared;
mod stats;
mod stream;

use std::fmt;
use std::sync::Arc;

use surety_core::{
    Close, Confirmation, DeliveryStream, Envelope, Publisher, Result, Subscriber, TransportError,
    TransportErrorKind,
};

pub use plan::FaultPlan;
pub use stats::{EVENT_LOG_LIMIT, Fault, FaultEvent, FaultStats};

use shared::Shared;

/// A transport that injects faults into another one.
///
/// It implements [`Publisher`], [`Subscriber`] and [`Close`] whenever the
/// wrapped transport does, so it drops in wherever the transport was used:
/// under a [`Worker`](surety_core::consumer::Worker), an outbox relay or a
/// saga. [`stats`](Self::stats) and [`events`](Self::events) tell what was
/// injected. Clones share the random number generator and the counters.
///
/// ```
/// use futures::StreamExt;
/// use surety_core::{Envelope, Publisher, Subscriber, memory::MemoryTransport};
/// use surety_testkit::fault::{FaultPlan, FaultyTransport};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> surety_core::Result<()> {
/// // Every message is published twice.
/// let transport = FaultyTransport::new(MemoryTransport::new(), FaultPlan::new(7).duplicate(1.0));
/// let mut deliveries = transport.subscribe("orders", "billing").await?;
/// let env = Envelope::builder("/orders", "order.placed").build();
/// let id = env.id.clone();
/// transport.publish("orders", env).await?;
///
/// for _ in 0..2 {
///     let delivery = deliveries.next().await.expect("delivered")?;
///     assert_eq!(delivery.envelope().id, id);
///     delivery.ack().await?;
/// }
/// assert_eq!(transport.stats().duplicated, 1);
/// # Ok(()) }
/// ```
///
/// Running your own handlers under faults: give the faulty subscription to a
/// [`Worker`](surety_core::consumer::Worker).
///
/// ```
/// use std::time::Duration;
/// use surety_core::consumer::{handler_fn, Incoming, Worker};
/// use surety_core::{Envelope, Publisher, Subscriber, memory::MemoryTransport};
/// use surety_testkit::fault::{FaultPlan, FaultyTransport};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let plan = FaultPlan::new(3).drop(0.3).fail_ack(0.3).max_forced_redeliveries(2);
/// let transport = FaultyTransport::new(MemoryTransport::new(), plan);
/// let deliveries = transport.subscribe("orders", "audit").await?;
///
/// let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
/// let handler = handler_fn(move |msg: Incoming| {
///     let seen_tx = seen_tx.clone();
///     async move {
///         seen_tx.send(msg.envelope.id).ok();
///         Ok::<_, std::convert::Infallible>(())
///     }
/// });
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let worker = tokio::spawn(Worker::new(handler).run(deliveries, async { stopped.await.ok(); }));
///
/// let env = Envelope::builder("/orders", "order.placed").build();
/// let id = env.id.clone();
/// transport.publish("orders", env).await?;
/// // Handled at least once, whatever was dropped or failed on the way.
/// loop {
///     let handled = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await?;
///     if handled.as_ref() == Some(&id) { break; }
/// }
/// stop.send(()).ok();
/// worker.await?;
/// # Ok(()) }
/// ```
pub struct FaultyTransport<T> {
    inner: T,
    shared: Arc<Shared>,
}

impl<T> FaultyTransport<T> {
    /// Wraps `inner`, injecting the faults of `plan`.
    pub fn new(inner: T, plan: FaultPlan) -> Self {
        Self {
            inner,
            shared: Arc::new(Shared::new(plan)),
        }
    }

    /// The wrapped transport, e.g. to look at
    /// [`MemoryTransport::depth`](surety_core::memory::MemoryTransport::depth).
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// Unwraps.
    pub fn into_inner(self) -> T {
        self.inner
    }

    /// The plan in force.
    pub fn plan(&self) -> &FaultPlan {
        &self.shared.plan
    }

    /// How many faults of each kind were injected so far.
    pub fn stats(&self) -> FaultStats {
        self.shared.stats()
    }

    /// The faults injected so far, in the order they happened (the first
    /// [`EVENT_LOG_LIMIT`] of them).
    ///
    /// ```
    /// use surety_core::{Envelope, Publisher, TransportErrorKind, memory::MemoryTransport};
    /// use surety_testkit::fault::{Fault, FaultPlan, FaultyTransport};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let transport = FaultyTransport::new(MemoryTransport::new(), FaultPlan::new(1).fail_publish(1.0));
    /// let env = Envelope::builder("/orders", "order.placed").id("o-1").build();
    /// let err = transport.publish("orders", env).await.unwrap_err();
    /// assert_eq!(err.kind(), TransportErrorKind::Connection);
    ///
    /// let events = transport.events();
    /// assert_eq!(events.len(), 1);
    /// assert_eq!(events[0].fault, Fault::PublishFailed);
    /// assert_eq!(events[0].message_id, "o-1");
    /// # }
    /// ```
    pub fn events(&self) -> Vec<FaultEvent> {
        self.shared.events()
    }
}

impl<T: Clone> Clone for FaultyTransport<T> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for FaultyTransport<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyTransport")
            .field("inner", &self.inner)
            .field("plan", &self.shared.plan)
            .field("stats", &self.shared.stats())
            .finish()
    }
}

impl<T: Publisher> Publisher for FaultyTransport<T> {
    async fn send(&self, topic: &str, envelope: Envelope) -> Result<Confirmation> {
        let plan = &self.shared.plan;
        let id = envelope.id.clone();
        if self
            .shared
            .decide(plan.fail_publish, Fault::PublishFailed, topic, &id)
        {
            return Err(TransportError::new(
                TransportErrorKind::Connection,
                format!(
                    "injected fault: publish of message {id} to {topic} failed; nothing was published"
                ),
            ));
        }
        if let Some(delay) = self.shared.delay(
            plan.delay_publish,
            plan.max_publish_delay,
            Fault::PublishDelayed,
            topic,
            &id,
        ) {
            tokio::time::sleep(delay).await;
        }
        if !self.shared.chance(plan.duplicate) {
            return self.inner.send(topic, envelope).await;
        }
        let first = self.inner.send(topic, envelope.clone()).await?;
        // The duplicate is an extra: its failure does not fail the publish.
        let second = match self.inner.send(topic, envelope).await {
            Ok(second) => {
                self.shared.record(Fault::Duplicated, topic, &id);
                Some(second)
            }
            Err(err) => {
                tracing::debug!(error = %err, topic, message_id = %id, "injected duplicate was not sent");
                None
            }
        };
        Ok(Confirmation::new(async move {
            let receipt = first.await?;
            if let Some(second) = second {
                // Confirmed or not, the original's receipt is the answer.
                let _ = second.await;
            }
            Ok(receipt)
        }))
    }
}

impl<T: Subscriber> Subscriber for FaultyTransport<T> {
    async fn subscribe(&self, topic: &str, group: &str) -> Result<DeliveryStream> {
        let inner = self.inner.subscribe(topic, group).await?;
        Ok(stream::wrap(inner, Arc::clone(&self.shared), topic, group))
    }
}

impl<T: Close> Close for FaultyTransport<T> {
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
