//! Timeouts of `Duration::MAX` mean "wait as long as it takes": connecting,
//! publishing, holding a full buffer and draining a dropped subscription
//! with them work, and never overflow the clock.

mod common;

use std::time::Duration;

use surety_core::{Close, Envelope, Publisher, Subscriber};
use surety_kafka::KafkaTransport;

const LIMIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_of_duration_max_publish_consume_and_drain() {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let config = common::config(&brokers)
        .connect_timeout(Duration::MAX)
        .delivery_timeout(Duration::MAX)
        .drain_timeout(Duration::MAX)
        .pause_after(Duration::MAX)
        .consumer_buffer(1);
    let kafka = KafkaTransport::connect(config).await.expect("connect");
    let topic = common::unique("max-timeouts");
    let group = common::unique("group");

    let mut sent = Vec::new();
    for n in 0..5 {
        let env = Envelope::builder("/test", "test.event")
            .partition_key("k")
            .payload(n.to_string())
            .build();
        sent.push(env.id.clone());
        kafka.publish(&topic, env).await.expect("publish");
    }
    // A buffer of one: the consumer holds the rest for the application
    // (`pause_after`) while the test reads them one by one.
    let mut stream = kafka.subscribe(&topic, &group).await.expect("subscribe");
    let mut received = Vec::new();
    for _ in 0..sent.len() {
        let delivery = common::next(&mut stream, LIMIT).await;
        received.push(delivery.envelope().id.clone());
        delivery.ack().await.expect("ack");
    }
    assert_eq!(received, sent);

    // Dropping the stream drains (`drain_timeout`) with nothing in flight.
    drop(stream);
    tokio::time::timeout(LIMIT, kafka.close())
        .await
        .expect("closes in time")
        .expect("close");
}
