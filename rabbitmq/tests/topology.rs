//! The topology helpers against a real broker: delayed retries through TTL
//! queues, dead-letter queues, quorum delivery limits.

mod common;

use std::time::{Duration, Instant};

use common::{WAIT, cleanup, config, connect, next, nothing_before_marker, unique, url};
use surety_core::{Close, Envelope, Publisher, Subscriber};
use surety_rabbitmq::lapin::Channel;
use surety_rabbitmq::lapin::options::BasicGetOptions;
use surety_rabbitmq::topology::{RetryLadder, WorkQueue};
use surety_rabbitmq::{QueueType, X_DELIVERY_COUNT};
use surety_testkit::rabbitmqctl::queue_depth;
use surety_testkit::wait::eventually;

/// Takes one message from `queue` with `basic.get`, waiting for it.
async fn get(channel: &Channel, queue: &str) -> surety_rabbitmq::lapin::message::BasicGetMessage {
    let started = Instant::now();
    loop {
        let got = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get");
        if let Some(message) = got {
            return message;
        }
        assert!(started.elapsed() < WAIT, "nothing arrived in {queue}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn ce_id(message: &surety_rabbitmq::lapin::message::BasicGetMessage) -> String {
    let headers = message
        .delivery
        .properties
        .headers()
        .clone()
        .expect("headers");
    match headers.inner().get("ce_id") {
        Some(surety_rabbitmq::lapin::types::AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("no ce_id: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_level_brings_the_message_back_after_its_ttl() {
    let Some(url) = url() else { return };
    let transport = connect(config(&url)).await;
    let channel = transport.channel().await.unwrap();
    let topic = unique("retry");
    let work = WorkQueue::for_group("surety", &topic, "worker");
    work.declare(&channel).await.unwrap();
    let delay = Duration::from_millis(700);
    let ladder = RetryLadder::new(work.name(), "surety", [delay, Duration::from_secs(60)]);
    let _cleanup = cleanup(&url, &topic, &["worker", "audit"])
        .queue(work.dead_letter_queue())
        .exchange(work.dead_letter_exchange());
    for level in 0..=ladder.levels() {
        if let Some(queue) = ladder.level_queue(level) {
            _cleanup.add_queue(queue);
        }
    }
    ladder.declare(&channel).await.unwrap();
    // Declaring again is harmless.
    work.declare(&channel).await.unwrap();
    ladder.declare(&channel).await.unwrap();

    let mut worker = transport.subscribe(&topic, "worker").await.unwrap();
    let mut other_group = transport.subscribe(&topic, "audit").await.unwrap();
    let env = Envelope::builder("/test", "test.retry")
        .header("surety-attempt", "2")
        .payload("again")
        .build();
    let sent = Instant::now();
    transport
        .publish(&ladder.topic(1).unwrap(), env.clone())
        .await
        .expect("the retry level is bound");
    let delivery = next(&mut worker).await;
    let waited = sent.elapsed();
    assert!(
        waited >= delay - Duration::from_millis(50),
        "came back after {waited:?}"
    );
    let back = delivery.envelope();
    assert_eq!(back.id, env.id);
    assert_eq!(back.payload, env.payload);
    assert_eq!(back.headers.get("surety-attempt"), Some("2"));
    assert_eq!(delivery.attempt(), 2);
    // RabbitMQ's record of the trip, as JSON.
    let x_death: serde_json::Value =
        serde_json::from_str(back.headers.get("x-death").expect("x-death")).unwrap();
    assert_eq!(x_death[0]["reason"], "expired");
    assert_eq!(x_death[0]["queue"], ladder.level_queue(1).unwrap().as_str());
    delivery.ack().await.unwrap();
    // Only the work queue gets it back, not the topic's other groups.
    nothing_before_marker(&transport, &topic, &mut other_group).await;
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_message_lands_in_the_dead_letter_queue() {
    let Some(url) = url() else { return };
    let transport = connect(config(&url)).await;
    let channel = transport.channel().await.unwrap();
    let topic = unique("dlq");
    let work = WorkQueue::for_group("surety", &topic, "g");
    let _cleanup = cleanup(&url, &topic, &["g"])
        .queue(work.dead_letter_queue())
        .exchange(work.dead_letter_exchange());
    work.declare(&channel).await.unwrap();
    let mut stream = transport.subscribe(&topic, "g").await.unwrap();
    let env = Envelope::builder("/test", "test.poison")
        .payload("bad")
        .build();
    transport.publish(&topic, env.clone()).await.unwrap();
    next(&mut stream).await.reject().await.unwrap();
    let dead = get(&channel, &work.dead_letter_queue()).await;
    assert_eq!(ce_id(&dead), env.id);
    assert_eq!(dead.delivery.data, b"bad");
    nothing_before_marker(&transport, &topic, &mut stream).await;
    transport.close().await.unwrap();
}

/// A quorum queue counts deliveries (`x-delivery-count`) and dead-letters a
/// message that keeps failing past its delivery limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_dead_letters_past_its_delivery_limit() {
    let Some(url) = url() else { return };
    let quorum = QueueType::Quorum {
        delivery_limit: Some(2),
    };
    let transport = connect(config(&url).queue_type(quorum)).await;
    let channel = transport.channel().await.unwrap();
    let topic = unique("limit");
    let work = WorkQueue::for_group("surety", &topic, "g").queue_type(quorum);
    let _cleanup = cleanup(&url, &topic, &["g"])
        .queue(work.dead_letter_queue())
        .exchange(work.dead_letter_exchange());
    work.declare(&channel).await.unwrap();
    let mut stream = transport.subscribe(&topic, "g").await.unwrap();
    let env = Envelope::builder("/test", "test.flaky").build();
    transport.publish(&topic, env.clone()).await.unwrap();

    let mut counts = Vec::new();
    for _ in 0..3 {
        let delivery = next(&mut stream).await;
        assert_eq!(delivery.envelope().id, env.id);
        assert!(!delivery.envelope().headers.contains(X_DELIVERY_COUNT));
        counts.push(delivery.info().delivery_count);
        delivery.nack(true).await.unwrap();
    }
    assert_eq!(counts, [Some(1), Some(2), Some(3)]);
    let dead = get(&channel, &work.dead_letter_queue()).await;
    assert_eq!(ce_id(&dead), env.id);
    nothing_before_marker(&transport, &topic, &mut stream).await;
    eventually(WAIT, "the work queue to be empty", || async {
        queue_depth(work.name()) == Some(0)
    })
    .await;
    transport.close().await.unwrap();
}
