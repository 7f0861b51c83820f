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

/// Deletes topics from the broker when dropped, however the test ends, so
/// test runs do not leave their topics behind. Made by [`delete_on_drop`].
pub struct DeleteTopics {
    brokers: String,
    topics: Vec<String>,
    prefix: Option<String>,
}

/// Deletes `topics` when the returned guard is dropped. A topic that does
/// not exist (never created) is fine; a failure is printed, never a panic.
pub fn delete_on_drop(brokers: &str, topics: &[&str]) -> DeleteTopics {
    DeleteTopics {
        brokers: brokers.to_owned(),
        topics: topics.iter().map(|t| (*t).to_owned()).collect(),
        prefix: None,
    }
}

/// Deletes every topic whose name starts with `prefix` (unique to the test)
/// when the returned guard is dropped.
pub fn delete_prefixed_on_drop(brokers: &str, prefix: &str) -> DeleteTopics {
    DeleteTopics {
        brokers: brokers.to_owned(),
        topics: Vec::new(),
        prefix: Some(prefix.to_owned()),
    }
}

impl Drop for DeleteTopics {
    fn drop(&mut self) {
        use surety_kafka::rdkafka::ClientConfig;
        use surety_kafka::rdkafka::admin::{AdminClient, AdminOptions};
        use surety_kafka::rdkafka::client::DefaultClientContext;

        let (brokers, mut topics) = (self.brokers.clone(), std::mem::take(&mut self.topics));
        let prefix = self.prefix.take();
        let worker = std::thread::spawn(move || {
            if let Some(prefix) = prefix {
                use surety_kafka::rdkafka::consumer::{BaseConsumer, Consumer};
                let lister: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .create()
                    .map_err(|e| e.to_string())?;
                let metadata = lister
                    .fetch_metadata(None, Duration::from_secs(10))
                    .map_err(|e| e.to_string())?;
                topics.extend(
                    metadata
                        .topics()
                        .iter()
                        .map(|t| t.name().to_owned())
                        .filter(|name| name.starts_with(&prefix)),
                );
            }
            if topics.is_empty() {
                return Ok(());
            }
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .create()
                    .map_err(|e| e.to_string())?;
                let names: Vec<&str> = topics.iter().map(String::as_str).collect();
                let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
                let results = tokio::time::timeout(
                    Duration::from_secs(15),
                    admin.delete_topics(&names, &options),
                )
                .await
                .map_err(|_| "timed out".to_owned())?
                .map_err(|e| e.to_string())?;
                let failed: Vec<String> = results
                    .into_iter()
                    .filter_map(|r| r.err())
                    .filter(|(_, code)| {
                        *code != surety_kafka::rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition
                    })
                    .map(|(topic, code)| format!("{topic}: {code}"))
                    .collect();
                if failed.is_empty() {
                    Ok(())
                } else {
                    Err(failed.join("; "))
                }
            })
        });
        match worker.join() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("deleting test topics failed: {err}"),
            Err(_) => eprintln!("deleting test topics panicked"),
        }
    }
}
