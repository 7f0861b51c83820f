//! The consumer pipeline: handlers as `tower` services, the [`Router`] that
//! dispatches by message type, and the [`Worker`] that drives them.
//!
//! A handler is a [`tower::Service`] from [`Incoming`] to [`Response`] with
//! [`HandlerError`] as its error. A [`Response`] says how the handler
//! finished ([`Outcome`]) and carries the messages it wants sent
//! ([`Output`]: replies, commands, events). Reliability features are
//! [`tower::Layer`]s around it (deduplication in `surety-idempotency`,
//! classification, bounded retries and dead-lettering in `surety-dlq`,
//! upcasting), and tower's own layers (timeouts, concurrency and rate
//! limits) fit in the same stack.
//!
//! The [`Worker`] pulls deliveries from a subscription, keeps one message
//! per partition key in flight, runs the service in a span linked to the
//! producer's trace, publishes the response's outputs (all confirmed), and
//! only then settles the delivery, exactly once:
//!
//! | result | settlement |
//! |---|---|
//! | `Ok(response)`, its outputs confirmed | ack |
//! | `Ok(response)`, an output not confirmed | nack with requeue (the handler runs again: make it idempotent) |
//! | transient error | nack with requeue (after the error's `retry_after`, if any), until the attempt reaches [`Worker::max_deliveries`], then reject |
//! | [`HandlerError::unavailable`] (the pipeline, not the message, failed) | nack with requeue, whatever the attempt |
//! | permanent or poison error | reject |
//! | panic in the handler | reject (classified permanent, with the panic message) |
//!
//! The worker's own retry is deliberately simple: `surety-dlq` adds backoff
//! with jitter, delayed redelivery through the broker and dead-letter
//! envelopes as a layer that turns failures into
//! [`Outcome::RetryScheduled`] or [`Outcome::DeadLettered`].
//!
//! [`Host`](crate::host::Host) runs the workers and background tasks of a
//! service under one shutdown signal.

mod handler;
mod keyed;
mod router;
mod worker;

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use tower::Service;

use crate::envelope::Envelope;
use crate::error::HandlerError;
use crate::port::DeliveryInfo;
use crate::transport::attempt_of;

pub use handler::{AckAll, HandlerFn, Typed, handler_fn, typed};
pub use router::{Router, UnknownType};
pub use worker::{OutputSink, Worker, WorkerReport};

/// A delivered message as a handler sees it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Incoming {
    /// The message.
    pub envelope: Envelope,
    /// Where it came from.
    pub info: DeliveryInfo,
    /// Which attempt this is, from 1 (see [`Delivery::attempt`](crate::Delivery::attempt)).
    pub attempt: u32,
    /// Values the layers around a handler hand to it (a transaction, a
    /// loaded saga instance), by type.
    pub extensions: Extensions,
}

impl Incoming {
    /// An incoming message, as a worker builds it from a delivery.
    pub fn new(envelope: Envelope, info: DeliveryInfo) -> Self {
        let attempt = attempt_of(&envelope, &info);
        Self {
            envelope,
            info,
            attempt,
            extensions: Extensions::default(),
        }
    }
}

/// Values by type, for a layer to hand to the handler it wraps (the
/// inbox's transaction, for example). Cloning an [`Incoming`] shares them.
///
/// ```
/// use surety_core::consumer::Extensions;
///
/// #[derive(Debug, PartialEq)]
/// struct Tenant(&'static str);
///
/// let mut extensions = Extensions::default();
/// assert!(extensions.get::<Tenant>().is_none());
/// extensions.insert(Tenant("acme"));
/// assert_eq!(extensions.get::<Tenant>(), Some(&Tenant("acme")));
/// ```
#[derive(Clone, Default)]
pub struct Extensions {
    // Boxed and optional: most deliveries carry none, and then cost one
    // pointer (not a whole empty map) and no allocation.
    #[allow(clippy::box_collection)]
    map: Option<Box<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>>,
}

impl Extensions {
    /// Adds `value`, replacing a value of the same type.
    pub fn insert<T: Send + Sync + 'static>(&mut self, value: T) {
        self.map
            .get_or_insert_with(Box::default)
            .insert(TypeId::of::<T>(), Arc::new(value));
    }

    /// The value of type `T`, if one was added.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.map
            .as_ref()?
            .get(&TypeId::of::<T>())?
            .downcast_ref::<T>()
    }

    /// How many values there are.
    pub fn len(&self) -> usize {
        self.map.as_ref().map_or(0, |map| map.len())
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for Extensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extensions")
            .field("len", &self.len())
            .finish()
    }
}

