//! Publishing against a real broker: confirms, returns, the confirm window,
//! typed connection errors.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{cleanup, config, connect, next, unique, url};
use surety_core::{Close, Envelope, Publisher, Subscriber, TransportErrorKind};
use surety_rabbitmq::metrics::PublishOutcome;
use surety_rabbitmq::{RabbitConfig, RabbitMetrics, RabbitTransport};

fn envelope(n: usize) -> Envelope {
    Envelope::builder("/test", "test.event")
        .payload(n.to_string())
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_publish_fails_with_unroutable() {
    let Some(url) = url() else { return };
    let metrics = RabbitMetrics::default();
    let transport = connect(config(&url).metrics(metrics.clone())).await;
    let topic = unique("nobody-listens");
    let err = transport
        .publish(&topic, envelope(0))
        .await
        .expect_err("no queue is bound");
    assert_eq!(err.kind(), TransportErrorKind::Unroutable, "{err}");
    assert_eq!(metrics.publishes(&topic, PublishOutcome::Returned), 1);
    assert_eq!(metrics.publishes(&topic, PublishOutcome::Confirmed), 0);
    transport.close().await.unwrap();
}

/// One window of sends alternating between a topic with a queue and one
/// without: the broker may confirm them with one `multiple` ack, and still
/// exactly the unroutable ones fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_are_matched_to_their_own_publish_in_a_window() {
    let Some(url) = url() else { return };
    let transport = connect(config(&url)).await;
    let routed = unique("routed");
    let _cleanup = cleanup(&url, &routed, &["g"]);
    let lost = unique("lost");
    let mut stream = transport.subscribe(&routed, "g").await.unwrap();
    let mut pending = Vec::new();
    for n in 0..400 {
        let topic = if n % 3 == 0 { &lost } else { &routed };
        let env = envelope(n);
        let id = env.id.clone();
        pending.push((
            topic == &lost,
            id,
            transport.send(topic, env).await.unwrap(),
        ));
    }
    let mut expected = HashSet::new();
    for (unroutable, id, confirmation) in pending {
        match confirmation.await {
            Ok(receipt) => {
                assert!(!unroutable, "message {id} to {lost} was reported stored");
                assert_eq!(receipt.topic, routed);
                expected.insert(id);
            }
            Err(err) => {
                assert!(unroutable, "routable message {id} failed: {err}");
                assert_eq!(err.kind(), TransportErrorKind::Unroutable);
            }
        }
    }
    while !expected.is_empty() {
        let delivery = next(&mut stream).await;
        assert!(expected.remove(&delivery.envelope().id));
        delivery.ack().await.unwrap();
    }
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_of_sends_is_confirmed_and_counted() {
    let Some(url) = url() else { return };
    let metrics = RabbitMetrics::default();
    let transport = connect(config(&url).metrics(metrics.clone()).max_in_flight(64)).await;
    let topic = unique("window");
    let _cleanup = cleanup(&url, &topic, &["g"]);
    let _stream = transport.subscribe(&topic, "g").await.unwrap();
    let mut pending = Vec::new();
    for n in 0..500 {
        pending.push(transport.send(&topic, envelope(n)).await.unwrap());
        assert!(metrics.confirms_in_flight() <= 64);
    }
    for confirmation in pending {
        confirmation.await.unwrap();
    }
    assert_eq!(metrics.publishes(&topic, PublishOutcome::Confirmed), 500);
    assert_eq!(metrics.confirms_in_flight(), 0);
    transport.close().await.unwrap();
}

#[tokio::test]
async fn a_bad_url_is_a_config_error() {
    for bad in ["http://localhost", "not a url", "amqp://host:notaport/"] {
        let err = RabbitTransport::connect(RabbitConfig::new(bad))
            .await
            .expect_err("cannot connect");
        assert_eq!(err.kind(), TransportErrorKind::Config, "{bad}: {err}");
    }
}

#[tokio::test]
async fn an_unreachable_broker_is_a_quick_connection_error() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let err = RabbitTransport::connect(
        RabbitConfig::new(format!("amqp://guest:guest@127.0.0.1:{port}/%2f"))
            .connect_timeout(Duration::from_secs(3)),
    )
    .await
    .expect_err("nothing listens");
    assert_eq!(err.kind(), TransportErrorKind::Connection, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn wrong_credentials_fail_without_hanging() {
    let Some(url) = url() else { return };
    let bad = url.replacen("guest:guest", "guest:wrong-password", 1);
    let started = Instant::now();
    let err =
        RabbitTransport::connect(RabbitConfig::new(bad).connect_timeout(Duration::from_secs(10)))
            .await
            .expect_err("login refused");
    assert!(
        matches!(
            err.kind(),
            TransportErrorKind::Config | TransportErrorKind::Connection
        ),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn publish_after_close_is_closed() {
    let Some(url) = url() else { return };
    let transport = connect(config(&url)).await;
    transport.close().await.unwrap();
    transport.close().await.unwrap();
    let err = transport.publish("t", envelope(0)).await.unwrap_err();
    assert_eq!(err.kind(), TransportErrorKind::Closed);
    let Err(err) = transport.subscribe("t", "g").await else {
        panic!("subscribed after close");
    };
    assert_eq!(err.kind(), TransportErrorKind::Closed);
}

#[test]
fn connecting_outside_a_tokio_runtime_is_an_error_not_a_panic() {
    let err = futures::executor::block_on(RabbitTransport::connect(RabbitConfig::new(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    )))
    .expect_err("no runtime");
    assert_eq!(err.kind(), TransportErrorKind::Config, "{err}");
}
