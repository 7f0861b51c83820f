//! The worker settles each delivery exactly once from its handler's result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use surety_core::consumer::{Incoming, Output, Worker, WorkerReport, handler_fn, typed};
use surety_core::memory::MemoryTransport;
use surety_core::{
    Close, Envelope, HandlerError, Message, Permanent, Publisher, Subscriber, Transient,
};

const DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: String,
}

impl Message for Order {
    const TYPE: &'static str = "order.placed";
}

fn order(id: &str) -> Envelope {
    Envelope::message("/shop", &Order { id: id.into() })
        .unwrap()
        .partition_key(id)
        .build()
}

/// Runs `worker` until `topic`/`group` is empty, then shuts it down.
async fn run_until_drained<S: surety_core::consumer::Handler>(
    transport: &MemoryTransport,
    worker: Worker<S>,
    topic: &str,
    group: &str,
) -> WorkerReport {
    let deliveries = transport.subscribe(topic, group).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(deliveries, async {
        stopped.await.ok();
    }));
    tokio::time::timeout(DEADLINE, async {
        while transport.depth(topic, group) > 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("queue drained before the deadline");
    stop.send(()).unwrap();
    running.await.unwrap()
}

#[tokio::test]
async fn transient_failures_are_requeued_then_handled() {
    let transport = MemoryTransport::new();
    transport.publish("orders", order("o-1")).await.unwrap();
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let seen = attempts.clone();
    let handler = typed(move |o: Order, msg: Incoming| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push((o.id, msg.attempt));
            if msg.attempt < 3 {
                return Err(Transient::new("busy"));
            }
            Ok(())
        }
    });
    let report = run_until_drained(&transport, Worker::new(handler), "orders", "g").await;
    assert_eq!(report.requeued, 2);
    assert_eq!(report.acked, 1);
    assert_eq!(
        *attempts.lock().unwrap(),
        [("o-1".into(), 1), ("o-1".into(), 2), ("o-1".into(), 3)]
    );
}

#[tokio::test]
async fn transient_failures_stop_at_max_deliveries() {
    let transport = MemoryTransport::new();
    transport.publish("orders", order("o-1")).await.unwrap();
    let calls = Arc::new(Mutex::new(0));
    let counter = calls.clone();
    let handler = handler_fn(move |_msg: Incoming| {
        let counter = counter.clone();
        async move {
            *counter.lock().unwrap() += 1;
            Err::<(), _>(Transient::new("always down"))
        }
    });
    let report = run_until_drained(
        &transport,
        Worker::new(handler).max_deliveries(3),
        "orders",
        "g",
    )
    .await;
    assert_eq!(*calls.lock().unwrap(), 3);
    assert_eq!((report.requeued, report.rejected), (2, 1));
    assert_eq!(transport.rejected("orders", "g").len(), 1);
}

#[tokio::test]
async fn unavailable_pipelines_requeue_past_max_deliveries() {
    let transport = MemoryTransport::new();
    transport.publish("orders", order("o-1")).await.unwrap();
    let handler = handler_fn(|msg: Incoming| async move {
        if msg.attempt <= 4 {
            // e.g. the dead-letter store is down: not the message's fault.
            return Err(HandlerError::unavailable("dead-letter store unreachable"));
        }
        Ok(())
    });
    let report = run_until_drained(
        &transport,
        Worker::new(handler).max_deliveries(2),
        "orders",
        "g",
    )
    .await;
    assert_eq!((report.requeued, report.acked, report.rejected), (4, 1, 0));
}

#[tokio::test]
async fn permanent_failures_are_rejected_without_retry() {
    let transport = MemoryTransport::new();
    transport.publish("orders", order("o-1")).await.unwrap();
    let handler =
        typed(|_o: Order, _msg: Incoming| async { Err::<(), _>(Permanent::new("bad sku")) });
    let report = run_until_drained(&transport, Worker::new(handler), "orders", "g").await;
    assert_eq!((report.acked, report.requeued, report.rejected), (0, 0, 1));
}

#[tokio::test]
async fn a_panicking_handler_is_rejected_not_redelivered_forever() {
    let transport = MemoryTransport::new();
    transport.publish("orders", order("o-1")).await.unwrap();
    let handler = handler_fn(|_msg: Incoming| async {
        if true {
            panic!("index out of range");
        }
        Ok::<_, std::convert::Infallible>(())
    });
    let report = run_until_drained(&transport, Worker::new(handler), "orders", "g").await;
    assert_eq!((report.acked, report.rejected), (0, 1));
}

