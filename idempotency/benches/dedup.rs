//! Consume throughput with deduplication against the same pipeline without
//! it, printed as ratios.
//!
//! Pipelines (in-memory transport, one worker, concurrency 8):
//!
//! - `memory`: a no-op handler, bare vs behind `IdempotencyLayer` with a
//!   `MemoryDedupStore` (the layer's whole cost, against a pipeline that does
//!   nothing else). The report adds the layer's cost per message in
//!   microseconds.
//! - `memory-json`: the same with a handler that decodes a 1 KB JSON order
//!   (`surety_core::consumer::typed`) and does nothing else: the cheapest
//!   handler that does real work, no I/O.
//! - `memory-10us`: the same with a handler that works 10 µs on the CPU
//!   (a spin on the clock): the measure for the in-memory target
//!   (≥ 0.95 of bare with ≥ 10 µs of handler work).
//! - `memory-io`: the same with a handler that waits 1 ms, as one doing
//!   I/O would.
//!
//! Every ratio row also runs its bare pipeline twice in each round (the
//! second run is the control); the control's per-round spread is printed
//! beside the ratio, with "within noise" when the ratio lies inside it.
//! - `sqlite` / `postgres`: a handler that writes its effect in a
//!   transaction (`BEGIN; INSERT; COMMIT`), bare vs as an inbox handler
//!   (claim, effect and mark in one transaction), and vs the plain layer
//!   with the SQL store (claim and complete as statements of their own).
//!
//! PostgreSQL runs when `SURETY_POSTGRES_URL` is set; without it the
//! PostgreSQL pipelines are skipped, or the bench fails when
//! `SURETY_REQUIRE_SERVICES` is set. Under
//! `cargo test --benches` every pipeline runs once on a few messages.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, Throughput};
use futures::future::BoxFuture;
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;
use surety_core::consumer::{Handler, Incoming, Worker, handler_fn, typed};
use surety_core::memory::MemoryTransport;
use surety_core::tower::Layer;
use surety_core::{Envelope, Publisher, Subscriber};
use surety_idempotency::{
    IdempotencyLayer, InboxTx, MemoryDedupStore, PostgresDedupStore, SqliteDedupStore, StoreError,
};
use surety_testkit::services;
use tokio::runtime::Runtime;
use tokio::sync::Notify;

// The integration tests' fresh databases.
#[allow(dead_code, unreachable_pub)]
#[path = "../tests/common/db.rs"]
mod db;

const CONCURRENCY: usize = 8;

/// Counts handled messages and wakes the timer at the last one.
#[derive(Clone, Default)]
struct Done {
    count: Arc<AtomicUsize>,
    target: Arc<AtomicUsize>,
    all: Arc<Notify>,
}

impl Done {
    fn one(&self) {
        if self.count.fetch_add(1, Ordering::SeqCst) + 1 == self.target.load(Ordering::SeqCst) {
            self.all.notify_one();
        }
    }
}

/// Time for a worker running `handler` to handle `n` waiting messages.
async fn consume<H: Handler>(handler: H, done: &Done, n: usize) -> Duration {
    consume_payload(handler, done, n, "{}").await
}

/// [`consume`] with messages carrying `payload`.
async fn consume_payload<H: Handler>(
    handler: H,
    done: &Done,
    n: usize,
    payload: &'static str,
) -> Duration {
    let transport = MemoryTransport::with_capacity(n + 1);
    let stream = transport.subscribe("bench", "consumer").await.unwrap();
    for _ in 0..n {
        let env = Envelope::builder("/bench", "bench.message")
            .payload(payload)
            .build();
        transport.publish("bench", env).await.unwrap();
    }
    done.count.store(0, Ordering::SeqCst);
    done.target.store(n, Ordering::SeqCst);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let worker = tokio::spawn(
        Worker::new(handler)
            .concurrency(CONCURRENCY)
            .run(stream, async {
                stopped.await.ok();
            }),
    );
    done.all.notified().await;
    let elapsed = started.elapsed();
    stop.send(()).ok();
    worker.await.unwrap();
    elapsed
}

/// One run of a pipeline: the time it takes to handle its messages.
type Run = dyn Fn() -> BoxFuture<'static, Duration>;

