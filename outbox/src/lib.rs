//! Transactional outbox for Surety.
//!
//! A service that changes its database and then publishes an event can
//! crash in between, or publish an event for a change that then rolls back.
//! The outbox closes that gap: the event is written as a row in the same
//! transaction as the change ([`SqliteOutbox::enqueue`],
//! [`PostgresOutbox::enqueue`]), and a [`Relay`] publishes committed rows
//! through any [`Publisher`](surety_core::Publisher) (RabbitMQ, Kafka, the
//! in-memory transport), marking a row sent only once the broker confirmed
//! it.
//!
//! - **Nothing lost, nothing invented.** A rolled-back transaction leaves no
//!   row; a committed row is published until the broker confirms it, or
//!   parked (below) with the reason. The relay delivers at least once (a
//!   crash between confirm and mark publishes again), with the message's
//!   own id, so consumers deduplicate.
//! - **Per-key order.** Rows with the same partition key are published in
//!   the order they were written; a failed row holds back the rest of its
//!   key, and only its key, until it is sent (see [`relay`]; on PostgreSQL,
//!   writers of one key must serialize, see [`postgres`]).
//! - **Failures are classified.** Failures that time or an operator can fix
//!   (the broker unreachable, no confirm in time, nothing bound to the
//!   topic yet, a missing topic) are retried with backoff and jitter. A
//!   message the broker refuses itself (too large, invalid) or a row that no
//!   longer decodes is parked for an operator, with the reason, and the rest
//!   of its key goes on.
//! - **One active relay.** Instances of a relay share a lease in the
//!   database; a standby takes over when the holder stops or dies.
//! - **Observable.** Backlog, oldest pending age, parked rows, outcomes and
//!   leadership as Prometheus metrics ([`metrics`]); the trace context of
//!   the writing request travels with the row.
//!
//! ```
//! use sqlx::sqlite::SqlitePoolOptions;
//! use surety_core::{Envelope, memory::MemoryTransport};
//! use surety_outbox::{Relay, SqliteOutbox};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await?;
//! surety_outbox::sqlite::migrate(&pool).await?;
//!
//! let mut tx = pool.begin().await?;
//! // ... the business write ...
//! let event = Envelope::builder("/shop", "order.placed").partition_key("o-1").build();
//! SqliteOutbox::enqueue(&mut tx, "orders", &event).await?;
//! tx.commit().await?;
//!
//! let transport = MemoryTransport::new();
//! let relay = Relay::new(SqliteOutbox::new(pool), transport);
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let running = tokio::spawn(relay.run(async move { stopped.await.ok(); }));
//! // ... serve ...
//! stop.send(()).ok();
//! running.await?;
//! # Ok(()) }
//! ```

#![doc(test(attr(deny(warnings), allow(dead_code))))]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod error;
pub mod metrics;
pub mod relay;
pub mod store;

pub use error::OutboxError;
pub use metrics::OutboxMetrics;
pub use relay::{Cycle, Relay};
/// The `sqlx` this crate's API takes (pools and transactions), so callers
/// use the same version.
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub use sqlx;
#[cfg(feature = "postgres")]
pub use store::postgres::{self, PostgresOutbox};
#[cfg(feature = "sqlite")]
pub use store::sqlite::{self, SqliteOutbox};
pub use store::{Backlog, Lease, OutboxRow, OutboxStore};
