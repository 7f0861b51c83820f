//! Rebuild throughput against the limit of its two halves, and what the
//! checkpoint costs a batch, on SQLite and on PostgreSQL.
//!
//! The log is the replayable in-memory log (`MemoryLog`, four partitions)
//! holding N events (`{"order_id","amount","seq"}`, 1 000 order keys). The
//! read model is one row per order, one upsert per event. Per round and
//! store:
//!
//! - **read**: a plain loop reading the N records from the earliest offset
//!   of a fresh group through the log port and decoding each payload (what
//!   any consumer of the log does before it can write);
//! - **upsert**: plain sqlx upserts of the same N rows, one statement per
//!   event, in transactions of B events (the batch size), into a fresh
//!   table;
//! - **control**: the upsert run again (its ratio to upsert is the noise);
//! - **checkpoint, paired**: the same upsert transactions into three fresh
//!   tables, interleaved batch by batch (the order rotating): plain, plain
//!   again (the paired control) and with the checkpoint write of every
//!   partition (`CheckpointStore::save`, four per transaction), as the
//!   runner does; each transaction timed on its own, so load that comes and
//!   goes on the machine falls on the three alike;
//! - **rebuild**: `Rebuild::run` of the projection into a fresh shadow
//!   version, from the earliest offset to promotion, batches of B.
//!
//! The limit is `1 / (1/read + 1/upsert)`: a reader that reads and then
//! writes each event, with no overlap between the two. Printed per store:
//! the median rebuild / limit (target **≥ 0.7**, issue 13) with absolute
//! events/s, the control's spread, and "within noise" where the ratio lies
//! inside it; the rebuild verdict takes the faster of upsert and control
//! as the upsert rate of a round, so a slow baseline run never flatters
//! it. Then the median checkpoint overhead of the paired runs,
//! `1 - checkpointed / plain` (target **≤ 5 %**), with the paired
//! control's spread as its noise band. The order of the runs is reversed every other
//! round, after an unreported warm-up round.
//!
//! `cargo bench -p surety-projection --bench rebuild` for the full run
//! (N = 100 000, B = 500, 5 rounds; `SURETY_BENCH_MESSAGES` and
//! `SURETY_BENCH_ROUNDS` override); `cargo test -p surety-projection
//! --benches` runs one tiny round per store. PostgreSQL needs
//! `SURETY_POSTGRES_URL` (skipped without, unless `SURETY_REQUIRE_SERVICES`
//! is set); its schema is dropped at the end.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::{Database, Pool, Postgres, Sqlite, Transaction};
use surety_core::log::{LogEvent, LogOptions, LogSubscriber};
use surety_core::memory::MemoryLog;
use surety_core::{Envelope, HandlerError, Message, Publisher};
use surety_projection::{
    Applied, CheckpointStore, PostgresCheckpoints, Projection, Rebuild, RunnerOptions,
    SqliteCheckpoints, VersionStore,
};
use surety_testkit::db::{TempSchema, TempSqlite};

/// The target: rebuild / limit.
const TARGET: f64 = 0.7;
/// The target: the checkpoint's share of a batch.
const OVERHEAD: f64 = 0.05;
const TOPIC: &str = "orders";
const PARTITIONS: i32 = 4;
/// Read-model tables made ready for rebuilt versions.
const VERSIONS: u32 = 64;

