//! Envelope encoding and decoding: CloudEvents structured JSON, binary
//! (headers) mode, and a typed order payload in and out of an envelope.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use surety_benches::{OrderPlaced, sample_envelope, sample_order};
use surety_core::Envelope;

fn structured_json(c: &mut Criterion) {
    let env = sample_envelope();
    let json = env.to_json();
    let mut group = c.benchmark_group("envelope/structured_json");
    group.throughput(Throughput::Elements(1));
    group.bench_function("to_json", |b| b.iter(|| black_box(&env).to_json()));
    group.bench_function("from_json", |b| {
        b.iter(|| Envelope::from_json(black_box(&json)).expect("valid envelope JSON"))
    });
    group.finish();
}

fn binary_mode(c: &mut Criterion) {
    let env = sample_envelope();
    let (headers, payload) = env.to_binary();
    let mut group = c.benchmark_group("envelope/binary_mode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("to_binary", |b| b.iter(|| black_box(&env).to_binary()));
    // `from_binary` takes the headers by value, as an adapter does when it
    // converts a broker message; the copy is made outside the measurement.
    group.bench_function("from_binary", |b| {
        b.iter_batched(
            || (headers.clone(), payload.clone()),
            |(headers, payload)| {
                Envelope::from_binary(headers, payload).expect("valid binary-mode headers")
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn typed_payload(c: &mut Criterion) {
    let order = sample_order();
    let env = sample_envelope();
    let mut group = c.benchmark_group("envelope/typed_payload");
    group.throughput(Throughput::Elements(1));
    // Serializes the payload and fills in id (UUIDv7), time, type and schema.
    group.bench_function("message", |b| {
        b.iter(|| {
            Envelope::message("/shop/checkout", black_box(&order))
                .expect("the order serializes")
                .partition_key("o-2024-000123")
                .build()
        })
    });
    group.bench_function("decode", |b| {
        b.iter(|| {
            black_box(&env)
                .decode::<OrderPlaced>()
                .expect("the payload is an order")
        })
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = structured_json, binary_mode, typed_payload
}
criterion_main!(benches);
