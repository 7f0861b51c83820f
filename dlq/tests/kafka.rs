//! The DLQ layer on a real Kafka-protocol broker: delayed retries through a
//! retry topic the same group consumes (the layer waits out
//! `surety-retry-at`), dead letters to a DLQ topic. Skipped unless
//! `SURETY_KAFKA_BROKERS` is set (a failure when `SURETY_REQUIRE_SERVICES`
//! is).

mod brokers;

use std::sync::Arc;
use std::time::Duration;

use brokers::{
    Broker, Kind, assert_permanent, assert_poison, assert_transient, replay_after_fix,
    replay_goes_to_the_failed_group_only, run,
};
use surety_core::consumer::Incoming;
use surety_kafka::{KafkaConfig, KafkaTransport};
use surety_testkit::services;

/// The first retry delay: above the broker's fetch latency, so that the
/// delays, not the polling, set the pace.
const BASE_DELAY: Duration = Duration::from_millis(600);

async fn broker(brokers: &str, consumers: usize, partitions: i32) -> Broker<KafkaTransport> {
    let mut transports = Vec::new();
    for n in 0..consumers.max(1) {
        let config = KafkaConfig::new(brokers)
            .client_id(format!("surety-dlq-test-{n}"))
            .create_missing_topics(partitions)
            .replication_factor(1)
            .consumer_property("heartbeat.interval.ms", "500")
            .consumer_property("session.timeout.ms", "6000")
            .consumer_property("fetch.wait.max.ms", "50");
        transports.push(
            KafkaTransport::connect(config)
                .await
                .expect("connects to Kafka"),
        );
    }
    let topic = format!("surety-dlq-test.orders.{}", uuid::Uuid::now_v7());
    let retry_topic = format!("{topic}.retry");
    let route_to = retry_topic.clone();
    for t in [&topic, &retry_topic, &format!("{topic}.dlq")] {
        transports[0].ensure_topic(t).await.expect("create topic");
    }
    Broker {
        transports,
        dlq_topic: format!("{topic}.dlq"),
        topic,
        group: format!("billing-{}", uuid::Uuid::now_v7()),
        also_consume: vec![retry_topic],
        base_delay: BASE_DELAY,
        route: Arc::new(move |_: &Incoming, _: u32, _: Duration| route_to.clone()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_dead_lettered_after_no_retry() {
    let Some(brokers) = services::require(services::kafka_brokers()) else {
        return;
    };
    let broker = broker(&brokers, 1, 1).await;
    assert_poison(&run(&broker, Kind::Poison, 3, 1, 4).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_are_dead_lettered_after_no_retry() {
    let Some(brokers) = services::require(services::kafka_brokers()) else {
        return;
    };
    let broker = broker(&brokers, 1, 1).await;
    assert_permanent(&run(&broker, Kind::Permanent, 3, 1, 4).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_n_times_with_growing_delays() {
    let Some(brokers) = services::require(services::kafka_brokers()) else {
        return;
    };
    let broker = broker(&brokers, 1, 1).await;
    let run = run(&broker, Kind::Transient, 2, 1, 4).await;
    assert_eq!(run.retries, 2 * 3);
    assert_transient(&run, 4, Some(BASE_DELAY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_competing_consumers_keep_the_attempt_count() {
    let Some(brokers) = services::require(services::kafka_brokers()) else {
        return;
    };
    let broker = broker(&brokers, 3, 3).await;
    let run = run(&broker, Kind::Transient, 9, 3, 4).await;
    // A rebalance may redeliver a message whose retry was already
    // published, which schedules that retry again; attempts stay exact.
    assert!(run.retries >= 9 * 3, "{}", run.retries);
    assert_transient(&run, 4, None);
}

/// The replay path end to end: dead letters of a failing handler, a dry run
/// that changes nothing, then a replay of one and of a filtered group that
/// the fixed handler processes, with the audit trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_one_and_a_filtered_group_after_the_fix() {
    let Some(brokers) = services::require(services::kafka_brokers()) else {
        return;
    };
    let broker = broker(&brokers, 1, 1).await;
    replay_after_fix(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_reaches_only_the_failed_group_of_three() {
    let Some(brokers) = services::require(services::kafka_brokers()) else {
        return;
    };
    let broker = broker(&brokers, 1, 1).await;
    replay_goes_to_the_failed_group_only(&broker).await;
}
