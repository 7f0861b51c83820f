//! The transport ports: [`Publisher`], [`Subscriber`], [`Close`] and the
//! [`Delivery`] a subscriber yields.
//!
//! Broker adapters (`surety-rabbitmq`, `surety-kafka`) and the in-memory
//! transport implement these; pattern crates (outbox, DLQ, saga, ...) are
//! written against them and never see a broker client.
//!
//! # Addressing
//!
//! A message is published to a *topic* (a Kafka topic, an AMQP routing key on
//! the adapter's exchange, an in-memory topic). Consumers subscribe to a topic
//! as a member of a *group*: every group receives every message, and the
//! members of one group compete for them (a Kafka consumer group, an AMQP
//! queue bound to the topic).
//!
//! # Ordering
//!
//! Messages with the same [`partition_key`](crate::Envelope::partition_key)
//! published by one publisher are delivered to a group in publish order.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::envelope::Envelope;
use crate::error::Result;

/// Where a published message was stored, as far as the broker tells.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Receipt {
    /// The topic the message was published to.
    pub topic: String,
    /// The partition, on brokers that have them.
    pub partition: Option<i32>,
    /// The offset or sequence number, on brokers that report one.
    pub offset: Option<i64>,
}

impl Receipt {
    /// A receipt for `topic` with no position.
    pub fn new(topic: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
            partition: None,
            offset: None,
        }
    }

    /// Sets the partition and offset.
    pub fn at(mut self, partition: Option<i32>, offset: Option<i64>) -> Self {
        self.partition = partition;
        self.offset = offset;
        self
    }
}

/// A publish that the transport has sent and that the broker has not yet
/// confirmed. Await it for the [`Receipt`] or the error.
///
/// Returned by [`Publisher::send`]; holding many of these at once is how a
/// publisher keeps a window of messages in flight.
#[must_use = "a publish is only safe once its confirmation resolved Ok"]
pub struct Confirmation {
    inner: BoxFuture<'static, Result<Receipt>>,
}

impl Confirmation {
    /// Wraps a future that resolves when the broker confirmed.
    pub fn new(fut: impl Future<Output = Result<Receipt>> + Send + 'static) -> Self {
        Self {
            inner: Box::pin(fut),
        }
    }

    /// An already confirmed publish.
    pub fn ready(result: Result<Receipt>) -> Self {
        Self::new(std::future::ready(result))
    }
}

impl Future for Confirmation {
    type Output = Result<Receipt>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for Confirmation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Confirmation").finish_non_exhaustive()
    }
}

/// Publishes envelopes to topics.
///
/// [`publish`](Self::publish) returns once the broker confirmed the message
/// (stored it durably, as far as the broker promises), or with a typed
/// error; an `Ok` is a promise that the message will be delivered.
/// [`send`](Self::send) splits that in two so many publishes can be in
/// flight: it resolves when the message has been handed to the connection in
/// call order, and yields a [`Confirmation`].
///
/// ```
/// use surety_core::{Envelope, Publisher, memory::MemoryTransport};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> surety_core::Result<()> {
/// let transport = MemoryTransport::new();
/// let env = Envelope::builder("/orders", "order.placed").payload("{}").build();
/// let receipt = transport.publish("orders", env).await?;
/// assert_eq!(receipt.topic, "orders");
///
/// // A window of publishes in flight, confirmed together.
/// let mut pending = Vec::new();
/// for _ in 0..10 {
///     let env = Envelope::builder("/orders", "order.placed").build();
///     pending.push(transport.send("orders", env).await?);
/// }
/// for confirmation in pending {
///     confirmation.await?;
/// }
/// # Ok(()) }
/// ```
pub trait Publisher: Send + Sync {
    /// Hands `envelope` to the transport and returns its pending
    /// confirmation. Messages are sent in the order `send` is called.
    fn send(
        &self,
        topic: &str,
        envelope: Envelope,
    ) -> impl Future<Output = Result<Confirmation>> + Send;

    /// Publishes `envelope` and waits for the broker's confirmation.
    fn publish(
        &self,
        topic: &str,
        envelope: Envelope,
    ) -> impl Future<Output = Result<Receipt>> + Send {
        async move { self.send(topic, envelope).await?.await }
    }
}

