//! Saga state machines for Surety: pure definitions, an orchestrator that
//! records every input, timers, compensation and operator actions.
//!
//! # Overview
//!
//! - [`steps::Steps`] builds the common shape as data: step -> command to
//!   a participant queue -> expected replies by type -> compensation, each
//!   step with its retry policy and deadline. [`checkout::definition`] is
//!   the reference checkout built with it.
//! - A [`Saga`] is pure: `(state, input) -> transition`. The
//!   [`Transition`] names the next state, the [`Command`]s to send and the
//!   timers to set or cancel. Inputs ([`Input`]) are replies and events,
//!   timeouts and [operator actions](OperatorAction). Compensation is just
//!   transitions that send the undoing commands, in reverse order.
//! - The [`Orchestrator`] is the effectful runner: it loads the instance
//!   (keyed by saga id = correlation id), applies one input, and writes the
//!   new state (checked against the loaded version), a history row, the
//!   commands and the timer changes in one [`store::Write`]. A concurrent
//!   writer makes it reload and apply again.
//! - Commands get deterministic ids (`<saga>:<id>:<key>` for a keyed
//!   command, else `<saga>:<id>:<version>:<index>`), the
//!   saga id as correlation id and partition key, so a re-sent command is
//!   deduplicated downstream and replies correlate back.
//! - Timers are rows with a due time, fired by
//!   [`Orchestrator::fire_due_timers`]; a timer cancelled or reset before it
//!   fires does nothing.
//! - [`metrics::SagaMetrics`] counts inputs by outcome and transitions by
//!   step (saga progress by state).
//! - Every input, operator actions included, is recorded:
//!   [`Orchestrator::history`] and [`replay`] recompute the state.
//! - [`consumer::reply_handler`] consumes a saga's reply queue through the
//!   core `Router` and `Worker` (one input per instance in flight);
//!   [`consumer::timer_task`] fires due timers under the core `Host`;
//!   [`participant`] is the participant side (idempotent with
//!   `surety-idempotency`, replying success, business failure or error).
//!
//! # Example
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use std::time::Duration;
//! use surety_saga::{Command, Input, Orchestrator, Outcome, Saga, Transition, store::MemorySagaStore};
//!
//! #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
//! enum Step { Paying, Done, Cancelled }
//! #[derive(Clone, Debug, Serialize, Deserialize)]
//! enum Reply { Paid, Declined }
//!
//! struct Checkout;
//! impl Saga for Checkout {
//!     type State = Step;
//!     type Message = Reply;
//!     fn name(&self) -> &str { "checkout" }
//!     fn state_name<'a>(&'a self, s: &'a Step) -> &'a str {
//!         match s { Step::Paying => "paying", Step::Done => "done", Step::Cancelled => "cancelled" }
//!     }
//!     fn is_finished(&self, s: &Step) -> bool { *s != Step::Paying }
//!     fn apply(&self, s: &Step, input: &Input<Reply>) -> Transition<Step> {
//!         match (s, input) {
//!             (Step::Paying, Input::Message(Reply::Paid)) => Transition::to(Step::Done),
//!             (Step::Paying, Input::Message(Reply::Declined) | Input::Timeout { .. }) =>
//!                 Transition::to(Step::Cancelled),
//!             _ => Transition::ignore(),
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = MemorySagaStore::new();
//! let saga = Orchestrator::new(Checkout, store.clone());
//! saga.start("order-1", Transition::to(Step::Paying)
//!     .command(Command::new("payments", "payment.charge", serde_json::json!({"cents": 4200})))
//!     .set_timer("payment", Duration::from_secs(30))).await?;
//! assert_eq!(store.take_commands().len(), 1);
//!
//! let outcome = saga.handle("order-1", Input::Message(Reply::Paid)).await?;
//! assert!(matches!(outcome, Outcome::Applied { finished: true, .. }));
//! assert!(store.timers().is_empty());
//! # Ok(()) }
//! ```
//!
//! # Feature flags
//!
//! - `sqlite` (on by default): `sqlite::SqliteSagaStore`, which writes
//!   each transition and its commands (into the `surety-outbox` table) in
//!   one SQLite transaction. It pulls in `sqlx` and `surety-outbox`.
//!
//! - `postgres` (on by default): `postgres::PostgresSagaStore`, the same
//!   on PostgreSQL. Both SQL stores write optimistically (insert, or update
//!   where the version is the loaded one) and migrate with versioned
//!   migrations recorded in `_surety_saga_migrations`.
//!
//! - `admin` (on by default): `admin::AdminApi`, the operator HTTP API
//!   (an axum router, token-protected like the DLQ admin API).
//!
//! Without features the crate ships the in-memory [`store::MemorySagaStore`].
#![cfg_attr(docsrs, feature(doc_cfg))]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

#[cfg(feature = "admin")]
pub mod admin;
pub mod checkout;
pub mod consumer;
mod definition;
pub mod metrics;
mod orchestrator;
pub mod participant;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod steps;
pub mod store;

pub use definition::{
    COMMAND_KEY_HEADER, Command, Input, OperatorAction, Saga, Transition, replay,
};
pub use orchestrator::{DEFAULT_REMEMBERED, Orchestrator, Outcome, SagaError};

/// The guide chapter's program, compiled and run as a doctest.
#[cfg(all(doctest, feature = "sqlite"))]
#[doc = include_str!("../../docs/guide/05-sagas.md")]
pub struct GuideSagas;
