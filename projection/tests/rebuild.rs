//! Rebuilding a read model into a shadow version while the live version
//! keeps serving and new events arrive: promoted once caught up, equal to
//! the fold of the log, side effects suppressed while rebuilding, rolled
//! back on demand, and resumed where it stopped after a crash.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::{Sqlite, SqlitePool, Transaction};
use surety_core::memory::MemoryLog;
use surety_core::{Envelope, HandlerError, Message, Publisher};
use surety_projection::metrics::ProjectionMetrics;
use surety_projection::{
    Applied, Mode, Projection, Rebuild, RebuildProgress, Runner, RunnerOptions, SqliteCheckpoints,
    VersionStore, versioned_name,
};
use surety_testkit::db::TempSqlite;
use surety_testkit::wait::eventually;

const DEADLINE: Duration = Duration::from_secs(30);
const NAME: &str = "totals";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Added {
    order_id: String,
    amount: i64,
    seq: u64,
}

impl Message for Added {
    const TYPE: &'static str = "test.order.added";
}

/// Totals per order in `totals_v{version}`; "sends a notification" (counts
/// it) for each event applied live.
struct Totals {
    table: String,
    notifications: Arc<AtomicU64>,
}

impl Projection<Sqlite> for Totals {
    type Event = Added;

    fn name(&self) -> &str {
        NAME
    }

    async fn apply(
        &self,
        tx: &mut Transaction<'static, Sqlite>,
        event: &Applied<Added>,
    ) -> Result<(), HandlerError> {
        let sql = format!(
            "INSERT INTO {} (order_id, total, history) VALUES ($1, $2, $3)
             ON CONFLICT (order_id) DO UPDATE SET total = total + excluded.total,
                 history = history || ',' || excluded.history",
            self.table
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&event.event.order_id)
            .bind(event.event.amount)
            .bind(event.event.seq.to_string())
            .execute(&mut **tx)
            .await
            .map_err(HandlerError::transient)?;
        if event.mode == Mode::Live {
            self.notifications.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

struct Fixture {
    db: TempSqlite,
    log: MemoryLog,
    store: SqliteCheckpoints,
    expected: BTreeMap<String, (i64, String)>,
    seq: u64,
    notifications: Arc<AtomicU64>,
}

impl Fixture {
    async fn new() -> Self {
        let db = TempSqlite::new(4, Duration::from_secs(10)).await;
        surety_projection::sqlite::migrate(&db.pool)
            .await
            .expect("migrations");
        for version in 1..=4 {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE TABLE totals_v{version} (order_id TEXT PRIMARY KEY, total INTEGER NOT NULL, history TEXT NOT NULL)"
            )))
            .execute(&db.pool)
            .await
            .expect("a read model table");
        }
        let store = SqliteCheckpoints::new(db.pool.clone());
        Self {
            db,
            log: MemoryLog::with_partitions(4),
            store,
            expected: BTreeMap::new(),
            seq: 0,
            notifications: Arc::default(),
        }
    }

    async fn publish(&mut self, n: u64) {
        for _ in 0..n {
            self.seq += 1;
            let order_id = format!("o-{}", self.seq % 37);
            let amount = (self.seq % 11) as i64 + 1;
            let entry = self
                .expected
                .entry(order_id.clone())
                .or_insert((0, String::new()));
            entry.0 += amount;
            if !entry.1.is_empty() {
                entry.1.push(',');
            }
            entry.1.push_str(&self.seq.to_string());
            let envelope = Envelope::message(
                "/test",
                &Added {
                    order_id: order_id.clone(),
                    amount,
                    seq: self.seq,
                },
            )
            .expect("an envelope")
            .partition_key(order_id.as_str())
            .build();
            self.log
                .publish("orders", envelope)
                .await
                .expect("published");
        }
    }

    fn projection(&self, version: u32) -> Totals {
        Totals {
            table: format!("totals_v{version}"),
            notifications: self.notifications.clone(),
        }
    }

    /// The live runner of `version`.
    fn live(
        &self,
        version: u32,
    ) -> tokio::task::JoinHandle<Result<(), surety_projection::ProjectionError>> {
        let runner = Runner::new(
            self.log.clone(),
            "orders",
            format!("totals@v{version}"),
            self.projection(version),
            self.store.clone(),
        )
        .options(
            RunnerOptions::default()
                .batch(200, Duration::from_millis(5))
                .checkpoint_name(versioned_name(NAME, version)),
        );
        tokio::spawn(runner.run())
    }

    fn rebuild(&self) -> Rebuild<MemoryLog, SqliteCheckpoints> {
        Rebuild::new(self.log.clone(), "orders", "totals", self.store.clone())
            .options(RunnerOptions::default().batch(100, Duration::from_millis(5)))
            .report_every(Duration::from_millis(5))
    }
}

