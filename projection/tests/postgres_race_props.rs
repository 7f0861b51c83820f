//! Two runners racing on PostgreSQL, each applying its batches in several
//! lanes (one transaction per lane): for any interleaving of publishes,
//! runner crashes and restarts (rebalances) and duplicate deliveries, the
//! read model equals the fold of the event log, and every checkpoint ends
//! at the end of its partition. Each event appends its sequence number to
//! its key's history, so a skip, a double apply or a reordering within a
//! key all show.
//!
//! Needs `SURETY_POSTGRES_URL` (skipped without, unless
//! `SURETY_REQUIRE_SERVICES` is set); each case runs in a schema of its
//! own, dropped when it passes. Few cases: each is a real database.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, Transaction};
use surety_core::log::{LogEvent, LogOptions, LogStream, LogSubscriber};
use surety_core::memory::MemoryLog;
use surety_core::{Envelope, HandlerError, Message, Publisher};
use surety_projection::{
    Applied, PostgresCheckpoints, Projection, ProjectionError, Runner, RunnerOptions,
};
use surety_testkit::db::TempSchema;
use surety_testkit::wait::eventually;
use tokio::task::JoinHandle;

const TOPIC: &str = "orders";
const DEADLINE: Duration = Duration::from_secs(60);

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

impl Projection<Postgres> for Totals {
    type Event = Added;

    fn name(&self) -> &str {
        "totals"
    }

    async fn apply(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        event: &Applied<Added>,
    ) -> Result<(), HandlerError> {
        sqlx::query(
            "INSERT INTO order_totals (order_id, total, history) VALUES ($1, $2, $3)
             ON CONFLICT (order_id) DO UPDATE SET total = order_totals.total + excluded.total,
                 history = order_totals.history || ',' || excluded.history",
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

/// A log that delivers every `every`-th record twice and repeats an
/// earlier record now and then, as a transport redelivering would.
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

/// How one runner runs.
#[derive(Debug, Clone, Copy)]
struct Shape {
    lanes: usize,
    batch: usize,
    dup_every: usize,
}

fn shape() -> impl Strategy<Value = Shape> {
    (2usize..5, 1usize..16, 2usize..9).prop_map(|(lanes, batch, dup_every)| Shape {
        lanes,
        batch,
        dup_every,
    })
}

#[derive(Debug, Clone)]
enum Op {
    /// Publishes `count` events of keys from `key` on.
    Publish { key: u8, count: u8, amount: i64 },
    /// Kills runner `which` (wherever it is, mid-transaction included) and
    /// starts another in its place: the group rebalances twice.
    Restart { which: usize, shape: Shape },
    /// Lets the runners run.
    Run(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..12, 1u8..20, 1i64..1000)
            .prop_map(|(key, count, amount)| Op::Publish { key, count, amount }),
        2 => (0usize..2, shape()).prop_map(|(which, shape)| Op::Restart { which, shape }),
        2 => (0u64..30).prop_map(Op::Run),
    ]
}

fn start(log: &MemoryLog, pool: &PgPool, shape: Shape) -> JoinHandle<Result<(), ProjectionError>> {
    let runner = Runner::new(
        Duplicating {
            log: log.clone(),
            every: shape.dup_every,
        },
        TOPIC,
        "totals",
        Totals,
        PostgresCheckpoints::new(pool.clone()),
    )
    .options(
        RunnerOptions::default()
            .batch(shape.batch, Duration::from_millis(2))
            .parallelism(shape.lanes)
            .retry(20, Duration::from_millis(5)),
    );
    tokio::spawn(runner.run())
}

async fn read_model(pool: &PgPool) -> BTreeMap<String, (i64, String)> {
    let rows: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT order_id, total, history FROM order_totals")
            .fetch_all(pool)
            .await
            .expect("the read model");
    rows.into_iter().map(|(k, t, h)| (k, (t, h))).collect()
}

async fn check(first: Shape, second: Shape, ops: Vec<Op>) {
    let Some(db) = TempSchema::new("projection_race", 10).await else {
        return;
    };
    surety_projection::postgres::migrate(&db.pool)
        .await
        .expect("migrations");
    sqlx::query(
        "CREATE TABLE order_totals (order_id TEXT PRIMARY KEY, total BIGINT NOT NULL, history TEXT NOT NULL)",
    )
    .execute(&db.pool)
    .await
    .expect("the read model table");
    let log = MemoryLog::with_partitions(4);
    let mut runners = [start(&log, &db.pool, first), start(&log, &db.pool, second)];
    let mut expected: BTreeMap<String, (i64, String)> = BTreeMap::new();
    let mut seq = 0u64;

    for op in ops {
        match op {
            Op::Publish { key, count, amount } => {
                for i in 0..count {
                    let order_id = format!("o-{}", (key + i) % 12);
                    seq += 1;
                    let entry = expected
                        .entry(order_id.clone())
                        .or_insert((0, String::new()));
                    entry.0 += amount;
                    if !entry.1.is_empty() {
                        entry.1.push(',');
                    }
                    entry.1.push_str(&seq.to_string());
                    let envelope = Envelope::message(
                        "/test",
                        &Added {
                            order_id: order_id.clone(),
                            amount,
                            seq,
                        },
                    )
                    .expect("an envelope")
                    .partition_key(order_id.as_str())
                    .build();
                    log.publish(TOPIC, envelope).await.expect("published");
                }
            }
            Op::Restart { which, shape } => {
                let which = which % runners.len();
                let killed = std::mem::replace(&mut runners[which], start(&log, &db.pool, shape));
                killed.abort();
                if let Ok(result) = killed.await {
                    result.expect("a runner failed");
                }
            }
            Op::Run(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    }
    let deadline = tokio::time::Instant::now() + DEADLINE;
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
            panic!(
                "the read model is not the fold of the log\nmodel    {model:?}\nexpected {expected:?}\nends {:?} checkpoints {checkpoints:?} runners stopped {stopped:?}",
                log.end_offsets(TOPIC)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total: i64 = log.end_offsets(TOPIC).iter().sum();
    eventually(DEADLINE, "the checkpoints to reach the end", || async {
        let stored: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(next_offset), 0)::BIGINT FROM surety_projection_checkpoint WHERE projection = 'totals'",
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
        let _ = handle.await;
    }
    db.drop_schema().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    #[test]
    fn two_racing_runners_with_lanes_on_postgres_fold_the_log(
        first in shape(),
        second in shape(),
        ops in proptest::collection::vec(op(), 5..60),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(check(first, second, ops));
    }
}