struct Settings {
    events: usize,
    batch: usize,
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
        let (events, rounds) = if full { (100_000, 5) } else { (1_000, 1) };
        Self {
            events: env("SURETY_BENCH_MESSAGES").unwrap_or(events),
            batch: 500,
            rounds: env("SURETY_BENCH_ROUNDS").unwrap_or(rounds),
            warmup: full,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Added {
    order_id: String,
    amount: i64,
    seq: i64,
}

impl Message for Added {
    const TYPE: &'static str = "bench.order.added";
}

fn upsert_sql(table: &str) -> String {
    format!(
        "INSERT INTO {table} (order_id, total, events, last_seq) VALUES ($1, $2, 1, $3)
         ON CONFLICT (order_id) DO UPDATE SET total = {table}.total + excluded.total,
             events = {table}.events + 1, last_seq = excluded.last_seq"
    )
}

fn create_sql(table: &str) -> String {
    format!(
        "CREATE TABLE {table} (order_id TEXT PRIMARY KEY, total BIGINT NOT NULL,
         events BIGINT NOT NULL, last_seq BIGINT NOT NULL)"
    )
}

/// The read model: totals per order in `totals_v{version}`.
struct Totals {
    sql: String,
}

impl Totals {
    fn new(version: u32) -> Self {
        Self {
            sql: upsert_sql(&format!("totals_v{version}")),
        }
    }
}

macro_rules! totals_on {
    ($db:ty) => {
        impl Projection<$db> for Totals {
            type Event = Added;

            fn name(&self) -> &str {
                "totals"
            }

            async fn apply(
                &self,
                tx: &mut Transaction<'static, $db>,
                event: &Applied<Added>,
            ) -> Result<(), HandlerError> {
                sqlx::query(sqlx::AssertSqlSafe(self.sql.clone()))
                    .bind(&event.event.order_id)
                    .bind(event.event.amount)
                    .bind(event.event.seq)
                    .execute(&mut **tx)
                    .await
                    .map_err(HandlerError::transient)?;
                Ok(())
            }
        }
    };
}

totals_on!(Sqlite);
totals_on!(Postgres);

fn main() {
    let settings = Settings::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let log = MemoryLog::with_partitions(PARTITIONS as usize);
        let rows = fill(&log, settings.events).await;
        println!(
            "rebuild of {} events from the in-memory log ({PARTITIONS} partitions), batches of {}",
            settings.events, settings.batch
        );

        let sqlite = TempSqlite::new(2, Duration::from_secs(10)).await;
        surety_projection::sqlite::migrate(&sqlite.pool)
            .await
            .expect("migrates");
        let store = SqliteCheckpoints::new(sqlite.pool.clone());
        prepare(store.pool()).await;
        // Each run starts with an empty write-ahead log: otherwise the run
        // after a big one pays for checkpointing its predecessor's pages.
        let settle = Some("PRAGMA wal_checkpoint(TRUNCATE)");
        let rounds = measure(&log, &rows, &store, settle, &settings).await;
        report("SQLite", &rounds);

        if let Some(schema) = TempSchema::new("surety_projection_rebuild_bench", 2).await {
            surety_projection::postgres::migrate(&schema.pool)
                .await
                .expect("migrates");
            let store = PostgresCheckpoints::new(schema.pool.clone());
            prepare(store.pool()).await;
            let rounds = measure(&log, &rows, &store, None, &settings).await;
            report("PostgreSQL", &rounds);
            schema.drop_schema().await;
        }
    });
}

/// Publishes the events; returns the rows they carry, in log order per
/// partition (the order of publication).
async fn fill(log: &MemoryLog, events: usize) -> Vec<Added> {
    let mut rows = Vec::with_capacity(events);
    for seq in 0..events as i64 {
        let row = Added {
            order_id: format!("order-{}", seq % 1000),
            amount: seq % 1000,
            seq,
        };
        let envelope = Envelope::message("/bench", &row)
            .expect("an envelope")
            .partition_key(row.order_id.as_str())
            .build();
        log.publish(TOPIC, envelope).await.expect("published");
        rows.push(row);
    }
    rows
}

async fn prepare<DB: Database>(pool: &Pool<DB>)
where
    for<'c> &'c Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as Database>::Arguments: sqlx::IntoArguments<DB>,
{
    for version in 1..=VERSIONS {
        sqlx::query(sqlx::AssertSqlSafe(create_sql(&format!(
            "totals_v{version}"
        ))))
        .execute(pool)
        .await
        .expect("a read-model table");
    }
}

