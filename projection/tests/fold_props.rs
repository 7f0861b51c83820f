//! The read model equals the fold of the event log, whatever happens to the
//! runners: for any interleaving of publishes, runner starts (rebalances),
//! crashes (a runner task dropped wherever it is, mid-transaction included)
//! and duplicate deliveries, on the in-memory log with the SQLite store.
//! Each event appends its sequence number to its key's history, so a skip,
//! a double apply or a reordering within a key all show.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use sqlx::{Sqlite, Transaction};
use surety_core::log::{LogEvent, LogOptions, LogStream, LogSubscriber};
use surety_core::memory::MemoryLog;
use surety_core::{Envelope, HandlerError, Message, Publisher};
use surety_projection::{
    Applied, Projection, ProjectionError, Runner, RunnerOptions, SqliteCheckpoints,
};
use surety_testkit::db::TempSqlite;
use surety_testkit::wait::eventually;
use tokio::task::JoinHandle;

const TOPIC: &str = "orders";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Added {
    order_id: String,
    amount: i64,
    seq: u64,
}

impl Message for Added {
    const TYPE: &'static str = "test.order.added";
}

/// Totals and the history of sequence numbers per order.
struct Totals;

impl Projection<Sqlite> for Totals {
    type Event = Added;

    fn name(&self) -> &str {
        "totals"
    }

    async fn apply(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        event: &Applied<Added>,
    ) -> Result<(), HandlerError> {
        sqlx::query(
            "INSERT INTO order_totals (order_id, total, history) VALUES ($1, $2, $3)
             ON CONFLICT (order_id) DO UPDATE SET total = total + excluded.total,
                 history = history || ',' || excluded.history",
        )
        .bind(&event.event.order_id)
        .bind(event.event.amount)
        .bind(event.event.seq.to_string())
        .execute(&mut **tx)
        .await
        .map_err(HandlerError::transient)?;
        Ok(())
    }
}

/// A log that delivers some records twice and repeats an earlier record
/// now and then, as a transport redelivering after a reconnect would.
#[derive(Clone)]
struct Duplicating {
    log: MemoryLog,
    every: usize,
}

impl LogSubscriber for Duplicating {
    async fn subscribe_log(
        &self,
        topic: &str,
        group: &str,
        options: LogOptions,
    ) -> surety_core::Result<LogStream> {
        let inner = self.log.subscribe_log(topic, group, options).await?;
        let every = self.every.max(2);
        let mut count = 0usize;
        let mut previous = None;
        Ok(inner
            .flat_map(move |event| {
                let mut out = vec![];
                if let Ok(LogEvent::Record(record)) = &event {
                    count += 1;
                    if count.is_multiple_of(every) {
                        out.push(Ok(LogEvent::Record(record.clone())));
                    }
                    if count.is_multiple_of(every + 1)
                        && let Some(old) = previous.take()
                    {
                        out.push(Ok(LogEvent::Record(old)));
                    }
                    previous = Some(record.clone());
                }
                out.insert(0, event);
                futures::stream::iter(out)
            })
            .boxed())
    }
}

#[derive(Debug, Clone)]
enum Op {
    Publish {
        key: u8,
        amount: i64,
        noise: bool,
    },
    Start {
        lanes: usize,
        batch: usize,
        dup_every: usize,
    },
    Kill(usize),
    Run(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..6, 1i64..1000, proptest::bool::weighted(0.1))
            .prop_map(|(key, amount, noise)| Op::Publish { key, amount, noise }),
        2 => (1usize..4, 1usize..8, 2usize..9)
            .prop_map(|(lanes, batch, dup_every)| Op::Start { lanes, batch, dup_every }),
        2 => (0usize..4).prop_map(Op::Kill),
        2 => (0u64..15).prop_map(Op::Run),
    ]
}

fn start(
    log: &MemoryLog,
    pool: &sqlx::SqlitePool,
    lanes: usize,
    batch: usize,
    dup_every: usize,
) -> JoinHandle<Result<(), ProjectionError>> {
    let runner = Runner::new(
        Duplicating {
            log: log.clone(),
            every: dup_every,
        },
        TOPIC,
        "totals",
        Totals,
        SqliteCheckpoints::new(pool.clone()),
    )
    .options(
        RunnerOptions::default()
            .batch(batch, Duration::from_millis(2))
            .parallelism(lanes)
            .retry(20, Duration::from_millis(5)),
    );
    tokio::spawn(runner.run())
}

