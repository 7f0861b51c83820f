//! The positioned-subscription conformance suite on Kafka: on the
//! Kafka-protocol broker the services run (tansu, whose fetch from inside a
//! record batch returns the next batch, which the adapter repairs), and on
//! librdkafka's mock cluster (which fetches as Kafka does).

mod common;

use std::time::Duration;

use surety_kafka::KafkaTransport;
use surety_kafka::rdkafka::mocking::MockCluster;
use surety_testkit::conformance::log::{LogCapabilities, log_conformance};

fn caps() -> LogCapabilities {
    LogCapabilities::default().receive_timeout(Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_log_conforms_on_the_broker() {
    common::init_tracing();
    let Some(brokers) = common::brokers() else {
        return;
    };
    // tansu 0.6 reports the last batch's base offset + 1 as the high
    // watermark, so the end offsets at assignment are not exact there.
    let caps = caps().exact_end_offsets(false);
    let report = log_conformance(
        || async {
            KafkaTransport::connect(common::config(&brokers).create_missing_topics(3))
                .await
                .expect("connect to the broker")
        },
        caps,
    )
    .await;
    println!("{report}");
    report.assert_ok();
    assert!(report.skipped().is_empty(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_log_conforms_on_the_mock_cluster() {
    common::init_tracing();
    let mock = MockCluster::new(1).expect("mock cluster");
    let bootstrap = mock.bootstrap_servers();
    let report = log_conformance(
        || async {
            KafkaTransport::connect(common::config(&bootstrap).create_missing_topics(3))
                .await
                .expect("connect to the mock cluster")
        },
        caps(),
    )
    .await;
    println!("{report}");
    report.assert_ok();
    assert!(report.skipped().is_empty(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_a_log_subscription_without_waiting_for_its_caller() {
    use futures::StreamExt;
    use surety_core::Close;
    use surety_core::log::{LogEvent, LogOptions, LogSubscriber};

    common::init_tracing();
    let mock = MockCluster::new(1).expect("mock cluster");
    let kafka = KafkaTransport::connect(common::config(&mock.bootstrap_servers()))
        .await
        .expect("connect to the mock cluster");
    let topic = common::unique("log-close");
    let mut events = kafka
        .subscribe_log(&topic, &common::unique("group"), LogOptions::default())
        .await
        .expect("subscribed");
    let first = tokio::time::timeout(Duration::from_secs(30), events.next())
        .await
        .expect("an assignment in time");
    assert!(
        matches!(first, Some(Ok(LogEvent::Assigned(_)))),
        "{first:?}"
    );
    // The caller keeps the stream and does not poll it: close still ends
    // the consumer (its revocation is not waited for) and the stream.
    tokio::time::timeout(Duration::from_secs(20), kafka.close())
        .await
        .expect("close in time")
        .expect("closed");
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = events.next().await {
            if let Err(err) = event {
                panic!("no error on close: {err}");
            }
        }
    })
    .await;
    assert!(rest.is_ok(), "the stream ends after close");
}
