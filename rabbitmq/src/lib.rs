//! RabbitMQ for Surety: core's [`Publisher`](surety_core::Publisher),
//! [`Subscriber`](surety_core::Subscriber) and [`Close`](surety_core::Close)
//! on [lapin](https://docs.rs/lapin), with publisher confirms, automatic
//! reconnects, manual acknowledgements and plugin-free delayed retries.
//!
//! # Overview
//!
//! - [`RabbitTransport::connect`] opens one AMQP connection from a
//!   [`RabbitConfig`] and declares the durable topic exchange every topic
//!   lives on (`surety` by default).
//! - **Publishing** ([`Publisher::send`](surety_core::Publisher::send)) is
//!   persistent, `mandatory` and confirmed: a publish resolves `Ok` only
//!   after the broker's ack, and fails with `Unroutable` when no queue is
//!   bound for the topic, `Nacked`, `Timeout` or `Connection` otherwise.
//!   Many publishes can be in flight ([`RabbitConfig::max_in_flight`]).
//! - **Subscribing** (`subscribe(topic, group)`) consumes the durable queue
//!   `{topic}.{group}` ([`queue_name`]) bound to the topic, with a prefetch
//!   and manual acks. Each group gets every message; the members of a group
//!   compete. [`DeliveryInfo::delivery_count`](surety_core::DeliveryInfo)
//!   comes from quorum queues' `x-delivery-count`, and on classic queues
//!   from the adapter's own count ([`X_SURETY_DELIVERIES`]), so the
//!   worker's `max_deliveries` bounds retries on every queue type.
//! - **Settling**: ack, nack (requeue) and reject map to `basic.ack`,
//!   `basic.nack` and `basic.reject`; a delivery dropped unsettled is nacked
//!   with requeue. On a classic queue a requeue is a confirmed copy with
//!   the count, published to the queue's tail, then an ack of the original
//!   (ADR 0013). Settling a delivery whose channel died fails with
//!   [`Ack`](surety_core::TransportErrorKind::Ack): the broker redelivers it.
//! - **Outages**: lapin's automatic recovery reconnects and restores
//!   channels, exchange, queues, bindings, prefetch and consumers; when it
//!   stalls, the transport opens a new connection itself
//!   ([`RabbitConfig::recovery_stall_timeout`]). Publishes wait for either up
//!   to [`RabbitConfig::outage_wait`]; publishes in flight when the
//!   connection dropped fail with `Connection` (publish them again:
//!   consumers deduplicate).
//! - **Topology** helpers ([`topology`]) declare work queues with a
//!   dead-letter queue, quorum queues with a delivery limit, and a ladder of
//!   TTL queues for delayed retries.
//! - **Metrics** ([`RabbitMetrics`]): publish outcomes, delivery outcomes,
//!   reconnects, confirms in flight, connection blocked.
//!
//! Messages carry the [`Envelope`](surety_core::Envelope) in CloudEvents
//! binary mode: every attribute as an AMQP header (so it round-trips
//! exactly) and the matching AMQP properties (`message_id`, `type`,
//! `app_id`, `timestamp`, ...). Messages from other producers are read from
//! their properties, and a message that cannot be read at all is delivered
//! as [poison](surety_core::Envelope::undecodable), never dropped.
//!
//! # Example
//!
//! ```no_run
//! use surety_core::consumer::{Incoming, Worker, handler_fn};
//! use surety_core::{Close, Envelope, Publisher, Subscriber};
//! use surety_rabbitmq::{RabbitConfig, RabbitTransport};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = RabbitConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f").prefetch(32);
//! let transport = RabbitTransport::connect(config).await?;
//!
//! // Join the `billing` group on `orders` before publishing: RabbitMQ
//! // returns messages no queue is bound for.
//! let deliveries = transport.subscribe("orders", "billing").await?;
//! transport
//!     .publish("orders", Envelope::builder("/shop", "order.placed").payload("{}").build())
//!     .await?;
//!
//! let handler = handler_fn(|msg: Incoming| async move {
//!     println!("order {}", msg.envelope.id);
//!     Ok::<_, std::convert::Infallible>(())
//! });
//! let worker = Worker::new(handler).concurrency(8);
//! let report = worker.run(deliveries, async { tokio::signal::ctrl_c().await.ok(); }).await;
//! println!("acked {}", report.acked);
//! transport.close().await?;
//! # Ok(()) }
//! ```
//!
//! # Feature flags
//!
//! surety-rabbitmq has no optional features. It uses lapin with the Tokio
//! runtime and without TLS (`amqp://` URLs); the transport must be created
//! and used inside a Tokio runtime. Design decisions are recorded in
//! `docs/adr/0004-rabbitmq-adapter.md`.
#![doc(test(attr(deny(warnings), allow(dead_code))))]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod codec;
mod config;
mod error;
pub mod metrics;
mod publish;
mod subscribe;
pub mod topology;
mod transport;

pub use config::{
    DEFAULT_CONFIRM_TIMEOUT, DEFAULT_EXCHANGE, DEFAULT_MAX_IN_FLIGHT, DEFAULT_OUTAGE_WAIT,
    DEFAULT_PREFETCH, QueueType, RabbitConfig,
};
pub use metrics::RabbitMetrics;
pub use transport::RabbitTransport;

/// Re-exported so that users name the same lapin version.
pub use lapin;

/// The `messaging.system` name of this transport.
pub const SYSTEM: &str = "rabbitmq";

/// The header quorum queues set to the number of earlier delivery attempts.
pub use codec::{X_DELIVERY_COUNT, X_SURETY_DELIVERIES};

/// The queue a consumer `group` on `topic` consumes: `{topic}.{group}`.
///
/// ```
/// assert_eq!(surety_rabbitmq::queue_name("orders", "billing"), "orders.billing");
/// ```
pub fn queue_name(topic: &str, group: &str) -> String {
    format!("{topic}.{group}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn public_types_are_send_and_sync() {
        assert_send_sync::<RabbitTransport>();
        assert_send_sync::<RabbitConfig>();
        assert_send_sync::<RabbitMetrics>();
        assert_send_sync::<topology::WorkQueue>();
        assert_send_sync::<topology::RetryLadder>();
    }
}
