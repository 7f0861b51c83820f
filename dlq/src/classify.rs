//! Classification in the pipeline: decode failures become poison before the
//! handler runs, and panics become permanent failures with their message.
//!
//! [`ClassifyLayer`] wraps any core `Handler`.
//! [`DlqLayer`](crate::DlqLayer) applies it itself, so it is only needed on
//! its own in a stack without dead-lettering.
//!
//! ```
//! use surety_core::consumer::{handler_fn, Incoming};
//! use surety_core::tower::{Layer, ServiceExt};
//! use surety_core::{Classify, DeliveryInfo, Envelope, ErrorClass};
//! use surety_dlq::classify::ClassifyLayer;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let handler = handler_fn(|_msg: Incoming| async move {
//!     if true { panic!("index out of bounds"); }
//!     Ok::<_, std::convert::Infallible>(())
//! });
//! let service = ClassifyLayer.layer(handler);
//! let msg = Incoming::new(Envelope::builder("/s", "t").build(), DeliveryInfo::new("memory", "t", "g"));
//! let err = service.oneshot(msg).await.unwrap_err();
//! assert_eq!(err.class(), ErrorClass::Permanent);
//! assert!(err.to_string().contains("index out of bounds"));
//! # }
//! ```

use std::panic::AssertUnwindSafe;
use std::task::{Context, Poll};

use futures::FutureExt;
use futures::future::BoxFuture;
use surety_core::consumer::{Handler, Incoming, Response};
use surety_core::error::panic_message;
use surety_core::{DecodeError, HandlerError};
use tower::{Layer, Service};

/// Wraps a handler in [`Classified`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ClassifyLayer;

impl<S> Layer<S> for ClassifyLayer {
    type Service = Classified<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Classified { inner }
    }
}

/// A handler whose every failure is classified: a message the transport
/// could not decode ([`Envelope::decode_error`](surety_core::Envelope::decode_error))
/// fails as poison without reaching the handler, and a panic in the handler
/// (while creating or polling its future) fails as permanent with the panic
/// message.
#[derive(Debug, Clone)]
pub struct Classified<S> {
    inner: S,
}

impl<S> Classified<S> {
    /// The wrapped handler.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Handler> Service<Incoming> for Classified<S> {
    type Response = Response;
    type Error = HandlerError;
    type Future = BoxFuture<'static, Result<Response, HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, msg: Incoming) -> Self::Future {
        if let Some(error) = msg.envelope.decode_error() {
            let err = HandlerError::new(DecodeError::Envelope(error.to_owned()));
            return Box::pin(std::future::ready(Err(err)));
        }
        let inner = &mut self.inner;
        match std::panic::catch_unwind(AssertUnwindSafe(move || inner.call(msg))) {
            Ok(fut) => Box::pin(AssertUnwindSafe(fut).catch_unwind().map(|result| {
                result.unwrap_or_else(|panic| Err(HandlerError::permanent(panic_message(&*panic))))
            })),
            Err(panic) => Box::pin(std::future::ready(Err(HandlerError::permanent(
                panic_message(&*panic),
            )))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use surety_core::consumer::handler_fn;
    use surety_core::{Classify, DeliveryInfo, Envelope, ErrorClass, Headers};
    use tower::ServiceExt;

    fn incoming(env: Envelope) -> Incoming {
        Incoming::new(env, DeliveryInfo::new("memory", "t", "g"))
    }

    #[tokio::test]
    async fn undecodable_messages_are_poison_and_never_reach_the_handler() {
        let called = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = called.clone();
        let handler = handler_fn(move |_msg: Incoming| {
            seen.store(true, std::sync::atomic::Ordering::SeqCst);
            async { Ok::<_, std::convert::Infallible>(()) }
        });
        let env = Envelope::undecodable(
            "kafka://t",
            "t/0/1",
            Headers::new(),
            "x".into(),
            &"no ce_id",
        );
        let err = ClassifyLayer
            .layer(handler)
            .oneshot(incoming(env))
            .await
            .unwrap_err();
        assert_eq!(err.class(), ErrorClass::Poison);
        assert!(err.to_string().contains("no ce_id"), "{err}");
        assert!(!called.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[derive(Clone)]
    struct PanicsInCall;

    impl Service<Incoming> for PanicsInCall {
        type Response = Response;
        type Error = HandlerError;
        type Future = std::future::Ready<Result<Response, HandlerError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Incoming) -> Self::Future {
            panic!("boom in call")
        }
    }

    #[tokio::test]
    async fn panics_while_creating_the_future_are_permanent() {
        let env = Envelope::builder("/s", "t").build();
        let err = ClassifyLayer
            .layer(PanicsInCall)
            .oneshot(incoming(env))
            .await
            .unwrap_err();
        assert_eq!(err.class(), ErrorClass::Permanent);
        assert_eq!(err.chain_message(100), "handler panicked: boom in call");
    }
}
