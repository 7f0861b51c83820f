//! What the outbox row costs the application's own transaction: a business
//! insert with the outbox row against the same insert without it, on SQLite
//! and on PostgreSQL.
//!
//! Per round and store, three runs of N transactions each, one transaction
//! per message (`BEGIN; INSERT INTO bench_orders ...; COMMIT`):
//!
//! - **bare**: the business insert alone;
//! - **control**: the same again (its ratio to bare is the noise);
//! - **outbox**: the business insert and `enqueue` of the order's event
//!   (256-byte payload, one of 256 partition keys) in the same transaction.
//!
//! The order of the three is reversed every other round, after an
//! unreported warm-up round. Printed: each round's rates and ratios, then
//! the median outbox/bare ratio against the target (**≥ 0.85**, issue 10),
//! the control's spread, and "within noise" when the ratio is inside it.
//!
//! `cargo bench -p surety-outbox --bench write` for the full run (N = 2 000,
//! 7 rounds; `SURETY_BENCH_MESSAGES` and `SURETY_BENCH_ROUNDS` override);
//! `cargo test -p surety-outbox --benches` runs one tiny round per store.
//! PostgreSQL needs `SURETY_POSTGRES_URL` (skipped without, unless
//! `SURETY_REQUIRE_SERVICES` is set); its schema is dropped at the end.

use std::time::{Duration, Instant};

use sqlx::{PgPool, SqlitePool};
use surety_core::Envelope;
use surety_outbox::{PostgresOutbox, SqliteOutbox};
use surety_testkit::db::{TempSchema, TempSqlite};

/// The target: outbox / bare.
const TARGET: f64 = 0.85;

struct Settings {
    messages: usize,
    rounds: usize,
    warmup: bool,
}

fn env(name: &str) -> Option<usize> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|v| *v > 0)
}

impl Settings {
    fn from_env() -> Self {
        let full = std::env::args().skip(1).any(|a| a == "--bench");
        let (messages, rounds) = if full { (2_000, 7) } else { (20, 1) };
        Self {
            messages: env("SURETY_BENCH_MESSAGES").unwrap_or(messages),
            rounds: env("SURETY_BENCH_ROUNDS").unwrap_or(rounds),
            warmup: full,
        }
    }
}

fn main() {
    let settings = Settings::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let sqlite = TempSqlite::new(1, Duration::from_secs(10)).await;
        surety_outbox::sqlite::migrate(&sqlite.pool)
            .await
            .expect("migrates");
        sqlx::query("CREATE TABLE bench_orders (id TEXT PRIMARY KEY, customer TEXT, total BIGINT)")
            .execute(&sqlite.pool)
            .await
            .expect("the business table");
        let store = Store::Sqlite(sqlite.pool.clone());
        report("SQLite", &measure(&store, &settings).await);

        if let Some(schema) = TempSchema::new("surety_outbox_write_bench", 1).await {
            surety_outbox::postgres::migrate(&schema.pool)
                .await
                .expect("migrates");
            sqlx::query(
                "CREATE TABLE bench_orders (id TEXT PRIMARY KEY, customer TEXT, total BIGINT)",
            )
            .execute(&schema.pool)
            .await
            .expect("the business table");
            let store = Store::Postgres(schema.pool.clone());
            report("PostgreSQL", &measure(&store, &settings).await);
            schema.drop_schema().await;
        }
    });
}

enum Store {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// One round's rates (transactions per second).
struct Round {
    bare: f64,
    control: f64,
    outbox: f64,
}

async fn measure(store: &Store, settings: &Settings) -> Vec<Round> {
    let mut rounds = Vec::new();
    let mut next = 0usize;
    for round in 0..settings.rounds + usize::from(settings.warmup) {
        let n = settings.messages;
        let mut run = |outbox: bool| {
            let first = next;
            next += n;
            transactions(store, first, n, outbox)
        };
        let (bare, control, outbox) = if round % 2 == 0 {
            let bare = run(false).await;
            let control = run(false).await;
            (bare, control, run(true).await)
        } else {
            let outbox = run(true).await;
            let control = run(false).await;
            (run(false).await, control, outbox)
        };
        let rate = |took: Duration| n as f64 / took.as_secs_f64().max(1e-9);
        let measured = Round {
            bare: rate(bare),
            control: rate(control),
            outbox: rate(outbox),
        };
        println!(
            "  round {round}: bare {:.0} tx/s, control {:.0} tx/s ({:.2}), with the outbox row {:.0} tx/s ({:.2})",
            measured.bare,
            measured.control,
            measured.control / measured.bare,
            measured.outbox,
            measured.outbox / measured.bare,
        );
        if !settings.warmup || round > 0 {
            rounds.push(measured);
        }
    }
    rounds
}

/// `n` transactions, orders `first..first + n`, each with its outbox row
/// when `outbox`.
async fn transactions(store: &Store, first: usize, n: usize, outbox: bool) -> Duration {
    let payload = "x".repeat(256);
    let events: Vec<Envelope> = (first..first + n)
        .map(|i| {
            Envelope::builder("/bench", "order.placed")
                .partition_key(format!("order-{}", i % 256))
                .payload(payload.clone())
                .build()
        })
        .collect();
    let started = Instant::now();
    for (i, event) in (first..).zip(&events) {
        let id = format!("order-{i}");
        match store {
            Store::Sqlite(pool) => {
                let mut tx = pool.begin().await.expect("a transaction");
                sqlx::query("INSERT INTO bench_orders (id, customer, total) VALUES (?, ?, ?)")
                    .bind(&id)
                    .bind("customer-1")
                    .bind(4200_i64)
                    .execute(&mut *tx)
                    .await
                    .expect("the business insert");
                if outbox {
                    SqliteOutbox::enqueue(&mut tx, "orders", event)
                        .await
                        .expect("enqueued");
                }
                tx.commit().await.expect("committed");
            }
            Store::Postgres(pool) => {
                let mut tx = pool.begin().await.expect("a transaction");
                sqlx::query("INSERT INTO bench_orders (id, customer, total) VALUES ($1, $2, $3)")
                    .bind(&id)
                    .bind("customer-1")
                    .bind(4200_i64)
                    .execute(&mut *tx)
                    .await
                    .expect("the business insert");
                if outbox {
                    PostgresOutbox::enqueue(&mut tx, "orders", event)
                        .await
                        .expect("enqueued");
                }
                tx.commit().await.expect("committed");
            }
        }
    }
    started.elapsed()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn report(store: &str, rounds: &[Round]) {
    if rounds.is_empty() {
        return;
    }
    let ratio = median(rounds.iter().map(|r| r.outbox / r.bare).collect());
    let controls: Vec<f64> = rounds.iter().map(|r| r.control / r.bare).collect();
    let low = controls.iter().copied().fold(1.0, f64::min);
    let high = controls.iter().copied().fold(1.0, f64::max);
    let noise = if (low..=high).contains(&ratio) {
        " (within noise)"
    } else {
        ""
    };
    println!(
        "{store}: business insert with / without the outbox row, median of {} rounds: {ratio:.2} \
         (bare {:.0} tx/s, with the row {:.0} tx/s; control {low:.2}–{high:.2}; target ≥ {TARGET}: {}{noise})",
        rounds.len(),
        median(rounds.iter().map(|r| r.bare).collect()),
        median(rounds.iter().map(|r| r.outbox).collect()),
        if ratio >= TARGET { "PASS" } else { "BELOW" },
    );
}
