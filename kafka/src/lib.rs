//! Kafka adapter for Surety: an idempotent producer with delivery
//! confirmations and an at-least-once consumer whose offsets never pass a
//! message that has not been settled.
//!
//! # Overview
//!
//! [`KafkaTransport`] implements surety-core's ports on
//! [rdkafka](https://docs.rs/rdkafka) (librdkafka):
//!
//! - [`Publisher`](surety_core::Publisher): one idempotent producer
//!   (`enable.idempotence=true`, `acks=all`). An envelope becomes a record
//!   in CloudEvents binary mode: the partition key is the record key (no key
//!   without one), the `ce_*` attributes and the envelope's headers are
//!   record headers, the payload is the value. A confirmation resolves with
//!   the partition and offset once the broker acknowledged the write.
//! - [`Subscriber`](surety_core::Subscriber): one consumer per
//!   subscription, in the subscription's consumer group, starting from the
//!   earliest offset when the group has none.
//! - [`LogSubscriber`](surety_core::log::LogSubscriber): positioned
//!   subscriptions whose positions the caller keeps (nothing is committed);
//!   the group assigns partitions, the caller seeks on `Assigned` and
//!   flushes on `Revoked`, records carry Kafka's timestamp, `CaughtUp` comes
//!   at the end of a partition. A fetch that lands past the offset sought
//!   (tansu 0.6 returns the next record batch) is repaired by seeking back
//!   and skipping. See ADR 0011.
//! - [`Close`](surety_core::Close): commits what settlements allowed,
//!   leaves the groups, flushes the producer.
//!
//! [`KafkaMetrics`] adds consumer lag, committed offsets and high
//! watermarks per partition (from librdkafka's statistics) and counts of
//! sent, received and settled messages.
//!
//! # Delivery guarantees
//!
//! - **Offsets move only past final outcomes.** The consumer stores an
//!   offset for the next commit only once every message before it was acked
//!   or rejected, whatever order the settlements arrive in (librdkafka's
//!   `enable.auto.offset.store` is off; auto-commit commits only stored
//!   offsets). A crash loses no message: every message after the last
//!   committed offset is delivered again, including messages that were
//!   acked after an unsettled one.
//! - **Nack and drop redeliver by seeking.** `nack(requeue = true)`, and a
//!   delivery dropped without being settled, seek the partition back to
//!   the message. The consumer then delivers that message again and skips
//!   the messages after it that it already delivered (settled or still being
//!   handled). [`DeliveryInfo::delivery_count`](surety_core::DeliveryInfo)
//!   counts the deliveries made by this consumer since it was assigned the
//!   partition: `None` on a first delivery (Kafka does not count deliveries;
//!   a member that crashed may have seen it), `Some(2)`, `Some(3)`, ... on
//!   redeliveries. After a rebalance or a restart the count starts over;
//!   `surety-dlq`'s attempt header is the durable count.
//! - **A redelivery that cannot be fetched stalls the partition.** If the
//!   fetcher goes past a message to be redelivered (the seek did not take,
//!   or retention deleted the message), the consumer seeks again; after
//!   three such misses it counts a stall
//!   ([`consumer_stalls`](KafkaMetrics::consumer_stalls)), logs an error and
//!   yields an [`Other`](surety_core::TransportErrorKind::Other) error on
//!   the stream, and keeps seeking. The stored offset never moves past the
//!   message: later messages are still delivered, but the committed offset
//!   stays below it until it is delivered and settled for good.
//! - **Reject is final.** `reject` (and `nack(requeue = false)`) lets the
//!   offset move past the message: Kafka has no dead-letter queue, so a
//!   message that must be kept has to be written somewhere first, which is
//!   what `surety-dlq`'s dead-letter layer does before the worker rejects.
//! - **Rebalances.** Before partitions are revoked the consumer stores what
//!   settlements allowed; librdkafka commits it for the revoked partitions.
//!   A settlement that arrives after its partition was revoked fails with
//!   [`Ack`](surety_core::TransportErrorKind::Ack): the partition's new
//!   owner delivers the message again. Buffered deliveries of a revoked
//!   partition are not handed out.
//! - **Ordering.** Per partition, so per partition key. A nacked message is
//!   redelivered after later messages of its partition were handled; a
//!   worker running several deliveries at once handles a partition's
//!   messages concurrently.
//! - **Backpressure.** Each subscription buffers up to
//!   [`consumer_buffer`](KafkaConfig::consumer_buffer) deliveries; while it
//!   is full the consumer takes nothing more and librdkafka stops fetching
//!   once its own queue is full. An application that takes nothing for
//!   [`pause_after`](KafkaConfig::pause_after) gets its partitions paused,
//!   and the consumer polls on so that it stays in the group; it resumes
//!   when half the buffer is free. A full producer queue makes
//!   [`send`](surety_core::Publisher::send) wait, up to the delivery
//!   timeout.
//! - **Dropping a stream** leaves the group once the deliveries already
//!   handed out are settled (or after
//!   [`drain_timeout`](KafkaConfig::drain_timeout)), so a worker's graceful
//!   shutdown acks without redeliveries.
//!
//! Messages without a readable envelope (a foreign producer, missing `ce_*`
//! headers, headers that are not UTF-8) are delivered as
//! [undecodable](surety_core::Envelope::undecodable) envelopes with id
//! `topic/partition/offset`, never dropped: the pipeline classifies them as
//! poison.
//!
//! # Topics
//!
//! Publishing to or subscribing to a topic that does not exist fails fast
//! with a [`Config`](surety_core::TransportErrorKind::Config) error naming
//! it, unless [`create_missing_topics`](KafkaConfig::create_missing_topics)
//! is set, in which case the adapter creates it through the admin API.
//!
//! # Example
//!
//! ```no_run
//! use surety_core::consumer::{handler_fn, Incoming, Worker};
//! use surety_core::{Close, Envelope, Instrumented, Publisher, Subscriber};
//! use surety_core::metrics::Metrics;
//! use surety_kafka::{KafkaConfig, KafkaMetrics, KafkaTransport};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut registry = prometheus_client::registry::Registry::default();
//! let config = KafkaConfig::new("127.0.0.1:9092")
//!     .client_id("checkout")
//!     .metrics(KafkaMetrics::register(&mut registry));
//! let kafka = KafkaTransport::connect(config).await?;
//!
//! // Traced, counted publishes.
//! let publisher = Instrumented::new(kafka.clone(), surety_kafka::SYSTEM, Metrics::register(&mut registry));
//! publisher
//!     .publish("orders", Envelope::builder("/shop", "order.placed").partition_key("o-1").build())
//!     .await?;
//!
//! // A worker acks what the handler finished and redelivers transient failures.
//! let deliveries = kafka.subscribe("orders", "fulfilment").await?;
//! let handler = handler_fn(|msg: Incoming| async move {
//!     println!("{} at offset {:?}", msg.envelope.id, msg.info.offset);
//!     Ok::<_, std::convert::Infallible>(())
//! });
//! let report = Worker::new(handler)
//!     .run(deliveries, async { tokio::signal::ctrl_c().await.ok(); })
//!     .await;
//! println!("acked {}", report.acked);
//! kafka.close().await?;
//! # Ok(()) }
//! ```
//!
//! # Feature flags
//!
//! surety-kafka has no optional features. It builds librdkafka from source
//! (rdkafka's default `libz` feature), which needs a C compiler and `make`.
#![doc(test(attr(deny(warnings), allow(dead_code))))]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod consumer;
mod context;
mod error;
mod log;
mod metrics;
mod poller;
mod tracker;
mod transport;

pub use config::{KafkaConfig, MANAGED_PROPERTIES};
pub use metrics::KafkaMetrics;
pub use transport::KafkaTransport;

/// The `messaging.system` name of this transport, as in
/// [`DeliveryInfo::system`](surety_core::DeliveryInfo::system).
pub const SYSTEM: &str = "kafka";

/// Re-exported so that users name the same rdkafka version.
pub use rdkafka;

#[cfg(test)]
mod tests {
    #[test]
    fn public_types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<crate::KafkaTransport>();
        check::<crate::KafkaConfig>();
        check::<crate::KafkaMetrics>();
    }
}
