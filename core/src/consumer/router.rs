//! [`Router`]: one subscription, several message types, each to its own
//! handler.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower::{Service, ServiceExt};

use super::{Handler, Incoming, Outcome, Response, typed};
use crate::envelope::Message;
use crate::error::{Classify, HandlerError};

/// What a [`Router`] does with a message whose type has no route.
///
/// A message the transport could not decode (see
/// [`Envelope::undecodable`](crate::Envelope::undecodable)) is
/// [poison](crate::ErrorClass::Poison) either way: it is dead-lettered with
/// its raw payload, never ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum UnknownType {
    /// A [permanent](crate::ErrorClass::Permanent) failure: the message is
    /// rejected (or dead-lettered by a DLQ layer around the router). The
    /// default: a message nobody handles is a mistake to look at.
    #[default]
    Reject,
    /// Acknowledged without handling, as [`Outcome::Ignored`]: for topics
    /// that carry types this consumer does not care about.
    Ignore,
}

type Route =
    Arc<dyn Fn(Incoming) -> BoxFuture<'static, Result<Response, HandlerError>> + Send + Sync>;

/// Dispatches each message to the handler registered for its `type`
/// (`envelope.event_type`), so one subscription can carry several message
/// types (a saga's replies, an order's events) and each is decoded only as
/// its own struct.
///
/// A message whose type has no route is handled as [`UnknownType`] says
/// (rejected by default). A router is itself a handler: wrap it in layers
/// (deduplication, dead-lettering) and run it in a
/// [`Worker`](super::Worker).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use surety_core::consumer::{Incoming, Outcome, Router, UnknownType};
/// use surety_core::tower::ServiceExt;
/// use surety_core::{DeliveryInfo, Envelope, Message};
///
/// #[derive(Serialize, Deserialize)]
/// struct PaymentCaptured { order_id: String }
/// impl Message for PaymentCaptured { const TYPE: &'static str = "payment.captured"; }
///
/// #[derive(Serialize, Deserialize)]
/// struct PaymentDeclined { order_id: String, reason: String }
/// impl Message for PaymentDeclined { const TYPE: &'static str = "payment.declined"; }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let router = Router::new()
///     .on(|captured: PaymentCaptured, _msg: Incoming| async move {
///         println!("captured {}", captured.order_id);
///         Ok::<_, std::convert::Infallible>(())
///     })
///     .on(|declined: PaymentDeclined, _msg: Incoming| async move {
///         println!("declined {}: {}", declined.order_id, declined.reason);
///         Ok::<_, std::convert::Infallible>(())
///     })
///     .unknown(UnknownType::Ignore);
///
/// let info = DeliveryInfo::new("memory", "checkout.replies", "checkout");
/// let other = Envelope::builder("/payments", "payment.audited").build();
/// let response = router.oneshot(Incoming::new(other, info)).await?;
/// assert_eq!(response.outcome, Outcome::Ignored);
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct Router {
    routes: Arc<HashMap<String, Route, foldhash::fast::RandomState>>,
    unknown: UnknownType,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut types: Vec<&str> = self.routes.keys().map(String::as_str).collect();
        types.sort_unstable();
        f.debug_struct("Router")
            .field("types", &types)
            .field("unknown", &self.unknown)
            .finish()
    }
}

impl Router {
    /// A router with no routes that rejects every message.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes messages of type `M::TYPE` to an async function of the decoded
    /// `M` (a [`typed`] handler).
    pub fn on<M, F, Fut, R, E>(self, f: F) -> Self
    where
        M: Message + Send + 'static,
        F: Fn(M, Incoming) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<R, E>> + Send + 'static,
        R: Into<Response>,
        E: Classify + std::error::Error + Send + Sync + 'static,
    {
        self.route(M::TYPE, typed(f))
    }

    /// Routes messages whose `type` is `event_type` to `handler` (any
    /// handler, with its own layers). A second route for the same type
    /// replaces the first, with a warning.
    pub fn route<S>(mut self, event_type: impl Into<String>, handler: S) -> Self
    where
        S: Handler + Sync,
    {
        let event_type = event_type.into();
        let route: Route = Arc::new(move |msg| Box::pin(handler.clone().oneshot(msg)));
        let routes = Arc::make_mut(&mut self.routes);
        if routes.insert(event_type.clone(), route).is_some() {
            tracing::warn!(
                event_type,
                "a second route for this type replaces the first"
            );
        }
        self
    }

