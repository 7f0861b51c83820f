//! Misconfiguration and unreachable brokers fail fast, with typed errors.

mod common;

use std::time::{Duration, Instant};

use surety_core::{Close, Envelope, Publisher, Subscriber, TransportErrorKind};
use surety_kafka::{KafkaConfig, KafkaTransport};

#[tokio::test]
async fn an_unreachable_broker_is_a_connection_error_not_a_hang() {
    // Port 1 on loopback: nothing listens, connections are refused.
    let config = KafkaConfig::new("127.0.0.1:1").connect_timeout(Duration::from_secs(2));
    let started = Instant::now();
    let err = KafkaTransport::connect(config)
        .await
        .expect_err("nothing listens on port 1");
    assert_eq!(err.kind(), TransportErrorKind::Connection, "{err}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn bad_configuration_is_a_config_error() {
    let unknown = KafkaConfig::new("127.0.0.1:9092").property("no.such.property", "1");
    let err = KafkaTransport::connect(unknown).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Config, "{err}");
    assert!(err.to_string().contains("no.such.property"), "{err}");

    let invalid = KafkaConfig::new("127.0.0.1:9092").producer_property("linger.ms", "soon");
    let err = KafkaTransport::connect(invalid).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Config, "{err}");

    // Properties the adapter's guarantees depend on cannot be overridden.
    let unsafe_commit =
        KafkaConfig::new("127.0.0.1:9092").consumer_property("enable.auto.offset.store", "true");
    let err = KafkaTransport::connect(unsafe_commit).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Config, "{err}");
}

#[tokio::test]
async fn a_missing_topic_is_a_config_error_naming_it() {
    let Some(brokers) = common::brokers() else {
        return;
    };
    // Topic creation off: the adapter's default.
    let mut config = common::config(&brokers);
    config.create_missing_topics = None;
    let kafka = KafkaTransport::connect(config).await.expect("connect");
    let topic = common::unique("missing");
    let _cleanup = common::delete_on_drop(&brokers, &[&topic]);

    let started = Instant::now();
    let env = Envelope::builder("/test", "missing.topic").build();
    let err = kafka.publish(&topic, env).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Config, "{err}");
    assert!(err.to_string().contains(&topic), "{err}");

    let err = kafka
        .subscribe(&topic, &common::unique("group"))
        .await
        .err()
        .expect("subscribing to a missing topic fails");
    assert_eq!(err.kind(), TransportErrorKind::Config, "{err}");
    assert!(err.to_string().contains(&topic), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    let err = kafka
        .publish("not a topic/name", Envelope::builder("/t", "t").build())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Config, "{err}");

    let err = kafka
        .subscribe("", "group")
        .await
        .err()
        .expect("empty topic");
    assert_eq!(err.kind(), TransportErrorKind::Config, "{err}");
    kafka.close().await.expect("close");
}

#[tokio::test]
async fn a_message_too_large_is_rejected() {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let kafka = KafkaTransport::connect(common::config(&brokers))
        .await
        .expect("connect");
    let topic = common::unique("large");
    let _cleanup = common::delete_on_drop(&brokers, &[&topic]);
    // Above librdkafka's message.max.bytes (1 MB by default).
    let env = Envelope::builder("/t", "t")
        .payload(vec![0u8; 2 * 1024 * 1024])
        .build();
    let err = kafka.publish(&topic, env).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Rejected, "{err}");
    kafka.close().await.expect("close");
}

#[tokio::test]
async fn publishing_after_close_is_closed_and_close_is_idempotent() {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let kafka = KafkaTransport::connect(common::config(&brokers))
        .await
        .expect("connect");
    let topic = common::unique("closed");
    let _cleanup = common::delete_on_drop(&brokers, &[&topic]);
    let receipt = kafka
        .publish(&topic, Envelope::builder("/t", "t").build())
        .await
        .expect("publish");
    assert_eq!(receipt.topic, topic);
    assert_eq!(receipt.partition, Some(0));
    assert_eq!(receipt.offset, Some(0));
    kafka.close().await.expect("close");
    kafka.close().await.expect("second close");
    let err = kafka
        .publish(&topic, Envelope::builder("/t", "t").build())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Closed);
    let err = kafka.subscribe(&topic, "g").await.err().expect("closed");
    assert_eq!(err.kind(), TransportErrorKind::Closed);
}
