//! Bounded retries: a handler that always fails transiently is tried exactly
//! `max_deliveries` times and the record is then rejected (its offset
//! committed past), whatever a producer wrote in `surety-attempt`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use surety_core::consumer::{Incoming, Worker, handler_fn};
use surety_core::{Close, Envelope, HandlerError, Publisher, Subscriber};
use surety_kafka::KafkaTransport;
use surety_testkit::wait::eventually;

const LIMIT: Duration = Duration::from_secs(30);
const MAX_DELIVERIES: u32 = 3;
const MARKER: &str = "test.marker";

async fn always_transient(producer_attempt: Option<u32>) -> Option<Vec<u32>> {
    let brokers = common::brokers()?;
    common::init_tracing();
    let kafka = KafkaTransport::connect(common::config(&brokers))
        .await
        .expect("connect");
    let (topic, group) = (common::unique("bounded"), common::unique("group"));
    let _cleanup = common::delete_on_drop(&brokers, &[&topic]);
    let deliveries = kafka.subscribe(&topic, &group).await.unwrap();
    let mut failing = Envelope::builder("/test", "test.failing").build();
    if let Some(attempt) = producer_attempt {
        failing.headers.set_attempt(attempt);
    }
    kafka.publish(&topic, failing).await.unwrap();

    let attempts = Arc::new(Mutex::new(Vec::<u32>::new()));
    let handler = {
        let attempts = attempts.clone();
        handler_fn(move |msg: Incoming| {
            let attempts = attempts.clone();
            async move {
                if msg.envelope.event_type == MARKER {
                    return Ok(());
                }
                attempts.lock().unwrap().push(msg.attempt);
                Err(HandlerError::transient("the downstream is always down"))
            }
        })
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(Worker::new(handler).max_deliveries(MAX_DELIVERIES).run(
        deliveries,
        async {
            stopped.await.ok();
        },
    ));
    let expected = if producer_attempt.unwrap_or(0) >= MAX_DELIVERIES {
        1
    } else {
        MAX_DELIVERIES
    };
    eventually(LIMIT, "the last attempt", || {
        let attempts = attempts.clone();
        async move { attempts.lock().unwrap().len() >= expected as usize }
    })
    .await;
    // Stopping waits for the last attempt to be settled.
    stop.send(()).unwrap();
    let report = worker.await.unwrap();
    assert_eq!(report.rejected, 1, "{report:?}");
    assert_eq!(report.requeued, u64::from(expected - 1), "{report:?}");

    // The group's offset is past the rejected record: a new member starts
    // with a record published after it.
    kafka
        .publish(&topic, Envelope::builder("/test", MARKER).build())
        .await
        .unwrap();
    let mut rejoined = kafka.subscribe(&topic, &group).await.unwrap();
    let first = common::next(&mut rejoined, LIMIT).await;
    assert_eq!(first.envelope().event_type, MARKER);
    first.ack().await.unwrap();
    drop(rejoined);
    kafka.close().await.unwrap();
    let attempts = attempts.lock().unwrap().clone();
    Some(attempts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_always_transient_record_is_rejected_after_max_deliveries() {
    let Some(attempts) = always_transient(None).await else {
        return;
    };
    assert_eq!(attempts, [1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_attempt_header_cannot_pin_or_skip_the_count() {
    let Some(attempts) = always_transient(Some(1)).await else {
        return;
    };
    assert_eq!(attempts, [1, 2, 3]);
    let Some(attempts) = always_transient(Some(99)).await else {
        return;
    };
    assert_eq!(attempts, [99]);
}
