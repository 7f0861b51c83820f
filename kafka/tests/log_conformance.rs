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
