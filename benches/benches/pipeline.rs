//! What the worker's own steps cost per message, without a transport.
//!
//! `pipeline/*`: a stream of ready deliveries (settled by a no-op) through a
//! [`Worker`] at concurrency 8 with a no-op handler, on a current-thread
//! runtime (one core, less scheduling noise):
//!
//! - `unkeyed/ack_all`: messages without a partition key, so the per-key
//!   scheduler only looks for a key and finds none: the baseline;
//! - `keyed/ack_all`: 64 partition keys, so every delivery goes through
//!   the scheduler (hash, busy map, waiting queue);
//! - `keyed/router`: the same, with a [`Router`] of three types in front
//!   of the handler (dispatch by `type`).
//!
//! `dispatch/*`: one handler call, polled to completion, with the same
//! no-op handler called directly and through the router: the router's own
//! cost without the worker around it.
//!
//! The differences between the rows are the scheduler's and the router's
//! cost per message (target: at most 0.3 µs together).

use std::time::Duration;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::FutureExt;
use surety_benches::{envelopes, ready_deliveries};
use surety_core::consumer::{AckAll, Handler, Incoming, Router, Worker};
use surety_core::{DeliveryInfo, Envelope};

const MESSAGES: usize = 10_000;
const KEYS: usize = 64;

async fn run<H: Handler>(handler: H, batch: Vec<Envelope>) {
    let n = batch.len() as u64;
    let report = Worker::new(handler)
        .concurrency(8)
        .run(ready_deliveries(batch), std::future::pending())
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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let unkeyed = envelopes(MESSAGES, 0);
    let keyed = envelopes(MESSAGES, KEYS);
    let event_type = keyed[0].event_type.clone();
    let mut group = c.benchmark_group("pipeline");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(8))
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

/// Calls `handler` once on `incoming` and polls it to completion (the
/// no-op handler's future is ready at once).
fn call_once<H: Handler>(handler: &mut H, incoming: Incoming) {
    let response = handler
        .call(incoming)
        .now_or_never()
        .expect("a no-op handler is ready at once")
        .expect("handled");
    std::hint::black_box(response);
}

fn dispatch(c: &mut Criterion) {
    let env = envelopes(1, KEYS).remove(0);
    let info = DeliveryInfo::new("memory", "orders", "fulfilment");
    let incoming = Incoming::new(env.clone(), info);
    let mut group = c.benchmark_group("dispatch");
    group.throughput(Throughput::Elements(1));
    let mut direct = AckAll;
    group.bench_function("direct", |b| {
        b.iter_batched(
            || incoming.clone(),
            |msg| call_once(&mut direct, msg),
            BatchSize::SmallInput,
        )
    });
    let mut routed = router(&env.event_type);
    group.bench_function("router", |b| {
        b.iter_batched(
            || incoming.clone(),
            |msg| call_once(&mut routed, msg),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, pipeline, dispatch);
criterion_main!(benches);