#[tokio::test]
async fn poison_is_rejected_before_the_handler_runs() {
    let transport = MemoryTransport::new();
    let poison = Envelope::builder("/shop", "order.placed")
        .payload("{not json")
        .build();
    transport.publish("orders", poison.clone()).await.unwrap();
    let ran = Arc::new(Mutex::new(false));
    let flag = ran.clone();
    let handler = typed(move |_o: Order, _msg: Incoming| {
        let flag = flag.clone();
        async move {
            *flag.lock().unwrap() = true;
            Ok::<_, std::convert::Infallible>(())
        }
    });
    let report = run_until_drained(&transport, Worker::new(handler), "orders", "g").await;
    assert!(!*ran.lock().unwrap(), "handler must not see poison");
    assert_eq!(report.rejected, 1);
    assert_eq!(transport.rejected("orders", "g"), [poison]);
}

#[tokio::test]
async fn a_message_the_transport_could_not_read_is_poison() {
    let transport = MemoryTransport::new();
    // What an adapter hands over for a record without envelope headers, even
    // when its payload happens to be a valid order.
    let raw = Envelope::undecodable(
        "kafka://orders",
        "orders/0/7",
        surety_core::Headers::new(),
        r#"{"id":"o-9"}"#.into(),
        &"envelope attribute `ce_id` is missing",
    );
    transport.publish("orders", raw).await.unwrap();
    let ran = Arc::new(Mutex::new(false));
    let flag = ran.clone();
    let handler = typed(move |_o: Order, _msg: Incoming| {
        let flag = flag.clone();
        async move {
            *flag.lock().unwrap() = true;
            Ok::<_, std::convert::Infallible>(())
        }
    });
    let report = run_until_drained(&transport, Worker::new(handler), "orders", "g").await;
    assert!(!*ran.lock().unwrap());
    assert_eq!(report.rejected, 1);
}

#[tokio::test]
async fn concurrent_workers_keep_per_key_order() {
    let transport = MemoryTransport::new();
    for n in 0..40 {
        let key = format!("k{}", n % 4);
        let env = Envelope::builder("/shop", "step")
            .partition_key(key)
            .payload(n.to_string())
            .build();
        transport.publish("steps", env).await.unwrap();
    }
    let seen: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let log = seen.clone();
    let handler = handler_fn(move |msg: Incoming| {
        let log = log.clone();
        async move {
            // Yield so that concurrent handlers interleave.
            tokio::task::yield_now().await;
            let n: u32 = std::str::from_utf8(&msg.envelope.payload)
                .map_err(HandlerError::poison)?
                .parse()
                .map_err(HandlerError::poison)?;
            let key = msg.envelope.partition_key.clone().unwrap_or_default();
            log.lock().unwrap().entry(key).or_default().push(n);
            Ok::<_, HandlerError>(())
        }
    });
    let report = run_until_drained(
        &transport,
        Worker::new(handler).concurrency(8),
        "steps",
        "g",
    )
    .await;
    assert_eq!(report.acked, 40);
    for (key, ns) in seen.lock().unwrap().iter() {
        let mut sorted = ns.clone();
        sorted.sort_unstable();
        assert_eq!(ns, &sorted, "key {key} out of order");
        assert_eq!(ns.len(), 10);
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_abandons_slow_handlers_after_the_grace_period_and_they_are_redelivered() {
    let transport = MemoryTransport::new();
    transport.publish("orders", order("o-1")).await.unwrap();
    let (started_tx, mut started) = tokio::sync::mpsc::channel(1);
    let handler = handler_fn(move |_msg: Incoming| {
        let started_tx = started_tx.clone();
        async move {
            started_tx.send(()).await.ok();
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, std::convert::Infallible>(())
        }
    });
    let deliveries = transport.subscribe("orders", "g").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(handler).shutdown_grace(Duration::from_secs(5));
    let running = tokio::spawn(worker.run(deliveries, async {
        stopped.await.ok();
    }));
    started.recv().await.unwrap();
    stop.send(()).unwrap();
    let report = running.await.unwrap();
    assert_eq!((report.acked, report.abandoned), (0, 1));

    // The abandoned message is still there, delivered again to the next consumer.
    assert_eq!(transport.depth("orders", "g"), 1);
    let handler = handler_fn(|_msg: Incoming| async { Ok::<_, std::convert::Infallible>(()) });
    let report = run_until_drained(&transport, Worker::new(handler), "orders", "g").await;
    assert_eq!(report.acked, 1);
}

#[test]
fn public_types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Envelope>();
    check::<surety_core::Headers>();
    check::<surety_core::Delivery>();
    check::<surety_core::TransportError>();
    check::<HandlerError>();
    check::<MemoryTransport>();
    check::<surety_core::metrics::Metrics>();
    check::<Incoming>();
    fn check_send<T: Send>() {}
    check_send::<surety_core::Confirmation>();
    check_send::<surety_core::DeliveryStream>();
}

#[tokio::test(start_paused = true)]
async fn a_failing_subscription_is_backed_off_not_spun() {
    use futures::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use surety_core::{TransportError, TransportErrorKind};

    let polls = Arc::new(AtomicUsize::new(0));
    let counter = polls.clone();
    // Errors for ever; ends after 1000 items so a regression fails instead of hanging.
    let errors = futures::stream::repeat_with(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        Err(TransportError::new(
            TransportErrorKind::Connection,
            "broker gone",
        ))
    })
    .take(1000)
    .boxed();
    let handler = handler_fn(|_msg: Incoming| async { Ok::<_, std::convert::Infallible>(()) });
    let report = Worker::new(handler)
        .run(errors, tokio::time::sleep(Duration::from_secs(1)))
        .await;
    assert_eq!(report, WorkerReport::default());
    let polls = polls.load(Ordering::SeqCst);
    assert!(
        (2..=10).contains(&polls),
        "{polls} subscription errors in one second"
    );
}

