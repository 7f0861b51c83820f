//! Each fault of `FaultyTransport` happens as planned and has the effect it
//! promises, decisions are reproducible from the seed, and a `Worker` handles
//! every message despite all of them.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::time::Duration;

use futures::StreamExt;
use surety_core::consumer::{Incoming, Worker, handler_fn};
use surety_core::memory::MemoryTransport;
use surety_core::{Delivery, DeliveryStream, Envelope, Publisher, Subscriber, TransportErrorKind};
use surety_testkit::fault::{Fault, FaultEvent, FaultPlan, FaultStats, FaultyTransport};
use tokio::time::{Instant, timeout};

const TOPIC: &str = "orders";
const GROUP: &str = "billing";
const DEADLINE: Duration = Duration::from_secs(5);

fn env(id: &str) -> Envelope {
    Envelope::builder("/test", "test.message").id(id).build()
}

fn keyed(id: &str, key: &str) -> Envelope {
    Envelope::builder("/test", "test.message")
        .id(id)
        .partition_key(key)
        .build()
}

async fn next(stream: &mut DeliveryStream) -> Delivery {
    timeout(DEADLINE, stream.next())
        .await
        .expect("a delivery within the deadline")
        .expect("the subscription is open")
        .expect("no subscription error")
}

fn faulty(plan: FaultPlan) -> FaultyTransport<MemoryTransport> {
    FaultyTransport::new(MemoryTransport::new(), plan)
}

/// The events as (fault, message id) pairs.
fn events(transport: &FaultyTransport<MemoryTransport>) -> Vec<(Fault, String)> {
    transport
        .events()
        .into_iter()
        .map(|e| (e.fault, e.message_id))
        .collect()
}

fn pairs(list: &[(Fault, &str)]) -> Vec<(Fault, String)> {
    list.iter().map(|(f, id)| (*f, (*id).to_owned())).collect()
}

#[tokio::test]
async fn duplicate_publishes_every_message_twice() {
    let t = faulty(FaultPlan::new(1).duplicate(1.0));
    let mut stream = t.subscribe(TOPIC, GROUP).await.unwrap();
    for n in 0..5 {
        t.publish(TOPIC, env(&format!("m-{n}"))).await.unwrap();
    }
    let mut received = Vec::new();
    for _ in 0..10 {
        let d = next(&mut stream).await;
        received.push(d.envelope().id.clone());
        d.ack().await.unwrap();
    }
    let expected: Vec<String> = (0..5)
        .flat_map(|n| [format!("m-{n}"), format!("m-{n}")])
        .collect();
    assert_eq!(received, expected, "each message arrives twice, in a row");
    assert_eq!(t.inner().depth(TOPIC, GROUP), 0, "nothing more to deliver");
    let stats = t.stats();
    assert_eq!(stats.duplicated, 5);
    assert_eq!(stats.total(), 5);
}

#[tokio::test]
async fn drop_leaves_the_delivery_unsettled_so_it_comes_back() {
    let t = faulty(FaultPlan::new(1).drop(1.0).max_forced_redeliveries(2));
    let mut stream = t.subscribe(TOPIC, GROUP).await.unwrap();
    t.publish(TOPIC, env("m-1")).await.unwrap();

    // Two deliveries never reached us; the third does.
    let d = next(&mut stream).await;
    assert_eq!(d.envelope().id, "m-1");
    assert!(d.info().redelivered);
    assert_eq!(d.info().delivery_count, Some(3));
    d.ack().await.unwrap();
    assert_eq!(t.inner().depth(TOPIC, GROUP), 0);
    assert_eq!(t.stats().dropped, 2);
    assert_eq!(
        events(&t),
        pairs(&[(Fault::Dropped, "m-1"), (Fault::Dropped, "m-1")])
    );
}

#[tokio::test]
async fn drop_without_a_limit_never_delivers_but_never_loses() {
    let t = faulty(FaultPlan::new(1).drop(1.0));
    let mut stream = t.subscribe(TOPIC, GROUP).await.unwrap();
    t.publish(TOPIC, env("m-1")).await.unwrap();
    // Absence needs a bounded wait: nothing gets through in 100 ms...
    let got = timeout(Duration::from_millis(100), stream.next()).await;
    assert!(got.is_err(), "every delivery is dropped");
    // ...while the transport kept the message and redelivered it again and again.
    assert!(t.stats().dropped > 1, "{}", t.stats());
    assert_eq!(t.inner().depth(TOPIC, GROUP), 1);
}

#[tokio::test(start_paused = true)]
async fn reorder_yields_a_delivery_after_the_next_one() {
    let window = Duration::from_millis(100);
    let t = faulty(FaultPlan::new(1).reorder(1.0).reorder_window(window));
    let mut stream = t.subscribe(TOPIC, GROUP).await.unwrap();
    for id in ["a", "b", "c"] {
        t.publish(TOPIC, env(id)).await.unwrap();
    }
    let mut received = Vec::new();
    for _ in 0..3 {
        let d = next(&mut stream).await;
        received.push(d.envelope().id.clone());
        d.ack().await.unwrap();
    }
    // `a` is held back and yielded after `b`; `c` is held back too, but no
    // next delivery comes within the window, so it is yielded on its own.
    assert_eq!(received, ["b", "a", "c"]);
    assert_eq!(t.stats().reordered, 1, "only `a` was overtaken");
    assert_eq!(events(&t), pairs(&[(Fault::Reordered, "a")]));
    assert_eq!(t.inner().depth(TOPIC, GROUP), 0);
}

