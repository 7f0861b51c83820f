//! Saga benchmarks.
//!
//! - `transition`: one pure step of the checkout definition
//!   (`Steps::apply`: a success reply moves to the next step and builds
//!   its command). Target: ≤ 1 µs.
//! - `durable_steps/sqlite`: checkouts through the orchestrator on a SQLite
//!   file (start, then three replies: four stored transitions, each with
//!   its history row, outbox command and timer change, in one
//!   transaction), against `raw`: the same four transactions written by
//!   hand (`BEGIN IMMEDIATE`, update the row, insert the history row,
//!   enqueue the command, set the timer, `COMMIT`) on the same file.
//!   Throughput is in steps; the ratio saga/raw is the target (≥ 0.7).
//!
//! - `rabbitmq_checkout` (when `SURETY_AMQP_URL` is set): whole checkouts
//!   over RabbitMQ with the SQLite store, outbox relay, reply consumer and
//!   three participants under one `Host`, against `raw`: the same three
//!   command/reply round trips on the same broker and the same pipeline,
//!   chained by a stateless reply handler (no store, no outbox). Each
//!   iteration runs a batch of checkouts concurrently; the ratio saga/raw
//!   is the target (≥ 0.7).
//!
//! Under `cargo test --benches` every bench runs once.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use surety_core::Envelope;
use surety_outbox::SqliteOutbox;
use surety_saga::checkout::{self, Deadlines};
use surety_saga::sqlite::{self, SqliteSagaStore};
use surety_saga::steps::{StepReply, Steps};
use surety_saga::{Input, Orchestrator, Saga};

const REPLIES: [&str; 3] = ["payment.charged", "inventory.reserved", "shipping.booked"];

fn transition(c: &mut Criterion) {
    let saga = checkout::definition(Deadlines::default());
    let start = saga.begin(serde_json::json!({"order": "o-1", "cents": 4200}));
    let state = start.state().cloned().expect("the start moves");
    let reply = Input::Message(StepReply::new("payment.charged"));
    let mut group = c.benchmark_group("transition");
    group.throughput(Throughput::Elements(1));
    group.bench_function("checkout_step", |b| {
        b.iter(|| saga.apply(std::hint::black_box(&state), std::hint::black_box(&reply)));
    });
    group.finish();
}

async fn open(path: &std::path::Path) -> SqlitePool {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .expect("opens the SQLite file")
}

async fn saga_checkouts(orchestrator: &Orchestrator<Steps, SqliteSagaStore>, from: u64, n: u64) {
    for i in from..from + n {
        let id = format!("o-{i}");
        let start = orchestrator
            .saga()
            .begin(serde_json::json!({"order": id, "cents": 4200}));
        orchestrator.start(&id, start).await.expect("starts");
        for reply in REPLIES {
            orchestrator
                .handle(&id, Input::Message(StepReply::new(reply)))
                .await
                .expect("applies");
        }
    }
}

/// The same four transactions per checkout, written by hand.
async fn raw_checkouts(pool: &SqlitePool, from: u64, n: u64) {
    for i in from..from + n {
        let id = format!("o-{i}");
        for version in 1..=4i64 {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begins");
            let state = serde_json::json!({"step": version, "order": id}).to_string();
            sqlx::query(
                "INSERT INTO raw_instance (id, state, version) VALUES ($1, $2, $3) \
                 ON CONFLICT (id) DO UPDATE SET state = excluded.state, version = excluded.version \
                 WHERE raw_instance.version = excluded.version - 1",
            )
            .bind(&id)
            .bind(&state)
            .bind(version)
            .execute(&mut *tx)
            .await
            .expect("writes the row");
            sqlx::query("INSERT INTO raw_history (id, version, state) VALUES ($1, $2, $3)")
                .bind(&id)
                .bind(version)
                .bind(&state)
                .execute(&mut *tx)
                .await
                .expect("writes history");
            if version < 4 {
                let command = Envelope::builder("/raw", "step.command")
                    .partition_key(id.clone())
                    .json(&serde_json::json!({"order": id}))
                    .expect("encodes")
                    .build();
                SqliteOutbox::enqueue(&mut tx, "raw", &command)
                    .await
                    .expect("enqueues");
                sqlx::query(
                    "INSERT INTO raw_timer (id, due) VALUES ($1, $2) \
                     ON CONFLICT (id) DO UPDATE SET due = excluded.due",
                )
                .bind(&id)
                .bind(version)
                .execute(&mut *tx)
                .await
                .expect("sets the timer");
            } else {
                sqlx::query("DELETE FROM raw_timer WHERE id = $1")
                    .bind(&id)
                    .execute(&mut *tx)
                    .await
                    .expect("drops the timer");
            }
            tx.commit().await.expect("commits");
        }
    }
}

