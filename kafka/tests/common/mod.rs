//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use futures::StreamExt;
use surety_core::{Delivery, DeliveryStream};
use surety_kafka::KafkaConfig;
use surety_testkit::services;

/// The broker address, or `None` (the test is skipped) when
/// `SURETY_KAFKA_BROKERS` is unset and services are not required.
pub fn brokers() -> Option<String> {
    services::require(services::kafka_brokers())
}

/// A configuration for tests: topics are created (tansu does not create
/// them), statistics and commits are frequent, group membership reacts fast.
pub fn config(brokers: &str) -> KafkaConfig {
    KafkaConfig::new(brokers)
        .client_id("surety-kafka-tests")
        .create_missing_topics(1)
        .replication_factor(1)
        .statistics_interval(Some(Duration::from_millis(200)))
        .consumer_property("auto.commit.interval.ms", "200")
        .consumer_property("heartbeat.interval.ms", "500")
        .consumer_property("session.timeout.ms", "6000")
}

/// The next delivery of `stream`; panics when none comes within `limit`,
/// the stream ends or it yields an error.
pub async fn next(stream: &mut DeliveryStream, limit: Duration) -> Delivery {
    tokio::time::timeout(limit, stream.next())
        .await
        .expect("a delivery in time")
        .expect("the stream is open")
        .expect("a delivery, not an error")
}

/// A unique name for a topic or group.
pub fn unique(prefix: &str) -> String {
    format!("surety-kafka-test.{prefix}.{}", uuid::Uuid::now_v7())
}

/// Installs a `tracing` subscriber printing to the test's output (once).
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("SURETY_TEST_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
