//! Command/reply: handlers that answer with a [`Reply`], stored with the
//! dedup key and published again to every duplicate.

use std::fmt;
use std::future::Future;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use surety_core::consumer::{Incoming, Outcome};
use surety_core::{
    Classify, Confirmation, Envelope, HandlerError, Publisher, TransportError, TransportErrorKind,
};
use tower::Service;

use crate::error::StoreError;

/// A reply to a command: the envelope to publish and the topic to publish
/// it to (typically the requester's reply topic, named in the command).
///
/// The layer stores the reply with the command's dedup key when the
/// handler succeeds, then publishes it; a duplicate of the command gets the
/// very same envelope (same id) published again, so the requester can
/// deduplicate replies too.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reply {
    /// Where the reply goes.
    pub topic: String,
    /// The reply.
    pub envelope: Envelope,
}

/// How a reply is stored: versioned JSON, with the envelope in its
/// CloudEvents structured form.
#[derive(Serialize, Deserialize)]
struct StoredReply {
    v: u32,
    topic: String,
    envelope: Envelope,
}

impl Reply {
    /// A reply of `envelope` to `topic`.
    pub fn new(topic: impl Into<String>, envelope: Envelope) -> Self {
        Self {
            topic: topic.into(),
            envelope,
        }
    }

    /// The stored form.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(&StoredReply {
            v: 1,
            topic: self.topic.clone(),
            envelope: self.envelope.clone(),
        })
        .map_err(|e| StoreError::Corrupt(format!("a reply cannot be encoded: {e}")))
    }

    /// Reads the stored form back.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let stored: StoredReply = serde_json::from_slice(bytes)
            .map_err(|e| StoreError::Corrupt(format!("stored reply: {e}")))?;
        if stored.v != 1 {
            return Err(StoreError::Corrupt(format!(
                "stored reply has unknown version {}",
                stored.v
            )));
        }
        Ok(Self::new(stored.topic, stored.envelope))
    }
}

/// What an inner handler of the [`IdempotencyLayer`](crate::IdempotencyLayer)
/// returns: an [`Outcome`], a [`Reply`], or an optional reply.
///
/// ```
/// use surety_core::consumer::Outcome;
/// use surety_core::Envelope;
/// use surety_idempotency::{HandlerResponse, Reply};
///
/// let reply = Reply::new("payments.replies", Envelope::builder("/payments", "payment.captured").build());
/// let (outcome, stored) = reply.clone().into_parts();
/// assert_eq!(outcome, Outcome::Handled);
/// assert_eq!(stored, Some(reply));
/// assert_eq!(Outcome::Handled.into_parts(), (Outcome::Handled, None));
/// ```
pub trait HandlerResponse: Send + 'static {
    /// The outcome and the reply to store and publish, if any.
    fn into_parts(self) -> (Outcome, Option<Reply>);
}

impl HandlerResponse for Outcome {
    fn into_parts(self) -> (Outcome, Option<Reply>) {
        (self, None)
    }
}

impl HandlerResponse for Reply {
    fn into_parts(self) -> (Outcome, Option<Reply>) {
        (Outcome::Handled, Some(self))
    }
}

impl HandlerResponse for Option<Reply> {
    fn into_parts(self) -> (Outcome, Option<Reply>) {
        (Outcome::Handled, self)
    }
}

/// A command handler from an async function that returns a [`Reply`] (or
/// an `Option<Reply>`). Wrap it in an
/// [`IdempotencyLayer`](crate::IdempotencyLayer) with a
/// [reply publisher](crate::IdempotencyLayer::replies) to run it in a
/// [`Worker`](surety_core::consumer::Worker).
///
/// ```
/// use surety_core::consumer::Incoming;
/// use surety_idempotency::{reply_fn, Reply};
///
/// let capture = reply_fn(|cmd: Incoming| async move {
///     let reply = cmd.envelope.caused_by("/payments", "payment.captured").build();
///     Ok::<_, std::convert::Infallible>(Reply::new("checkout.replies", reply))
/// });
/// # let _ = capture;
/// ```
pub fn reply_fn<F, Fut, R, E>(f: F) -> ReplyFn<F>
where
    F: Fn(Incoming) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
    R: HandlerResponse,
    E: Classify + std::error::Error + Send + Sync + 'static,
{
    ReplyFn { f }
}

/// The handler returned by [`reply_fn`].
#[derive(Clone)]
pub struct ReplyFn<F> {
    f: F,
}

impl<F> fmt::Debug for ReplyFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyFn").finish_non_exhaustive()
    }
}

impl<F, Fut, R, E> Service<Incoming> for ReplyFn<F>
where
    F: Fn(Incoming) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
    R: HandlerResponse,
    E: Classify + std::error::Error + Send + Sync + 'static,
{
    type Response = R;
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<R, HandlerError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Incoming) -> Self::Future {
        let fut = (self.f)(msg);
        Box::pin(async move { fut.await.map_err(HandlerError::new) })
    }
}

/// The reply publisher of a layer without one: handlers that return no
/// reply never use it; publishing through it fails with a
/// [`Config`](TransportErrorKind::Config) error (a permanent failure).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoReplies;

impl Publisher for NoReplies {
    async fn send(&self, topic: &str, envelope: Envelope) -> surety_core::Result<Confirmation> {
        Err(TransportError::new(
            TransportErrorKind::Config,
            format!(
                "a handler replied with message {} to {topic}, but the idempotency layer has no reply publisher (use IdempotencyLayer::replies)",
                envelope.id
            ),
        ))
    }
}
