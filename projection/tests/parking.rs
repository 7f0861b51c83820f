//! Events that cannot be applied are parked per key through surety-dlq
//! while the rest of the stream goes on: transient failures are retried and
//! applied, a permanent failure and an undecodable payload are dead-lettered
//! with their context and parked with every later event of their key, and
//! the parked events are applied in order once the cause is fixed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::{Sqlite, SqlitePool, Transaction};
use surety_core::memory::MemoryLog;
use surety_core::upcast::Upcasters;
use surety_core::{Envelope, HandlerError, Message, Publisher};
use surety_dlq::store::{DlqStore, MemoryDlqStore};
use surety_projection::{
    Applied, CheckpointStore, Projection, Runner, RunnerOptions, SqliteCheckpoints, replay_parked,
};
use surety_testkit::db::TempSqlite;
use surety_testkit::wait::eventually;

const DEADLINE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Added {
    order_id: String,
    amount: i64,
    seq: u64,
}

impl Message for Added {
    const TYPE: &'static str = "test.order.added";
}

/// Fails `amount == 13` permanently until fixed, and `amount == 7` with a
/// transient failure on its first two attempts.
struct Totals {
    fixed: Arc<AtomicBool>,
    transient: Arc<Mutex<HashMap<u64, u32>>>,
}

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
        let added = &event.event;
        if added.amount == 13 && !self.fixed.load(Ordering::SeqCst) {
            return Err(HandlerError::permanent("13 is not a valid amount"));
        }
        if added.amount == 7 {
            let mut seen = self.transient.lock().expect("the attempts");
            let attempts = seen.entry(added.seq).or_default();
            *attempts += 1;
            if *attempts <= 2 {
                return Err(HandlerError::transient("the database is busy"));
            }
        }
        sqlx::query(
            "INSERT INTO order_totals (order_id, total, history) VALUES ($1, $2, $3)
             ON CONFLICT (order_id) DO UPDATE SET total = total + excluded.total,
                 history = history || ',' || excluded.history",
        )
        .bind(&added.order_id)
        .bind(added.amount)
        .bind(added.seq.to_string())
        .execute(&mut **tx)
        .await
        .map_err(HandlerError::transient)?;
        Ok(())
    }
}

async fn read_model(pool: &SqlitePool) -> BTreeMap<String, (i64, String)> {
    let rows: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT order_id, total, history FROM order_totals")
            .fetch_all(pool)
            .await
            .expect("the read model");
    rows.into_iter().map(|(k, t, h)| (k, (t, h))).collect()
}

fn fold(events: &[(String, i64, u64)]) -> BTreeMap<String, (i64, String)> {
    let mut model: BTreeMap<String, (i64, String)> = BTreeMap::new();
    for (key, amount, seq) in events {
        let entry = model.entry(key.clone()).or_insert((0, String::new()));
        entry.0 += amount;
        if !entry.1.is_empty() {
            entry.1.push(',');
        }
        entry.1.push_str(&seq.to_string());
    }
    model
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_is_parked_per_key_and_replayed_in_order_after_a_fix() {
    for lanes in [1, 3] {
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
        let log = MemoryLog::with_partitions(2);
        let mut events = Vec::new();
        let mut seq = 0;
        for round in 0..20i64 {
            for key in ["a", "b", "c", "d"] {
                seq += 1;
                // b fails at round 5 (permanently), d's payload is broken at
                // round 8, a fails transiently at round 3.
                let amount = match (key, round) {
                    ("b", 5) => 13,
                    ("a", 3) => 7,
                    _ => round + 100,
                };
                let envelope = if (key, round) == ("d", 8) {
                    Envelope::builder("/test", Added::TYPE)
                        .partition_key(key)
                        .payload(r#"{"order_id": 12"#)
                        .build()
                } else {
                    events.push((key.to_owned(), amount, seq));
                    Envelope::message(
                        "/test",
                        &Added {
                            order_id: key.into(),
                            amount,
                            seq,
                        },
                    )
                    .expect("an envelope")
                    .partition_key(key)
                    .build()
                };
                log.publish("orders", envelope).await.expect("published");
            }
        }
        let dlq = Arc::new(MemoryDlqStore::new());
        let fixed = Arc::new(AtomicBool::new(false));
        let projection = || Totals {
            fixed: fixed.clone(),
            transient: Arc::default(),
        };
        let store = SqliteCheckpoints::new(db.pool.clone());
        let runner = Runner::new(log.clone(), "orders", "totals", projection(), store.clone())
            .park_to(dlq.clone())
            .options(
                RunnerOptions::default()
                    .batch(16, Duration::from_millis(5))
                    .parallelism(lanes)
                    .retry(5, Duration::from_millis(1)),
            );
        let status = runner.status();
        let task = tokio::spawn(runner.run());
        eventually(DEADLINE, "the runner to pass every event", || async {
            status.caught_up()
        })
        .await;
        assert!(!task.is_finished(), "the runner stopped: {:?}", task.await);
        task.abort();

        // a and c are complete (a's transient failure was retried); b stops
        // before round 5 and d before round 8.
        let model = read_model(&db.pool).await;
        let expected = fold(&events);
        assert_eq!(model["a"], expected["a"], "lanes {lanes}");
        assert_eq!(model["c"], expected["c"], "lanes {lanes}");
        let before = |key: &str, rounds: usize| {
            fold(
                &events
                    .iter()
                    .filter(|e| e.0 == key)
                    .take(rounds)
                    .cloned()
                    .collect::<Vec<_>>(),
            )[key]
                .clone()
        };
        assert_eq!(model["b"], before("b", 5), "lanes {lanes}");
        assert_eq!(model["d"], before("d", 8), "lanes {lanes}");

        // One dead letter per failure, with its context.
        let keys = store
            .parked_keys("totals", "orders")
            .await
            .expect("parked keys");
        assert_eq!(keys, ["b".to_owned(), "d".to_owned()].into_iter().collect());
        let b = store.parked("totals", "orders", "b").await.expect("parked");
        assert_eq!(b.len(), 15, "the failed event and every later one of b");
        assert!(
            b[0].letter
                .error
                .message
                .contains("13 is not a valid amount")
        );
        assert_eq!(b[0].letter.error.class, "permanent");
        let d = store.parked("totals", "orders", "d").await.expect("parked");
        assert_eq!(d.len(), 12);
        assert_eq!(d[0].letter.error.class, "poison");
        assert_eq!(
            dlq.count(&surety_dlq::store::Filter::default())
                .await
                .expect("dlq depth"),
            2
        );

        // After the fix, b is replayed in order; d's first event still
        // cannot be decoded, so nothing of d is applied.
        fixed.store(true, Ordering::SeqCst);
        let replayed = replay_parked(
            &projection(),
            &store,
            &Upcasters::new(),
            "orders",
            "totals",
            "b",
        )
        .await
        .expect("b replays");
        assert_eq!(replayed, 15);
        assert!(
            replay_parked(
                &projection(),
                &store,
                &Upcasters::new(),
                "orders",
                "totals",
                "d"
            )
            .await
            .is_err()
        );
        let model = read_model(&db.pool).await;
        assert_eq!(model["b"], expected["b"], "lanes {lanes}");
        assert_eq!(model["d"], before("d", 8), "lanes {lanes}");
        let keys = store
            .parked_keys("totals", "orders")
            .await
            .expect("parked keys");
        assert_eq!(keys, ["d".to_owned()].into_iter().collect());
    }
}
