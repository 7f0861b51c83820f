//! Test a handler without a broker: given envelopes, when the handler (with
//! its layers) runs, then the outcome, the messages it emitted and what it
//! published on the side (dead letters, delayed retries).
//!
//! [`HandlerTest`] calls the handler directly, once per delivery, the way a
//! [`Worker`](surety_core::consumer::Worker) would: no transport, no
//! polling, no waiting. A [`Recorder`] is a [`Publisher`] that keeps what
//! is published to it; hand it to a layer as its dead-letter or retry
//! destination and read the messages back.
//!
//! ```
//! use surety_core::consumer::{Incoming, Outcome, Output, handler_fn};
//! use surety_core::{Envelope, HandlerError};
//! use surety_testkit::handler::HandlerTest;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! // A handler that confirms each order and refuses empty ones.
//! let handler = handler_fn(|msg: Incoming| async move {
//!     if msg.envelope.payload.is_empty() {
//!         return Err(HandlerError::permanent("empty order"));
//!     }
//!     let confirmed = Envelope::builder("/orders", "order.confirmed").build();
//!     Ok(Output::new("orders.confirmed", confirmed))
//! });
//! let mut test = HandlerTest::new(handler).topic("orders");
//!
//! let order = Envelope::builder("/orders", "order.placed").payload(&b"{}"[..]).build();
//! let then = test.deliver(order).await;
//! assert_eq!(then.outcome(), Some(Outcome::Handled));
//! assert_eq!(then.outputs()[0].destination, "orders.confirmed");
//!
//! let empty = Envelope::builder("/orders", "order.placed").build();
//! let then = test.deliver(empty).await;
//! assert!(then.failure_class().is_some_and(|c| !c.is_retryable()));
//! # });
//! ```

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};

use futures::FutureExt as _;
use surety_core::consumer::{Handler, Incoming, Outcome, Output, Response};
use surety_core::tower::ServiceExt as _;
use surety_core::{Classify as _, Confirmation, DeliveryInfo, Envelope, ErrorClass, HandlerError};
use surety_core::{Publisher, Receipt, Result as TransportResult};

/// Runs a handler on envelopes, one delivery at a time, and returns what
/// it answered.
#[derive(Debug, Clone)]
pub struct HandlerTest<H> {
    handler: H,
    topic: String,
    group: String,
}

impl<H: Handler> HandlerTest<H> {
    /// A test of `handler`, fed from topic `test` in group `test`.
    pub fn new(handler: H) -> Self {
        Self {
            handler,
            topic: "test".into(),
            group: "test".into(),
        }
    }

