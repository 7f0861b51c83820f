//! Retry classification, bounded retries, dead-letter envelopes, DLQ stores,
//! replay and an admin HTTP API for Surety consumers: no poison message
//! loops forever, and no failed message becomes a mystery.
//!
//! # Overview
//!
//! - [`DlqLayer`] is a `tower` layer over any core
//!   [`Handler`](surety_core::consumer::Handler). It classifies every
//!   failure (undecodable messages are poison before the handler runs,
//!   panics are permanent, everything else goes through core's
//!   [`Classify`](surety_core::Classify)), retries only what the
//!   [`RetryPolicy`] allows — in place, or delayed through the broker with
//!   the attempt count in the `surety-attempt` header — and finally writes a
//!   [`DeadLetter`] to every configured sink before the original is
//!   acknowledged. If a sink is down, the original goes back to the broker;
//!   it is never dropped.
//! - [`policy`] holds the pure retry decision: attempts, exponential
//!   backoff with jitter (`surety_core::retry::Backoff`), per-class schedules.
//! - [`DeadLetter`] is the versioned dead-letter envelope: the original
//!   message, the failure and its source chain, attempts and times, source,
//!   handler, host, trace id, fingerprint, replay count and history. It maps
//!   to and from `surety-dlq-*` broker headers (and reads RabbitMQ's
//!   `x-death`). Its format is documented in `docs/reference/dlq-envelope.md`.
//! - [`sink`]: a DLQ topic through any core [`Publisher`](surety_core::Publisher)
//!   ([`TopicSink`](sink::TopicSink)) and/or a [`DlqStore`](store::DlqStore)
//!   ([`StoreSink`](sink::StoreSink)).
//! - [`store`]: in-memory, SQLite and PostgreSQL stores with filtering,
//!   paging, conditional status changes and an audit log; migrations ship
//!   with the crate and run through `migrate()`.
//! - [`Replayer`] replays or discards one dead letter, a selection or a
//!   filter, with dry runs, a rate limit, optional edits (with a required
//!   reason) and an audit trail, to the consumer group that failed the
//!   message. Every action runs as a [`job`]: its intent is written before
//!   it acts, and a restarted process resumes it.
//! - [`admin`] (feature `admin`) serves all of that as JSON over HTTP: an
//!   axum `Router` to mount, protected by bearer tokens.
//! - [`metrics`]: DLQ depth and oldest age by source, dead-lettered,
//!   retries scheduled, replays by outcome, sink failures.
//!
//! # Example
//!
//! A handler with three in-place attempts for transient failures, whose
//! dead letters go to a DLQ topic and a SQLite store:
//!
//! ```
//! use surety_core::consumer::{typed, Incoming, Worker};
//! use surety_core::memory::MemoryTransport;
//! use surety_core::tower::Layer;
//! use surety_core::{Envelope, Message, Publisher, Subscriber};
//! use surety_dlq::store::{DlqStore, Filter, SqliteDlqStore};
//! use surety_dlq::{DlqLayer, FailureClass, RetryPolicy};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct OrderPlaced { quantity: u32 }
//! impl Message for OrderPlaced { const TYPE: &'static str = "order.placed"; }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let transport = MemoryTransport::new();
//! let store = SqliteDlqStore::in_memory().await?;
//! let handler = typed(|order: OrderPlaced, _msg: Incoming| async move {
//!     println!("ordering {}", order.quantity);
//!     Ok::<_, std::convert::Infallible>(())
//! });
//! let handler = DlqLayer::new("fulfilment")
//!     .policy(RetryPolicy::in_place(3))
//!     .dead_letter_to(transport.clone(), "orders.dlq")
//!     .store(store.clone())
//!     .layer(handler);
//!
//! let deliveries = transport.subscribe("orders", "fulfilment").await?;
//! // Not an order: poison, dead-lettered without running the handler.
//! transport.publish("orders", Envelope::builder("/shop", "order.placed").payload("\"many\"").build()).await?;
//!
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let worker = tokio::spawn(Worker::new(handler).run(deliveries, async { stopped.await.ok(); }));
//! while store.count(&Filter::new().class(FailureClass::Poison)).await? == 0 {
//!     tokio::time::sleep(std::time::Duration::from_millis(5)).await;
//! }
//! stop.send(()).ok();
//! worker.await?;
//! # Ok(()) }
//! ```
//!
//! # Feature flags
//!
//! - `sqlite` (default): [`store::SqliteDlqStore`] (sqlx).
//! - `postgres` (default): [`store::PostgresDlqStore`] (sqlx).
//! - `admin` (default): the [`admin`] HTTP API (axum).
//!
//! Without them the crate still has the layer, the policy, the dead-letter
//! format, the topic sink, the in-memory store, replay and metrics.
#![doc(test(attr(deny(warnings), allow(dead_code))))]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "admin")]
pub mod admin;
pub mod classify;
pub mod job;
pub mod keys;
mod layer;
pub mod letter;
pub mod metrics;
pub mod policy;
pub mod replay;
pub mod sink;
pub mod store;

pub use layer::{Dlq, DlqLayer, RetryRoute};
pub use letter::{DeadLetter, Event, Failure, FailureClass, Source, Status, UnknownClass};
pub use metrics::DlqMetrics;
pub use policy::{Backoff, Decision, RetryMode, RetryPolicy, Schedule};
pub use replay::{
    ActionReport, DiscardRequest, Edit, ReplayError, ReplayRequest, Replayer, Selection, Started,
};
/// The `sqlx` this crate's API takes (pools and transactions), so callers
/// use the same version.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use sqlx;
