//! In-memory transport throughput: publish N messages and consume + ack
//! them, with one subscriber and with four competing members of one group,
//! then the same through the consumer [`Worker`] with a no-op handler to show
//! what the pipeline (task per delivery, span, metrics, settlement) costs.
//!
//! Every iteration uses a fresh transport; publisher and consumers run
//! concurrently on a multi-thread tokio runtime. Messages carry one of 64
//! partition keys, like orders keyed by id, so per-key ordering is in force.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use surety_benches::envelopes;
use surety_core::consumer::{AckAll, Worker};
use surety_core::memory::MemoryTransport;
use surety_core::{Close, Envelope, Publisher, Subscriber};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

const TOPIC: &str = "orders";
const GROUP: &str = "fulfilment";
const BATCH_SIZES: [usize; 2] = [100, 1_000];
const PARTITION_KEYS: usize = 64;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

async fn publish_all(transport: &MemoryTransport, batch: Vec<Envelope>) {
    for env in batch {
        transport.publish(TOPIC, env).await.expect("publish");
    }
}

/// Publishes `batch` while `consumers` competing subscribers ack it. The
/// consumer that acks the last message closes the transport, which ends the
/// other subscribers' streams.
async fn publish_and_ack(batch: Vec<Envelope>, consumers: usize) {
    let n = batch.len();
    let transport = MemoryTransport::new();
    let acked = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..consumers {
        let mut stream = transport.subscribe(TOPIC, GROUP).await.expect("subscribe");
        let (transport, acked) = (transport.clone(), acked.clone());
        tasks.spawn(async move {
            while let Some(delivery) = stream.next().await {
                delivery.expect("a delivery").ack().await.expect("ack");
                if acked.fetch_add(1, Ordering::AcqRel) + 1 == n {
                    transport.close().await.expect("close");
                }
            }
        });
    }
    publish_all(&transport, batch).await;
    while let Some(done) = tasks.join_next().await {
        done.expect("consumer task");
    }
    assert_eq!(acked.load(Ordering::Acquire), n);
}

/// Publishes `batch` while a [`Worker`] running [`AckAll`] consumes it. The
/// worker's stream ends after `batch.len()` deliveries; the worker then
/// settles what is in flight and returns.
async fn through_worker(batch: Vec<Envelope>, concurrency: usize) {
    let n = batch.len();
    let transport = MemoryTransport::new();
    let stream = transport.subscribe(TOPIC, GROUP).await.expect("subscribe");
    let worker = tokio::spawn(
        Worker::new(AckAll)
            .concurrency(concurrency)
            .run(stream.take(n).boxed(), std::future::pending()),
    );
    publish_all(&transport, batch).await;
    let report = worker.await.expect("worker task");
    assert_eq!(report.acked, n as u64, "{report:?}");
}

/// Benchmarks `run(batch, width)` in the criterion group `name` for every
/// batch size and for `width` 1 and 4 (as `{label}_{width}/{n}`), on a
/// fresh runtime.
fn widths<F>(c: &mut Criterion, name: &str, label: &str, run: impl Fn(Vec<Envelope>, usize) -> F)
where
    F: Future<Output = ()>,
{
    let rt = runtime();
    let mut group = c.benchmark_group(name);
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    for n in BATCH_SIZES {
        let batch = envelopes(n, PARTITION_KEYS);
        group.throughput(Throughput::Elements(n as u64));
        for width in [1, 4] {
            let id = BenchmarkId::new(format!("{label}_{width}"), n);
            group.bench_with_input(id, &width, |b, &width| {
                b.to_async(&rt).iter_batched(
                    || batch.clone(),
                    |batch| run(batch, width),
                    BatchSize::PerIteration,
                )
            });
        }
    }
    group.finish();
}

fn raw_subscribers(c: &mut Criterion) {
    widths(
        c,
        "memory_transport/publish_ack",
        "subscribers",
        publish_and_ack,
    );
}

fn worker_pipeline(c: &mut Criterion) {
    widths(
        c,
        "memory_transport/worker_ack_all",
        "concurrency",
        through_worker,
    );
}

fn config() -> Criterion {
    Criterion::default().warm_up_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = raw_subscribers, worker_pipeline
}
criterion_main!(benches);