    /// The topic deliveries come from.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = topic.into();
        self
    }

    /// The consumer group deliveries come to.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// The handler under test.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Delivers `envelope` for the first time.
    pub async fn deliver(&mut self, envelope: Envelope) -> Then {
        let info = DeliveryInfo::new("test", self.topic.clone(), self.group.clone());
        self.run(Incoming::new(envelope, info)).await
    }

    /// Delivers `envelope` again, as its `attempt`-th delivery (the broker's
    /// delivery count says so, as a quorum queue's does).
    pub async fn redeliver(&mut self, envelope: Envelope, attempt: u32) -> Then {
        let mut info = DeliveryInfo::new("test", self.topic.clone(), self.group.clone());
        info.redelivered = attempt > 1;
        info.delivery_count = Some(attempt.max(1));
        self.run(Incoming::new(envelope, info)).await
    }

    /// Delivers each envelope in turn, waiting for each to finish.
    pub async fn deliver_all(
        &mut self,
        envelopes: impl IntoIterator<Item = Envelope>,
    ) -> Vec<Then> {
        let mut results = Vec::new();
        for envelope in envelopes {
            results.push(self.deliver(envelope).await);
        }
        results
    }

    /// Runs the handler on one prepared message (set extensions or delivery
    /// details yourself).
    pub async fn run(&mut self, incoming: Incoming) -> Then {
        let id = incoming.envelope.id.clone();
        let attempt = incoming.attempt;
        let handler = self.handler.clone();
        let call = async move { handler.oneshot(incoming).await };
        let result = match AssertUnwindSafe(call).catch_unwind().await {
            Ok(Ok(response)) => Answer::Response(response),
            Ok(Err(error)) => Answer::Error(error),
            Err(panic) => Answer::Panic(panic_message(panic.as_ref())),
        };
        Then {
            id,
            attempt,
            result,
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

#[derive(Debug)]
enum Answer {
    Response(Response),
    Error(HandlerError),
    Panic(String),
}

/// What the handler answered to one delivery.
#[derive(Debug)]
pub struct Then {
    id: String,
    attempt: u32,
    result: Answer,
}

impl Then {
    /// The delivered message's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The attempt the handler saw.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The outcome, when the handler answered with a response.
    pub fn outcome(&self) -> Option<Outcome> {
        match &self.result {
            Answer::Response(response) => Some(response.outcome),
            _ => None,
        }
    }

    /// The messages the handler emitted (empty when it failed).
    pub fn outputs(&self) -> &[Output] {
        match &self.result {
            Answer::Response(response) => &response.outputs,
            _ => &[],
        }
    }

    /// The error, when the handler failed.
    pub fn error(&self) -> Option<&HandlerError> {
        match &self.result {
            Answer::Error(error) => Some(error),
            _ => None,
        }
    }

    /// The class of the failure: the error's, or permanent for a panic (as
    /// the worker treats it).
    pub fn failure_class(&self) -> Option<ErrorClass> {
        match &self.result {
            Answer::Response(_) => None,
            Answer::Error(error) => Some(error.class()),
            Answer::Panic(_) => Some(ErrorClass::Permanent),
        }
    }

    /// The panic message, when the handler panicked.
    pub fn panic(&self) -> Option<&str> {
        match &self.result {
            Answer::Panic(message) => Some(message),
            _ => None,
        }
    }

    /// The response, when the handler answered with one.
    pub fn response(&self) -> Option<&Response> {
        match &self.result {
            Answer::Response(response) => Some(response),
            _ => None,
        }
    }
}

/// A [`Publisher`] that keeps every message published to it, confirmed at
/// once. Clones share the record.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    published: Arc<Mutex<Vec<(String, Envelope)>>>,
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every message published, with its topic, in order.
    pub fn all(&self) -> Vec<(String, Envelope)> {
        self.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The messages published to `topic`, in order.
    pub fn published(&self, topic: &str) -> Vec<Envelope> {
        self.all()
            .into_iter()
            .filter(|(t, _)| t == topic)
            .map(|(_, e)| e)
            .collect()
    }

    /// Forgets everything recorded so far.
    pub fn clear(&self) {
        self.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

impl Publisher for Recorder {
    async fn send(&self, topic: &str, envelope: Envelope) -> TransportResult<Confirmation> {
        self.published
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((topic.to_owned(), envelope));
        Ok(Confirmation::ready(Ok(Receipt::new(topic))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use surety_core::consumer::handler_fn;

    #[tokio::test]
    async fn reports_responses_errors_and_panics() {
        let handler = handler_fn(|msg: Incoming| async move {
            match msg.envelope.event_type.as_str() {
                "ok" => Ok(Outcome::Handled),
                "busy" => Err(HandlerError::transient("busy")),
                _ => panic!("unexpected {}", msg.envelope.event_type),
            }
        });
        let mut test = HandlerTest::new(handler);
        let ok = test.deliver(Envelope::builder("/s", "ok").build()).await;
        assert_eq!(ok.outcome(), Some(Outcome::Handled));
        assert_eq!(ok.attempt(), 1);
        let busy = test
            .redeliver(Envelope::builder("/s", "busy").build(), 3)
            .await;
        assert!(busy.failure_class().is_some_and(|c| c.is_retryable()));
        assert_eq!(busy.attempt(), 3);
        let boom = test.deliver(Envelope::builder("/s", "boom").build()).await;
        assert_eq!(boom.panic(), Some("unexpected boom"));
        assert_eq!(boom.failure_class(), Some(ErrorClass::Permanent));
    }

    #[tokio::test]
    async fn the_recorder_keeps_what_is_published() {
        let recorder = Recorder::new();
        recorder
            .publish("a", Envelope::builder("/s", "x").build())
            .await
            .expect("recorded");
        recorder
            .publish("b", Envelope::builder("/s", "y").build())
            .await
            .expect("recorded");
        assert_eq!(recorder.published("a").len(), 1);
        assert_eq!(recorder.all().len(), 2);
        recorder.clear();
        assert!(recorder.all().is_empty());
    }
}
