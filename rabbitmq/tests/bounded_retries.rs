//! Bounded retries on every queue type: a handler that always fails
//! transiently is tried exactly `max_deliveries` times and the message is
//! then rejected, on a queue of the default (classic) type and on a quorum
//! queue, whatever a producer wrote in the `surety-attempt` header.

mod common;

use std::sync::{Arc, Mutex};

use common::{WAIT, cleanup, config, connect, unique, url};
use surety_core::consumer::{Incoming, Worker, WorkerReport, handler_fn};
use surety_core::{Close, Envelope, HandlerError, Publisher, Subscriber};
use surety_rabbitmq::{QueueType, RabbitConfig, queue_name};
use surety_testkit::rabbitmqctl::queue_depth;
use surety_testkit::wait::eventually;

const MAX_DELIVERIES: u32 = 3;
const MARKER: &str = "test.marker";

/// What the handler saw: the attempt number of every try of the failing
/// message, and whether the marker arrived.
#[derive(Default)]
struct Seen {
    attempts: Vec<u32>,
    marker: bool,
}

/// Publishes one message (with `producer_attempt` in `surety-attempt`, if
/// any) to a fresh group on a transport connected with `config`, runs a
/// worker whose handler always fails it transiently, and returns the
/// attempts the handler saw and the worker's report, once the message has
/// left the queue and a marker published after that was handled.
async fn always_transient(
    config: RabbitConfig,
    producer_attempt: Option<u32>,
) -> (Vec<u32>, WorkerReport) {
    let url = config.url.clone();
    let transport = connect(config).await;
    let topic = unique("bounded");
    let queue = queue_name(&topic, "g");
    let _cleanup = cleanup(&url, &topic, &["g"]);
    let deliveries = transport.subscribe(&topic, "g").await.unwrap();

    let mut failing = Envelope::builder("/test", "test.failing").build();
    if let Some(attempt) = producer_attempt {
        failing.headers.set_attempt(attempt);
    }
    transport.publish(&topic, failing).await.unwrap();

    let seen = Arc::new(Mutex::new(Seen::default()));
    let handler = {
        let seen = seen.clone();
        handler_fn(move |msg: Incoming| {
            let seen = seen.clone();
            async move {
                let mut seen = seen.lock().unwrap();
                if msg.envelope.event_type == MARKER {
                    seen.marker = true;
                    return Ok(());
                }
                seen.attempts.push(msg.attempt);
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

    // The message is gone from the queue (not waiting, not out with the
    // worker) only once it was rejected.
    let at_least = if producer_attempt.unwrap_or(0) >= MAX_DELIVERIES {
        1
    } else {
        MAX_DELIVERIES as usize
    };
    eventually(WAIT, "the failing message to be rejected", || {
        let seen = seen.clone();
        let queue = queue.clone();
        async move {
            seen.lock().unwrap().attempts.len() >= at_least
                && tokio::task::spawn_blocking(move || queue_depth(&queue))
                    .await
                    .ok()
                    == Some(Some(0))
        }
    })
    .await;
    // A message published now is handled after anything still queued: when
    // it has been, no further attempt of the failing message is pending.
    transport
        .publish(&topic, Envelope::builder("/test", MARKER).build())
        .await
        .unwrap();
    eventually(WAIT, "the marker to be handled", || {
        let seen = seen.clone();
        async move { seen.lock().unwrap().marker }
    })
    .await;
    stop.send(()).unwrap();
    let report = worker.await.unwrap();
    transport.close().await.unwrap();
    let attempts = seen.lock().unwrap().attempts.clone();
    (attempts, report)
}

fn quorum(config: RabbitConfig) -> RabbitConfig {
    config.queue_type(QueueType::Quorum {
        delivery_limit: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_queue_rejects_after_max_deliveries() {
    let Some(url) = url() else { return };
    let (attempts, report) = always_transient(config(&url), None).await;
    assert_eq!(attempts, [1, 2, 3]);
    assert_eq!(report.rejected, 1);
    assert_eq!(report.requeued, u64::from(MAX_DELIVERIES - 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_rejects_after_max_deliveries() {
    let Some(url) = url() else { return };
    let (attempts, report) = always_transient(quorum(config(&url)), None).await;
    assert_eq!(attempts, [1, 2, 3]);
    assert_eq!(report.rejected, 1);
}

/// A producer that writes `surety-attempt: 1` cannot keep the attempt low:
/// the count grows on every redelivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_attempt_header_cannot_pin_the_count() {
    let Some(url) = url() else { return };
    for config in [config(&url), quorum(config(&url))] {
        let (attempts, report) = always_transient(config, Some(1)).await;
        assert_eq!(attempts, [1, 2, 3]);
        assert_eq!(report.rejected, 1);
    }
}

/// A producer that writes an attempt past the bound does not get the
/// message past it: the first transient failure rejects it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_attempt_past_the_bound_is_rejected_at_once() {
    let Some(url) = url() else { return };
    let (attempts, report) = always_transient(config(&url), Some(99)).await;
    assert_eq!(attempts, [99]);
    assert_eq!(report.rejected, 1);
    assert_eq!(report.requeued, 0);
}
