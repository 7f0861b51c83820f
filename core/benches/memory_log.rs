//! Reading the replayable in-memory log: a new group reads 100 000 retained
//! messages from the earliest offset of four partitions, on one core (a
//! current-thread runtime).

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use surety_core::log::{LogEvent, LogOptions, LogSubscriber};
use surety_core::memory::MemoryLog;
use surety_core::{Envelope, Publisher};

const MESSAGES: u64 = 100_000;

fn read(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let log = MemoryLog::with_partitions(4);
    runtime.block_on(async {
        for i in 0..MESSAGES {
            let env = Envelope::builder("/bench", "order.placed")
                .partition_key(format!("order-{}", i % 1_000))
                .payload(r#"{"order_id":"o-1","quantity":3}"#)
                .build();
            log.publish("orders", env).await.expect("published");
        }
    });
    let mut group = c.benchmark_group("memory_log");
    group.throughput(Throughput::Elements(MESSAGES));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    let mut run = 0_u64;
    group.bench_function("read_from_earliest", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                run += 1;
                let group_name = format!("reader-{run}");
                total += runtime.block_on(async {
                    let start = Instant::now();
                    let mut stream = log
                        .subscribe_log("orders", &group_name, LogOptions::default())
                        .await
                        .expect("subscribed");
                    let mut records = 0;
                    while records < MESSAGES {
                        if let Some(Ok(LogEvent::Record(r))) = stream.next().await {
                            std::hint::black_box(&r);
                            records += 1;
                        }
                    }
                    start.elapsed()
                });
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, read);
criterion_main!(benches);
