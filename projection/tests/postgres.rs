//! The runner on PostgreSQL: two runners share the partitions with parallel
//! lanes, one is killed mid-stream, and the read model equals the fold of
//! the log with every checkpoint at the end; a shadow version is rebuilt
//! and promoted on the same store.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, Transaction};
use surety_core::memory::MemoryLog;
use surety_core::{Envelope, HandlerError, Message, Publisher};
use surety_projection::{
    Applied, CheckpointStore, PostgresCheckpoints, Projection, Rebuild, Runner, RunnerOptions,
    VersionStore,
};
use surety_testkit::db::TempSchema;
use surety_testkit::wait::eventually;

const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Added {
    order_id: String,
    amount: i64,
    seq: i64,
}

impl Message for Added {
    const TYPE: &'static str = "test.order.added";
}

struct Totals {
    table: &'static str,
}

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
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {} (order_id, total, history) VALUES ($1, $2, $3)
             ON CONFLICT (order_id) DO UPDATE SET total = {0}.total + excluded.total,
                 history = {0}.history || ',' || excluded.history",
            self.table
        )))
        .bind(&event.event.order_id)
        .bind(event.event.amount)
        .bind(event.event.seq.to_string())
        .execute(&mut **tx)
        .await
        .map_err(HandlerError::transient)?;
        Ok(())
    }
}

async fn table(pool: &PgPool, table: &str) -> BTreeMap<String, (i64, String)> {
    let rows: Vec<(String, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT order_id, total, history FROM {table}"
    )))
    .fetch_all(pool)
    .await
    .expect("the read model");
    rows.into_iter().map(|(k, t, h)| (k, (t, h))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_share_partitions_survive_a_kill_and_rebuild_on_postgres() {
    let Some(db) = TempSchema::new("projection", 8).await else {
        return;
    };
    surety_projection::postgres::migrate(&db.pool)
        .await
        .expect("migrations");
    for name in ["totals_v1", "totals_v2"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {name} (order_id TEXT PRIMARY KEY, total BIGINT NOT NULL, history TEXT NOT NULL)"
        )))
        .execute(&db.pool)
        .await
        .expect("a read model table");
    }
    let log = MemoryLog::with_partitions(4);
    let store = PostgresCheckpoints::new(db.pool.clone());
    let mut expected: BTreeMap<String, (i64, String)> = BTreeMap::new();
    let publish = async |from: i64, to: i64, expected: &mut BTreeMap<String, (i64, String)>| {
        for seq in from..to {
            let order_id = format!("o-{}", seq % 50);
            let entry = expected
                .entry(order_id.clone())
                .or_insert((0, String::new()));
            entry.0 += seq;
            if !entry.1.is_empty() {
                entry.1.push(',');
            }
            entry.1.push_str(&seq.to_string());
            let envelope = Envelope::message(
                "/test",
                &Added {
                    order_id: order_id.clone(),
                    amount: seq,
                    seq,
                },
            )
            .expect("an envelope")
            .partition_key(order_id.as_str())
            .build();
            log.publish("orders", envelope).await.expect("published");
        }
    };
    publish(0, 3000, &mut expected).await;

    let runner = || {
        Runner::new(
            log.clone(),
            "orders",
            "totals",
            Totals { table: "totals_v1" },
            store.clone(),
        )
        .options(
            RunnerOptions::default()
                .batch(100, Duration::from_millis(10))
                .parallelism(3),
        )
    };
    let first = tokio::spawn(runner().run());
    let second = tokio::spawn(runner().run());
    let progress = store.clone();
    eventually(DEADLINE, "some progress", || async {
        progress
            .checkpoints("totals", "orders")
            .await
            .expect("checkpoints")
            .len()
            >= 2
    })
    .await;
    first.abort();
    publish(3000, 4000, &mut expected).await;
    eventually(DEADLINE, "the read model to equal the fold", || async {
        table(&db.pool, "totals_v1").await == expected
    })
    .await;
    let ends = log.end_offsets("orders");
    eventually(DEADLINE, "every checkpoint at the end", || async {
        let stored = store
            .checkpoints("totals", "orders")
            .await
            .expect("checkpoints");
        stored.iter().map(|(_, next)| *next).sum::<i64>() == ends.iter().sum::<i64>()
    })
    .await;
    assert!(!second.is_finished(), "the surviving runner stopped");
    second.abort();

    let version = Rebuild::new(log.clone(), "orders", "totals", store.clone())
        .options(
            RunnerOptions::default()
                .batch(500, Duration::from_millis(10))
                .parallelism(2),
        )
        .run("totals", |_| Totals { table: "totals_v2" }, |_| {})
        .await
        .expect("the rebuild");
    assert_eq!(version, 2);
    assert_eq!(store.versions("totals").await.expect("versions").live, 2);
    assert_eq!(table(&db.pool, "totals_v2").await, expected);
    db.drop_schema().await;
}
