//! The participant side: a handler for a saga's command that answers with
//! a reply, built for the [`Worker`](surety_core::consumer::Worker).
//!
//! Your function decides the [`Answer`]: [`Answer::done`] (the step
//! happened) or [`Answer::declined`] (a business failure: declined, out of
//! stock; a normal reply, not an error). The [`participant`] handler turns
//! it into a reply addressed to the command's reply-to topic, correlated
//! with the saga and keyed like the command. An error is classified:
//! transient errors go back to the pipeline (the command is retried, no
//! reply is sent); permanent and poison errors are answered with the
//! step's error reply, `<command type>.error`, carrying the message.
//!
//! Make it idempotent by wrapping it in `surety-idempotency`'s
//! `IdempotencyLayer`: the saga re-sends a command that missed its deadline
//! with the same message id, the layer drops the duplicate and sends the
//! stored reply again, error replies included (an error reply is final for
//! that command; an operator's retry sends a new one). Transient errors are
//! not stored: the broker redelivers the command and the handler runs
//! again.
//!
//! # Late commands after their compensation
//!
//! A saga that gives up on a step (its deadline passed, every attempt
//! spent) compensates it, and the compensation can reach the participant
//! before the step's own command, still queued or redelivered. Give the
//! handler [`Tombstones`] with [`Participant::tombstones`]: the
//! compensation of a step (its command carries the
//! [`COMMAND_KEY_HEADER`] `undo:<step>:..`)
//! records a tombstone for (saga id, step) before your function runs, and
//! a later command for that step (`do:<step>:..`) is answered as already
//! compensated: your function does not run, no reply is sent (the saga
//! has moved on) and, behind the idempotency layer, that no-op is what is
//! stored for the command's id. Keep the tombstones in the participant's
//! own database ([`SqliteSagaStore`](crate::sqlite::SqliteSagaStore) and
//! [`PostgresSagaStore`](crate::postgres::PostgresSagaStore) implement the
//! trait on the `surety_saga_tombstone` table); [`MemoryTombstones`] is
//! for tests.
//!
//! ```
//! use surety_core::consumer::Incoming;
//! use surety_core::Permanent;
//! use surety_saga::participant::{participant, Answer};
//!
//! let payments = participant("/payments", |command: Incoming| async move {
//!     let order: serde_json::Value = serde_json::from_slice(&command.envelope.payload)
//!         .map_err(Permanent::new)?;
//!     if order["cents"].as_u64().unwrap_or(0) > 100_000 {
//!         return Ok(Answer::declined("payment.declined", serde_json::json!({"reason": "limit"})));
//!     }
//!     Ok::<_, Permanent>(Answer::done("payment.charged", serde_json::json!({"charge": "ch-1"})))
//! });
//! # let _ = payments;
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use surety_core::consumer::{Incoming, Output, Response};
use surety_core::tower::Service;
use surety_core::{Classify, Envelope, HandlerError};

use crate::definition::COMMAND_KEY_HEADER;
use crate::store::StoreError;

/// Where a participant records the steps it compensated, so a late command
/// for one of them is not applied; see the [module docs](self).
pub trait Tombstones: Clone + Send + Sync + 'static {
    /// Records that the compensation of `step` of the saga instance `id`
    /// (the correlation id) from `saga` (the command's source) was handled.
    /// Recording twice is not an error.
    fn record(
        &self,
        saga: &str,
        id: &str,
        step: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Whether [`record`](Self::record) was called for `step` of `id`.
    fn contains(
        &self,
        saga: &str,
        id: &str,
        step: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

/// No tombstones: every command runs (the default).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoTombstones;

impl Tombstones for NoTombstones {
    async fn record(&self, _: &str, _: &str, _: &str) -> Result<(), StoreError> {
        Ok(())
    }

    async fn contains(&self, _: &str, _: &str, _: &str) -> Result<bool, StoreError> {
        Ok(false)
    }
}

/// Tombstones in memory, for tests and examples. Clones share them.
#[derive(Clone, Debug, Default)]
pub struct MemoryTombstones {
    inner: Arc<Mutex<BTreeSet<(String, String, String)>>>,
}

impl MemoryTombstones {
    /// No tombstones yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many tombstones are recorded.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Tombstones for MemoryTombstones {
    async fn record(&self, saga: &str, id: &str, step: &str) -> Result<(), StoreError> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((saga.to_owned(), id.to_owned(), step.to_owned()));
        Ok(())
    }

    async fn contains(&self, saga: &str, id: &str, step: &str) -> Result<bool, StoreError> {
        Ok(self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&(saga.to_owned(), id.to_owned(), step.to_owned())))
    }
}

/// What the tombstone check says about a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Gate {
    /// Run the command (a tombstone was recorded first if it is a
    /// compensation).
    Run,
    /// The step's compensation was handled first: do not apply it.
    AlreadyCompensated,
}

