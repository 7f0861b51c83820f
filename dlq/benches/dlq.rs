//! surety-dlq benchmarks.
//!
//! - `decision/*`: the per-message cost of classifying a failure and
//!   deciding what to do with it (retry policy, backoff with jitter), and of
//!   building the dead letter (fingerprint, id, headers stripped).
//! - `pipeline/*`: messages per second on the in-memory transport of
//!   - `raw_consume_publish`: a hand-written loop that receives, publishes
//!     to another topic and acks (the floor: no worker, no layer);
//!   - `worker_publish`: a core `Worker` whose handler publishes each
//!     message to another topic;
//!   - `dlq_every_message_fails`: a `Worker` with the `DlqLayer`, every
//!     message failing permanently and dead-lettered to a DLQ topic.
//!
//! At the end the throughput ratios of the DLQ pipeline to the other two
//! are printed (`ratio dlq/raw = ...`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use surety_core::consumer::{Incoming, Worker, handler_fn};
use surety_core::memory::MemoryTransport;
use surety_core::tower::Layer;
use surety_core::{
    Classify, Confirmation, DeliveryInfo, Envelope, ErrorClass, HandlerError, Publisher, Subscriber,
};
use surety_dlq::policy::DeadLetterReason;
use surety_dlq::{Backoff, DeadLetter, DlqLayer, RetryPolicy};
use tokio::sync::Notify;

/// Messages per pipeline iteration.
const BATCH: usize = 2_000;