/// A run of a pipeline whose handler `make` builds afresh every time (a
/// fresh store per run), on `n` messages carrying `payload`.
fn fresh<H, F>(
    done: &Done,
    n: usize,
    payload: &'static str,
    make: F,
) -> impl Fn() -> BoxFuture<'static, Duration> + use<H, F>
where
    H: Handler,
    F: Fn(&Done) -> H + Clone + Send + 'static,
{
    let done = done.clone();
    move || {
        let (done, make) = (done.clone(), make.clone());
        Box::pin(async move { consume_payload(make(&done), &done, n, payload).await })
    }
}

/// Benchmarks `id` as the time of as many runs as criterion asks for.
fn bench_runs(group: &mut BenchmarkGroup<'_, WallTime>, rt: &Runtime, id: &str, run: &Run) {
    group.bench_function(id, |b| {
        b.to_async(rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += run().await;
            }
            total
        })
    });
}

/// `handler` behind the dedup layer with a fresh `MemoryDedupStore`.
fn deduped<H: Handler>(handler: H) -> impl Handler {
    IdempotencyLayer::new(MemoryDedupStore::new()).layer(handler)
}

fn counting(done: &Done) -> impl Handler + use<> {
    let done = done.clone();
    handler_fn(move |_msg: Incoming| {
        let done = done.clone();
        async move {
            done.one();
            Ok::<_, std::convert::Infallible>(())
        }
    })
}

/// An order of about 1 KB, as JSON.
#[derive(serde::Serialize, serde::Deserialize)]
#[allow(dead_code)]
struct Order {
    order_id: String,
    customer: Customer,
    lines: Vec<OrderLine>,
    currency: String,
    total_cents: u64,
    placed_at: String,
}

impl surety_core::Message for Order {
    const TYPE: &'static str = "bench.message";
}

#[derive(serde::Serialize, serde::Deserialize)]
#[allow(dead_code)]
struct Customer {
    id: String,
    email: String,
    name: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[allow(dead_code)]
struct OrderLine {
    sku: String,
    title: String,
    quantity: u32,
    unit_price_cents: u64,
}

/// The payload of the `memory-json` pipeline.
static ORDER_JSON: std::sync::LazyLock<&'static str> = std::sync::LazyLock::new(|| {
    let lines: Vec<_> = (0..8)
        .map(|i| {
            serde_json::json!({
                "sku": format!("SKU-{i:06}"),
                "title": format!("Stoneware mug, glazed, 350 ml, colour no. {i}"),
                "quantity": i + 1,
                "unit_price_cents": 1_250 + i * 10,
            })
        })
        .collect();
    let order = serde_json::json!({
        "order_id": "o-2f6c1a9e-4b8d-4f3a-9c1e-7d2b5a8e0f13",
        "customer": { "id": "c-81234", "email": "ada@example.com", "name": "Ada Lovelace" },
        "lines": lines,
        "currency": "EUR",
        "total_cents": 45_360,
        "placed_at": "2025-03-14T09:26:53Z",
    });
    String::leak(order.to_string())
});

/// A handler that decodes the order and does nothing else.
fn decoding(done: &Done) -> impl Handler + use<> {
    let done = done.clone();
    typed(move |order: Order, _msg: Incoming| {
        let done = done.clone();
        async move {
            std::hint::black_box(&order);
            done.one();
            Ok::<_, std::convert::Infallible>(())
        }
    })
}

/// A handler that works [`WORK`] on the CPU (a spin on the clock), as one
/// computing something would.
fn working(done: &Done) -> impl Handler + use<> {
    let done = done.clone();
    handler_fn(move |_msg: Incoming| {
        let done = done.clone();
        async move {
            let started = Instant::now();
            while started.elapsed() < WORK {
                std::hint::spin_loop();
            }
            done.one();
            Ok::<_, std::convert::Infallible>(())
        }
    })
}

/// The CPU work of [`working`].
const WORK: Duration = Duration::from_micros(10);

/// A handler that waits 1 ms, as for a call to another service.
fn waiting(done: &Done) -> impl Handler {
    let done = done.clone();
    handler_fn(move |_msg: Incoming| {
        let done = done.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            done.one();
            Ok::<_, std::convert::Infallible>(())
        }
    })
}