fn durable_steps(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let dir = std::env::temp_dir().join(format!("surety-saga-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let path = dir.join("bench.db");
    let pool = runtime.block_on(async {
        let pool = open(&path).await;
        sqlite::migrate(&pool).await.expect("migrates");
        for ddl in [
            "CREATE TABLE IF NOT EXISTS raw_instance (id TEXT PRIMARY KEY, state TEXT NOT NULL, version INTEGER NOT NULL)",
            "CREATE TABLE IF NOT EXISTS raw_history (id TEXT NOT NULL, version INTEGER NOT NULL, state TEXT NOT NULL, PRIMARY KEY (id, version))",
            "CREATE TABLE IF NOT EXISTS raw_timer (id TEXT PRIMARY KEY, due INTEGER NOT NULL)",
        ] {
            sqlx::query(ddl).execute(&pool).await.expect("creates");
        }
        pool
    });
    let orchestrator = Orchestrator::new(
        checkout::definition(Deadlines::default()),
        SqliteSagaStore::new(pool.clone()),
    );
    let mut group = c.benchmark_group("durable_steps");
    group.throughput(Throughput::Elements(4));
    group.sample_size(10);
    let mut next = 0u64;
    group.bench_function("sqlite/saga", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            runtime.block_on(saga_checkouts(&orchestrator, next, iters));
            next += iters;
            started.elapsed()
        });
    });
    let mut next = 0u64;
    group.bench_function("sqlite/raw", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            runtime.block_on(raw_checkouts(&pool, next, iters));
            next += iters;
            started.elapsed()
        });
    });
    group.finish();
    runtime.block_on(pool.close());
    std::fs::remove_dir_all(&dir).ok();
}

/// Checkouts started per iteration of the RabbitMQ benches.
const BATCH: u64 = 50;

