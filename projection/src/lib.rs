//! Replayable projection runners for Surety: read models built from event
//! logs, with their positions stored in the read model's own transaction.
//!
//! A [`Projection`] applies typed events (decoded through the
//! [upcaster chain](surety_core::upcast)) to a read model inside the read
//! model's transaction. A [`Runner`] reads any positioned log
//! ([`LogSubscriber`](surety_core::log::LogSubscriber): the in-memory
//! [`MemoryLog`](surety_core::memory::MemoryLog), Kafka through
//! surety-kafka), batches the events by count and time, applies each batch
//! in one transaction and stores each partition's next offset in that same
//! transaction ([`CheckpointStore`]: SQLite, PostgreSQL). Effect and
//! position commit together, so whatever crashes, restarts, rebalances and
//! redeliveries happen, each event is applied exactly once.
//!
//! Several runners in the same group share the partitions; with
//! [`RunnerOptions::parallelism`] a runner applies one batch in several
//! lanes (one key's events always in the same lane, in order), and the
//! stored position stays the contiguous watermark: it never passes an
//! event that is not applied.
//!
//! # Feature flags
//!
//! - `sqlite` (default): [`SqliteCheckpoints`].
//! - `postgres` (default): [`PostgresCheckpoints`].

#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(attr(deny(warnings), allow(dead_code))))]

pub mod error;
pub mod metrics;
pub mod projection;
pub mod rebuild;
pub mod runner;
pub mod store;
pub mod windows;

pub use error::ProjectionError;
pub use projection::{Applied, EventSet, Mode, Projection};
pub use rebuild::{Rebuild, RebuildProgress};
pub use runner::{Runner, RunnerOptions, RunnerStatus, replay_parked};
#[cfg(feature = "postgres")]
pub use store::postgres::{self, PostgresCheckpoints};
#[cfg(feature = "sqlite")]
pub use store::sqlite::{self, SqliteCheckpoints};
pub use store::{Checkpoint, CheckpointStore, Parked, VersionStore, Versions, versioned_name};

/// The guide chapter's program, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../docs/guide/06-projections.md")]
pub struct GuideProjections;
