//! Scenarios shared by the RabbitMQ and Kafka integration tests: the same
//! DLQ layer, worker and assertions on both brokers.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use surety_core::consumer::{Incoming, Worker, WorkerReport, typed};
use surety_core::tower::Layer;
use surety_core::{Envelope, HandlerError, Message, Publisher, Subscriber};
use surety_dlq::store::{DlqStore, Filter, MemoryStore};
use surety_dlq::{Backoff, DeadLetter, DlqLayer, RetryMode, RetryPolicy};

/// How long a scenario may take on a real broker.
pub const DEADLINE: Duration = Duration::from_secs(90);

/// What the handler does with an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Fails transiently, every time.
    Transient,
    /// Fails permanently.
    Permanent,
    /// Not even sent as an order: the payload does not decode.
    Poison,
}

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    kind: Kind,
}

impl Message for Order {
    const TYPE: &'static str = "order.placed";
}

/// A retry route as a trait object.
pub type Route = dyn Fn(&Incoming, u32, Duration) -> String + Send + Sync;

/// Per message id: the attempt and time of every handler call.
type Calls = HashMap<String, Vec<(u32, Instant)>>;

/// Where a scenario runs.
pub struct Broker<T> {
    /// One transport per consumer (separate connections), the first also
    /// publishes.
    pub transports: Vec<T>,
    /// The work topic.
    pub topic: String,
    /// The consumer group.
    pub group: String,
    /// Where dead letters are published.
    pub dlq_topic: String,
    /// Other topics each consumer reads in the group (Kafka's retry topic).
    pub also_consume: Vec<String>,
    /// The first retry delay; later ones double.
    pub base_delay: Duration,
    /// The retry route: (message, next attempt, delay) -> topic.
    pub route: Arc<Route>,
}

/// What happened in a scenario.
pub struct Run {
    /// Per message id: the attempt and time of every handler call.
    pub calls: Calls,
    /// The dead letters in the store.
    pub letters: Vec<DeadLetter>,
    /// The dead letters read back from the DLQ topic.
    pub from_dlq_topic: Vec<DeadLetter>,
    /// Retries routed.
    pub retries: usize,
    /// The workers' reports.
    pub reports: Vec<WorkerReport>,
    /// The ids published.
    pub ids: Vec<String>,
}

