//! Handlers from async functions: [`handler_fn`], [`typed`], and [`AckAll`].

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tower::Service;

use super::{Incoming, Response};
use crate::envelope::Message;
use crate::error::{Classify, HandlerError};

/// A handler from an async function of the [`Incoming`] message.
///
/// The function returns anything that converts into a [`Response`] (`()`,
/// an [`Outcome`](super::Outcome), an [`Output`](super::Output), ...) or
/// any error that implements [`Classify`].
///
/// ```
/// use surety_core::consumer::{handler_fn, Incoming};
/// use surety_core::Permanent;
///
/// let handler = handler_fn(|msg: Incoming| async move {
///     if msg.envelope.payload.is_empty() {
///         return Err(Permanent::new("empty order"));
///     }
///     Ok(())
/// });
/// # let _ = handler;
/// ```
pub fn handler_fn<F, Fut, R, E>(f: F) -> HandlerFn<F>
where
    F: Fn(Incoming) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
    R: Into<Response>,
    E: Classify + std::error::Error + Send + Sync + 'static,
{
    HandlerFn { f }
}

/// The handler returned by [`handler_fn`].
#[derive(Clone)]
pub struct HandlerFn<F> {
    f: F,
}

impl<F> fmt::Debug for HandlerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerFn").finish_non_exhaustive()
    }
}

impl<F, Fut, R, E> Service<Incoming> for HandlerFn<F>
where
    F: Fn(Incoming) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
    R: Into<Response>,
    E: Classify + std::error::Error + Send + Sync + 'static,
{
    type Response = Response;
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<Response, HandlerError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Incoming) -> Self::Future {
        let fut = (self.f)(msg);
        Box::pin(async move { fut.await.map(Into::into).map_err(HandlerError::new) })
    }
}

/// A handler from an async function of the decoded [`Message`] `M` and the
/// [`Incoming`] message.
///
/// The message's `type` must be `M::TYPE`: any other type is a
/// [permanent](crate::ErrorClass::Permanent) failure (the message was sent to
/// the wrong handler) and the payload is never decoded as `M`. A payload
/// that does not decode is a [poison](crate::ErrorClass::Poison) failure.
/// The function never runs in either case. To handle several types from
/// one subscription, put typed handlers in a [`Router`](super::Router).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use surety_core::consumer::{typed, Incoming};
/// use surety_core::Message;
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderPlaced { order_id: String }
/// impl Message for OrderPlaced { const TYPE: &'static str = "com.example.order.placed"; }
///
/// let handler = typed(|order: OrderPlaced, _msg: Incoming| async move {
///     println!("placing {}", order.order_id);
///     Ok::<_, std::convert::Infallible>(())
/// });
/// # let _ = handler;
/// ```
pub fn typed<M, F, Fut, R, E>(f: F) -> Typed<M, F>
where
    M: Message + Send + 'static,
    F: Fn(M, Incoming) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
    R: Into<Response>,
    E: Classify + std::error::Error + Send + Sync + 'static,
{
    Typed {
        f,
        _payload: PhantomData,
    }
}

/// The handler returned by [`typed`].
pub struct Typed<M, F> {
    f: F,
    _payload: PhantomData<fn() -> M>,
}

impl<M, F: Clone> Clone for Typed<M, F> {
    fn clone(&self) -> Self {
        Self {
            f: self.f.clone(),
            _payload: PhantomData,
        }
    }
}

impl<M, F> fmt::Debug for Typed<M, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Typed")
            .field("message", &std::any::type_name::<M>())
            .finish_non_exhaustive()
    }
}

impl<M, F, Fut, R, E> Service<Incoming> for Typed<M, F>
where
    M: Message + Send + 'static,
    F: Fn(M, Incoming) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<R, E>> + Send + 'static,
    R: Into<Response>,
    E: Classify + std::error::Error + Send + Sync + 'static,
{
    type Response = Response;
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<Response, HandlerError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, msg: Incoming) -> Self::Future {
        // An envelope that did not decode is poison whatever its type
        // says; `decode` reports it.
        if msg.envelope.event_type != M::TYPE && msg.envelope.decode_error().is_none() {
            return Box::pin(std::future::ready(Err(HandlerError::permanent(format!(
                "message {} has type `{}`; this handler takes `{}`",
                msg.envelope.id,
                msg.envelope.event_type,
                M::TYPE
            )))));
        }
        let payload = match msg.envelope.decode::<M>() {
            Ok(payload) => payload,
            Err(err) => return Box::pin(std::future::ready(Err(HandlerError::new(err)))),
        };
        let fut = (self.f)(payload, msg);
        Box::pin(async move { fut.await.map(Into::into).map_err(HandlerError::new) })
    }
}

/// A service that handles nothing and succeeds; useful in tests and as a
/// layer base.
#[derive(Debug, Clone, Copy, Default)]
pub struct AckAll;

impl Service<Incoming> for AckAll {
    type Response = Response;
    type Error = HandlerError;
    type Future = std::future::Ready<Result<Response, HandlerError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Incoming) -> Self::Future {
        std::future::ready(Ok(Response::handled()))
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};
    use tower::ServiceExt;

    use super::*;
    use crate::envelope::Envelope;
    use crate::error::ErrorClass;
    use crate::port::DeliveryInfo;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Placed {
        order_id: String,
    }
    impl Message for Placed {
        const TYPE: &'static str = "order.placed";
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct Cancelled {
        order_id: String,
    }
    impl Message for Cancelled {
        const TYPE: &'static str = "order.cancelled";
    }

    fn incoming(env: Envelope) -> Incoming {
        Incoming::new(env, DeliveryInfo::new("memory", "orders", "g"))
    }

    #[tokio::test]
    async fn typed_refuses_another_type_of_the_same_shape() {
        let handler = typed(|_: Placed, _| async { Ok::<_, std::convert::Infallible>(()) });
        // Same JSON shape, different type: never decoded as `Placed`.
        let cancelled = Envelope::message(
            "/shop",
            &Cancelled {
                order_id: "o-1".into(),
            },
        )
        .expect("encodes")
        .build();
        let err = handler
            .clone()
            .oneshot(incoming(cancelled))
            .await
            .expect_err("wrong type");
        assert_eq!(err.class(), ErrorClass::Permanent);
        assert!(err.to_string().contains("order.cancelled"), "{err}");

        let placed = Envelope::message(
            "/shop",
            &Placed {
                order_id: "o-1".into(),
            },
        )
        .expect("encodes")
        .build();
        assert_eq!(
            handler.oneshot(incoming(placed)).await.expect("handled"),
            Response::handled()
        );
    }

    #[tokio::test]
    async fn typed_classifies_an_undecodable_payload_as_poison() {
        let handler = typed(|_: Placed, _| async { Ok::<_, std::convert::Infallible>(()) });
        let env = Envelope::builder("/shop", Placed::TYPE)
            .payload("{not json")
            .build();
        let err = handler.oneshot(incoming(env)).await.expect_err("poison");
        assert_eq!(err.class(), ErrorClass::Poison);
    }
}
