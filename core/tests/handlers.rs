//! Handler logic without a broker: typed handlers and the router, given
//! envelopes, then the outcome, the replies they emit and how failures are
//! classified.

use std::convert::Infallible;

use serde::{Deserialize, Serialize};
use surety_core::consumer::{Incoming, Outcome, Router, UnknownType, typed};
use surety_core::{Envelope, ErrorClass, Headers, Message};
use surety_testkit::handler::HandlerTest;

#[derive(Debug, Serialize, Deserialize)]
struct Capture {
    order_id: String,
    cents: u64,
}
impl Message for Capture {
    const TYPE: &'static str = "payment.capture";
}

#[derive(Debug, Serialize, Deserialize)]
struct Captured {
    order_id: String,
}
impl Message for Captured {
    const TYPE: &'static str = "payment.captured";
}

#[derive(Debug, Serialize, Deserialize)]
struct Refund {
    order_id: String,
}
impl Message for Refund {
    const TYPE: &'static str = "payment.refund";
}

fn capture(order_id: &str) -> Envelope {
    Envelope::message(
        "/checkout",
        &Capture {
            order_id: order_id.into(),
            cents: 1250,
        },
    )
    .expect("encodes")
    .reply_to("checkout.replies")
    .partition_key(order_id)
    .build()
}

fn payments() -> Router {
    Router::new()
        .on(|cmd: Capture, msg: Incoming| async move {
            msg.envelope.reply(
                "/payments",
                &Captured {
                    order_id: cmd.order_id,
                },
            )
        })
        .on(|_: Refund, _: Incoming| async move { Ok::<_, Infallible>(Outcome::Handled) })
}

#[tokio::test]
async fn a_command_gets_its_reply_addressed_and_correlated() {
    let mut test = HandlerTest::new(payments()).topic("payments");
    let request = capture("o-1");
    let then = test.deliver(request.clone()).await;
    assert_eq!(then.outcome(), Some(Outcome::Handled));
    let [reply] = then.outputs() else {
        panic!("one reply, got {:?}", then.outputs());
    };
    assert_eq!(reply.destination, "checkout.replies");
    assert_eq!(reply.envelope.event_type, Captured::TYPE);
    assert_eq!(
        reply.envelope.causation_id.as_deref(),
        Some(request.id.as_str())
    );
    assert_eq!(reply.envelope.partition_key.as_deref(), Some("o-1"));
    let captured: Captured = reply.envelope.decode().expect("a Captured payload");
    assert_eq!(captured.order_id, "o-1");
}

#[tokio::test]
async fn unknown_types_are_rejected_or_ignored_as_configured() {
    let stranger = Envelope::builder("/audit", "payment.audited").build();
    let rejected = HandlerTest::new(payments()).deliver(stranger.clone()).await;
    assert_eq!(rejected.failure_class(), Some(ErrorClass::Permanent));
    let ignored = HandlerTest::new(payments().unknown(UnknownType::Ignore))
        .deliver(stranger)
        .await;
    assert_eq!(ignored.outcome(), Some(Outcome::Ignored));
    assert!(ignored.outputs().is_empty());
}

#[tokio::test]
async fn bad_payloads_are_poison_and_wrong_types_permanent() {
    let mut test = HandlerTest::new(payments());
    // The right type, a payload that is not a Capture.
    let garbled = Envelope::builder("/checkout", Capture::TYPE)
        .payload(&b"{\"order_id\": 7}"[..])
        .build();
    assert_eq!(
        test.deliver(garbled).await.failure_class(),
        Some(ErrorClass::Poison)
    );
    // A typed handler given another type refuses it without decoding.
    let only_captures =
        typed(|_: Capture, _: Incoming| async move { Ok::<_, Infallible>(Outcome::Handled) });
    let refund = Envelope::message(
        "/checkout",
        &Refund {
            order_id: "o-1".into(),
        },
    )
    .expect("encodes")
    .build();
    let then = HandlerTest::new(only_captures).deliver(refund).await;
    assert_eq!(then.failure_class(), Some(ErrorClass::Permanent));
    // A message the transport could not read never reaches a handler.
    let unreadable = Envelope::undecodable(
        "kafka://payments",
        "payments/0/9",
        Headers::new(),
        "??".into(),
        &"missing ce_id",
    );
    assert_eq!(
        test.deliver(unreadable).await.failure_class(),
        Some(ErrorClass::Poison)
    );
}

#[tokio::test]
async fn a_command_without_reply_to_cannot_be_answered() {
    let request = Envelope::message(
        "/checkout",
        &Capture {
            order_id: "o-2".into(),
            cents: 1,
        },
    )
    .expect("encodes")
    .build();
    let then = HandlerTest::new(payments()).deliver(request).await;
    assert_eq!(then.failure_class(), Some(ErrorClass::Permanent));
    assert!(then.outputs().is_empty());
}
