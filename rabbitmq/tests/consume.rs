//! Consuming against a real broker: foreign and unreadable messages,
//! recovery after a lost connection, dropped streams, graceful shutdown.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{WAIT, cleanup, config, connect, next, nothing_before_marker, unique, url};
use surety_core::consumer::{Incoming, Worker, handler_fn};
use surety_core::envelope::UNDECODABLE_TYPE;
use surety_core::{Close, Envelope, Publisher, Subscriber, TransportErrorKind};
use surety_rabbitmq::lapin::BasicProperties;
use surety_rabbitmq::lapin::options::BasicPublishOptions;
use surety_rabbitmq::lapin::types::{AMQPValue, FieldTable};
use surety_rabbitmq::metrics::{DeliveryOutcome, PublishOutcome};
use surety_rabbitmq::{RabbitMetrics, queue_name};
use surety_testkit::rabbitmqctl::{force_close_connection, queue_depth};
use surety_testkit::wait::eventually;

fn envelope(n: usize) -> Envelope {
    Envelope::builder("/test", "test.event")
        .payload(n.to_string())
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_messages_are_read_and_garbage_flows_as_poison() {
    let Some(url) = url() else { return };
    let transport = connect(config(&url)).await;
    let topic = unique("foreign");
    let _cleanup = cleanup(&url, &topic, &["g"]);
    let mut stream = transport.subscribe(&topic, "g").await.unwrap();
    let channel = transport.channel().await.unwrap();
    let publish = |props: BasicProperties, body: &'static [u8]| {
        let channel = channel.clone();
        let topic = topic.clone();
        async move {
            channel
                .basic_publish(
                    "surety".into(),
                    topic.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await
                .unwrap();
        }
    };

    // A producer that only knows AMQP properties.
    publish(
        BasicProperties::default()
            .with_message_id("legacy-1".into())
            .with_type("legacy.order".into())
            .with_app_id("legacy-shop".into())
            .with_content_type("text/plain".into()),
        b"hello",
    )
    .await;
    let delivery = next(&mut stream).await;
    let env = delivery.envelope();
    assert_eq!(env.id, "legacy-1");
    assert_eq!(env.event_type, "legacy.order");
    assert_eq!(env.source, "legacy-shop");
    assert_eq!(env.content_type, "text/plain");
    assert_eq!(&env.payload[..], b"hello");
    assert!(env.decode_error().is_none());
    assert_eq!(
        delivery.info().delivery_count,
        Some(1),
        "the adapter counts on classic queues"
    );
    delivery.ack().await.unwrap();

    // No identity at all, and a header that is not a string.
    let mut table = FieldTable::default();
    table.insert(
        "nested".into(),
        AMQPValue::FieldTable(FieldTable::default()),
    );
    table.insert("retries".into(), AMQPValue::LongInt(3));
    publish(BasicProperties::default().with_headers(table), b"\xde\xad").await;
    let first = next(&mut stream).await;
    let id = first.envelope().id.clone();
    assert_eq!(first.envelope().event_type, UNDECODABLE_TYPE);
    assert!(first.envelope().decode_error().is_some());
    assert_eq!(first.envelope().headers.get("retries"), Some("3"));
    assert_eq!(&first.envelope().payload[..], b"\xde\xad");
    first.nack(true).await.unwrap();
    let again = next(&mut stream).await;
    assert!(again.info().redelivered);
    assert_eq!(
        again.envelope().id,
        id,
        "the poison id is stable across redeliveries"
    );
    again.reject().await.unwrap();
    nothing_before_marker(&transport, &topic, &mut stream).await;
    transport.close().await.unwrap();
}

/// The broker drops the connection: lapin reconnects, the subscription
/// resumes, an ack for a delivery of the old connection fails with `Ack`
/// and the message comes again, and publishing works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_recovers_after_the_broker_drops_it() {
    let Some(url) = url() else { return };
    let metrics = RabbitMetrics::default();
    let name = unique("recovering");
    let transport = connect(
        config(&url)
            .connection_name(name.clone())
            .metrics(metrics.clone()),
    )
    .await;
    let topic = unique("recovery");
    let _cleanup = cleanup(&url, &topic, &["g"]);
    let mut stream = transport.subscribe(&topic, "g").await.unwrap();
    let env = envelope(1);
    let id = env.id.clone();
    transport.publish(&topic, env).await.unwrap();
    let held = next(&mut stream).await;
    assert!(!held.info().redelivered);

    assert_eq!(
        force_close_connection(&name, "surety test: forced close"),
        1,
        "our connection is listed"
    );
    eventually(WAIT, "the connection to be recovered", || {
        let metrics = metrics.clone();
        async move { metrics.reconnects() >= 1 }
    })
    .await;

    let err = held.ack().await.expect_err("the old channel is gone");
    assert_eq!(err.kind(), TransportErrorKind::Ack, "{err}");
    assert_eq!(
        metrics.deliveries(&topic, "g", DeliveryOutcome::SettleFailed),
        1
    );

    let again = next(&mut stream).await;
    assert_eq!(again.envelope().id, id);
    assert!(again.info().redelivered);
    again.ack().await.unwrap();

    let env = envelope(2);
    let id = env.id.clone();
    transport
        .publish(&topic, env)
        .await
        .expect("publishing resumed");
    assert_eq!(next(&mut stream).await.envelope().id, id);
    assert!(metrics.publishes(&topic, PublishOutcome::Confirmed) >= 2);
    transport.close().await.unwrap();
}

