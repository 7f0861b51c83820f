//! A rebalance commits what settlements allowed before the partition moves,
//! and a delivery held across it can no longer be settled: the partition's
//! next owner delivers it again.

mod common;

use std::time::Duration;

use futures::StreamExt;
use surety_core::{Close, Envelope, Publisher, Subscriber, TransportErrorKind};
use surety_kafka::KafkaTransport;

const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_partitions_commit_settled_offsets_and_refuse_late_settlements() {
    common::init_tracing();
    let Some(brokers) = common::brokers() else {
        return;
    };
    // No periodic commits within the test: only the revocation commits.
    let config = common::config(&brokers).consumer_property("auto.commit.interval.ms", "3600000");
    let kafka = KafkaTransport::connect(config).await.expect("connect");
    let topic = common::unique("rebalance");
    let _cleanup = common::delete_on_drop(&brokers, &[&topic]);
    let group = common::unique("group");
    let mut first = kafka.subscribe(&topic, &group).await.expect("subscribe");
    for n in 0..10 {
        let env = Envelope::builder("/test", "rebalance.test")
            .payload(n.to_string())
            .build();
        kafka.publish(&topic, env).await.expect("published");
    }
    for offset in 0..5 {
        let delivery = common::next(&mut first, LIMIT).await;
        assert_eq!(delivery.info().offset, Some(offset));
        delivery.ack().await.expect("ack");
    }
    let held = common::next(&mut first, LIMIT).await;
    assert_eq!(held.info().offset, Some(5));

    // A second member joins: every partition is revoked and reassigned.
    let second = kafka
        .subscribe(&topic, &group)
        .await
        .expect("second member");
    let err = held
        .ack()
        .await
        .expect_err("the partition was revoked meanwhile");
    assert_eq!(err.kind(), TransportErrorKind::Ack, "{err}");

    // Whichever member owns the partition now starts at offset 5: the
    // revocation committed the five acks, and nothing after them.
    let mut both = futures::stream::select(first, second).boxed();
    let again = common::next(&mut both, LIMIT).await;
    assert_eq!(again.info().offset, Some(5), "{:?}", again.info());
    again.ack().await.expect("ack");
    for offset in 6..10 {
        let delivery = common::next(&mut both, LIMIT).await;
        assert_eq!(delivery.info().offset, Some(offset));
        delivery.ack().await.expect("ack");
    }
    drop(both);
    kafka.close().await.expect("close");
}
