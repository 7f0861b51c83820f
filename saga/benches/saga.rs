//! Saga benchmarks.
//!
//! - `transition` (criterion): one pure step of the checkout definition
//!   (`Steps::apply`: a success reply moves to the next step and builds
//!   its command). Target: ≤ 1 µs.
//! - `durable_steps`: checkouts through the orchestrator on a SQLite file
//!   (start, then three replies: four stored transitions, each loading the
//!   instance and writing it with its history row, outbox command and timer
//!   change in one transaction), against `raw`: the same four transactions
//!   written by hand with sqlx on the same file (`BEGIN IMMEDIATE`, read the
//!   row, write it, insert the history row, insert the command's
//!   pre-encoded bytes into an outbox table, set the timer, `COMMIT`; no
//!   Surety code). Throughput in steps; target saga/raw ≥ 0.7.
//! - `rabbitmq_checkout` (when `SURETY_AMQP_URL` is set): whole checkouts
//!   over RabbitMQ with the SQLite store, outbox relay, reply consumer and
//!   three participants under one `Host`, the SQLite file opened as the
//!   outbox guide opens it (WAL, four connections), checkouts started
//!   `CONCURRENCY` at a time as concurrent handlers would start them (and,
//!   as a second row, one at a time), against `raw`: checkouts started
//!   the same way, the same three
//!   command/reply round trips on the same broker in plain lapin (durable
//!   queues, persistent messages, publisher confirms, manual acks, 32
//!   deliveries handled at once per consumer like the workers; a stateless
//!   reply consumer publishes the next command). Target saga/raw ≥ 0.7.
//!
//! The two ratio rows follow ADR 0018: every round measures raw, raw again
//! (the control) and saga, the order reversed every other round; the
//! control's ratios to raw, widened to include 1.00, are the noise band.
//! Each row also gives the process's CPU time per unit on both sides
//! (`surety_testkit::cpu`; in the RabbitMQ row the process runs the
//! participants and the reply consumer of both sides, the broker runs in
//! its own). Both sides count finished checkouts in their reply consumer;
//! neither polls a store.
//! `cargo bench -p surety-saga --bench saga` for the full run; under
//! `cargo test --benches` each runs one small round.

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