/// Dropping a stream returns what it had prefetched at once, while a
/// delivery taken from it can still be acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_returns_prefetched_messages() {
    let Some(url) = url() else { return };
    let transport = connect(config(&url).prefetch(10)).await;
    let topic = unique("dropped-stream");
    let _cleanup = cleanup(&url, &topic, &["g"]);
    let mut first = transport.subscribe(&topic, "g").await.unwrap();
    let mut ids = HashSet::new();
    for n in 0..5 {
        let env = envelope(n);
        ids.insert(env.id.clone());
        transport.publish(&topic, env).await.unwrap();
    }
    let held = next(&mut first).await;
    ids.remove(&held.envelope().id);
    // Let the broker push the rest into the first stream's prefetch buffer.
    eventually(WAIT, "the prefetch to fill", || async {
        queue_depth(&queue_name(&topic, "g")) == Some(5)
    })
    .await;
    drop(first);

    let mut second = transport.subscribe(&topic, "g").await.unwrap();
    while !ids.is_empty() {
        let delivery = next(&mut second).await;
        assert!(ids.remove(&delivery.envelope().id), "delivered twice");
        delivery.ack().await.unwrap();
    }
    held.ack()
        .await
        .expect("the first subscription's channel stays open for it");
    nothing_before_marker(&transport, &topic, &mut second).await;
    transport.close().await.unwrap();
}