#[tokio::test(start_paused = true)]
async fn delay_holds_publishes_and_deliveries_back() {
    let max = Duration::from_millis(200);
    let t = faulty(FaultPlan::new(5).delay_publish(1.0, max));
    let mut stream = t.subscribe(TOPIC, GROUP).await.unwrap();
    let started = Instant::now();
    t.publish(TOPIC, env("m-1")).await.unwrap();
    let elapsed = started.elapsed();
    let [event] = t.events().try_into().expect("one event");
    let Fault::PublishDelayed(delay) = event.fault else {
        panic!("expected a publish delay, got {event}");
    };
    assert!(delay > Duration::ZERO && delay <= max, "{delay:?}");
    assert!(
        elapsed >= delay,
        "publish took {elapsed:?}, delay was {delay:?}"
    );
    next(&mut stream).await.ack().await.unwrap();
    assert_eq!(t.stats().publish_delayed, 1);

    let t = faulty(FaultPlan::new(5).delay_delivery(1.0, max));
    let mut stream = t.subscribe(TOPIC, GROUP).await.unwrap();
    t.publish(TOPIC, env("m-2")).await.unwrap();
    let started = Instant::now();
    let d = next(&mut stream).await;
    let elapsed = started.elapsed();
    d.ack().await.unwrap();
    let [event] = t.events().try_into().expect("one event");
    let Fault::DeliveryDelayed(delay) = event.fault else {
        panic!("expected a delivery delay, got {event}");
    };
    assert!(delay > Duration::ZERO && delay <= max, "{delay:?}");
    assert!(
        elapsed >= delay,
        "delivery took {elapsed:?}, delay was {delay:?}"
    );
    assert_eq!(t.stats().delivery_delayed, 1);
}

#[tokio::test]
async fn fail_publish_errors_with_connection_and_publishes_nothing() {
    let t = faulty(FaultPlan::new(1).fail_publish(1.0));
    let mut stream = t.subscribe(TOPIC, GROUP).await.unwrap();
    let err = t.publish(TOPIC, env("m-1")).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Connection);
    let err = t.send(TOPIC, env("m-2")).await.err().unwrap();
    assert_eq!(err.kind(), TransportErrorKind::Connection);
    assert_eq!(t.inner().depth(TOPIC, GROUP), 0, "nothing was published");
    assert!(
        timeout(Duration::from_millis(50), stream.next())
            .await
            .is_err()
    );
    assert_eq!(t.stats().publish_failed, 2);
}

#[tokio::test]
async fn a_seeded_probability_fails_exactly_the_publishes_it_counts() {
    let t = faulty(FaultPlan::new(11).fail_publish(0.5));
    let _group = t.subscribe(TOPIC, GROUP).await.unwrap();
    let mut ok = 0u64;
    for n in 0..100 {
        if t.publish(TOPIC, env(&format!("m-{n}"))).await.is_ok() {
            ok += 1;
        }
    }
    let failed = t.stats().publish_failed;
    assert_eq!(ok + failed, 100);
    assert!((20..=80).contains(&failed), "about half fail: {failed}");
    assert_eq!(t.inner().depth(TOPIC, GROUP) as u64, ok);
}

#[tokio::test]
async fn fail_ack_errors_and_the_message_comes_back() {
    let t = faulty(FaultPlan::new(1).fail_ack(1.0));
    let mut stream = t.subscribe(TOPIC, GROUP).await.unwrap();
    t.publish(TOPIC, env("m-1")).await.unwrap();

    let d = next(&mut stream).await;
    let err = d.ack().await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Ack);
    assert_eq!(t.inner().depth(TOPIC, GROUP), 1, "not acknowledged");

    let again = next(&mut stream).await;
    assert_eq!(again.envelope().id, "m-1");
    assert_eq!(again.info().delivery_count, Some(2));
    // Only acks fail: reject goes through.
    again.reject().await.unwrap();
    assert_eq!(t.inner().depth(TOPIC, GROUP), 0);
    assert_eq!(t.inner().rejected(TOPIC, GROUP).len(), 1);
    assert_eq!(t.stats().ack_failed, 1);
    assert_eq!(events(&t), pairs(&[(Fault::AckFailed, "m-1")]));
}

#[tokio::test]
async fn the_redelivery_limit_lets_every_message_through() {
    let plan = FaultPlan::new(1)
        .drop(1.0)
        .fail_ack(1.0)
        .max_forced_redeliveries(2);
    let t = faulty(plan);
    let mut stream = t.subscribe(TOPIC, GROUP).await.unwrap();
    t.publish(TOPIC, env("m-1")).await.unwrap();
    // Both forced redeliveries go to drops; the ack is then allowed.
    let d = next(&mut stream).await;
    assert_eq!(d.info().delivery_count, Some(3));
    d.ack().await.unwrap();
    assert_eq!(t.inner().depth(TOPIC, GROUP), 0);
    let stats = t.stats();
    assert_eq!((stats.dropped, stats.ack_failed), (2, 0));
}

