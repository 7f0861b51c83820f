//! The DLQ layer on a real RabbitMQ: delayed retries through the TTL ladder
//! of `surety_rabbitmq::topology`, dead letters to a DLQ topic.
//! Skipped unless `SURETY_AMQP_URL` is set (a failure when
//! `SURETY_REQUIRE_SERVICES` is).

mod brokers;

use std::sync::Arc;
use std::time::Duration;

use brokers::{
    Broker, Kind, assert_permanent, assert_poison, assert_transient, replay_after_fix,
    replay_goes_to_the_failed_group_only, run,
};
use surety_core::consumer::Incoming;
use surety_rabbitmq::topology::{RetryLadder, WorkQueue};
use surety_rabbitmq::{RabbitConfig, RabbitTransport};
use surety_testkit::rabbitmq::Cleanup;
use surety_testkit::services;

async fn broker(url: &str, consumers: usize) -> Broker<RabbitTransport> {
    let mut transports = Vec::new();
    for n in 0..consumers.max(1) {
        let config = RabbitConfig::new(url).connection_name(format!("surety-dlq-test-{n}"));
        transports.push(
            RabbitTransport::connect(config)
                .await
                .expect("connects to RabbitMQ"),
        );
    }
    let topic = format!("surety-dlq-test.orders.{}", uuid::Uuid::now_v7());
    let group = "billing".to_owned();
    let exchange = transports[0].config().exchange.clone();
    let channel = transports[0].channel().await.expect("channel");
    let work = WorkQueue::for_group(&exchange, &topic, &group);
    work.declare(&channel)
        .await
        .expect("declare the work queue");
    let ladder = RetryLadder::new(
        work.name(),
        &exchange,
        [
            Duration::from_millis(100),
            Duration::from_millis(200),
            Duration::from_millis(400),
        ],
    );
    ladder
        .declare(&channel)
        .await
        .expect("declare the retry ladder");
    let route = move |_: &Incoming, attempt: u32, _: Duration| {
        let level = ladder
            .level_for_attempt(attempt.saturating_sub(1))
            .unwrap_or(1);
        ladder.topic(level).unwrap_or_default()
    };
    Broker {
        transports,
        dlq_topic: format!("{topic}.dead-letters"),
        topic,
        group,
        also_consume: Vec::new(),
        base_delay: Duration::from_millis(100),
        route: Arc::new(route),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_dead_lettered_after_no_retry() {
    let Some(url) = services::require(services::amqp_url()) else {
        return;
    };
    let broker = broker(&url, 1).await;
    let _cleanup = Cleanup::new(&url).prefix(&broker.topic);
    assert_poison(&run(&broker, Kind::Poison, 3, 1, 4).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_are_dead_lettered_after_no_retry() {
    let Some(url) = services::require(services::amqp_url()) else {
        return;
    };
    let broker = broker(&url, 1).await;
    let _cleanup = Cleanup::new(&url).prefix(&broker.topic);
    assert_permanent(&run(&broker, Kind::Permanent, 3, 1, 4).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_n_times_with_growing_delays() {
    let Some(url) = services::require(services::amqp_url()) else {
        return;
    };
    let broker = broker(&url, 1).await;
    let _cleanup = Cleanup::new(&url).prefix(&broker.topic);
    let run = run(&broker, Kind::Transient, 2, 1, 4).await;
    assert_eq!(run.retries, 2 * 3);
    assert_transient(&run, 4, Some(Duration::from_millis(100)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_competing_consumers_keep_the_attempt_count() {
    let Some(url) = services::require(services::amqp_url()) else {
        return;
    };
    let broker = broker(&url, 3).await;
    let _cleanup = Cleanup::new(&url).prefix(&broker.topic);
    let run = run(&broker, Kind::Transient, 9, 3, 4).await;
    assert_eq!(run.retries, 9 * 3, "exactly N-1 retries per message");
    assert_transient(&run, 4, None);
    let busy = run.reports.iter().filter(|r| r.acked > 0).count();
    assert!(busy >= 2, "the consumers competed: {:?}", run.reports);
}

/// The replay path end to end: dead letters of a failing handler, a dry run
/// that changes nothing, then a replay of one and of a filtered group that
/// the fixed handler processes, with the audit trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_one_and_a_filtered_group_after_the_fix() {
    let Some(url) = services::require(services::amqp_url()) else {
        return;
    };
    let broker = broker(&url, 1).await;
    let _cleanup = Cleanup::new(&url).prefix(&broker.topic);
    replay_after_fix(&broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_reaches_only_the_failed_group_of_three() {
    let Some(url) = services::require(services::amqp_url()) else {
        return;
    };
    let broker = broker(&url, 1).await;
    replay_goes_to_the_failed_group_only(&broker).await;
}