macro_rules! sql_pipelines {
    ($name:ident, $store:ty, $pool:ty, $insert:literal) => {
        mod $name {
            use super::*;

            /// The business write, bare: one transaction per message.
            pub(super) fn bare(pool: &$pool, done: &Done) -> impl Handler {
                let (pool, done) = (pool.clone(), done.clone());
                handler_fn(move |msg: Incoming| {
                    let (pool, done) = (pool.clone(), done.clone());
                    async move {
                        let mut tx = pool.begin().await.map_err(StoreError::from)?;
                        sqlx::query($insert)
                            .bind(&msg.envelope.id)
                            .execute(&mut *tx)
                            .await
                            .map_err(StoreError::from)?;
                        tx.commit().await.map_err(StoreError::from)?;
                        done.one();
                        Ok::<_, StoreError>(())
                    }
                })
            }

            /// The same write as an inbox handler.
            pub(super) fn inbox(store: &$store, done: &Done) -> impl Handler {
                let done = done.clone();
                IdempotencyLayer::new(store.clone()).inbox(
                    move |msg: Incoming, mut tx: InboxTx<$store>| {
                        let done = done.clone();
                        async move {
                            sqlx::query($insert)
                                .bind(&msg.envelope.id)
                                .execute(&mut *tx)
                                .await?;
                            let committed = tx.commit().await?;
                            done.one();
                            Ok::<_, StoreError>(committed)
                        }
                    },
                )
            }

            /// The same write behind the plain layer with the SQL store.
            pub(super) fn layer(pool: &$pool, store: &$store, done: &Done) -> impl Handler {
                IdempotencyLayer::new(store.clone()).layer(bare(pool, done))
            }
        }
    };
}

sql_pipelines!(
    on_sqlite,
    SqliteDedupStore,
    SqlitePool,
    "INSERT INTO bench_effects (message_id) VALUES (?1)"
);
sql_pipelines!(
    on_postgres,
    PostgresDedupStore,
    PgPool,
    "INSERT INTO bench_effects (message_id) VALUES ($1)"
);

/// The business table the SQL pipelines write their effect to.
const EFFECTS_TABLE: &str = "CREATE TABLE bench_effects (message_id TEXT NOT NULL)";

struct Sqlite {
    db: db::TempSqlite,
    store: SqliteDedupStore,
}

async fn sqlite() -> Sqlite {
    let db =
        db::TempSqlite::with_busy_timeout(CONCURRENCY as u32 + 2, Duration::from_secs(30)).await;
    sqlx::query(EFFECTS_TABLE).execute(&db.pool).await.unwrap();
    Sqlite {
        store: SqliteDedupStore::new(db.pool.clone()),
        db,
    }
}

struct Postgres {
    db: db::TempSchema,
    store: PostgresDedupStore,
}

async fn postgres() -> Option<Postgres> {
    // Skips without the address, and fails under SURETY_REQUIRE_SERVICES.
    let url = services::require(services::postgres_url())?;
    let db = db::temp_schema_at(&url, CONCURRENCY as u32 + 2).await;
    sqlx::query(EFFECTS_TABLE).execute(&db.pool).await.unwrap();
    Some(Postgres {
        store: PostgresDedupStore::new(db.pool.clone()),
        db,
    })
}

/// Messages per second of `rounds` runs of each pipeline (one list per
/// pipeline, one entry per round), run in turns so that drift hits all of
/// them alike.
async fn samples(pipelines: &[(&str, &Run)], n: usize, rounds: usize) -> Vec<Vec<f64>> {
    let mut samples = vec![Vec::new(); pipelines.len()];
    for _ in 0..rounds {
        for (i, (_, run)) in pipelines.iter().enumerate() {
            let elapsed = run().await;
            samples[i].push(n as f64 / elapsed.as_secs_f64());
        }
    }
    samples
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
}

/// A report row.
struct Row {
    name: &'static str,
    /// Median throughput of the pipeline over the bare one's.
    ratio: f64,
    /// The bare pipeline's median throughput.
    bare: f64,
    /// The control's (bare again) per-round ratios to bare: lowest, highest
    /// (widened to 1.0).
    noise: (f64, f64),
}

/// A report row: `name`, the median throughput of pipeline `i` of
/// `samples` over the bare one (the first), and the noise from the control
/// (the second: bare again).
fn ratio(name: &'static str, samples: &[Vec<f64>], i: usize) -> Row {
    let (bare, control) = (&samples[0], &samples[1]);
    let controls: Vec<f64> = control.iter().zip(bare).map(|(c, b)| c / b).collect();
    Row {
        name,
        ratio: median(&samples[i]) / median(bare),
        bare: median(bare),
        noise: (
            controls.iter().copied().fold(1.0, f64::min),
            controls.iter().copied().fold(1.0, f64::max),
        ),
    }
}

