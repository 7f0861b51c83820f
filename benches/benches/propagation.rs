//! Header propagation: W3C trace context injected into and extracted from
//! [`Headers`], and the typed header accessors every hop uses.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use surety_benches::TRACEPARENT;
use surety_core::Headers;
use surety_core::headers::keys;
use surety_core::trace;

/// Headers as they arrive on a consumed message: trace context plus a few
/// application headers.
fn incoming_headers() -> Headers {
    [
        (keys::TRACEPARENT, TRACEPARENT),
        (keys::TRACESTATE, "vendor=opaque"),
        ("x-tenant", "acme"),
        (keys::ATTEMPT, "2"),
    ]
    .into_iter()
    .collect()
}

fn trace_context(c: &mut Criterion) {
    let headers = incoming_headers();
    let cx = trace::extract(&headers);
    let mut out = Headers::new();
    trace::inject(&cx, &mut out);
    assert_eq!(
        out.traceparent(),
        Some(TRACEPARENT),
        "fixture context is valid"
    );
    let untraced: Headers = [("x-tenant", "acme")].into_iter().collect();

    let mut group = c.benchmark_group("propagation/trace_context");
    group.throughput(Throughput::Elements(1));
    group.bench_function("extract", |b| {
        b.iter(|| trace::extract(black_box(&headers)))
    });
    group.bench_function("extract_absent", |b| {
        b.iter(|| trace::extract(black_box(&untraced)))
    });
    group.bench_function("inject", |b| {
        b.iter(|| {
            let mut headers = Headers::new();
            trace::inject(black_box(&cx), &mut headers);
            headers
        })
    });
    group.bench_function("extract_then_inject", |b| {
        b.iter(|| {
            let cx = trace::extract(black_box(&headers));
            let mut out = Headers::new();
            trace::inject(&cx, &mut out);
            out
        })
    });
    group.finish();
}

fn typed_headers(c: &mut Criterion) {
    let headers = incoming_headers();
    let mut group = c.benchmark_group("propagation/headers");
    group.throughput(Throughput::Elements(1));
    group.bench_function("get", |b| {
        b.iter(|| black_box(&headers).get(black_box("x-tenant")).is_some())
    });
    group.bench_function("attempt", |b| {
        b.iter(|| black_box(&headers).attempt().expect("a valid attempt"))
    });
    group.bench_function("set_attempt", |b| {
        let mut headers = headers.clone();
        b.iter(|| black_box(&mut headers).set_attempt(black_box(3)))
    });
    group.bench_function("parsed_u64", |b| {
        let mut headers = headers.clone();
        headers.set_parsed("x-retry-at-ms", 1_717_245_296_789_u64);
        b.iter(|| {
            black_box(&headers)
                .parsed::<u64>("x-retry-at-ms")
                .expect("a valid number")
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
    targets = trace_context, typed_headers
}
criterion_main!(benches);