/// Closes a publisher, subscriber or transport.
///
/// Closing is idempotent. After close, publishing fails with
/// [`TransportErrorKind::Closed`](crate::TransportErrorKind::Closed) and
/// subscriptions end; unacknowledged deliveries are returned to the broker.
pub trait Close: Send + Sync {
    /// Closes, waiting for the transport's own clean-up.
    fn close(&self) -> impl Future<Output = Result<()>> + Send;
}

/// A stream of deliveries from one subscription.
pub type DeliveryStream = BoxStream<'static, Result<Delivery>>;

/// Subscribes to topics as a member of a consumer group.
///
/// The stream ends when the subscriber is closed. Dropping the stream leaves
/// the group; its unacknowledged deliveries go back to the other members.
///
/// ```
/// use futures::StreamExt;
/// use surety_core::{Envelope, Publisher, Subscriber, memory::MemoryTransport};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> surety_core::Result<()> {
/// let transport = MemoryTransport::new();
/// let mut deliveries = transport.subscribe("orders", "billing").await?;
/// transport.publish("orders", Envelope::builder("/orders", "order.placed").build()).await?;
///
/// let delivery = deliveries.next().await.expect("one delivery")?;
/// assert_eq!(delivery.envelope().event_type, "order.placed");
/// delivery.ack().await?;
/// # Ok(()) }
/// ```
pub trait Subscriber: Send + Sync {
    /// Joins `group` on `topic`, creating what the broker needs (a queue, a
    /// group) when it does not exist.
    fn subscribe(
        &self,
        topic: &str,
        group: &str,
    ) -> impl Future<Output = Result<DeliveryStream>> + Send;
}

/// Settles a delivery with the broker. Implemented by transports; users call
/// the methods on [`Delivery`].
///
/// A settler that is dropped without being called must leave the message to
/// be redelivered (as if nacked with requeue). When is up to the broker: the
/// in-memory transport redelivers at once; a broker may wait until the
/// channel or consumer closes (declared as `redelivers_dropped` in the
/// testkit conformance suite's capabilities).
#[async_trait::async_trait]
pub trait Settle: Send + Sync + fmt::Debug {
    /// The message was handled: remove it.
    async fn ack(self: Box<Self>) -> Result<()>;
    /// The message was not handled. With `requeue` it is delivered again;
    /// without, the broker drops or dead-letters it.
    async fn nack(self: Box<Self>, requeue: bool) -> Result<()>;
    /// The message must never be delivered again: the broker drops it or
    /// routes it to its dead-letter destination.
    async fn reject(self: Box<Self>) -> Result<()>;
}

/// Where a delivery came from and how often it was delivered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct DeliveryInfo {
    /// The transport, as an OpenTelemetry `messaging.system` value
    /// (`rabbitmq`, `kafka`, `memory`).
    pub system: &'static str,
    /// The topic (or queue) the message was consumed from.
    pub topic: String,
    /// The consumer group (or queue) that received it.
    pub group: String,
    /// The partition, on brokers that have them.
    pub partition: Option<i32>,
    /// The offset, on brokers that have them.
    pub offset: Option<i64>,
    /// Whether the broker says it delivered this message before.
    pub redelivered: bool,
    /// How many times this message was delivered, counting this one, when
    /// the transport tracks it: the broker's count (a quorum queue, the
    /// in-memory transport), the adapter's own (a classic RabbitMQ queue) or
    /// the consumer's (Kafka redeliveries within one member of the group).
    pub delivery_count: Option<u32>,
    /// When the broker stored the message (Kafka's record timestamp, the
    /// in-memory transports' publish time), when the broker gives one.
    pub timestamp: Option<chrono::DateTime<chrono::Utc>>,
}

impl DeliveryInfo {
    /// Info for a delivery from `system`, `topic` and `group`.
    pub fn new(system: &'static str, topic: impl Into<String>, group: impl Into<String>) -> Self {
        Self {
            system,
            topic: topic.into(),
            group: group.into(),
            ..Self::default()
        }
    }
}

/// A message received from a [`Subscriber`], to be settled exactly once with
/// [`ack`](Self::ack), [`nack`](Self::nack) or [`reject`](Self::reject).
///
/// Dropping a delivery without settling it returns it to the broker for
/// redelivery (at once on the in-memory transport; on some brokers only when
/// the channel or consumer closes).
#[derive(Debug)]
pub struct Delivery {
    envelope: Envelope,
    info: DeliveryInfo,
    settle: Box<dyn Settle>,
}