/// A settler that records how each delivery was settled.
#[derive(Debug)]
struct Recorded {
    id: String,
    log: Arc<Mutex<Vec<(String, &'static str)>>>,
}

#[async_trait::async_trait]
impl surety_core::Settle for Recorded {
    async fn ack(self: Box<Self>) -> surety_core::Result<()> {
        self.log.lock().unwrap().push((self.id.clone(), "ack"));
        Ok(())
    }
    async fn nack(self: Box<Self>, requeue: bool) -> surety_core::Result<()> {
        let how = if requeue { "requeue" } else { "nack" };
        self.log.lock().unwrap().push((self.id.clone(), how));
        Ok(())
    }
    async fn reject(self: Box<Self>) -> surety_core::Result<()> {
        self.log.lock().unwrap().push((self.id.clone(), "reject"));
        Ok(())
    }
}

/// Every delivery at once, as a broker with a large prefetch (or a Kafka
/// partition) hands them out; settlements go to `log`.
fn all_at_once(
    envelopes: Vec<Envelope>,
    info: surety_core::DeliveryInfo,
    log: &Arc<Mutex<Vec<(String, &'static str)>>>,
) -> surety_core::DeliveryStream {
    let deliveries: Vec<surety_core::Result<surety_core::Delivery>> = envelopes
        .into_iter()
        .map(|env| {
            let settle = Box::new(Recorded {
                id: env.id.clone(),
                log: Arc::clone(log),
            });
            Ok(surety_core::Delivery::new(env, info.clone(), settle))
        })
        .collect();
    futures::stream::iter(deliveries).boxed()
}

#[tokio::test]
async fn the_worker_keeps_per_key_order_when_the_transport_does_not() {
    let log = Arc::default();
    let envelopes: Vec<Envelope> = (0..60)
        .map(|n| {
            Envelope::builder("/shop", "step")
                .partition_key(format!("k{}", n % 3))
                .payload(n.to_string())
                .build()
        })
        .collect();
    let info = surety_core::DeliveryInfo::new("memory", "steps", "g");
    let running: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let seen: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let overlaps = Arc::new(Mutex::new(0));
    let handler = {
        let (running, seen, overlaps) = (running.clone(), seen.clone(), overlaps.clone());
        handler_fn(move |msg: Incoming| {
            let (running, seen, overlaps) = (running.clone(), seen.clone(), overlaps.clone());
            async move {
                let key = msg.envelope.partition_key.clone().unwrap_or_default();
                {
                    let mut running = running.lock().unwrap();
                    let n = running.entry(key.clone()).or_default();
                    *n += 1;
                    if *n > 1 {
                        *overlaps.lock().unwrap() += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
                *running.lock().unwrap().get_mut(&key).unwrap() -= 1;
                let n: u32 = std::str::from_utf8(&msg.envelope.payload)
                    .unwrap()
                    .parse()
                    .unwrap();
                seen.lock().unwrap().entry(key).or_default().push(n);
                Ok::<_, HandlerError>(())
            }
        })
    };
    // The stream ends after the last delivery: the worker drains and stops.
    let report = Worker::new(handler)
        .concurrency(8)
        .run(all_at_once(envelopes, info, &log), std::future::pending())
        .await;
    assert_eq!(report.handled, 60);
    assert_eq!(*overlaps.lock().unwrap(), 0, "two of one key ran at once");
    for (key, ns) in seen.lock().unwrap().iter() {
        let mut sorted = ns.clone();
        sorted.sort_unstable();
        assert_eq!(ns, &sorted, "key {key} out of order");
        assert_eq!(ns.len(), 20);
    }
}

#[tokio::test]
async fn outputs_are_published_before_the_input_is_acknowledged() {
    let transport = MemoryTransport::new();
    let mut events = transport.subscribe("orders.events", "audit").await.unwrap();
    let log = Arc::default();
    let request = Envelope::builder("/shop", "order.place")
        .reply_to("orders.events")
        .build();
    let info = surety_core::DeliveryInfo::new("memory", "orders", "g");
    let handler = handler_fn(|msg: Incoming| async move {
        let accepted = msg.envelope.caused_by("/orders", "order.accepted").build();
        Ok::<_, HandlerError>(Output::new("orders.events", accepted))
    });
    let report = Worker::new(handler)
        .emit_to(transport.clone())
        .run(
            all_at_once(vec![request.clone()], info, &log),
            std::future::pending(),
        )
        .await;
    assert_eq!(report.handled, 1);
    let event = events.next().await.unwrap().unwrap();
    assert_eq!(
        event.envelope().causation_id.as_deref(),
        Some(request.id.as_str())
    );
    assert_eq!(*log.lock().unwrap(), [(request.id, "ack")]);
}

#[tokio::test]
async fn an_unconfirmed_output_leaves_the_input_unacknowledged() {
    let transport = MemoryTransport::new();
    let outputs = transport.clone();
    // The output sink is closed: every publish fails.
    outputs.close().await.unwrap();
    let log = Arc::default();
    let request = Envelope::builder("/shop", "order.place").build();
    let info = surety_core::DeliveryInfo::new("memory", "orders", "g");
    let handler = handler_fn(|msg: Incoming| async move {
        let accepted = msg.envelope.caused_by("/orders", "order.accepted").build();
        Ok::<_, HandlerError>(Output::new("orders.events", accepted))
    });
    let report = Worker::new(handler)
        .emit_to(outputs)
        .max_retry_after(Duration::ZERO)
        .run(
            all_at_once(vec![request.clone()], info, &log),
            std::future::pending(),
        )
        .await;
    assert_eq!((report.handled, report.requeued), (0, 1));
    assert_eq!(*log.lock().unwrap(), [(request.id, "requeue")]);
}

#[tokio::test]
async fn outputs_without_a_sink_are_a_configuration_error() {
    let log = Arc::default();
    let request = Envelope::builder("/shop", "order.place").build();
    let info = surety_core::DeliveryInfo::new("memory", "orders", "g");
    let handler = handler_fn(|msg: Incoming| async move {
        let accepted = msg.envelope.caused_by("/orders", "order.accepted").build();
        Ok::<_, HandlerError>(Output::new("orders.events", accepted))
    });
    let report = Worker::new(handler)
        .run(
            all_at_once(vec![request.clone()], info, &log),
            std::future::pending(),
        )
        .await;
    assert_eq!(report.rejected, 1);
    assert_eq!(*log.lock().unwrap(), [(request.id, "reject")]);
}

/// A consumer's series exist at zero from its first delivery: an alert on
/// rejections sees a 0 before the first one, not a missing series.
#[tokio::test]
async fn a_consumers_series_exist_at_zero_from_its_first_delivery() {
    use prometheus_client::registry::Registry;
    use surety_core::metrics::Metrics;

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let transport = MemoryTransport::new();
    transport.publish("orders", order("o-1")).await.unwrap();
    let handler = typed(|_: Order, _: Incoming| async { Ok::<_, Transient>(()) });
    let worker = Worker::new(handler).metrics(metrics);
    run_until_drained(&transport, worker, "orders", "g").await;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let labels = r#"messaging_system="memory",messaging_destination_name="orders",messaging_consumer_group_name="g""#;
    for (series, value) in [
        (
            format!("surety_messages_consumed_total{{{labels},outcome=\"handled\"}}"),
            1,
        ),
        (
            format!("surety_messages_consumed_total{{{labels},outcome=\"rejected\"}}"),
            0,
        ),
        (
            format!("surety_messages_consumed_total{{{labels},outcome=\"settle_failed\"}}"),
            0,
        ),
        (
            format!("surety_handler_duration_seconds_count{{{labels},outcome=\"ok\"}}"),
            1,
        ),
        (
            format!("surety_handler_duration_seconds_count{{{labels},outcome=\"poison\"}}"),
            0,
        ),
    ] {
        assert!(
            text.lines().any(|line| line == format!("{series} {value}")),
            "{series} {value} in:\n{text}"
        );
    }
}