fn rabbitmq_checkout(c: &mut Criterion) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use surety_core::consumer::{Incoming, Output, Response, Worker, handler_fn};
    use surety_core::host::Host;
    use surety_core::{HandlerError, Permanent, Publisher};
    use surety_outbox::Relay;
    use surety_rabbitmq::{RabbitConfig, RabbitTransport};
    use surety_saga::consumer;
    use surety_saga::participant::{Answer, participant};

    let Ok(url) = std::env::var("SURETY_AMQP_URL") else {
        eprintln!("rabbitmq_checkout: SURETY_AMQP_URL is not set; skipped");
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let prefix = format!("surety-saga-bench.{}", uuid::Uuid::now_v7());
    // Deletes the bench's queues when the bench ends.
    let _cleanup = surety_testkit::rabbitmq::Cleanup::new(url.clone()).prefix(prefix.clone());
    let q = |name: &str| format!("{prefix}.{name}");
    let dir = std::env::temp_dir().join(format!("surety-saga-bench-rmq-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let (transport, pool) = runtime.block_on(async {
        let transport = RabbitTransport::connect(
            RabbitConfig::new(url.clone()).connection_name(format!("{prefix}.bench")),
        )
        .await
        .expect("connects to RabbitMQ");
        let pool = open(&dir.join("bench.db")).await;
        sqlite::migrate(&pool).await.expect("migrates");
        (transport, pool)
    });
    let saga = checkout::definition_on(
        Deadlines::default(),
        &q("payments"),
        &q("inventory"),
        &q("shipping"),
    );
    let orchestrator = Arc::new(
        Orchestrator::new(saga, SqliteSagaStore::new(pool.clone())).reply_to(q("replies")),
    );
    let answer = |reply: &'static str| {
        participant("/bench", move |_command: Incoming| async move {
            Ok::<_, Permanent>(Answer::done(reply, serde_json::json!({})))
        })
    };
    // Raw: the next command for each reply, no state.
    let done = Arc::new(AtomicU64::new(0));
    let raw_done = Arc::clone(&done);
    let raw_next = {
        let (inventory, shipping) = (q("inventory"), q("shipping"));
        let reply_to = q("raw-replies");
        handler_fn(move |incoming: Incoming| {
            let (inventory, shipping, reply_to) =
                (inventory.clone(), shipping.clone(), reply_to.clone());
            let done = Arc::clone(&raw_done);
            async move {
                let request = &incoming.envelope;
                let (topic, kind) = match request.event_type.as_str() {
                    "payment.charged" => (inventory, "inventory.reserve"),
                    "inventory.reserved" => (shipping, "shipping.book"),
                    _ => {
                        done.fetch_add(1, Ordering::SeqCst);
                        return Ok::<_, HandlerError>(Response::handled());
                    }
                };
                let command = Envelope::builder("/raw", kind)
                    .correlation_id(request.correlation_id.clone().unwrap_or_default())
                    .partition_key(request.partition_key.clone().unwrap_or_default())
                    .reply_to(reply_to)
                    .json(&serde_json::json!({}))
                    .map_err(HandlerError::permanent)?
                    .build();
                Ok(Response::handled().emit(Output::new(topic, command)))
            }
        })
    };
    let relay = Relay::new(SqliteOutbox::new(pool.clone()), transport.clone())
        .poll_interval(Duration::from_millis(2));
    let host = Host::new()
        .consume(
            transport.clone(),
            q("replies"),
            "checkout",
            Worker::new(consumer::reply_handler(Arc::clone(&orchestrator))).concurrency(32),
        )
        .consume(
            transport.clone(),
            q("raw-replies"),
            "raw",
            Worker::new(raw_next)
                .concurrency(32)
                .emit_to(transport.clone()),
        )
        .task("relay", move |shutdown| relay.run(shutdown.wait()))
        .consume(
            transport.clone(),
            q("payments"),
            "payments",
            Worker::new(answer("payment.charged"))
                .concurrency(32)
                .emit_to(transport.clone()),
        )
        .consume(
            transport.clone(),
            q("inventory"),
            "inventory",
            Worker::new(answer("inventory.reserved"))
                .concurrency(32)
                .emit_to(transport.clone()),
        )
        .consume(
            transport.clone(),
            q("shipping"),
            "shipping",
            Worker::new(answer("shipping.booked"))
                .concurrency(32)
                .emit_to(transport.clone()),
        );
    let health = host.health();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = runtime.spawn(host.run(async {
        stopped.await.ok();
    }));
    runtime.block_on(async {
        while !health.is_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });

    let mut group = c.benchmark_group("rabbitmq_checkout");
    group.throughput(Throughput::Elements(BATCH));
    group.sample_size(10);
    let mut next = 0u64;
    group.bench_function("saga", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            runtime.block_on(async {
                for _ in 0..iters {
                    let ids: Vec<String> = (next..next + BATCH).map(|i| format!("c-{i}")).collect();
                    next += BATCH;
                    for id in &ids {
                        let start = orchestrator.saga().begin(serde_json::json!({"order": id}));
                        orchestrator.start(id, start).await.expect("starts");
                    }
                    for id in &ids {
                        loop {
                            let state = orchestrator.state(id).await.expect("loads");
                            if state.is_some_and(|s| orchestrator.saga().is_finished(&s)) {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
            });
            started.elapsed()
        });
    });
    group.bench_function("raw", |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            runtime.block_on(async {
                for _ in 0..iters {
                    let target = done.load(Ordering::SeqCst) + BATCH;
                    for i in 0..BATCH {
                        let key = format!("r-{next}-{i}");
                        let command = Envelope::builder("/raw", "payment.charge")
                            .correlation_id(key.clone())
                            .partition_key(key)
                            .reply_to(q("raw-replies"))
                            .json(&serde_json::json!({}))
                            .expect("encodes")
                            .build();
                        transport
                            .publish(&q("payments"), command)
                            .await
                            .expect("publishes");
                    }
                    next += 1;
                    while done.load(Ordering::SeqCst) < target {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
            });
            started.elapsed()
        });
    });
    group.finish();
    stop.send(()).ok();
    runtime.block_on(async {
        running.await.ok();
        pool.close().await;
    });
    std::fs::remove_dir_all(&dir).ok();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    transition(&mut c);
    durable_steps(&mut c);
    rabbitmq_checkout(&mut c);
    c.final_summary();
}