/// One round's rates (events per second).
struct Round {
    read: f64,
    upsert: f64,
    control: f64,
    rebuild: f64,
    /// The paired runs: plain, plain again, with the checkpoint.
    paired: [f64; 3],
}

impl Round {
    /// The faster of the two identical raw runs: the verdicts compare
    /// with the better baseline, never the slower one.
    fn raw(&self) -> f64 {
        self.upsert.max(self.control)
    }

    fn limit(&self) -> f64 {
        1.0 / (1.0 / self.read + 1.0 / self.raw())
    }

    /// With the checkpoint / plain, in the paired runs.
    fn kept(&self) -> f64 {
        self.paired[2] / self.paired[0]
    }

    /// The paired control / plain.
    fn paired_control(&self) -> f64 {
        self.paired[1] / self.paired[0]
    }
}

async fn measure<S>(
    log: &MemoryLog,
    rows: &[Added],
    store: &S,
    settle: Option<&str>,
    settings: &Settings,
) -> Vec<Round>
where
    S: CheckpointStore + VersionStore,
    Totals: Projection<S::Db>,
    for<'c> &'c mut <S::Db as Database>::Connection: sqlx::Executor<'c, Database = S::Db>,
    for<'c> &'c Pool<S::Db>: sqlx::Executor<'c, Database = S::Db>,
    for<'q> <S::Db as Database>::Arguments: sqlx::IntoArguments<S::Db>,
    for<'q> String: sqlx::Encode<'q, S::Db> + sqlx::Type<S::Db>,
    for<'q> i64: sqlx::Encode<'q, S::Db> + sqlx::Type<S::Db>,
{
    let mut measured = Vec::new();
    let n = rows.len() as f64;
    let rate = |took: Duration| n / took.as_secs_f64().max(1e-9);
    let mut table = 0;
    for round in 0..settings.rounds + usize::from(settings.warmup) {
        let settled = || async {
            if let Some(sql) = settle {
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(store.pool())
                    .await
                    .expect("settled");
            }
        };
        let mut raw = |checkpoint: bool| {
            table += 1;
            upserts(store, rows, settings.batch, table, checkpoint)
        };
        let (read, upsert, control, paired, rebuild);
        if round % 2 == 0 {
            read = read_log(log, rows.len(), round).await;
            settled().await;
            upsert = raw(false).await;
            settled().await;
            control = raw(false).await;
            settled().await;
            paired = interleaved(store, rows, settings.batch, round).await;
            settled().await;
            rebuild = rebuild_once(log, store, settings.batch).await;
        } else {
            settled().await;
            rebuild = rebuild_once(log, store, settings.batch).await;
            settled().await;
            paired = interleaved(store, rows, settings.batch, round).await;
            settled().await;
            control = raw(false).await;
            settled().await;
            upsert = raw(false).await;
            read = read_log(log, rows.len(), round).await;
        }
        let r = Round {
            read: rate(read),
            upsert: rate(upsert),
            control: rate(control),
            rebuild: rate(rebuild),
            paired: paired.map(rate),
        };
        println!(
            "  round {round}: read {:.0}/s, upsert {:.0}/s, control {:.0}/s ({:.2}), \
             limit {:.0}/s, rebuild {:.0}/s ({:.2} of the limit); paired: plain {:.0}/s, \
             control {:.0}/s ({:.3}), checkpointed {:.0}/s ({:.3})",
            r.read,
            r.upsert,
            r.control,
            r.control / r.upsert,
            r.limit(),
            r.rebuild,
            r.rebuild / r.limit(),
            r.paired[0],
            r.paired[1],
            r.paired_control(),
            r.paired[2],
            r.kept(),
        );
        if !settings.warmup || round > 0 {
            measured.push(r);
        }
    }
    measured
}