/// The tombstone check [`Participant`] runs before your function: the
/// compensation of a step records a tombstone for (saga id, step); the
/// step's command after it is [`Gate::AlreadyCompensated`]. A command
/// without a saga id or a step key runs.
///
/// # Errors
///
/// The tombstone store's.
pub async fn check<T: Tombstones>(tombstones: &T, command: &Envelope) -> Result<Gate, StoreError> {
    let (Some(id), Some(key)) = (
        command.correlation_id.as_deref(),
        command.headers.get(COMMAND_KEY_HEADER),
    ) else {
        return Ok(Gate::Run);
    };
    let mut parts = key.splitn(3, ':');
    let (Some(kind), Some(step)) = (parts.next(), parts.next()) else {
        return Ok(Gate::Run);
    };
    let saga = command.source.as_str();
    match kind {
        "undo" => {
            tombstones.record(saga, id, step).await?;
            Ok(Gate::Run)
        }
        "do" if tombstones.contains(saga, id, step).await? => {
            tracing::info!(
                saga,
                id,
                step,
                command = %command.id,
                "a command arrived after its step was compensated: not applied"
            );
            Ok(Gate::AlreadyCompensated)
        }
        _ => Ok(Gate::Run),
    }
}

/// A participant's answer to a command.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Answer {
    /// The step happened: reply `message_type` with `payload`.
    Done {
        /// The reply type (one of the step's success replies).
        message_type: String,
        /// The reply payload.
        payload: serde_json::Value,
    },
    /// A business failure: reply `message_type` (one of the step's
    /// `fails_on` types) with `payload`.
    Declined {
        /// The reply type.
        message_type: String,
        /// The reply payload.
        payload: serde_json::Value,
    },
}

impl Answer {
    /// The step happened.
    pub fn done(message_type: impl Into<String>, payload: serde_json::Value) -> Self {
        Self::Done {
            message_type: message_type.into(),
            payload,
        }
    }

    /// A business failure.
    pub fn declined(message_type: impl Into<String>, payload: serde_json::Value) -> Self {
        Self::Declined {
            message_type: message_type.into(),
            payload,
        }
    }
}

/// A reply to `request` of `message_type` with a JSON `payload`, from
/// `source`: to the request's reply-to topic, correlated with it (the saga
/// id) and with its partition key.
///
/// # Errors
///
/// A permanent error when the request has no reply-to topic or the payload
/// does not encode.
pub fn reply(
    request: &Envelope,
    source: &str,
    message_type: &str,
    payload: &serde_json::Value,
) -> Result<Output, HandlerError> {
    let Some(destination) = request.reply_to() else {
        return Err(HandlerError::permanent(format!(
            "command {} ({}) has no reply-to topic",
            request.id, request.event_type
        )));
    };
    let mut builder = Envelope::builder(source.to_owned(), message_type.to_owned())
        .caused_by(request)
        .json(payload)
        .map_err(HandlerError::permanent)?;
    if let Some(key) = &request.partition_key {
        builder = builder.partition_key(key.clone());
    }
    Ok(Output::new(destination, builder.build()))
}

/// A handler that runs `f` on each command and replies with its answer;
/// see the [module docs](self).
pub fn participant<F, Fut, E>(source: impl Into<String>, f: F) -> Participant<F>
where
    F: Fn(Incoming) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Answer, E>> + Send + 'static,
    E: Classify + std::error::Error + Send + Sync + 'static,
{
    Participant {
        source: source.into().into(),
        f,
        tombstones: NoTombstones,
    }
}

/// The handler [`participant`] builds.
#[derive(Clone)]
pub struct Participant<F, T = NoTombstones> {
    source: Arc<str>,
    f: F,
    tombstones: T,
}

impl<F, T> Participant<F, T> {
    /// Records compensations in `tombstones` and answers a step's command
    /// that arrives after its compensation as already compensated; see the
    /// [module docs](self).
    pub fn tombstones<T2: Tombstones>(self, tombstones: T2) -> Participant<F, T2> {
        Participant {
            source: self.source,
            f: self.f,
            tombstones,
        }
    }
}

impl<F, T> fmt::Debug for Participant<F, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Participant")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl<F, Fut, E, T> Service<Incoming> for Participant<F, T>
where
    F: Fn(Incoming) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Answer, E>> + Send + 'static,
    E: Classify + std::error::Error + Send + Sync + 'static,
    T: Tombstones,
{
    type Response = Response;
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<Response, HandlerError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, incoming: Incoming) -> Self::Future {
        let request = incoming.envelope.clone();
        let source = Arc::clone(&self.source);
        let f = self.f.clone();
        let tombstones = self.tombstones.clone();
        Box::pin(async move {
            if check(&tombstones, &request)
                .await
                .map_err(HandlerError::new)?
                == Gate::AlreadyCompensated
            {
                return Ok(Response::handled());
            }
            let (message_type, payload) = match f(incoming).await {
                Ok(
                    Answer::Done {
                        message_type,
                        payload,
                    }
                    | Answer::Declined {
                        message_type,
                        payload,
                    },
                ) => (message_type, payload),
                Err(error) if error.class().is_retryable() => {
                    return Err(HandlerError::new(error));
                }
                Err(error) => (
                    format!("{}.error", request.event_type),
                    serde_json::json!({ "error": error.to_string() }),
                ),
            };
            let output = reply(&request, &source, &message_type, &payload)?;
            Ok(Response::handled().emit(output))
        })
    }
}