/// Publishes `messages` orders of `kind` and runs `consumers` competing
/// workers with the DLQ layer (`max_attempts` delayed attempts, delays of
/// `broker.base_delay` doubling, without jitter) until every message is
/// dead-lettered.
pub async fn run<T>(
    broker: &Broker<T>,
    kind: Kind,
    messages: usize,
    consumers: usize,
    max_attempts: u32,
) -> Run
where
    T: Publisher + Subscriber + Clone + 'static,
{
    let publisher = broker.transports[0].clone();
    let store = MemoryStore::new();
    let calls: Arc<Mutex<Calls>> = Arc::default();
    let retries = Arc::new(AtomicUsize::new(0));
    let route = broker.route.clone();
    let counted = retries.clone();
    let policy = RetryPolicy::new()
        .max_attempts(max_attempts)
        .backoff(Backoff::exponential(broker.base_delay, broker.base_delay * 8).without_jitter())
        .mode(RetryMode::Delayed);
    let layer = DlqLayer::new("billing")
        .policy(policy)
        .retry_via(
            publisher.clone(),
            move |msg: &Incoming, attempt: u32, delay: Duration| {
                counted.fetch_add(1, Ordering::SeqCst);
                route(msg, attempt, delay)
            },
        )
        .dead_letter_to(publisher.clone(), broker.dlq_topic.clone())
        .store(store.clone());
    let seen = calls.clone();
    let handler = typed(move |order: Order, msg: Incoming| {
        let seen = seen.clone();
        async move {
            seen.lock()
                .unwrap()
                .entry(msg.envelope.id.clone())
                .or_default()
                .push((msg.attempt, Instant::now()));
            match order.kind {
                Kind::Transient => Err(HandlerError::transient("inventory service unavailable")),
                Kind::Permanent => Err(HandlerError::permanent("order has quantity 0")),
                Kind::Poison => Ok(()),
            }
        }
    });
    let mut dlq = broker.transports[0]
        .subscribe(&broker.dlq_topic, "operators")
        .await
        .expect("subscribe to the DLQ");
    let mut workers = Vec::new();
    for transport in broker.transports.iter().take(consumers) {
        for topic in std::iter::once(&broker.topic).chain(&broker.also_consume) {
            let deliveries = transport
                .subscribe(topic, &broker.group)
                .await
                .expect("subscribe");
            let worker = Worker::new(layer.layer(handler.clone()))
                .max_deliveries(u32::MAX)
                .concurrency(4);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            workers.push((
                stop,
                tokio::spawn(worker.run(deliveries, async {
                    stopped.await.ok();
                })),
            ));
        }
    }
    let mut ids = Vec::new();
    for n in 0..messages {
        let env = match kind {
            Kind::Poison => Envelope::builder("/shop", Order::TYPE)
                .payload("{not json")
                .build(),
            _ => Envelope::message("/shop", &Order { kind }).unwrap().build(),
        };
        let mut env = env;
        env.partition_key = Some(format!("order-{n}"));
        ids.push(env.id.clone());
        publisher
            .publish(&broker.topic, env)
            .await
            .expect("publish");
    }
    let started = Instant::now();
    loop {
        if store.count(&Filter::new()).await.unwrap() as usize >= messages {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "timed out waiting for {messages} dead letters"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut from_dlq_topic = Vec::new();
    while from_dlq_topic.len() < messages {
        let delivery = tokio::time::timeout(DEADLINE, dlq.next())
            .await
            .expect("a dead letter on the DLQ topic in time")
            .expect("the DLQ stream is open")
            .expect("a delivery");
        from_dlq_topic.push(DeadLetter::from_envelope(delivery.envelope()).expect("a dead letter"));
        delivery.ack().await.expect("ack");
    }
    let mut reports = Vec::new();
    for (stop, handle) in workers {
        stop.send(()).ok();
        reports.push(handle.await.expect("worker"));
    }
    let calls = calls.lock().unwrap().clone();
    Run {
        calls,
        letters: store.all(),
        from_dlq_topic,
        retries: retries.load(Ordering::SeqCst),
        reports,
        ids,
    }
}

/// A poison message: dead-lettered after 0 retries, the handler never ran.
pub fn assert_poison(run: &Run) {
    assert_eq!(run.retries, 0, "poison is never retried");
    assert!(
        run.calls.is_empty(),
        "the handler never ran: {:?}",
        run.calls.keys()
    );
    for letter in run.letters.iter().chain(&run.from_dlq_topic) {
        assert_eq!(letter.error.class, "poison");
        assert_eq!(letter.attempts, 1);
        assert!(run.ids.contains(&letter.envelope.id), "same message id");
    }
}

/// A permanent failure: dead-lettered after 0 retries.
pub fn assert_permanent(run: &Run) {
    assert_eq!(run.retries, 0, "permanent failures are never retried");
    for id in &run.ids {
        let attempts: Vec<u32> = run.calls[id].iter().map(|(a, _)| *a).collect();
        assert_eq!(attempts, [1], "called once");
    }
    for letter in run.letters.iter().chain(&run.from_dlq_topic) {
        assert_eq!(letter.error.class, "permanent");
        assert_eq!(letter.attempts, 1);
    }
}

/// A transient failure: tried exactly `n` times (attempts 1..=n, whichever
/// consumer got each), with growing gaps, then dead-lettered with attempts
/// `n`. A broker may redeliver an attempt after a rebalance; that repeats an
/// attempt number but never adds one.
pub fn assert_transient(run: &Run, n: u32, gaps_from: Option<Duration>) {
    assert_eq!(run.letters.len(), run.ids.len());
    for id in &run.ids {
        let calls = &run.calls[id];
        let mut attempts: Vec<u32> = calls.iter().map(|(a, _)| *a).collect();
        attempts.dedup();
        assert_eq!(attempts, (1..=n).collect::<Vec<_>>(), "attempts of {id}");
        if let Some(base) = gaps_from {
            let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1].1 - w[0].1).collect();
            for (i, gap) in gaps.iter().enumerate() {
                let floor = (base * (1 << i)).mul_f32(0.9);
                assert!(
                    *gap >= floor,
                    "gap {i} of {id} is {gap:?}, expected at least {floor:?}: {gaps:?}"
                );
            }
            for pair in gaps.windows(2) {
                assert!(pair[1] > pair[0], "gaps must grow: {gaps:?}");
            }
        }
    }
    for letter in run.letters.iter().chain(&run.from_dlq_topic) {
        assert_eq!(letter.error.class, "transient");
        assert_eq!(letter.attempts, n, "the attempt count is exact");
        assert!(letter.first_failed_at < letter.last_failed_at);
    }
}