/// Reads every record from the earliest offsets as a fresh group and
/// decodes each payload.
async fn read_log(log: &MemoryLog, events: usize, round: usize) -> Duration {
    let started = Instant::now();
    let mut stream = log
        .subscribe_log(TOPIC, &format!("reader-{round}"), LogOptions::default())
        .await
        .expect("subscribed");
    let mut seen = 0;
    while seen < events {
        match stream.next().await {
            Some(Ok(LogEvent::Record(record))) => {
                let row: Added =
                    serde_json::from_slice(&record.envelope().payload).expect("a bench event");
                std::hint::black_box(row);
                seen += 1;
            }
            Some(Ok(_)) => {}
            other => panic!("the log stream ended: {other:?}"),
        }
    }
    started.elapsed()
}

/// Upserts `rows` into a fresh table, `batch` to a transaction, with the
/// checkpoint write of every partition in each when `checkpoint`.
async fn upserts<S>(
    store: &S,
    rows: &[Added],
    batch: usize,
    table: usize,
    checkpoint: bool,
) -> Duration
where
    S: CheckpointStore,
    for<'c> &'c mut <S::Db as Database>::Connection: sqlx::Executor<'c, Database = S::Db>,
    for<'c> &'c Pool<S::Db>: sqlx::Executor<'c, Database = S::Db>,
    for<'q> <S::Db as Database>::Arguments: sqlx::IntoArguments<S::Db>,
    for<'q> String: sqlx::Encode<'q, S::Db> + sqlx::Type<S::Db>,
    for<'q> i64: sqlx::Encode<'q, S::Db> + sqlx::Type<S::Db>,
{
    let name = format!("raw_{table}");
    sqlx::query(sqlx::AssertSqlSafe(create_sql(&name)))
        .execute(store.pool())
        .await
        .expect("a raw table");
    let sql = upsert_sql(&name);
    let mut positions: [Option<i64>; PARTITIONS as usize] = [None; PARTITIONS as usize];
    let started = Instant::now();
    for (chunk, rows) in rows.chunks(batch).enumerate() {
        let mut tx = store.pool().begin().await.expect("a transaction");
        for row in rows {
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(row.order_id.clone())
                .bind(row.amount)
                .bind(row.seq)
                .execute(&mut *tx)
                .await
                .expect("an upsert");
        }
        if checkpoint {
            let next = ((chunk + 1) * batch) as i64;
            for (partition, position) in positions.iter_mut().enumerate() {
                S::save(&mut tx, &name, TOPIC, partition as i32, *position, next, 0)
                    .await
                    .expect("a checkpoint");
                *position = Some(next);
            }
        }
        tx.commit().await.expect("committed");
    }
    started.elapsed()
}

