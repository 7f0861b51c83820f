//! Idempotent consumers for Surety: every message's effect happens once,
//! however often the broker delivers it.
//!
//! # Overview
//!
//! Brokers deliver at least once: a reconnect, a rebalance or a replay
//! hands the same message to a handler again. This crate puts a dedup step
//! in front of the handler.
//!
//! - [`IdempotencyLayer`] is a `tower` layer for any core handler. It takes
//!   a dedup key from each delivery ([`EnvelopeKey`]: `source` + `id`, or
//!   any [`KeyFn`], such as an order id and a step), claims it in a
//!   [`DedupStore`], runs the handler on the first delivery and acknowledges
//!   duplicates with [`Outcome::Duplicate`](surety_core::consumer::Outcome)
//!   without running it. A handler's outputs (a reply, commands, events) are stored
//!   with the key and published again for every duplicate.
//! - Claims are **leases** ([`LeasePolicy`]): two instances receiving the
//!   same message at once do not both run it (the second waits, then backs
//!   off), and a holder that dies loses its lease after a while, so a crash
//!   never blocks a key forever. Every claim has a [`LeaseToken`]; a holder
//!   whose lease was taken over cannot mark the key done (fencing).
//! - The **inbox** ([`inbox`]): with SQLite or PostgreSQL, "mark
//!   processed" happens in the transaction of your business write, so the
//!   effect and the mark commit or roll back together. This is how an
//!   effect stays exactly-once even when the handler crashes halfway.
//! - Stores: [`MemoryDedupStore`] (bounded, for tests and the embedded default),
//!   [`SqliteDedupStore`] and [`PostgresDedupStore`] (migrations shipped, run with
//!   [`sqlite::migrate`] / [`postgres::migrate`]). [`Cleanup`] deletes old
//!   keys in bounded batches and is safe to run on every instance.
//! - [`IdempotencyMetrics`]: duplicates, first-time handling, lease
//!   takeovers, busy keys, store latency and size.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use surety_core::consumer::{handler_fn, Incoming, Worker};
//! use surety_core::{Envelope, Publisher, Subscriber, memory::MemoryTransport};
//! use surety_core::tower::ServiceBuilder;
//! use surety_idempotency::{IdempotencyLayer, MemoryDedupStore};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let transport = MemoryTransport::new();
//! let deliveries = transport.subscribe("orders", "shipping").await?;
//!
//! let shipped = Arc::new(Mutex::new(Vec::new()));
//! let log = Arc::clone(&shipped);
//! let ship = handler_fn(move |msg: Incoming| {
//!     let log = Arc::clone(&log);
//!     async move {
//!         log.lock().unwrap().push(msg.envelope.id);
//!         Ok::<_, std::convert::Infallible>(())
//!     }
//! });
//! let handler = ServiceBuilder::new()
//!     .layer(IdempotencyLayer::new(MemoryDedupStore::new()))
//!     .service(ship);
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let worker = tokio::spawn(Worker::new(handler).run(deliveries, async { stopped.await.ok(); }));
//!
//! // A producer retried a publish whose confirmation it did not see.
//! let order = Envelope::builder("/orders", "order.placed").build();
//! transport.publish("orders", order.clone()).await?;
//! transport.publish("orders", order).await?;
//!
//! while transport.depth("orders", "shipping") > 0 {
//!     tokio::task::yield_now().await;
//! }
//! stop.send(()).ok();
//! assert_eq!(worker.await?.acked, 2, "both deliveries are acknowledged");
//! assert_eq!(shipped.lock().unwrap().len(), 1, "the order ships once");
//! # Ok(()) }
//! ```
//!
//! # What "once" means
//!
//! With the layer alone, a handler's effect runs once as long as the
//! handler finishes: a crash *before* the handler completes releases
//! nothing, the lease expires and a redelivery runs it again; a crash after
//! the effect but before the key is marked done runs the effect twice.
//! Effects that live in the same SQL database as the store close that gap
//! with the [`inbox`]. Effects elsewhere (an HTTP call) need their own
//! idempotency key, for which [`InboxTx::key`] or [`KeyFn`] gives a stable
//! value.
//!
//! # Feature flags
//!
//! - `sqlite` (default): [`SqliteDedupStore`], [`sqlite::migrate`] and the inbox
//!   on SQLite, through `sqlx`.
//! - `postgres` (default): [`PostgresDedupStore`], [`postgres::migrate`] and the
//!   inbox on PostgreSQL, through `sqlx`.
//!
//! The in-memory store, the layer, the metrics and the cleanup task are
//! always available.
#![doc(test(attr(deny(warnings), allow(dead_code))))]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod cleanup;
mod error;
mod idempotent;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod inbox;
mod key;
mod metrics;
mod policy;
mod reply;
pub mod store;

/// The future of an [`Idempotent`] handler: the `tower::Service::Future`
/// type, named here for code that must spell it out.
pub mod future {
    pub use crate::idempotent::IdempotentFuture;
}

pub use cleanup::Cleanup;
pub use error::StoreError;
pub use idempotent::{IdempotencyLayer, Idempotent};
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use inbox::{
    Committed, Inbox, InboxGuard, InboxHandler, InboxLayer, InboxTransaction, InboxTx, Marked,
    TransactionalStore,
};
pub use key::{EnvelopeKey, KeyFn};
pub use metrics::IdempotencyMetrics;
pub use policy::LeasePolicy;
/// The `sqlx` this crate's API takes (pools and transactions), so callers
/// use the same version.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use sqlx;
pub use store::memory::{self, MemoryDedupStore};
#[cfg(feature = "postgres")]
pub use store::postgres::{self, PostgresDedupStore};
#[cfg(feature = "sqlite")]
pub use store::sqlite::{self, SqliteDedupStore};
pub use store::{Claim, DedupStore, Lease, LeaseToken};
