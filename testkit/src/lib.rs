//! Test support for Surety: a transport conformance suite, a fault-injecting
//! transport wrapper, and the addresses of the services integration tests
//! run against.
//!
//! # Overview
//!
//! - [`conformance`] is one suite every transport runs — the in-memory
//!   transport, the RabbitMQ and Kafka adapters, yours — with the
//!   [capabilities](conformance::Capabilities) it declares:
//!   [`transport_conformance`](conformance::transport_conformance) checks
//!   that envelopes and payloads survive the trip, that ack, nack and reject
//!   do what the ports promise, per-key ordering, fan-out and competing
//!   consumers, and close. Checks use fresh topic and group names, so they
//!   run against long-lived brokers.
//! - [`fault`] wraps any transport in a
//!   [`FaultyTransport`](fault::FaultyTransport) that drops, duplicates,
//!   reorders and delays messages and fails publishes and acks, seeded and
//!   reproducible, so that handlers, workers and pattern crates can be
//!   tested against the unhappy path without a broker.
//! - [`handler`] tests a handler, with its layers, without a broker:
//!   [`HandlerTest`](handler::HandlerTest) delivers envelopes straight to it
//!   and returns the outcome, the emitted messages and the error;
//!   [`Recorder`](handler::Recorder) keeps what a layer publishes (dead
//!   letters, delayed retries). No worker, no transport, no polling.
//! - [`services`] finds RabbitMQ, Kafka and PostgreSQL for integration
//!   tests and checks that they answer; [`rabbitmqctl`] acts on the
//!   RabbitMQ broker (closes a connection, reads a queue's depth).
//! - [`process`] runs the test binary again as a child running one named
//!   test (selected by an environment variable) and kills it with SIGKILL,
//!   for crash tests: [`TestProcess`](process::TestProcess).
//! - [`wait`] polls a condition until it holds or a deadline passes:
//!   [`eventually`](wait::eventually).
//!
//! ```
//! use std::time::Duration;
//! use futures::StreamExt;
//! use surety_core::{Envelope, Publisher, Subscriber, memory::MemoryTransport};
//! use surety_testkit::conformance::{transport_conformance, Capabilities};
//! use surety_testkit::fault::{FaultPlan, FaultyTransport};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> surety_core::Result<()> {
//! // The in-memory transport conforms, with every capability.
//! let caps = Capabilities::all().quiet_period(Duration::from_millis(20));
//! transport_conformance(|| async { MemoryTransport::new() }, caps).await.assert_ok();
//!
//! // A consumer that crashes before handling: the first delivery of each
//! // message is dropped, and the transport delivers it again.
//! let plan = FaultPlan::new(1).drop(1.0).max_forced_redeliveries(1);
//! let transport = FaultyTransport::new(MemoryTransport::new(), plan);
//! let mut deliveries = transport.subscribe("orders", "billing").await?;
//! transport.publish("orders", Envelope::builder("/orders", "order.placed").build()).await?;
//! let delivery = deliveries.next().await.expect("redelivered")?;
//! assert_eq!(delivery.info().delivery_count, Some(2));
//! delivery.ack().await?;
//! assert_eq!(transport.stats().dropped, 1);
//! # Ok(()) }
//! ```
//!
//! # Feature flags
//!
//! - `idempotency`: the `idempotency_store` module, the shared test suite for
//!   `surety-idempotency` dedup stores.
//! - `dlq`: the `dlq_store` module, the shared test suite for `surety-dlq` stores.
//! - `saga`: the `saga_store` module, the shared test suite for `surety-saga`
//!   stores.
//! - `trace`: the `trace` module, which captures spans in memory and runs the
//!   publish → consume round trip that checks a transport propagates trace
//!   context.
#![doc(test(attr(deny(warnings), allow(dead_code))))]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod conformance;
pub mod cpu;
#[cfg(feature = "db")]
pub mod db;
#[cfg(feature = "dlq")]
pub mod dlq_store;
pub mod fault;
pub mod handler;
#[cfg(feature = "idempotency")]
pub mod idempotency_store;
pub mod process;
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
pub mod rabbitmqctl;
#[cfg(feature = "saga")]
pub mod saga_store;
pub mod services;
#[cfg(feature = "trace")]
pub mod trace;
pub mod wait;
