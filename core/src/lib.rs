//! The small, stable core of Surety: the message [`Envelope`], [`Headers`],
//! [error classes](ErrorClass), the transport ports ([`Publisher`],
//! [`Subscriber`], [`Close`], [`Delivery`]), the consumer pipeline, an
//! in-memory transport, and the tracing and metrics glue every other Surety
//! crate builds on.
//!
//! # Overview
//!
//! - [`Envelope`] is one message: CloudEvents 1.0 attributes (`id`,
//!   `source`, `type`, `time`, `datacontenttype`, `subject`), Surety's
//!   extensions (schema version, partition key, correlation and causation
//!   ids), [`Headers`] and a [`bytes::Bytes`] payload.
//! - [`ErrorClass`] sorts every failure into transient, permanent or poison;
//!   [`Classify`] maps your error types onto it.
//! - [`Publisher`] and [`Subscriber`] are the ports broker adapters
//!   implement (`surety-rabbitmq`, `surety-kafka`) and
//!   [`memory::MemoryTransport`] is the embedded default.
//! - [`log`] is the capability of transports that retain messages:
//!   positioned subscriptions whose positions the caller keeps, with
//!   assignment and revocation events, end offsets and broker timestamps;
//!   [`memory::MemoryLog`] is its embedded default (Kafka implements it too).
//! - [`consumer`] runs handlers as `tower` services: decode, handle,
//!   classify, settle; pattern crates add layers (deduplication, retries,
//!   dead-lettering).
//! - [`upcast`] brings payloads written at old schema versions up to the
//!   version a handler reads, before it decodes them.
//! - [`trace`] carries W3C trace context through headers; [`metrics`]
//!   registers Prometheus metrics into your registry.
//!
//! This crate changes rarely: new abilities arrive as new traits and new
//! crates, not as changes to these types.
//!
//! # Example
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use surety_core::consumer::{typed, Incoming, Worker};
//! use surety_core::{Envelope, Message, Permanent, Publisher, Subscriber};
//! use surety_core::memory::MemoryTransport;
//!
//! #[derive(Serialize, Deserialize)]
//! struct OrderPlaced { order_id: String, quantity: u32 }
//! impl Message for OrderPlaced { const TYPE: &'static str = "order.placed"; }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let transport = MemoryTransport::new();
//! let deliveries = transport.subscribe("orders", "fulfilment").await?;
//!
//! let order = OrderPlaced { order_id: "o-1".into(), quantity: 0 };
//! transport.publish("orders", Envelope::message("/shop", &order)?.partition_key("o-1").build()).await?;
//!
//! let handler = typed(|order: OrderPlaced, _msg: Incoming| async move {
//!     if order.quantity == 0 {
//!         return Err(Permanent::new("quantity must be positive"));
//!     }
//!     Ok(())
//! });
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let worker = tokio::spawn(Worker::new(handler).run(deliveries, async { stopped.await.ok(); }));
//!
//! // A permanent failure is rejected, not retried.
//! while transport.rejected("orders", "fulfilment").is_empty() {
//!     tokio::task::yield_now().await;
//! }
//! stop.send(()).ok();
//! assert_eq!(worker.await?.rejected, 1);
//! # Ok(()) }
//! ```
//!
//! # Feature flags
//!
//! surety-core has no optional features; it always includes the in-memory
//! transport, JSON codec, tracing and metrics glue.
#![doc(test(attr(deny(warnings), allow(dead_code))))]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "admin")]
#[cfg_attr(docsrs, doc(cfg(feature = "admin")))]
pub mod admin;
pub mod codec;
pub mod consumer;
pub mod envelope;
pub mod error;
pub mod headers;
pub mod host;
pub mod log;
pub mod memory;
mod memory_log;
pub mod metrics;
mod port;
mod publish;
pub mod retry;
pub mod store;
pub mod trace;
pub mod transport;
pub mod upcast;

pub use codec::DecodeError;
pub use envelope::{Envelope, EnvelopeBuilder, Message, ReplyError};
pub use error::{
    BoxError, Classify, ErrorClass, HandlerError, Permanent, Poison, Result, Transient,
    TransportError, TransportErrorKind,
};
pub use headers::Headers;
pub use port::{
    BoxPublisher, BoxSubscriber, Close, Confirmation, Delivery, DeliveryInfo, DeliveryStream,
    Publisher, Receipt, Settle, Subscriber,
};
pub use publish::Instrumented;

/// Re-exported so that users and adapters name the same versions.
pub use bytes;
/// Re-exported so that users and adapters name the same versions.
pub use prometheus_client;
/// Re-exported so that users and adapters name the same versions.
pub use tower;
