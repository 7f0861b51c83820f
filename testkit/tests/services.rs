//! The services `scripts/services` starts answer their protocols. Skipped
//! when the addresses are not set, a failure when `SURETY_REQUIRE_SERVICES` is.

use surety_testkit::services;

#[tokio::test]
async fn rabbitmq_answers_amqp() {
    let Some(url) = services::require(services::amqp_url()) else {
        return;
    };
    services::check_amqp(&url).await.unwrap();
}

#[tokio::test]
async fn postgres_answers() {
    let Some(url) = services::require(services::postgres_url()) else {
        return;
    };
    services::check_postgres(&url).await.unwrap();
}

#[tokio::test]
async fn kafka_protocol_broker_answers_api_versions() {
    let Some(brokers) = services::require(services::kafka_brokers()) else {
        return;
    };
    services::check_kafka(&brokers).await.unwrap();
}

#[tokio::test]
async fn a_closed_port_is_reported_not_hung() {
    // Port 1 on loopback refuses connections.
    let err = services::check_amqp("amqp://127.0.0.1:1/")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}
