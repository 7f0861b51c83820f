//! Timeouts of `Duration::MAX` mean "wait as long as it takes": connecting,
//! publishing and reconnecting with them work, and never overflow the clock.

mod common;

use std::time::Duration;

use common::{connect, next, unique, url};
use surety_core::{Close, Envelope, Publisher, Subscriber};
use surety_rabbitmq::{RabbitConfig, queue_name};
use surety_testkit::rabbitmqctl;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_of_duration_max_connect_publish_and_deliver() {
    let Some(url) = url() else { return };
    let config = RabbitConfig::new(&url)
        .connection_name(unique("conn"))
        .connect_timeout(Duration::MAX)
        .confirm_timeout(Duration::MAX)
        .outage_wait(Duration::MAX)
        .reconnect(Duration::MAX, 3)
        .recovery_stall_timeout(Duration::MAX);
    let transport = connect(config).await;
    let topic = unique("max-timeouts");
    let mut stream = transport.subscribe(&topic, "g").await.unwrap();

    let sent = Envelope::builder("/test", "test.event")
        .payload("once")
        .build();
    transport.publish(&topic, sent.clone()).await.unwrap();
    let delivery = next(&mut stream).await;
    assert_eq!(delivery.envelope().id, sent.id);
    delivery.ack().await.unwrap();

    drop(stream);
    transport.close().await.unwrap();
    let queue = queue_name(&topic, "g");
    tokio::task::spawn_blocking(move || rabbitmqctl::run(&["delete_queue", &queue]))
        .await
        .unwrap();
}