fn main() {
    let mut criterion = Criterion::default()
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();
    let benching = std::env::args().any(|a| a == "--bench");
    let (n, rounds) = if benching { (2_000, 7) } else { (50, 1) };
    // The no-op and JSON pipelines are so fast that they need more messages
    // per run, and take more rounds (a run lasts some 50 ms, so a burst of
    // load from elsewhere on a shared machine moves one run's number a lot).
    let n_memory = if benching { 20_000 } else { 50 };
    let rounds_memory = rounds * 3;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let done = Done::default();
    let sqlite = rt.block_on(sqlite());
    let pg = rt.block_on(postgres());

    // A fresh store per run for the no-op and JSON pipelines, so the store's
    // size is the same in every run.
    let memory_bare = fresh(&done, n_memory, "{}", counting);
    let memory_dedup = fresh(&done, n_memory, "{}", |done| deduped(counting(done)));
    let json_bare = fresh(&done, n_memory, &ORDER_JSON, decoding);
    let json_dedup = fresh(&done, n_memory, &ORDER_JSON, |done| deduped(decoding(done)));
    let work_bare = fresh(&done, n, "{}", working);
    let work_dedup = fresh(&done, n, "{}", |done| deduped(working(done)));
    {
        let mut group = criterion.benchmark_group("consume");
        group.throughput(Throughput::Elements(n_memory as u64));
        let runs: [(&str, &Run); 4] = [
            ("memory/bare", &memory_bare),
            ("memory/dedup", &memory_dedup),
            ("memory-json/bare", &json_bare),
            ("memory-json/dedup", &json_dedup),
        ];
        for (id, run) in runs {
            bench_runs(&mut group, &rt, id, run);
        }
        group.finish();
    }
    {
        let mut group = criterion.benchmark_group("consume");
        group.throughput(Throughput::Elements(n as u64));
        macro_rules! bench {
            ($id:literal, $handler:expr) => {
                group.bench_function($id, |b| {
                    b.to_async(&rt).iter_custom(|iters| {
                        let done = done.clone();
                        let handler = $handler;
                        async move {
                            let mut total = Duration::ZERO;
                            for _ in 0..iters {
                                total += consume(handler.clone(), &done, n).await;
                            }
                            total
                        }
                    })
                });
            };
        }
        bench!("memory-io/bare", waiting(&done));
        bench!("memory-io/dedup", deduped(waiting(&done)));
        bench!("sqlite/bare", on_sqlite::bare(&sqlite.db.pool, &done));
        bench!("sqlite/inbox", on_sqlite::inbox(&sqlite.store, &done));
        bench!(
            "sqlite/layer",
            on_sqlite::layer(&sqlite.db.pool, &sqlite.store, &done)
        );
        if let Some(pg) = &pg {
            bench!("postgres/bare", on_postgres::bare(&pg.db.pool, &done));
            bench!("postgres/inbox", on_postgres::inbox(&pg.store, &done));
            bench!(
                "postgres/layer",
                on_postgres::layer(&pg.db.pool, &pg.store, &done)
            );
        }
        group.finish();
    }

    // Ratios of median throughput, dedup / bare.
    macro_rules! pipeline {
        ($handler:expr) => {{
            let done = done.clone();
            let handler = $handler;
            move || -> BoxFuture<'static, Duration> {
                let (done, handler) = (done.clone(), handler.clone());
                Box::pin(async move { consume(handler, &done, n).await })
            }
        }};
    }
    let io_bare = pipeline!(waiting(&done));
    let io_dedup = pipeline!(deduped(waiting(&done)));
    let sqlite_bare = pipeline!(on_sqlite::bare(&sqlite.db.pool, &done));
    let sqlite_inbox = pipeline!(on_sqlite::inbox(&sqlite.store, &done));
    let sqlite_layer = pipeline!(on_sqlite::layer(&sqlite.db.pool, &sqlite.store, &done));
    let mut report = Vec::new();
    let m = rt.block_on(samples(
        &[
            ("bare", &memory_bare),
            ("control", &memory_bare),
            ("dedup", &memory_dedup),
        ],
        n_memory,
        rounds_memory,
    ));
    report.push(ratio(
        "memory, no-op handler: layer + MemoryDedupStore / bare (reported; the layer's cost per message below is the measure)",
        &m,
        2,
    ));
    // What the layer adds to every message, in microseconds of wall time.
    let (bare_us, dedup_us) = (1e6 / median(&m[0]), 1e6 / median(&m[2]));
    let layer_cost = dedup_us - bare_us;
    let control_cost: Vec<f64> = m[1]
        .iter()
        .zip(&m[0])
        .map(|(c, b)| 1e6 / c - 1e6 / b)
        .collect();
    let j = rt.block_on(samples(
        &[
            ("bare", &json_bare),
            ("control", &json_bare),
            ("dedup", &json_dedup),
        ],
        n_memory,
        rounds_memory,
    ));
    report.push(ratio(
        "memory, handler decoding a 1 KB JSON order: layer + MemoryDedupStore / bare",
        &j,
        2,
    ));
    let w = rt.block_on(samples(
        &[
            ("bare", &work_bare),
            ("control", &work_bare),
            ("dedup", &work_dedup),
        ],
        n,
        rounds_memory,
    ));
    report.push(ratio(
        "memory, handler working 10 us: layer + MemoryDedupStore / bare (target >= 0.95)",
        &w,
        2,
    ));
    let io = rt.block_on(samples(
        &[
            ("bare", &io_bare),
            ("control", &io_bare),
            ("dedup", &io_dedup),
        ],
        n,
        rounds,
    ));
    report.push(ratio(
        "memory, 1 ms handler: layer + MemoryDedupStore / bare",
        &io,
        2,
    ));
    let s = rt.block_on(samples(
        &[
            ("bare", &sqlite_bare),
            ("control", &sqlite_bare),
            ("inbox", &sqlite_inbox),
            ("layer", &sqlite_layer),
        ],
        n,
        rounds,
    ));
    report.push(ratio(
        "sqlite: inbox / bare transaction (target >= 0.7)",
        &s,
        2,
    ));
    report.push(ratio(
        "sqlite: layer + SqliteDedupStore / bare transaction",
        &s,
        3,
    ));
    if let Some(pg) = &pg {
        let pg_bare = pipeline!(on_postgres::bare(&pg.db.pool, &done));
        let pg_inbox = pipeline!(on_postgres::inbox(&pg.store, &done));
        let pg_layer = pipeline!(on_postgres::layer(&pg.db.pool, &pg.store, &done));
        let p = rt.block_on(samples(
            &[
                ("bare", &pg_bare),
                ("control", &pg_bare),
                ("inbox", &pg_inbox),
                ("layer", &pg_layer),
            ],
            n,
            rounds,
        ));
        report.push(ratio(
            "postgres: inbox / bare transaction (target >= 0.7)",
            &p,
            2,
        ));
        report.push(ratio(
            "postgres: layer + PostgresDedupStore / bare transaction",
            &p,
            3,
        ));
    } else {
        println!("postgres: skipped (SURETY_POSTGRES_URL is not set)");
    }
    println!(
        "\nconsume throughput with dedup / without (median of {rounds_memory} runs of {n_memory} messages for the no-op and JSON handlers, {rounds_memory} runs of {n} for the 10 us one, {rounds} runs of {n} otherwise; control: the bare pipeline again each round):"
    );
    for row in report {
        let (low, high) = row.noise;
        let within = if (low..=high).contains(&row.ratio) {
            ", within noise"
        } else {
            ""
        };
        println!(
            "  {}: {:.2}  (bare: {:.0} msg/s; control {low:.2}–{high:.2}{within})",
            row.name, row.ratio, row.bare
        );
    }
    let (cost_low, cost_high) = (
        control_cost.iter().copied().fold(0.0, f64::min),
        control_cost.iter().copied().fold(0.0, f64::max),
    );
    println!(
        "  the layer with MemoryDedupStore adds {layer_cost:.2} us per message (A/B wall time on the no-op pipeline; target <= 0.5 us; the control's difference to bare spans {cost_low:+.2}..{cost_high:+.2} us); the no-op bare pipeline takes {bare_us:.2} us"
    );

    drop(sqlite);
    if let Some(pg) = pg {
        rt.block_on(pg.db.drop_schema());
    }
    criterion.final_summary();
}