/// Publishes and consumes 30 messages under every fault; returns what
/// happened.
async fn scenario(seed: u64) -> (Vec<FaultEvent>, FaultStats, Vec<String>) {
    let plan = FaultPlan::new(seed)
        .drop(0.3)
        .duplicate(0.3)
        .reorder(0.3)
        .reorder_window(Duration::from_millis(10))
        .delay_publish(0.3, Duration::from_millis(5))
        .delay_delivery(0.3, Duration::from_millis(5))
        .fail_publish(0.2)
        .fail_ack(0.3)
        .max_forced_redeliveries(2);
    let t = faulty(plan);
    let mut stream = t.subscribe(TOPIC, GROUP).await.unwrap();
    for n in 0..30 {
        let _ = t
            .publish(TOPIC, keyed(&format!("m-{n:02}"), &format!("k-{}", n % 3)))
            .await;
    }
    let mut received = Vec::new();
    while t.inner().depth(TOPIC, GROUP) > 0 {
        let d = next(&mut stream).await;
        received.push(d.envelope().id.clone());
        let _ = d.ack().await;
    }
    (t.events(), t.stats(), received)
}

#[tokio::test(start_paused = true)]
async fn the_same_seed_gives_the_same_faults() {
    let first = scenario(42).await;
    let again = scenario(42).await;
    assert_eq!(first, again);

    let (_, stats, received) = &first;
    for (kind, count) in [
        ("dropped", stats.dropped),
        ("duplicated", stats.duplicated),
        ("reordered", stats.reordered),
        ("publish delayed", stats.publish_delayed),
        ("delivery delayed", stats.delivery_delayed),
        ("publish failed", stats.publish_failed),
        ("ack failed", stats.ack_failed),
    ] {
        assert!(
            count > 0,
            "the scenario injects every fault; no {kind}: {stats}"
        );
    }
    let published = 30 - stats.publish_failed;
    assert_eq!(
        received.len() as u64,
        published + stats.duplicated + stats.ack_failed,
        "every published copy is received once, plus once per failed ack ({stats})"
    );

    let other = scenario(43).await;
    assert_ne!(first.0, other.0, "another seed, other faults");
}

#[tokio::test]
async fn a_worker_handles_every_message_despite_faults() {
    let plan = FaultPlan::new(2024)
        .drop(0.2)
        .duplicate(0.2)
        .reorder(0.3)
        .reorder_window(Duration::from_millis(20))
        .fail_ack(0.2)
        .max_forced_redeliveries(3);
    let t = faulty(plan);
    let deliveries = t.subscribe(TOPIC, GROUP).await.unwrap();

    let (handled_tx, mut handled) = tokio::sync::mpsc::unbounded_channel();
    let handler = handler_fn(move |msg: Incoming| {
        let handled_tx = handled_tx.clone();
        async move {
            handled_tx.send(msg.envelope.id).ok();
            Ok::<_, Infallible>(())
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(Worker::new(handler).concurrency(4).run(deliveries, async {
        stopped.await.ok();
    }));

    let mut published = HashSet::new();
    for n in 0..50 {
        let env = keyed(&format!("m-{n:02}"), &format!("k-{}", n % 5));
        published.insert(env.id.clone());
        t.publish(TOPIC, env).await.unwrap();
    }

    let mut times_handled: HashMap<String, u32> = HashMap::new();
    while times_handled.len() < published.len() {
        let id = timeout(DEADLINE, handled.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "handled {} of {} messages; faults: {}",
                    times_handled.len(),
                    published.len(),
                    t.stats()
                )
            })
            .expect("the handler is alive");
        *times_handled.entry(id).or_default() += 1;
    }
    stop.send(()).ok();
    let report = timeout(DEADLINE, worker).await.unwrap().unwrap();

    let handled_ids: HashSet<String> = times_handled.keys().cloned().collect();
    assert_eq!(handled_ids, published);
    let stats = t.stats();
    assert!(stats.dropped > 0, "{stats}");
    assert!(stats.duplicated > 0, "{stats}");
    assert!(stats.reordered > 0, "{stats}");
    assert!(stats.ack_failed > 0, "{stats}");
    assert_eq!(
        report.settle_failures, stats.ack_failed,
        "the worker saw every injected ack failure"
    );
    assert!(
        times_handled.values().any(|&n| n > 1),
        "duplicates and failed acks make some messages run twice"
    );
}

#[test]
fn public_types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<FaultyTransport<MemoryTransport>>();
    check::<FaultPlan>();
    check::<FaultStats>();
    check::<FaultEvent>();
}

#[tokio::test]
async fn clones_share_the_generator_and_the_counters() {
    let t = faulty(FaultPlan::new(1).fail_publish(1.0));
    let clone = t.clone();
    let err = clone.publish(TOPIC, env("m-1")).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Connection);
    assert_eq!(t.stats().publish_failed, 1);
}
