//! Consumer lag, committed offset and high watermark come from librdkafka's
//! statistics and describe what a group has not finished yet.

mod common;

use std::time::Duration;

use futures::StreamExt;
use prometheus_client::registry::Registry;
use surety_core::{Close, Envelope, Publisher, Subscriber};
use surety_kafka::{KafkaMetrics, KafkaTransport};
use surety_testkit::wait::eventually;

const LIMIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_reflects_messages_not_yet_settled() {
    common::init_tracing();
    let Some(brokers) = common::brokers() else {
        return;
    };
    let mut registry = Registry::default();
    let metrics = KafkaMetrics::register(&mut registry);
    let kafka = KafkaTransport::connect(common::config(&brokers).metrics(metrics.clone()))
        .await
        .expect("connect");
    let topic = common::unique("lag");
    let _cleanup = common::delete_on_drop(&brokers, &[&topic]);
    kafka.ensure_topic(&topic).await.expect("topic");
    for n in 0..10 {
        let env = Envelope::builder("/test", "lag.test")
            .payload(n.to_string())
            .build();
        kafka.publish(&topic, env).await.expect("published");
    }

    // One group handles 4 of the 10 messages, another none.
    let (busy, idle) = (common::unique("busy"), common::unique("idle"));
    let _cleanup = common::delete_on_drop(&brokers, &[&busy, &idle]);
    let mut deliveries = kafka.subscribe(&topic, &busy).await.expect("subscribe");
    let _untouched = kafka.subscribe(&topic, &idle).await.expect("subscribe");
    for _ in 0..4 {
        let delivery = tokio::time::timeout(LIMIT, deliveries.next())
            .await
            .expect("a delivery in time")
            .expect("stream open")
            .expect("delivery");
        delivery.ack().await.expect("ack");
    }

    let busy_lag = eventually(LIMIT, "lag 6 for the busy group", || async {
        metrics
            .consumer_lag(&topic, &busy, 0)
            .filter(|&lag| lag == 6)
    })
    .await;
    assert_eq!(busy_lag, 6);
    eventually(LIMIT, "committed offset 4 for the busy group", || async {
        metrics
            .committed_offset(&topic, &busy, 0)
            .filter(|&c| c == 4)
    })
    .await;
    assert_eq!(metrics.high_watermark(&topic, &busy, 0), Some(10));
    eventually(LIMIT, "lag 10 for the idle group", || async {
        metrics
            .consumer_lag(&topic, &idle, 0)
            .filter(|&lag| lag == 10)
    })
    .await;

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    let series = format!(
        "surety_kafka_consumer_lag{{messaging_destination_name=\"{topic}\",messaging_consumer_group_name=\"{busy}\",messaging_destination_partition_id=\"0\"}} 6"
    );
    assert!(text.contains(&series), "{series} missing from\n{text}");
    assert!(text.contains(&format!(
        "surety_kafka_messages_sent_total{{messaging_destination_name=\"{topic}\",outcome=\"confirmed\"}} 10"
    )));
    assert!(text.contains(&format!(
        "surety_kafka_messages_settled_total{{messaging_destination_name=\"{topic}\",messaging_consumer_group_name=\"{busy}\",outcome=\"acked\"}} 4"
    )));
    // Outcomes that did not happen are series at zero from the
    // subscription on.
    assert!(text.contains(&format!(
        "surety_kafka_messages_settled_total{{messaging_destination_name=\"{topic}\",messaging_consumer_group_name=\"{busy}\",outcome=\"refused\"}} 0"
    )));
    assert!(text.contains(&format!(
        "surety_kafka_consumer_pauses_total{{messaging_destination_name=\"{topic}\",messaging_consumer_group_name=\"{idle}\"}} 0"
    )));

    // Gauges describe only partitions assigned in this process.
    kafka.close().await.expect("close");
    assert_eq!(metrics.consumer_lag(&topic, &busy, 0), None);
    assert_eq!(metrics.consumer_lag(&topic, &idle, 0), None);
}