/// A worker asked to stop under load finishes and acks what it handles,
/// hands back what it has not started, and a second worker handles the rest:
/// every message handled once, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_under_load_loses_and_repeats_nothing() {
    const COUNT: usize = 300;
    let Some(url) = url() else { return };
    let metrics = RabbitMetrics::default();
    let transport = connect(config(&url).prefetch(32).metrics(metrics.clone())).await;
    let topic = unique("shutdown");
    let _cleanup = cleanup(&url, &topic, &["g"]);
    let deliveries = transport.subscribe(&topic, "g").await.unwrap();
    let mut published = HashSet::new();
    let mut pending = Vec::new();
    for n in 0..COUNT {
        let env = envelope(n);
        published.insert(env.id.clone());
        pending.push(transport.send(&topic, env).await.unwrap());
    }
    for confirmation in pending {
        confirmation.await.unwrap();
    }

    let handled = Arc::new(Mutex::new(Vec::<String>::new()));
    let handler = {
        let handled = handled.clone();
        handler_fn(move |msg: Incoming| {
            let handled = handled.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                handled.lock().unwrap().push(msg.envelope.id);
                Ok::<_, std::convert::Infallible>(())
            }
        })
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(
        Worker::new(handler.clone())
            .concurrency(8)
            .run(deliveries, async {
                stopped.await.ok();
            }),
    );
    eventually(WAIT, "a third of the messages to be handled", || {
        let handled = handled.clone();
        async move { handled.lock().unwrap().len() >= COUNT / 3 }
    })
    .await;
    stop.send(()).unwrap();
    let first = worker.await.unwrap();
    assert_eq!(first.abandoned, 0);
    assert_eq!(first.settle_failures, 0);
    assert!(
        (first.acked as usize) < COUNT,
        "the first worker stopped early"
    );

    let deliveries = transport.subscribe(&topic, "g").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(Worker::new(handler).concurrency(8).run(deliveries, async {
        stopped.await.ok();
    }));
    eventually(WAIT, "every message to be handled", || {
        let handled = handled.clone();
        async move { handled.lock().unwrap().len() >= COUNT }
    })
    .await;
    eventually(WAIT, "the queue to be empty", || async {
        queue_depth(&queue_name(&topic, "g")) == Some(0)
    })
    .await;
    stop.send(()).unwrap();
    let second = worker.await.unwrap();

    let handled = handled.lock().unwrap().clone();
    let unique_handled: HashSet<_> = handled.iter().cloned().collect();
    assert_eq!(unique_handled, published, "every message was handled");
    assert_eq!(handled.len(), COUNT, "no message was handled twice");
    assert_eq!((first.acked + second.acked) as usize, COUNT);
    assert_eq!(
        metrics.deliveries(&topic, "g", DeliveryOutcome::Acked),
        COUNT as u64
    );
    transport.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_streams_and_fails_later_settles() {
    let Some(url) = url() else { return };
    let transport = connect(config(&url)).await;
    let topic = unique("close");
    let _cleanup = cleanup(&url, &topic, &["g"]);
    let mut stream = transport.subscribe(&topic, "g").await.unwrap();
    transport.publish(&topic, envelope(0)).await.unwrap();
    let held = next(&mut stream).await;
    transport.close().await.unwrap();
    let end = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut stream))
        .await
        .expect("the stream ends after close");
    assert!(end.is_none());
    let err = held.ack().await.expect_err("closed");
    assert_eq!(err.kind(), TransportErrorKind::Ack);
    // The broker still has the message: a new connection gets it again.
    let other = connect(config(&url)).await;
    let mut stream = other.subscribe(&topic, "g").await.unwrap();
    let again = next(&mut stream).await;
    assert!(again.info().redelivered);
    again.ack().await.unwrap();
    other.close().await.unwrap();
}

/// A subscription's delivery series and a topic's publish series exist at
/// zero from the subscription and the first publish: an alert on
/// `settle_failed` or `returned` sees a 0, not a missing series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_exist_at_zero_from_the_subscription_and_first_publish() {
    let Some(url) = url() else { return };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = RabbitMetrics::register(&mut registry);
    let transport = connect(config(&url).metrics(metrics)).await;
    let topic = unique("series");
    let _cleanup = cleanup(&url, &topic, &["g"]);
    let _stream = transport.subscribe(&topic, "g").await.unwrap();
    let scrape = || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    };
    let delivery = format!(
        r#"surety_rabbitmq_deliveries_total{{messaging_system="rabbitmq",messaging_destination_name="{topic}",messaging_consumer_group_name="g",outcome="settle_failed"}} 0"#
    );
    assert!(
        scrape().lines().any(|l| l == delivery),
        "{delivery} in:\n{}",
        scrape()
    );
    transport.publish(&topic, envelope(1)).await.unwrap();
    let text = scrape();
    for (outcome, value) in [("confirmed", 1), ("returned", 0), ("timed_out", 0)] {
        let series = format!(
            r#"surety_rabbitmq_publishes_total{{messaging_system="rabbitmq",messaging_destination_name="{topic}",outcome="{outcome}"}} {value}"#
        );
        assert!(text.lines().any(|l| l == series), "{series} in:\n{text}");
    }
    transport.close().await.unwrap();
}