/// (total time, total messages) per pipeline variant.
static TOTALS: Mutex<Vec<(&'static str, Duration, u64)>> = Mutex::new(Vec::new());

fn record(name: &'static str, elapsed: Duration, messages: u64) {
    let mut totals = TOTALS.lock().unwrap();
    match totals.iter_mut().find(|(n, _, _)| *n == name) {
        Some(entry) => {
            entry.1 += elapsed;
            entry.2 += messages;
        }
        None => totals.push((name, elapsed, messages)),
    }
}

fn decision(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision");
    group.throughput(Throughput::Elements(1));
    let policy = RetryPolicy::new()
        .max_attempts(5)
        .backoff(Backoff::exponential(
            Duration::from_millis(100),
            Duration::from_secs(60),
        ));
    let transient = HandlerError::transient("connection reset by peer");
    let permanent = HandlerError::permanent("quantity must be positive");
    for (name, err) in [("transient", &transient), ("permanent", &permanent)] {
        group.bench_with_input(
            BenchmarkId::new("classify_and_decide", name),
            err,
            |b, err| {
                let mut attempt = 0u32;
                b.iter(|| {
                    attempt = attempt % 5 + 1;
                    let class = std::hint::black_box(err).class();
                    std::hint::black_box(policy.decide(class, attempt))
                })
            },
        );
    }
    let env = Envelope::builder("/shop", "order.placed")
        .partition_key("o-1")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .payload(vec![b'x'; 512])
        .build();
    let info = DeliveryInfo::new("memory", "orders", "billing");
    group.bench_function("build_dead_letter", |b| {
        b.iter(|| {
            DeadLetter::new(
                std::hint::black_box(&env),
                &info,
                &permanent,
                DeadLetterReason::NotRetryable,
                1,
                "billing",
                "host",
            )
        })
    });
    let letter = DeadLetter::new(
        &env,
        &info,
        &permanent,
        DeadLetterReason::NotRetryable,
        1,
        "billing",
        "host",
    );
    group.bench_function("dead_letter_to_envelope", |b| {
        b.iter(|| std::hint::black_box(&letter).to_envelope())
    });
    let _ = ErrorClass::Poison;
    group.finish();
}

fn message(n: usize) -> Envelope {
    Envelope::builder("/bench", "order.placed")
        .partition_key(format!("k{}", n % 64))
        .payload(vec![b'x'; 256])
        .build()
}

/// Publishes `BATCH` messages to `in` on a fresh transport with a group
/// subscribed to `out`, and returns the transport and the `in` stream.
async fn prepared() -> (
    MemoryTransport,
    surety_core::DeliveryStream,
    surety_core::DeliveryStream,
) {
    let transport = MemoryTransport::with_capacity(BATCH * 4);
    let input = transport.subscribe("in", "g").await.unwrap();
    let output = transport.subscribe("out", "sink").await.unwrap();
    for n in 0..BATCH {
        transport.publish("in", message(n)).await.unwrap();
    }
    (transport, input, output)
}

async fn raw_consume_publish() -> Duration {
    let (transport, mut input, _output) = prepared().await;
    let started = Instant::now();
    for _ in 0..BATCH {
        let delivery = input.next().await.unwrap().unwrap();
        transport
            .publish("out", delivery.envelope().clone())
            .await
            .unwrap();
        delivery.ack().await.unwrap();
    }
    started.elapsed()
}

/// Publishes through the transport and signals once `BATCH` messages were
/// published, so the benchmark waits without polling.
#[derive(Clone)]
struct Counting {
    inner: MemoryTransport,
    published: Arc<AtomicUsize>,
    done: Arc<Notify>,
}

impl Counting {
    fn new(inner: MemoryTransport) -> Self {
        Self {
            inner,
            published: Arc::default(),
            done: Arc::default(),
        }
    }
}

impl Publisher for Counting {
    async fn send(&self, topic: &str, envelope: Envelope) -> surety_core::Result<Confirmation> {
        let confirmation = self.inner.send(topic, envelope).await?;
        if self.published.fetch_add(1, Ordering::SeqCst) + 1 == BATCH {
            self.done.notify_one();
        }
        Ok(confirmation)
    }
}

async fn run_worker<S: surety_core::consumer::Handler>(
    done: Arc<Notify>,
    input: surety_core::DeliveryStream,
    handler: S,
) -> Duration {
    let started = Instant::now();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(Worker::new(handler).concurrency(32).run(input, async {
        stopped.await.ok();
    }));
    done.notified().await;
    let elapsed = started.elapsed();
    stop.send(()).ok();
    let report = worker.await.unwrap();
    assert_eq!(report.acked as usize, BATCH);
    elapsed
}

async fn worker_publish() -> Duration {
    let (transport, input, _output) = prepared().await;
    let out = Counting::new(transport);
    let done = out.done.clone();
    let handler = handler_fn(move |msg: Incoming| {
        let out = out.clone();
        async move { out.publish("out", msg.envelope).await.map(|_| ()) }
    });
    run_worker(done, input, handler).await
}

async fn dlq_every_message_fails() -> Duration {
    let (transport, input, _output) = prepared().await;
    let out = Counting::new(transport);
    let done = out.done.clone();
    let layer = DlqLayer::new("bench")
        .policy(RetryPolicy::new().max_attempts(3))
        .dead_letter_to(out, "out")
        .host("bench-host");
    let handler = layer.layer(handler_fn(|_msg: Incoming| async {
        Err::<(), _>(HandlerError::permanent(
            "order 42: quantity must be positive",
        ))
    }));
    run_worker(done, input, handler).await
}

fn pipeline(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(4));
    group.warm_up_time(Duration::from_secs(1));
    macro_rules! variant {
        ($name:literal, $run:expr) => {
            group.bench_function($name, |b| {
                b.to_async(&rt).iter_custom(|iters| async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += $run.await;
                    }
                    record($name, total, iters * BATCH as u64);
                    total
                })
            });
        };
    }
    variant!("raw_consume_publish", raw_consume_publish());
    variant!("worker_publish", worker_publish());
    variant!("dlq_every_message_fails", dlq_every_message_fails());
    group.finish();

    let totals = TOTALS.lock().unwrap();
    let rate = |name: &str| {
        totals
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, d, m)| *m as f64 / d.as_secs_f64())
    };
    if let (Some(raw), Some(worker), Some(dlq)) = (
        rate("raw_consume_publish"),
        rate("worker_publish"),
        rate("dlq_every_message_fails"),
    ) {
        println!(
            "pipeline throughput (messages/s): raw {raw:.0}, worker {worker:.0}, dlq (every message failing) {dlq:.0}"
        );
        println!("ratio dlq/raw = {:.2}", dlq / raw);
        println!("ratio dlq/worker = {:.2}", dlq / worker);
    }
}

criterion_group!(benches, decision, pipeline);
criterion_main!(benches);
