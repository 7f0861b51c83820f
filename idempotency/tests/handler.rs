//! The idempotency layer's logic, handler by handler, without a broker: a
//! duplicate is answered with the stored outputs and never runs the handler;
//! a failure releases the key so the redelivery runs it; a key held by a
//! delivery in progress makes the duplicate wait (transient), not run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use surety_core::consumer::{Incoming, Outcome, Output, handler_fn};
use surety_core::tower::Layer;
use surety_core::{Envelope, HandlerError};
use surety_idempotency::{IdempotencyLayer, MemoryDedupStore};
use surety_testkit::handler::HandlerTest;
use tokio::sync::{Notify, oneshot};

fn order(id: &str) -> Envelope {
    Envelope::builder("/orders", "order.placed")
        .id(id)
        .partition_key(id)
        .build()
}

#[tokio::test]
async fn a_duplicate_gets_the_stored_outputs_without_running_the_handler() {
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let handler = handler_fn(move |msg: Incoming| {
        let runs = counted.clone();
        async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            let confirmed = Envelope::builder("/orders", "order.confirmed")
                .caused_by(&msg.envelope)
                .header("run", n.to_string())
                .build();
            Ok::<_, HandlerError>(Output::new("orders.confirmed", confirmed))
        }
    });
    let layered = IdempotencyLayer::new(MemoryDedupStore::new()).layer(handler);
    let mut test = HandlerTest::new(layered).topic("orders");

    let first = test.deliver(order("o-1")).await;
    assert_eq!(first.outcome(), Some(Outcome::Handled));
    let again = test.redeliver(order("o-1"), 2).await;
    assert_eq!(again.outcome(), Some(Outcome::Duplicate));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
    // The same reply, re-emitted: same message id, same content.
    assert_eq!(again.outputs().len(), 1);
    assert_eq!(
        again.outputs()[0].envelope.id,
        first.outputs()[0].envelope.id
    );
    assert_eq!(again.outputs()[0].envelope.headers.get("run"), Some("1"));
    // Another message is not a duplicate.
    assert_eq!(
        test.deliver(order("o-2")).await.outcome(),
        Some(Outcome::Handled)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_failure_releases_the_key_for_the_redelivery() {
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let handler = handler_fn(move |_: Incoming| {
        let runs = counted.clone();
        async move {
            if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(HandlerError::transient("the database is busy"));
            }
            Ok(())
        }
    });
    let mut test = HandlerTest::new(IdempotencyLayer::new(MemoryDedupStore::new()).layer(handler));
    let failed = test.deliver(order("o-1")).await;
    assert!(failed.failure_class().is_some_and(|c| c.is_retryable()));
    let retried = test.redeliver(order("o-1"), 2).await;
    assert_eq!(retried.outcome(), Some(Outcome::Handled));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_duplicate_of_a_delivery_in_progress_waits_instead_of_running() {
    let started = Arc::new(Notify::new());
    let (release, released) = oneshot::channel::<()>();
    let released = Arc::new(tokio::sync::Mutex::new(Some(released)));
    let runs = Arc::new(AtomicU32::new(0));
    let (s, r, n) = (started.clone(), released.clone(), runs.clone());
    let handler = handler_fn(move |_: Incoming| {
        let (started, released, runs) = (s.clone(), r.clone(), n.clone());
        async move {
            runs.fetch_add(1, Ordering::SeqCst);
            started.notify_one();
            if let Some(released) = released.lock().await.take() {
                released.await.ok();
            }
            Ok::<_, HandlerError>(())
        }
    });
    let test = HandlerTest::new(IdempotencyLayer::new(MemoryDedupStore::new()).layer(handler));
    let mut first = test.clone();
    let slow = tokio::spawn(async move { first.deliver(order("o-1")).await });
    started.notified().await;
    // The first delivery holds the key: its duplicate is told to come back.
    let mut second = test.clone();
    let busy = second.redeliver(order("o-1"), 2).await;
    assert!(
        busy.failure_class().is_some_and(|c| c.is_retryable()),
        "{busy:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    release.send(()).ok();
    let first = slow.await.expect("the first delivery finishes");
    assert_eq!(first.outcome(), Some(Outcome::Handled));
    // Now it is a plain duplicate.
    assert_eq!(
        second.redeliver(order("o-1"), 3).await.outcome(),
        Some(Outcome::Duplicate)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
