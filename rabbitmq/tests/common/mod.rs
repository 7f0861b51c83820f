//! Helpers shared by the integration tests: the broker's address, unique
//! names and deadlines. `surety_testkit::rabbitmqctl` acts on the broker and
//! `surety_testkit::wait::eventually` waits for a condition.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use futures::StreamExt;
use surety_core::{Delivery, DeliveryStream, Envelope, Publisher};
use surety_rabbitmq::{RabbitConfig, RabbitTransport, queue_name};
use surety_testkit::rabbitmq::Cleanup;
use surety_testkit::services;

/// How long a test waits for anything that should happen.
pub const WAIT: Duration = Duration::from_secs(20);

/// The broker URL, or `None` (after printing why) when the test is skipped.
pub fn url() -> Option<String> {
    services::require(services::amqp_url())
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!("surety-rabbitmq-test.{prefix}.{}", uuid::Uuid::now_v7())
}

/// Deletes the queues of `groups` on `topic` when dropped (however the test
/// ends); register more with [`Cleanup::add_queue`].
pub fn cleanup(url: &str, topic: &str, groups: &[&str]) -> Cleanup {
    let cleanup = Cleanup::new(url);
    for group in groups {
        cleanup.add_queue(queue_name(topic, group));
    }
    cleanup
}

/// A config for `url` with a unique connection name and short timeouts.
pub fn config(url: &str) -> RabbitConfig {
    RabbitConfig::new(url)
        .connection_name(unique("conn"))
        .confirm_timeout(Duration::from_secs(15))
        .outage_wait(Duration::from_secs(15))
}

pub async fn connect(config: RabbitConfig) -> RabbitTransport {
    RabbitTransport::connect(config)
        .await
        .expect("connects to RabbitMQ")
}

/// The next delivery, failing the test after [`WAIT`].
pub async fn next(stream: &mut DeliveryStream) -> Delivery {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("a delivery within the deadline")
        .expect("the stream is open")
        .expect("a delivery, not an error")
}

/// Asserts that nothing more comes to `stream` (a subscription to `topic`):
/// a marker published now must be the next delivery, since a queue hands
/// out whatever was still to come before it. No waiting period to guess.
pub async fn nothing_before_marker(
    transport: &RabbitTransport,
    topic: &str,
    stream: &mut DeliveryStream,
) {
    let marker = Envelope::builder("/test", "test.marker").build();
    transport
        .publish(topic, marker.clone())
        .await
        .expect("the marker is published");
    let delivery = next(stream).await;
    assert_eq!(
        delivery.envelope().id,
        marker.id,
        "expected nothing before the marker, got {:?}",
        delivery.envelope()
    );
    delivery.ack().await.expect("the marker is acked");
}

/// Asserts that nothing is delivered for `period`.
pub async fn nothing_for(stream: &mut DeliveryStream, period: Duration) {
    if let Ok(Some(item)) = tokio::time::timeout(period, stream.next()).await {
        panic!(
            "expected no delivery, got {:?}",
            item.map(|d| d.envelope().clone())
        );
    }
}
