//! Backpressure against the real broker: a backlog far larger than the
//! subscription's buffer streams through without pausing, and an
//! application that stops taking deliveries gets its partitions paused
//! while its group goes on being served.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use surety_core::{Close, Envelope, Publisher, Subscriber, TransportErrorKind};
use surety_kafka::{KafkaMetrics, KafkaTransport};
use surety_testkit::wait::eventually;

const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_far_larger_than_the_buffer_streams_without_pausing() {
    common::init_tracing();
    let Some(brokers) = common::brokers() else {
        return;
    };
    const MESSAGES: usize = 20_000;
    let metrics = KafkaMetrics::default();
    // The application below never stops taking deliveries for long; a
    // generous `pause_after` keeps a busy machine from counting as stuck.
    let kafka = KafkaTransport::connect(
        common::config(&brokers)
            .create_missing_topics(4)
            .consumer_buffer(16)
            .pause_after(Duration::from_secs(5))
            .metrics(metrics.clone()),
    )
    .await
    .expect("connect");
    let topic = common::unique("backlog");
    let _cleanup = common::delete_on_drop(&brokers, &[&topic]);
    let group = common::unique("group");

    // Every confirmation in flight at once: the producer batches records,
    // so the consumer fetches many records per batch.
    let mut confirmations = Vec::with_capacity(MESSAGES);
    let mut ids = HashSet::with_capacity(MESSAGES);
    for i in 0..MESSAGES {
        let envelope = Envelope::builder("/test", "backlog.message")
            .partition_key(format!("key-{}", i % 16))
            .payload(i.to_string())
            .build();
        ids.insert(envelope.id.clone());
        confirmations.push(kafka.send(&topic, envelope).await.expect("sent"));
    }
    for receipt in futures::future::join_all(confirmations).await {
        receipt.expect("confirmed");
    }

    let mut stream = kafka.subscribe(&topic, &group).await.expect("subscribe");
    let mut last_offsets: BTreeMap<i32, i64> = BTreeMap::new();
    let mut received = HashSet::with_capacity(MESSAGES);
    while received.len() < MESSAGES {
        let delivery = common::next(&mut stream, LIMIT).await;
        let (partition, offset) = (
            delivery.info().partition.expect("a partition"),
            delivery.info().offset.expect("an offset"),
        );
        if let Some(last) = last_offsets.insert(partition, offset) {
            assert!(
                offset > last,
                "partition {partition}: offset {offset} after {last}"
            );
        }
        let id = delivery.envelope().id.clone();
        assert!(ids.contains(&id), "an unknown message {id}");
        assert!(received.insert(id), "delivered twice without a nack");
        delivery.ack().await.expect("ack");
    }
    assert_eq!(
        metrics.consumer_pauses(&topic, &group),
        0,
        "an application that keeps up never makes the consumer pause"
    );
    drop(stream);
    kafka.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_application_pauses_and_its_group_is_still_served() {
    common::init_tracing();
    let Some(brokers) = common::brokers() else {
        return;
    };
    const MESSAGES: usize = 40;
    let metrics = KafkaMetrics::default();
    let kafka = KafkaTransport::connect(
        common::config(&brokers)
            .create_missing_topics(2)
            .consumer_buffer(4)
            .pause_after(Duration::from_millis(200))
            .group_join_timeout(LIMIT)
            .metrics(metrics.clone()),
    )
    .await
    .expect("connect");
    let topic = common::unique("stuck");
    let _cleanup = common::delete_on_drop(&brokers, &[&topic]);
    let group = common::unique("group");
    let mut ids = HashSet::new();
    for i in 0..MESSAGES {
        let envelope = Envelope::builder("/test", "stuck.message")
            .partition_key(format!("key-{}", i % 4))
            .payload(i.to_string())
            .build();
        ids.insert(envelope.id.clone());
        kafka.publish(&topic, envelope).await.expect("published");
    }

    // The application takes nothing: the buffer fills and the consumer
    // pauses once `pause_after` has passed.
    let first = kafka.subscribe(&topic, &group).await.expect("subscribe");
    eventually(LIMIT, "the consumer to pause", || async {
        (metrics.consumer_pauses(&topic, &group) > 0).then_some(())
    })
    .await;

    // Paused, it still polls: a second member's join rebalances the group
    // instead of waiting for the stuck member.
    let second = kafka
        .subscribe(&topic, &group)
        .await
        .expect("the group rebalanced while the first member was stuck");

    // Both members together deliver every message (at least once: what the
    // first one buffered for a revoked partition comes again from its new
    // owner).
    let mut both = futures::stream::select(first, second).boxed();
    let mut received = HashSet::new();
    while received.len() < MESSAGES {
        let delivery = common::next(&mut both, LIMIT).await;
        let id = delivery.envelope().id.clone();
        assert!(ids.contains(&id), "an unknown message {id}");
        received.insert(id);
        if let Err(err) = delivery.ack().await {
            // Handed out before a later rebalance: its new owner has it.
            assert_eq!(err.kind(), TransportErrorKind::Ack, "{err}");
        }
    }
    drop(both);
    kafka.close().await.expect("close");
}