impl Delivery {
    /// A delivery of `envelope` settled through `settle`.
    pub fn new(envelope: Envelope, info: DeliveryInfo, settle: Box<dyn Settle>) -> Self {
        Self {
            envelope,
            info,
            settle,
        }
    }

    /// The message.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Where it came from.
    pub fn info(&self) -> &DeliveryInfo {
        &self.info
    }

    /// The attempt this delivery represents, counting from 1: the higher of
    /// the `surety-attempt` header (written by a retry layer that republished
    /// the message) and the transport's delivery count (or, without one, 2
    /// for a redelivery and 1 for a first delivery).
    ///
    /// Taking the higher of the two means a header set by a producer cannot
    /// keep the attempt low while the transport redelivers the message: the
    /// count grows on every redelivery whatever the header says. A header
    /// that is too high only makes the message reach the bound sooner.
    pub fn attempt(&self) -> u32 {
        crate::transport::attempt_of(&self.envelope, &self.info)
    }

    /// Splits into the envelope, the info and the settler, so that the
    /// envelope can move into a handler while the settler waits.
    pub fn into_parts(self) -> (Envelope, DeliveryInfo, Box<dyn Settle>) {
        (self.envelope, self.info, self.settle)
    }

    /// Acknowledges: the message was handled.
    pub async fn ack(self) -> Result<()> {
        self.settle.ack().await
    }

    /// Negatively acknowledges; with `requeue` the message is delivered again.
    pub async fn nack(self, requeue: bool) -> Result<()> {
        self.settle.nack(requeue).await
    }

    /// Rejects: the message is not delivered again.
    pub async fn reject(self) -> Result<()> {
        self.settle.reject().await
    }
}

impl<P: Publisher + ?Sized> Publisher for std::sync::Arc<P> {
    fn send(
        &self,
        topic: &str,
        envelope: Envelope,
    ) -> impl Future<Output = Result<Confirmation>> + Send {
        (**self).send(topic, envelope)
    }
}

impl<S: Subscriber + ?Sized> Subscriber for std::sync::Arc<S> {
    fn subscribe(
        &self,
        topic: &str,
        group: &str,
    ) -> impl Future<Output = Result<DeliveryStream>> + Send {
        (**self).subscribe(topic, group)
    }
}

impl<C: Close + ?Sized> Close for std::sync::Arc<C> {
    fn close(&self) -> impl Future<Output = Result<()>> + Send {
        (**self).close()
    }
}

/// The object-safe form of [`Publisher`] + [`Close`], behind [`BoxPublisher`].
trait ErasedPublisher: Send + Sync {
    fn send_boxed<'a>(
        &'a self,
        topic: &'a str,
        envelope: Envelope,
    ) -> BoxFuture<'a, Result<Confirmation>>;
    fn publish_boxed<'a>(
        &'a self,
        topic: &'a str,
        envelope: Envelope,
    ) -> BoxFuture<'a, Result<Receipt>>;
    fn close_boxed(&self) -> BoxFuture<'_, Result<()>>;
}

impl<P: Publisher + Close> ErasedPublisher for P {
    fn send_boxed<'a>(
        &'a self,
        topic: &'a str,
        envelope: Envelope,
    ) -> BoxFuture<'a, Result<Confirmation>> {
        Box::pin(self.send(topic, envelope))
    }

    // A publisher's own `publish` (it may do more than send and wait) is
    // kept behind the box.
    fn publish_boxed<'a>(
        &'a self,
        topic: &'a str,
        envelope: Envelope,
    ) -> BoxFuture<'a, Result<Receipt>> {
        Box::pin(self.publish(topic, envelope))
    }

    fn close_boxed(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.close())
    }
}

/// A type-erased, cheaply cloned publisher, for choosing a transport at run
/// time (in-memory by default, a broker when configured).
///
/// ```
/// use surety_core::{BoxPublisher, Envelope, Publisher, memory::MemoryTransport};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> surety_core::Result<()> {
/// let publisher = BoxPublisher::new(MemoryTransport::new());
/// publisher.publish("orders", Envelope::builder("/shop", "order.placed").build()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct BoxPublisher {
    inner: std::sync::Arc<dyn ErasedPublisher>,
}