/// How a handler (and its layers) finished with a message. Every outcome is
/// final: the worker acknowledges the delivery once the response's outputs
/// are confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler ran and succeeded.
    #[default]
    Handled,
    /// The message was a duplicate of one already handled; the handler did not run.
    Duplicate,
    /// The message's type has no handler and the router was told to ignore
    /// such messages ([`UnknownType::Ignore`]).
    Ignored,
    /// The failure was recorded and the message republished for a later attempt.
    RetryScheduled,
    /// The message was moved to a dead-letter destination.
    DeadLettered,
}

impl Outcome {
    /// The stable lower-case name, used as a metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Handled => "handled",
            Self::Duplicate => "duplicate",
            Self::Ignored => "ignored",
            Self::RetryScheduled => "retry_scheduled",
            Self::DeadLettered => "dead_lettered",
        }
    }
}

/// A message a handler wants sent: an envelope and the topic it goes to.
///
/// Build a reply with [`Envelope::reply`] (addressed to the request's
/// reply-to topic, correlated with the request), or any message with
/// [`Output::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Output {
    /// The topic to publish to.
    pub destination: String,
    /// The message.
    pub envelope: Envelope,
}

impl Output {
    /// `envelope`, to be published to `destination`.
    pub fn new(destination: impl Into<String>, envelope: Envelope) -> Self {
        Self {
            destination: destination.into(),
            envelope,
        }
    }
}

/// What a handler returns: how it finished and the messages to send before
/// the input is acknowledged.
///
/// Handlers written with [`handler_fn`] or [`typed`] may return `()`, an
/// [`Outcome`], an [`Output`], a `Vec<Output>` or a `Response`; each
/// converts with `From`.
///
/// ```
/// use surety_core::consumer::{Outcome, Output, Response};
/// use surety_core::Envelope;
///
/// let event = Envelope::builder("/orders", "order.accepted").build();
/// let response = Response::handled().emit(Output::new("orders.events", event));
/// assert_eq!(response.outcome, Outcome::Handled);
/// assert_eq!(response.outputs.len(), 1);
/// assert_eq!(Response::from(()), Response::handled());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Response {
    /// How the handler finished.
    pub outcome: Outcome,
    /// Messages to publish, in order, before the input is acknowledged.
    pub outputs: Vec<Output>,
}

impl Response {
    /// Handled, with nothing to send.
    pub fn handled() -> Self {
        Self::default()
    }

    /// `outcome`, with nothing to send.
    pub fn outcome(outcome: Outcome) -> Self {
        Self {
            outcome,
            outputs: Vec::new(),
        }
    }

    /// The same outputs with `outcome`.
    pub fn with_outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }

    /// Adds a message to send.
    pub fn emit(mut self, output: Output) -> Self {
        self.outputs.push(output);
        self
    }
}

impl From<()> for Response {
    fn from((): ()) -> Self {
        Self::handled()
    }
}

impl From<Outcome> for Response {
    fn from(outcome: Outcome) -> Self {
        Self::outcome(outcome)
    }
}

impl From<Output> for Response {
    fn from(output: Output) -> Self {
        Self::handled().emit(output)
    }
}

impl From<Vec<Output>> for Response {
    fn from(outputs: Vec<Output>) -> Self {
        Self {
            outcome: Outcome::Handled,
            outputs,
        }
    }
}

impl From<Option<Output>> for Response {
    fn from(output: Option<Output>) -> Self {
        Self {
            outcome: Outcome::Handled,
            outputs: output.into_iter().collect(),
        }
    }
}

/// A service that handles messages: what a [`Worker`] runs.
///
/// Implemented for every matching `tower::Service`; write one with
/// [`handler_fn`], [`typed`] or a [`Router`].
pub trait Handler:
    Service<Incoming, Response = Response, Error = HandlerError, Future: Send> + Clone + Send + 'static
{
}

impl<S> Handler for S where
    S: Service<Incoming, Response = Response, Error = HandlerError, Future: Send>
        + Clone
        + Send
        + 'static
{
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