/// The SQLite file at `path` in WAL mode, with `connections` connections.
async fn open(path: &std::path::Path, connections: u32) -> SqlitePool {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new()
        .max_connections(connections)
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

/// The same four transactions per checkout, written by hand with sqlx:
/// read the row, write it under its version, a history row, the command's
/// bytes (encoded before the clock starts) into an outbox table, the timer.
async fn raw_checkouts(pool: &SqlitePool, command: &[u8], from: u64, n: u64) {
    for i in from..from + n {
        let id = format!("o-{i}");
        for version in 1..=4i64 {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begins");
            let loaded: Option<(String, i64)> =
                sqlx::query_as("SELECT state, version FROM raw_instance WHERE id = $1")
                    .bind(&id)
                    .fetch_optional(&mut *tx)
                    .await
                    .expect("reads the row");
            assert_eq!(loaded.map_or(0, |(_, v)| v), version - 1);
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
                sqlx::query(
                    "INSERT INTO raw_outbox (message_id, topic, payload) VALUES ($1, $2, $3)",
                )
                .bind(format!("raw:{id}:{version}"))
                .bind("raw")
                .bind(command)
                .execute(&mut *tx)
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

/// Whether this is a full run (`cargo bench`) rather than the smoke run of
/// `cargo test --benches`.
fn full_run() -> bool {
    std::env::args().any(|arg| arg == "--bench")
}

/// The target of both ratio rows: saga / raw.
const TARGET: f64 = 0.7;

/// One measurement: units per second and process CPU per unit (µs).
#[derive(Clone, Copy, Debug)]
struct Measured {
    rate: f64,
    cpu: f64,
}

/// One round: raw, raw again (the control), saga.
#[derive(Clone, Copy, Debug)]
struct Round {
    raw: Measured,
    control: Measured,
    saga: Measured,
}

/// Runs one measurement: `units` done in the wall time it took, with the
/// process's CPU time over that window.
async fn measure<F: std::future::Future<Output = u64>>(run: F) -> Measured {
    let cpu = surety_testkit::cpu::process_cpu;
    let (started, cpu_before) = (Instant::now(), cpu());
    let units = run.await;
    let wall = started.elapsed().as_secs_f64();
    let used = match (cpu_before, cpu()) {
        (Some(before), Some(after)) => after.saturating_sub(before).as_secs_f64(),
        _ => f64::NAN,
    };
    Measured {
        rate: units as f64 / wall,
        cpu: used * 1e6 / units as f64,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs `rounds` rounds of raw, control and saga (the order reversed every
/// other round), each measurement returning how many units it did, and
/// prints the rates, the ratio, the noise band (ADR 0018) and the process
/// CPU per unit of each side.
async fn rounds<R, RF, S, SF>(name: &str, unit: &str, rounds: usize, mut raw: R, mut saga: S)
where
    R: FnMut() -> RF,
    RF: std::future::Future<Output = u64>,
    S: FnMut() -> SF,
    SF: std::future::Future<Output = u64>,
{
    let mut results = Vec::new();
    // A warm-up round, not counted.
    for round in 0..=rounds {
        let (r, c, s);
        if round % 2 == 0 {
            r = measure(raw()).await;
            c = measure(raw()).await;
            s = measure(saga()).await;
        } else {
            s = measure(saga()).await;
            c = measure(raw()).await;
            r = measure(raw()).await;
        }
        if round > 0 {
            results.push(Round {
                raw: r,
                control: c,
                saga: s,
            });
        }
    }
    let ratios: Vec<f64> = results.iter().map(|r| r.saga.rate / r.raw.rate).collect();
    let noise: Vec<f64> = results
        .iter()
        .map(|r| r.control.rate / r.raw.rate)
        .collect();
    let low = noise.iter().copied().fold(1.0, f64::min);
    let high = noise.iter().copied().fold(1.0, f64::max);
    let ratio = median(ratios.clone());
    for (i, r) in results.iter().enumerate() {
        println!(
            "{name} round {}: raw {:.0} {unit}/s, control {:.0}, saga {:.0}, saga/raw {:.2}; CPU per {unit}: raw {:.0} µs, saga {:.0} µs",
            i + 1,
            r.raw.rate,
            r.control.rate,
            r.saga.rate,
            r.saga.rate / r.raw.rate,
            r.raw.cpu,
            r.saga.cpu,
        );
    }
    let verdict = match (ratio >= TARGET, (low..=high).contains(&ratio)) {
        (true, false) => format!(" (target ≥ {TARGET}: PASS)"),
        (true, true) => format!(" (target ≥ {TARGET}: PASS, within noise)"),
        (false, true) => format!(" (target ≥ {TARGET}: BELOW, within noise)"),
        (false, false) => format!(" (target ≥ {TARGET}: BELOW)"),
    };
    let (raw_cpu, saga_cpu) = (
        median(results.iter().map(|r| r.raw.cpu).collect()),
        median(results.iter().map(|r| r.saga.cpu).collect()),
    );
    println!(
        "{name}: raw {:.0} {unit}/s, saga {:.0} {unit}/s, saga/raw {ratio:.2}{verdict}, noise band {low:.2}..{high:.2} over {} rounds; process CPU per {unit}: raw {raw_cpu:.0} µs, saga {saga_cpu:.0} µs ({:.1}x)",
        median(results.iter().map(|r| r.raw.rate).collect()),
        median(results.iter().map(|r| r.saga.rate).collect()),
        results.len(),
        saga_cpu / raw_cpu,
    );
}

fn durable_steps() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let dir = std::env::temp_dir().join(format!("surety-saga-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let path = dir.join("bench.db");
    let pool = runtime.block_on(async {
        let pool = open(&path, 1).await;
        sqlite::migrate(&pool).await.expect("migrates");
        for ddl in [
            "CREATE TABLE IF NOT EXISTS raw_instance (id TEXT PRIMARY KEY, state TEXT NOT NULL, version INTEGER NOT NULL)",
            "CREATE TABLE IF NOT EXISTS raw_history (id TEXT NOT NULL, version INTEGER NOT NULL, state TEXT NOT NULL, PRIMARY KEY (id, version))",
            "CREATE TABLE IF NOT EXISTS raw_timer (id TEXT PRIMARY KEY, due INTEGER NOT NULL)",
            "CREATE TABLE IF NOT EXISTS raw_outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL)",
        ] {
            sqlx::query(ddl).execute(&pool).await.expect("creates");
        }
        pool
    });
    let orchestrator = Orchestrator::new(
        checkout::definition(Deadlines::default()),
        SqliteSagaStore::new(pool.clone()),
    );
    // The command as the outbox stores it: encoded before the clock starts.
    let command = serde_json::to_vec(
        &Envelope::builder("/raw", "step.command")
            .json(&serde_json::json!({"order": "o-0", "cents": 4200}))
            .expect("encodes")
            .build(),
    )
    .expect("encodes");
    let (n, count) = if full_run() { (250u64, 6) } else { (5, 1) };
    let next = std::cell::Cell::new(0u64);
    let take = |n: u64| {
        let from = next.get();
        next.set(from + n);
        from
    };
    runtime.block_on(rounds(
        "durable_steps/sqlite",
        "steps",
        count,
        || {
            let from = take(n);
            let (pool, command) = (&pool, &command);
            async move {
                raw_checkouts(pool, command, from, n).await;
                4 * n
            }
        },
        || {
            let from = take(n);
            let orchestrator = &orchestrator;
            async move {
                saga_checkouts(orchestrator, from, n).await;
                4 * n
            }
        },
    ));
    runtime.block_on(pool.close());
    std::fs::remove_dir_all(&dir).ok();
}

/// Checkouts started per measurement of the RabbitMQ rows.
fn batch() -> u64 {
    if full_run() { 200 } else { 10 }
}

/// Deliveries each consumer handles at once, on both sides.
const CONCURRENCY: usize = 32;

/// The raw side: plain lapin, no Surety code. Three participants answer
/// each command with its reply; a stateless reply consumer sends the next
/// command and counts finished checkouts.
mod raw {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use futures::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueDeclareOptions,
    };
    use lapin::types::{FieldTable, ShortString};
    use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

    /// What a consumer sends for a delivery of a type: the queue and the
    /// message type, or nothing.
    type Next = Arc<dyn Fn(&str, &BasicProperties) -> Option<(String, String)> + Send + Sync>;

    /// A running raw checkout: its queues and the count of finished ones.
    pub(crate) struct Raw {
        pub(crate) done: Arc<AtomicU64>,
        pub(crate) publisher: Channel,
        pub(crate) payments: String,
        pub(crate) replies: String,
        _connection: Connection,
    }

    pub(crate) async fn publish(
        channel: &Channel,
        queue: &str,
        kind: &str,
        correlation: &str,
        reply_to: Option<&str>,
    ) {
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_type(ShortString::from(kind))
            .with_correlation_id(ShortString::from(correlation))
            .with_content_type(ShortString::from("application/json"));
        if let Some(reply_to) = reply_to {
            properties = properties.with_reply_to(ShortString::from(reply_to));
        }
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b"{}",
                properties,
            )
            .await
            .expect("raw publish");
        let confirmation = confirm.await.expect("a raw confirm");
        assert!(confirmation.is_ack(), "the broker nacked a raw publish");
    }

    async fn confirming(connection: &Connection) -> Channel {
        let channel = connection.create_channel().await.expect("a channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        channel
    }

    /// Consumes `queue`, `CONCURRENCY` deliveries at once: `answer` names
    /// the message to send for a delivery of a type (queue and type), the
    /// delivery is acked once that is confirmed.
    async fn consume(
        connection: &Connection,
        queue: String,
        answer: Next,
        reply_to: Option<String>,
    ) {
        let channel = connection.create_channel().await.expect("a channel");
        channel
            .basic_qos(64, BasicQosOptions::default())
            .await
            .expect("prefetch");
        let publisher = confirming(connection).await;
        let mut consumer = channel
            .basic_consume(
                queue.as_str().into(),
                ShortString::from(format!("{queue}-raw")),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("raw consume");
        let permits = Arc::new(tokio::sync::Semaphore::new(super::CONCURRENCY));
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let permit = Arc::clone(&permits).acquire_owned().await.expect("open");
                let (answer, publisher, reply_to) =
                    (Arc::clone(&answer), publisher.clone(), reply_to.clone());
                tokio::spawn(async move {
                    let properties = &delivery.properties;
                    let kind = properties.kind().as_ref().map_or("", |k| k.as_str());
                    let correlation = properties
                        .correlation_id()
                        .as_ref()
                        .map_or("", |c| c.as_str())
                        .to_owned();
                    if let Some((to, next)) = answer(kind, properties) {
                        publish(&publisher, &to, &next, &correlation, reply_to.as_deref()).await;
                    }
                    delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .expect("raw ack");
                    drop(permit);
                });
            }
        });
    }

    /// Declares the queues `<prefix>.raw.*` and starts the consumers.
    pub(crate) async fn start(url: &str, prefix: &str) -> Raw {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .expect("raw lapin connects");
        let setup = connection.create_channel().await.expect("a channel");
        let q = |name: &str| format!("{prefix}.raw.{name}");
        for name in ["payments", "inventory", "shipping", "replies"] {
            setup
                .queue_declare(
                    q(name).as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .expect("declares");
        }
        // Participants reply to the command's reply-to queue.
        for (name, reply) in [
            ("payments", "payment.charged"),
            ("inventory", "inventory.reserved"),
            ("shipping", "shipping.booked"),
        ] {
            let answer: Next = Arc::new(move |_kind, properties| {
                let to = properties.reply_to().as_ref()?.as_str().to_owned();
                Some((to, reply.to_owned()))
            });
            consume(&connection, q(name), answer, None).await;
        }
        // The reply consumer: the next command, or one more checkout done.
        let done = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&done);
        let (inventory, shipping) = (q("inventory"), q("shipping"));
        let next: Next = Arc::new(move |kind, _| match kind {
            "payment.charged" => Some((inventory.clone(), "inventory.reserve".to_owned())),
            "inventory.reserved" => Some((shipping.clone(), "shipping.book".to_owned())),
            _ => {
                counted.fetch_add(1, Ordering::SeqCst);
                None
            }
        });
        consume(&connection, q("replies"), next, Some(q("replies"))).await;
        Raw {
            done,
            publisher: confirming(&connection).await,
            payments: q("payments"),
            replies: q("replies"),
            _connection: connection,
        }
    }
}

fn rabbitmq_checkout() {
    use futures::StreamExt;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use surety_core::Permanent;
    use surety_core::consumer::{Incoming, Worker};
    use surety_core::host::Host;
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
    let (transport, pool, raw) = runtime.block_on(async {
        let transport = RabbitTransport::connect(
            RabbitConfig::new(url.clone()).connection_name(format!("{prefix}.bench")),
        )
        .await
        .expect("connects to RabbitMQ");
        // As the outbox's guide opens a file: WAL, four connections, so
        // reads go on while one connection writes.
        let pool = open(&dir.join("bench.db"), 4).await;
        sqlite::migrate(&pool).await.expect("migrates");
        let raw = raw::start(&url, &prefix).await;
        (transport, pool, raw)
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
    // Checkouts finished: shipping replies the orchestrator applied (it
    // finishes the instance). Counted like the raw side's, so that
    // neither side polls a store to find out.
    let finished = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counting = |router: surety_core::consumer::Router,
                    finished: Arc<std::sync::atomic::AtomicU64>| {
        surety_core::consumer::handler_fn(move |incoming: Incoming| {
            let (router, finished) = (router.clone(), Arc::clone(&finished));
            async move {
                let last = incoming.envelope.event_type == "shipping.booked";
                let response = tower::ServiceExt::oneshot(router, incoming).await?;
                if last {
                    finished.fetch_add(1, Ordering::SeqCst);
                }
                Ok::<_, surety_core::HandlerError>(response)
            }
        })
    };
    let relay = Relay::new(SqliteOutbox::new(pool.clone()), transport.clone())
        .poll_interval(Duration::from_millis(2));
    let worker = |handler| Worker::new(handler).concurrency(CONCURRENCY);
    let host = Host::new()
        .consume(
            transport.clone(),
            q("replies"),
            "checkout",
            Worker::new(counting(
                consumer::reply_handler(Arc::clone(&orchestrator)),
                Arc::clone(&finished),
            ))
            .concurrency(CONCURRENCY),
        )
        .task("relay", move |shutdown| relay.run(shutdown.wait()))
        .consume(
            transport.clone(),
            q("payments"),
            "payments",
            worker(answer("payment.charged")).emit_to(transport.clone()),
        )
        .consume(
            transport.clone(),
            q("inventory"),
            "inventory",
            worker(answer("inventory.reserved")).emit_to(transport.clone()),
        )
        .consume(
            transport.clone(),
            q("shipping"),
            "shipping",
            worker(answer("shipping.booked")).emit_to(transport.clone()),
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

    let n = batch();
    let count = if full_run() { 6 } else { 1 };
    let next = std::cell::Cell::new(0u64);
    let take = || {
        let from = next.get();
        next.set(from + n);
        from
    };
    let (orchestrator, raw, finished) = (&orchestrator, &raw, &finished);
    // Checkouts started one at a time (each start confirmed or committed
    // before the next: latency decides), then `CONCURRENCY` at a time (as
    // concurrent handlers start them: throughput decides).
    for (name, starts) in [
        ("rabbitmq_checkout/one_start_at_a_time", 1),
        ("rabbitmq_checkout", CONCURRENCY),
    ] {
        runtime.block_on(rounds(
            name,
            "checkouts",
            count,
            || {
                let from = take();
                async move {
                    let target = raw.done.load(Ordering::SeqCst) + n;
                    futures::stream::iter(from..from + n)
                        .for_each_concurrent(starts, |i| async move {
                            let id = format!("r-{i}");
                            raw::publish(
                                &raw.publisher,
                                &raw.payments,
                                "payment.charge",
                                &id,
                                Some(&raw.replies),
                            )
                            .await;
                        })
                        .await;
                    while raw.done.load(Ordering::SeqCst) < target {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    n
                }
            },
            || {
                let from = take();
                async move {
                    let target = finished.load(Ordering::SeqCst) + n;
                    let ids: Vec<String> = (from..from + n).map(|i| format!("c-{i}")).collect();
                    futures::stream::iter(&ids)
                        .for_each_concurrent(starts, |id| async move {
                            let start = orchestrator.saga().begin(serde_json::json!({"order": id}));
                            orchestrator.start(id, start).await.expect("starts");
                        })
                        .await;
                    while finished.load(Ordering::SeqCst) < target {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    n
                }
            },
        ));
    }
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
    c.final_summary();
    durable_steps();
    rabbitmq_checkout();
}