/// The paired runs: `rows` upserted into three fresh tables, `batch` to a
/// transaction, interleaved batch by batch with the order rotating; the
/// third with the checkpoint write of every partition in each transaction.
/// Returns the summed transaction times of plain, plain again and
/// checkpointed.
async fn interleaved<S>(store: &S, rows: &[Added], batch: usize, round: usize) -> [Duration; 3]
where
    S: CheckpointStore,
    for<'c> &'c mut <S::Db as Database>::Connection: sqlx::Executor<'c, Database = S::Db>,
    for<'c> &'c Pool<S::Db>: sqlx::Executor<'c, Database = S::Db>,
    for<'q> <S::Db as Database>::Arguments: sqlx::IntoArguments<S::Db>,
    for<'q> String: sqlx::Encode<'q, S::Db> + sqlx::Type<S::Db>,
    for<'q> i64: sqlx::Encode<'q, S::Db> + sqlx::Type<S::Db>,
{
    let names: Vec<String> = (0..3).map(|k| format!("paired_{round}_{k}")).collect();
    for name in &names {
        sqlx::query(sqlx::AssertSqlSafe(create_sql(name)))
            .execute(store.pool())
            .await
            .expect("a paired table");
    }
    let sqls: Vec<String> = names.iter().map(|name| upsert_sql(name)).collect();
    let mut positions: [Option<i64>; PARTITIONS as usize] = [None; PARTITIONS as usize];
    let mut took = [Duration::ZERO; 3];
    for (chunk, rows) in rows.chunks(batch).enumerate() {
        for step in 0..3 {
            let k = (chunk + step) % 3;
            let started = Instant::now();
            let mut tx = store.pool().begin().await.expect("a transaction");
            for row in rows {
                sqlx::query(sqlx::AssertSqlSafe(sqls[k].clone()))
                    .bind(row.order_id.clone())
                    .bind(row.amount)
                    .bind(row.seq)
                    .execute(&mut *tx)
                    .await
                    .expect("an upsert");
            }
            if k == 2 {
                let next = ((chunk + 1) * batch) as i64;
                for (partition, position) in positions.iter_mut().enumerate() {
                    S::save(
                        &mut tx,
                        &names[2],
                        TOPIC,
                        partition as i32,
                        *position,
                        next,
                        0,
                    )
                    .await
                    .expect("a checkpoint");
                    *position = Some(next);
                }
            }
            tx.commit().await.expect("committed");
            took[k] += started.elapsed();
        }
    }
    took
}

/// One rebuild into a fresh shadow version, to promotion.
async fn rebuild_once<S>(log: &MemoryLog, store: &S, batch: usize) -> Duration
where
    S: CheckpointStore + VersionStore,
    Totals: Projection<S::Db>,
{
    let started = Instant::now();
    Rebuild::new(log.clone(), TOPIC, "totals", store.clone())
        .options(RunnerOptions::default().batch(batch, Duration::from_millis(50)))
        .run("totals", Totals::new, |_| {})
        .await
        .expect("the rebuild");
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
    let controls: Vec<f64> = rounds.iter().map(|r| r.control / r.upsert).collect();
    let low = controls.iter().copied().fold(1.0, f64::min);
    let high = controls.iter().copied().fold(1.0, f64::max);
    let noise = |ratio: f64| {
        if (low..=high).contains(&ratio) {
            " (within noise)"
        } else {
            ""
        }
    };
    let ratio = median(rounds.iter().map(|r| r.rebuild / r.limit()).collect());
    println!(
        "{store}: rebuild / limit, median of {} rounds: {ratio:.2} (rebuild {:.0} events/s, \
         limit {:.0} events/s = read {:.0}/s with upsert {:.0}/s (the faster raw run); control {low:.2}–{high:.2}; \
         target ≥ {TARGET}: {}{})",
        rounds.len(),
        median(rounds.iter().map(|r| r.rebuild).collect()),
        median(rounds.iter().map(|r| r.limit()).collect()),
        median(rounds.iter().map(|r| r.read).collect()),
        median(rounds.iter().map(Round::raw).collect()),
        if ratio >= TARGET { "PASS" } else { "BELOW" },
        noise(ratio),
    );
    let kept = median(rounds.iter().map(Round::kept).collect());
    let overhead = 1.0 - kept;
    let paired: Vec<f64> = rounds.iter().map(Round::paired_control).collect();
    let (plow, phigh) = (
        paired.iter().copied().fold(1.0, f64::min),
        paired.iter().copied().fold(1.0, f64::max),
    );
    let within = if (plow..=phigh).contains(&kept) {
        " (within noise)"
    } else {
        ""
    };
    println!(
        "{store}: checkpoint overhead of a batch, median of {} rounds: {:.1} % \
         (checkpointed / plain {kept:.3}, paired; paired control {plow:.3}–{phigh:.3}; target ≤ {:.0} %: {}{within})",
        rounds.len(),
        overhead * 100.0,
        OVERHEAD * 100.0,
        if overhead <= OVERHEAD {
            "PASS"
        } else {
            "ABOVE"
        },
    );
}