async fn table(pool: &SqlitePool, version: u32) -> BTreeMap<String, (i64, String)> {
    let rows: Vec<(String, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT order_id, total, history FROM totals_v{version}"
    )))
    .fetch_all(pool)
    .await
    .expect("the read model");
    rows.into_iter().map(|(k, t, h)| (k, (t, h))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_is_rebuilt_while_the_live_version_serves_then_promoted_and_rolled_back() {
    let mut f = Fixture::new().await;
    f.publish(3000).await;
    let live = f.live(1);
    eventually(DEADLINE, "the live version to catch up", || async {
        table(&f.db.pool, 1).await == f.expected
    })
    .await;
    let notified_live = f.notifications.load(Ordering::Relaxed);
    assert_eq!(notified_live, 3000);

    let reports = Arc::new(std::sync::Mutex::new(Vec::<RebuildProgress>::new()));
    let metrics =
        ProjectionMetrics::register(&mut prometheus_client::registry::Registry::default());
    let rebuild = {
        let reports = reports.clone();
        let projection = f.projection(2);
        tokio::spawn(f.rebuild().metrics(metrics.clone()).run(
            NAME,
            move |_| projection,
            move |p| {
                reports.lock().expect("reports").push(p);
            },
        ))
    };
    // New events arrive during the rebuild; the live version serves them.
    f.publish(500).await;
    assert_eq!(f.store.versions(NAME).await.expect("versions").live, 1);
    let promoted = tokio::time::timeout(DEADLINE, rebuild)
        .await
        .expect("the rebuild to finish")
        .expect("the rebuild task")
        .expect("the rebuild");
    assert_eq!(promoted, 2);
    let versions = f.store.versions(NAME).await.expect("versions");
    assert_eq!(
        (versions.live, versions.previous, versions.shadow),
        (2, Some(1), None)
    );

    // No side effect came from the rebuild: only the live runner's 3500.
    eventually(
        DEADLINE,
        "the live version to serve the new events",
        || async { table(&f.db.pool, 1).await == f.expected },
    )
    .await;
    live.abort();
    assert_eq!(f.notifications.load(Ordering::Relaxed), 3500);

    // The new live runner resumes from the shadow's checkpoints.
    let live2 = f.live(2);
    f.publish(100).await;
    eventually(DEADLINE, "version 2 to equal the fold", || async {
        table(&f.db.pool, 2).await == f.expected
    })
    .await;
    live2.abort();

    assert!(metrics.applied_count("totals@v2") >= 3000);
    assert!(metrics.rebuild_progress("totals@v2") > 0.0);
    assert!(metrics.last_heartbeat("totals@v2") > 0.0);

    let reports = reports.lock().expect("reports").clone();
    assert!(!reports.is_empty(), "progress was reported");
    assert!(reports.iter().all(|p| p.version == 2));
    assert!(
        reports
            .last()
            .is_some_and(|p| p.applied > 0 && p.events_per_second > 0.0)
    );

    assert_eq!(f.store.rollback(NAME).await.expect("a rollback"), 1);
    let versions = f.store.versions(NAME).await.expect("versions");
    assert_eq!((versions.live, versions.previous), (1, Some(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_rebuild_resumes_its_shadow_where_it_stopped() {
    let mut f = Fixture::new().await;
    f.publish(5000).await;
    let started = Arc::new(AtomicU64::new(0));
    let crashed = {
        let started = started.clone();
        let projection = f.projection(2);
        tokio::spawn(
            f.rebuild()
                .options(RunnerOptions::default().batch(50, Duration::from_millis(5)))
                .run(
                    NAME,
                    move |_| projection,
                    move |p| {
                        started.store(p.applied, Ordering::Relaxed);
                    },
                ),
        )
    };
    eventually(DEADLINE, "the rebuild to apply something", || async {
        started.load(Ordering::Relaxed) > 0
    })
    .await;
    crashed.abort();
    let _ = crashed.await;
    let checkpoints = sqlx::query_scalar::<_, i64>(
        "SELECT COALESCE(SUM(next_offset), 0) FROM surety_projection_checkpoint WHERE projection = 'totals@v2'",
    )
    .fetch_one(&f.db.pool)
    .await
    .expect("checkpoints");
    assert!(checkpoints > 0, "the crashed rebuild committed progress");
    assert_eq!(
        f.store.versions(NAME).await.expect("versions").shadow,
        Some(2)
    );

    let resumed_applied = Arc::new(AtomicU64::new(0));
    let promoted = {
        let resumed_applied = resumed_applied.clone();
        tokio::time::timeout(
            DEADLINE,
            f.rebuild().run(
                NAME,
                |v| f.projection(v),
                move |p| {
                    resumed_applied.store(p.applied, Ordering::Relaxed);
                },
            ),
        )
        .await
        .expect("the resumed rebuild to finish")
        .expect("the resumed rebuild")
    };
    assert_eq!(promoted, 2, "the same shadow version was resumed");
    assert_eq!(table(&f.db.pool, 2).await, f.expected);
    assert!(
        resumed_applied.load(Ordering::Relaxed) < 5000,
        "the resumed run did not start over"
    );
}
