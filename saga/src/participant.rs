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

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use surety_core::consumer::{Incoming, Output, Response};
use surety_core::tower::Service;
use surety_core::{Classify, Envelope, HandlerError};

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
    }
}

/// The handler [`participant`] builds.
#[derive(Clone)]
pub struct Participant<F> {
    source: Arc<str>,
    f: F,
}

impl<F> fmt::Debug for Participant<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Participant")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl<F, Fut, E> Service<Incoming> for Participant<F>
where
    F: Fn(Incoming) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Answer, E>> + Send + 'static,
    E: Classify + std::error::Error + Send + Sync + 'static,
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
        let answer = (self.f)(incoming);
        Box::pin(async move {
            let (message_type, payload) = match answer.await {
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
