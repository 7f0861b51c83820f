//! The transport conformance suite against a real Kafka-protocol broker.

mod common;

use std::time::Duration;

use surety_kafka::KafkaTransport;
use surety_testkit::conformance::{Capabilities, transport_conformance};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_transport_conforms() {
    common::init_tracing();
    let Some(brokers) = common::brokers() else {
        return;
    };
    // What Kafka (through this adapter) does and does not promise:
    // - per-key order: yes (one key, one partition, idempotent producer);
    // - nack and dropped deliveries are redelivered: yes, by seeking back;
    // - the redelivered flag: yes for redeliveries by the same consumer,
    //   which is what the suite checks (not after a rebalance or restart);
    // - delivery count: no; Kafka does not count deliveries and the
    //   adapter reports None on a first delivery, not Some(1);
    // - competing consumers: yes (members of a group split the partitions).
    // Everything the run creates starts with this prefix and is deleted.
    let id = uuid::Uuid::now_v7().simple().to_string();
    let prefix = format!("surety-kafka-conf-{}", &id[16..]);
    let _cleanup = common::delete_prefixed_on_drop(&brokers, &prefix);
    let caps = Capabilities::default()
        .name_prefix(prefix.clone())
        .per_key_order(true)
        .redelivers_on_nack(true)
        .redelivers_dropped(true)
        .redelivered_flag(true)
        .delivery_count(false)
        .competing_consumers(true)
        .receive_timeout(Duration::from_secs(20))
        .quiet_period(Duration::from_secs(1));
    let report = transport_conformance(
        || async {
            KafkaTransport::connect(common::config(&brokers))
                .await
                .expect("connect to the broker")
        },
        caps,
    )
    .await;
    println!("{report}");
    report.assert_ok();
    assert!(
        report.skipped().is_empty(),
        "every check runs: {:?} skipped",
        report.skipped()
    );
}