async fn read_model(pool: &sqlx::SqlitePool) -> BTreeMap<String, (i64, String)> {
    let rows: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT order_id, total, history FROM order_totals")
            .fetch_all(pool)
            .await
            .expect("the read model");
    rows.into_iter().map(|(k, t, h)| (k, (t, h))).collect()
}

async fn check(ops: Vec<Op>) {
    let db = TempSqlite::new(4, Duration::from_secs(10)).await;
    surety_projection::sqlite::migrate(&db.pool)
        .await
        .expect("migrations");
    sqlx::query(
        "CREATE TABLE order_totals (order_id TEXT PRIMARY KEY, total INTEGER NOT NULL, history TEXT NOT NULL)",
    )
    .execute(&db.pool)
    .await
    .expect("the read model table");
    let log = MemoryLog::with_partitions(3);
    let mut runners: Vec<JoinHandle<Result<(), ProjectionError>>> = Vec::new();
    let mut expected: BTreeMap<String, (i64, String)> = BTreeMap::new();
    let mut seq = 0u64;

    for op in ops {
        match op {
            Op::Publish { key, amount, noise } => {
                let order_id = format!("o-{key}");
                seq += 1;
                let envelope = if noise {
                    Envelope::builder("/test", "test.order.viewed")
                        .partition_key(order_id.as_str())
                        .payload("{}")
                        .build()
                } else {
                    let entry = expected
                        .entry(order_id.clone())
                        .or_insert((0, String::new()));
                    entry.0 += amount;
                    if !entry.1.is_empty() {
                        entry.1.push(',');
                    }
                    entry.1.push_str(&seq.to_string());
                    Envelope::message(
                        "/test",
                        &Added {
                            order_id: order_id.clone(),
                            amount,
                            seq,
                        },
                    )
                    .expect("an envelope")
                    .partition_key(order_id.as_str())
                    .build()
                };
                log.publish(TOPIC, envelope).await.expect("published");
            }
            Op::Start {
                lanes,
                batch,
                dup_every,
            } => {
                if runners.len() < 3 {
                    runners.push(start(&log, &db.pool, lanes, batch, dup_every));
                }
            }
            Op::Kill(i) => {
                if !runners.is_empty() {
                    let handle = runners.remove(i % runners.len());
                    handle.abort();
                    if let Ok(result) = handle.await {
                        result.expect("a runner failed");
                    }
                }
            }
            Op::Run(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    }
    if runners.is_empty() {
        runners.push(start(&log, &db.pool, 2, 4, 3));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let model = read_model(&db.pool).await;
        if model == expected {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let stopped: Vec<bool> = runners.iter().map(JoinHandle::is_finished).collect();
            let checkpoints: Vec<(i32, i64)> = sqlx::query_as(
                "SELECT partition, next_offset FROM surety_projection_checkpoint ORDER BY partition",
            )
            .fetch_all(&db.pool)
            .await
            .expect("the checkpoints");
            let applied: Vec<(i32, i64)> = sqlx::query_as(
                "SELECT partition, applied_offset FROM surety_projection_applied ORDER BY 1, 2",
            )
            .fetch_all(&db.pool)
            .await
            .expect("the applied offsets");
            panic!(
                "the read model is not the fold of the log\nmodel    {model:?}\nexpected {expected:?}\nends {:?} checkpoints {checkpoints:?} applied {applied:?} runners stopped {stopped:?}",
                log.end_offsets(TOPIC)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total: i64 = log.end_offsets(TOPIC).iter().sum();
    eventually(Duration::from_secs(30), "the checkpoints to reach the end", || async {
        let stored: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(next_offset), 0) FROM surety_projection_checkpoint WHERE projection = 'totals'",
        )
        .fetch_one(&db.pool)
        .await
        .expect("the checkpoints");
        stored == total
    })
    .await;
    for handle in runners {
        assert!(
            !handle.is_finished(),
            "a runner stopped: {:?}",
            handle.await
        );
        handle.abort();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn the_read_model_is_the_fold_of_the_log(ops in proptest::collection::vec(op(), 1..50)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(check(ops));
    }
}
