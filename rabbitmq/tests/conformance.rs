//! The testkit's transport conformance suite against RabbitMQ, with classic
//! and with quorum queues.

mod common;

use std::time::Duration;

use common::{config, url};
use surety_rabbitmq::{QueueType, RabbitConfig, RabbitTransport};
use surety_testkit::conformance::{Capabilities, transport_conformance};
use surety_testkit::rabbitmq::Cleanup;

/// What the adapter declares on any queue type.
///
/// - per-key order: RabbitMQ keeps a queue's order for one consumer, which
///   is what the check uses (with several consumers in a group, per-key
///   order does not hold);
/// - a dropped delivery is nacked with requeue at once (not only when the
///   channel closes), so it comes back while the subscription stays open.
fn capabilities() -> Capabilities {
    Capabilities::default()
        .per_key_order(true)
        .redelivers_on_nack(true)
        .redelivers_dropped(true)
        .redelivered_flag(true)
        .competing_consumers(true)
        .receive_timeout(Duration::from_secs(20))
        .quiet_period(Duration::from_millis(500))
}

/// Runs the whole suite on transports connected with `config`; every check
/// must run and pass.
async fn assert_conforms(config: RabbitConfig, caps: Capabilities) {
    // Everything the run declares starts with this prefix and is deleted.
    // Short: the queue name repeats it twice and must fit in 255 bytes.
    let id = uuid::Uuid::now_v7().simple().to_string();
    let prefix = format!("surety-rmq-{}", &id[16..]);
    let _cleanup = Cleanup::new(config.url.clone()).prefix(&prefix);
    let caps = caps.name_prefix(prefix);
    let report = transport_conformance(
        || async {
            RabbitTransport::connect(config.clone())
                .await
                .expect("connects to RabbitMQ")
        },
        caps,
    )
    .await;
    report.assert_ok();
    assert!(
        report.skipped().is_empty(),
        "skipped {:?}",
        report.skipped()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_queues_conform() {
    let Some(url) = url() else { return };
    // Classic queues do not count deliveries; the adapter does.
    assert_conforms(config(&url), capabilities().delivery_count(true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_conform_and_count_deliveries() {
    let Some(url) = url() else { return };
    let quorum = config(&url).queue_type(QueueType::Quorum {
        delivery_limit: None,
    });
    assert_conforms(quorum, capabilities().delivery_count(true)).await;
}
