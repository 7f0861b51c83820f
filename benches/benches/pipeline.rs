//! What the worker's own steps cost per message, without a transport: a
//! stream of ready deliveries (settled by a no-op) through a [`Worker`] at
//! concurrency 8 with a no-op handler.
//!
//! - `unkeyed/ack_all`: messages without a partition key, so the per-key
//!   scheduler only looks for a key and finds none: the baseline;
//! - `keyed/ack_all`: 64 partition keys, so every delivery goes through
//!   the scheduler (hash, busy set, waiting queue);
//! - `keyed/router`: the same, with a [`Router`] of three types in front
//!   of the handler (dispatch by `type`).
//!
//! The differences between the rows are the scheduler's and the router's
//! cost per message (target: at most 0.3 µs together).

use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use surety_benches::envelopes;
use surety_core::consumer::{AckAll, Handler, Router, Worker};
use surety_core::{Delivery, DeliveryInfo, DeliveryStream, Envelope, Settle};
use tokio::runtime::Runtime;

const MESSAGES: usize = 10_000;
const KEYS: usize = 64;

/// A settler that does nothing: the transport is not what is measured.
#[derive(Debug)]
struct Noop;

#[async_trait::async_trait]
impl Settle for Noop {
    async fn ack(self: Box<Self>) -> surety_core::Result<()> {
        Ok(())
    }
    async fn nack(self: Box<Self>, _requeue: bool) -> surety_core::Result<()> {
        Ok(())
    }
    async fn reject(self: Box<Self>) -> surety_core::Result<()> {
        Ok(())
    }
}

fn stream(batch: Vec<Envelope>) -> DeliveryStream {
    let info = DeliveryInfo::new("memory", "orders", "fulfilment");
    futures::stream::iter(
        batch
            .into_iter()
            .map(move |env| Ok(Delivery::new(env, info.clone(), Box::new(Noop)))),
    )
    .boxed()
}

async fn run<H: Handler>(handler: H, batch: Vec<Envelope>) {
    let n = batch.len() as u64;
    let report = Worker::new(handler)
        .concurrency(8)
        .run(stream(batch), std::future::pending())
        .await;
    assert_eq!(report.handled, n, "{report:?}");
}

fn router(event_type: &str) -> Router {
    Router::new()
        .route("shop.order.cancelled", AckAll)
        .route(event_type.to_owned(), AckAll)
        .route("shop.order.shipped", AckAll)
}

fn pipeline(c: &mut Criterion) {
    let rt = Runtime::new().expect("a tokio runtime");
    let unkeyed = envelopes(MESSAGES, 0);
    let keyed = envelopes(MESSAGES, KEYS);
    let event_type = keyed[0].event_type.clone();
    let mut group = c.benchmark_group("pipeline");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(MESSAGES as u64));
    let mut bench = |name: &str, batch: &Vec<Envelope>, routed: bool| {
        group.bench_function(BenchmarkId::new(name, MESSAGES), |b| {
            b.to_async(&rt).iter_batched(
                || batch.clone(),
                |batch| async {
                    if routed {
                        run(router(&event_type), batch).await;
                    } else {
                        run(AckAll, batch).await;
                    }
                },
                BatchSize::PerIteration,
            )
        });
    };
    bench("unkeyed/ack_all", &unkeyed, false);
    bench("keyed/ack_all", &keyed, false);
    bench("keyed/router", &keyed, true);
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