impl BoxPublisher {
    /// Erases the type of `publisher`.
    pub fn new(publisher: impl Publisher + Close + 'static) -> Self {
        Self {
            inner: std::sync::Arc::new(publisher),
        }
    }

    /// Erases the type of a publisher this box does not own: closing the
    /// box does nothing, the publisher's owner closes it. For layers and
    /// tools that publish through a transport the application holds.
    pub fn borrowed(publisher: impl Publisher + 'static) -> Self {
        Self::new(Unclosed(publisher))
    }
}

/// A publisher whose [`Close`] is left to its owner.
struct Unclosed<P>(P);

impl<P: Publisher> Publisher for Unclosed<P> {
    fn send(
        &self,
        topic: &str,
        envelope: Envelope,
    ) -> impl Future<Output = Result<Confirmation>> + Send {
        self.0.send(topic, envelope)
    }

    fn publish(
        &self,
        topic: &str,
        envelope: Envelope,
    ) -> impl Future<Output = Result<Receipt>> + Send {
        self.0.publish(topic, envelope)
    }
}

impl<P: Send + Sync> Close for Unclosed<P> {
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

impl fmt::Debug for BoxPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxPublisher").finish_non_exhaustive()
    }
}

impl Publisher for BoxPublisher {
    async fn send(&self, topic: &str, envelope: Envelope) -> Result<Confirmation> {
        self.inner.send_boxed(topic, envelope).await
    }

    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<Receipt> {
        self.inner.publish_boxed(topic, envelope).await
    }
}

impl Close for BoxPublisher {
    fn close(&self) -> impl Future<Output = Result<()>> + Send {
        self.inner.close_boxed()
    }
}

/// The object-safe form of [`Subscriber`] + [`Close`], behind [`BoxSubscriber`].
trait ErasedSubscriber: Send + Sync {
    fn subscribe_boxed<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<DeliveryStream>>;
    fn close_boxed(&self) -> BoxFuture<'_, Result<()>>;
}

impl<S: Subscriber + Close> ErasedSubscriber for S {
    fn subscribe_boxed<'a>(
        &'a self,
        topic: &'a str,
        group: &'a str,
    ) -> BoxFuture<'a, Result<DeliveryStream>> {
        Box::pin(self.subscribe(topic, group))
    }

    fn close_boxed(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.close())
    }
}

/// A type-erased, cheaply cloned subscriber; see [`BoxPublisher`].
#[derive(Clone)]
pub struct BoxSubscriber {
    inner: std::sync::Arc<dyn ErasedSubscriber>,
}

impl BoxSubscriber {
    /// Erases the type of `subscriber`.
    pub fn new(subscriber: impl Subscriber + Close + 'static) -> Self {
        Self {
            inner: std::sync::Arc::new(subscriber),
        }
    }
}

impl fmt::Debug for BoxSubscriber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoxSubscriber").finish_non_exhaustive()
    }
}

impl Subscriber for BoxSubscriber {
    async fn subscribe(&self, topic: &str, group: &str) -> Result<DeliveryStream> {
        self.inner.subscribe_boxed(topic, group).await
    }
}

impl Close for BoxSubscriber {
    fn close(&self) -> impl Future<Output = Result<()>> + Send {
        self.inner.close_boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::memory::MemoryTransport;

    /// Counts what goes through its own `publish`.
    #[derive(Clone)]
    struct Counting {
        inner: MemoryTransport,
        published: Arc<AtomicUsize>,
    }

    impl Publisher for Counting {
        async fn send(&self, topic: &str, envelope: Envelope) -> Result<Confirmation> {
            self.inner.send(topic, envelope).await
        }

        async fn publish(&self, topic: &str, envelope: Envelope) -> Result<Receipt> {
            let receipt = self.inner.publish(topic, envelope).await?;
            self.published.fetch_add(1, Ordering::SeqCst);
            Ok(receipt)
        }
    }

    impl Close for Counting {
        async fn close(&self) -> Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_boxed_publisher_keeps_its_own_publish() {
        let counting = Counting {
            inner: MemoryTransport::new(),
            published: Arc::default(),
        };
        for boxed in [
            BoxPublisher::new(counting.clone()),
            BoxPublisher::borrowed(counting.clone()),
        ] {
            boxed
                .publish("orders", Envelope::builder("/t", "t").build())
                .await
                .expect("published");
        }
        assert_eq!(counting.published.load(Ordering::SeqCst), 2);
    }
}