    /// What to do with a message whose type has no route (default
    /// [`UnknownType::Reject`]).
    pub fn unknown(mut self, unknown: UnknownType) -> Self {
        self.unknown = unknown;
        self
    }

    /// The types this router has a route for.
    pub fn types(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }
}

impl Service<Incoming> for Router {
    type Response = Response;
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<Response, HandlerError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Incoming) -> Self::Future {
        if let Some(route) = self.routes.get(msg.envelope.event_type.as_str()) {
            return route(msg);
        }
        // A message the transport could not read has no trustworthy type:
        // it is poison, to be dead-lettered with its raw payload, never
        // ignored.
        if let Some(reason) = msg.envelope.decode_error() {
            let err = HandlerError::poison(format!(
                "message {} could not be decoded: {reason}",
                msg.envelope.id
            ));
            return Box::pin(std::future::ready(Err(err)));
        }
        let result = match self.unknown {
            UnknownType::Ignore => {
                tracing::debug!(
                    event_type = %msg.envelope.event_type,
                    "no route for this message type; ignored"
                );
                Ok(Response::outcome(Outcome::Ignored))
            }
            UnknownType::Reject => Err(HandlerError::permanent(format!(
                "no handler for message type `{}` (message {})",
                msg.envelope.event_type, msg.envelope.id
            ))),
        };
        Box::pin(std::future::ready(result))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde::{Deserialize, Serialize};

    use super::*;
    use crate::envelope::Envelope;
    use crate::error::ErrorClass;
    use crate::port::DeliveryInfo;

    #[derive(Serialize, Deserialize)]
    struct A {
        n: u32,
    }
    impl Message for A {
        const TYPE: &'static str = "t.a";
    }
    #[derive(Serialize, Deserialize)]
    struct B {
        n: u32,
    }
    impl Message for B {
        const TYPE: &'static str = "t.b";
    }

    fn incoming<M: Message>(m: &M) -> Incoming {
        let env = Envelope::message("/s", m).expect("encodes").build();
        Incoming::new(env, DeliveryInfo::new("memory", "t", "g"))
    }

    #[tokio::test]
    async fn each_type_reaches_its_own_handler() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (sa, sb) = (Arc::clone(&seen), Arc::clone(&seen));
        let router = Router::new()
            .on(move |a: A, _| {
                let seen = Arc::clone(&sa);
                async move {
                    seen.lock().expect("lock").push(format!("a{}", a.n));
                    Ok::<_, std::convert::Infallible>(())
                }
            })
            .on(move |b: B, _| {
                let seen = Arc::clone(&sb);
                async move {
                    seen.lock().expect("lock").push(format!("b{}", b.n));
                    Ok::<_, std::convert::Infallible>(())
                }
            });
        router
            .clone()
            .oneshot(incoming(&A { n: 1 }))
            .await
            .expect("a");
        router
            .clone()
            .oneshot(incoming(&B { n: 2 }))
            .await
            .expect("b");
        assert_eq!(*seen.lock().expect("lock"), ["a1", "b2"]);

        let mut types: Vec<&str> = router.types().collect();
        types.sort_unstable();
        assert_eq!(types, ["t.a", "t.b"]);
    }

    #[tokio::test]
    async fn an_unknown_type_is_rejected_by_default_and_can_be_ignored() {
        let only_a = Router::new().on(|_: A, _| async { Ok::<_, std::convert::Infallible>(()) });
        let err = only_a
            .clone()
            .oneshot(incoming(&B { n: 1 }))
            .await
            .expect_err("no route");
        assert_eq!(err.class(), ErrorClass::Permanent);
        assert!(err.to_string().contains("t.b"), "{err}");

        let ignoring = only_a.unknown(UnknownType::Ignore);
        let response = ignoring
            .oneshot(incoming(&B { n: 1 }))
            .await
            .expect("ignored");
        assert_eq!(response.outcome, Outcome::Ignored);
    }
}
