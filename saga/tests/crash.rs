//! The orchestrator killed with SIGKILL at random points, 10 times, while
//! 1,000 checkouts run over RabbitMQ (`SURETY_AMQP_URL`) on a SQLite file.
//!
//! The orchestrator (reply consumer, outbox relay, timer task) runs in a
//! child process: this test binary again, running only
//! [`child_orchestrator`], which works when `SURETY_SAGA_CRASH_DB` names a
//! database. The participants run in the parent, idempotent, and record
//! every effect. The parent kills the child at a random moment (seeded:
//! `SURETY_SAGA_CRASH_SEED` repeats a run), 10 times, then lets a last
//! child finish. Afterwards every checkout is at rest as its scenario
//! says, no participant applied a command twice, and every timer fired
//! once: no deadline input came sooner than the deadline after the
//! transition that set it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use surety_core::host::Host;
use surety_saga::checkout::Deadlines;
use surety_saga::sqlite::{self, SqliteSagaStore};
use surety_saga::steps::{Status, StepState};
use surety_saga::store::SagaStore;
use surety_saga::{Input, Orchestrator, Saga};
use surety_testkit::process::{Child, Seeded, TestProcess};
use surety_testkit::rabbitmq::Cleanup;
use surety_testkit::services;
use surety_testkit::wait::eventually;

use common::{Queues, World, checkout_host, definition_with, rabbit, running_participants};

/// Checkouts started.
const CHECKOUTS: usize = 1_000;
/// Kills before the last child is let finish.
const KILLS: usize = 10;
/// A child runs this long at least, and at most this plus `KILL_SPREAD`
/// milliseconds, before it is killed.
const KILL_AFTER: Duration = Duration::from_millis(500);
const KILL_SPREAD: u64 = 1_500;

const DB: &str = "SURETY_SAGA_CRASH_DB";
const PREFIX: &str = "SURETY_SAGA_CRASH_PREFIX";
const SEED: &str = "SURETY_SAGA_CRASH_SEED";

fn deadlines() -> Deadlines {
    Deadlines {
        step: Duration::from_secs(3),
        compensation: Duration::from_secs(3),
        step_attempts: 3,
        compensation_attempts: 5,
    }
}

fn scenario(i: usize) -> &'static str {
    match i % 10 {
        0 => "declined",
        1 => "out-of-stock",
        2 => "ship-timeout",
        _ => "happy",
    }
}

async fn open(path: &std::path::Path) -> SqlitePool {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(30));
    SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .expect("opens the SQLite file")
}

/// The orchestrator process: does nothing unless the parent started it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_orchestrator() {
    let Ok(path) = std::env::var(DB) else { return };
    let prefix = std::env::var(PREFIX).expect("the parent names the queues");
    let url = services::amqp_url().expect("the parent found RabbitMQ");
    let queues = Queues::with_prefix(prefix);
    let pool = open(std::path::Path::new(&path)).await;
    let store = SqliteSagaStore::new(pool.clone());
    let orchestrator = Arc::new(
        Orchestrator::new(definition_with(&queues, deadlines()), store)
            .reply_to(queues.replies.clone()),
    );
    let transport = rabbit(&url, "crash-child").await;
    let host = checkout_host(
        Host::new(),
        &transport,
        &queues,
        orchestrator,
        surety_outbox::SqliteOutbox::new(pool),
        &World::default(),
        false,
    );
    host.run(std::future::pending::<()>()).await;
}

fn spawn_child(path: &std::path::Path, prefix: &str) -> Child {
    TestProcess::new("child_orchestrator")
        .env(DB, path)
        .env(PREFIX, prefix)
        .spawn()
        .expect("starts the orchestrator process")
}

fn at_rest(state: &StepState) -> bool {
    matches!(
        state.status,
        Status::Completed | Status::Compensated | Status::Resolved
    ) || matches!(state.status, Status::CompensationFailed { .. })
}

async fn resting(store: &SqliteSagaStore, saga: &surety_saga::steps::Steps) -> usize {
    let all = store
        .list(&surety_saga::store::ListFilter::new(CHECKOUTS * 2))
        .await
        .unwrap();
    all.iter()
        .filter(|i| {
            serde_json::from_value::<StepState>(i.state.clone())
                .map(|s| at_rest(&s) || saga.is_finished(&s))
                .unwrap_or(false)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_killed_ten_times_during_a_thousand_checkouts() {
    let Some(url) = services::require(services::amqp_url()) else {
        return;
    };
    let mut rng = Seeded::from_env(SEED);
    println!("{SEED}={}", rng.seed());

    let queues = Queues::unique();
    let _cleanup = Cleanup::new(&url).prefix(queues.prefix.clone());
    let dir = std::env::temp_dir().join(format!("surety-saga-crash-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("saga.db");
    let pool = open(&path).await;
    sqlite::migrate(&pool).await.unwrap();
    let store = SqliteSagaStore::new(pool.clone());
    let saga = definition_with(&queues, deadlines());
    let starter = Orchestrator::new(saga.clone(), store.clone()).reply_to(queues.replies.clone());

    // The participants live through every kill.
    let world = World::default();
    let participants = running_participants(&url, "crash-participants", &queues, &world).await;

    for i in 0..CHECKOUTS {
        let id = format!("o-{i}");
        let data = serde_json::json!({ "order": id, "scenario": scenario(i) });
        starter.start(&id, saga.begin(data)).await.unwrap();
    }

    let mut progress = Vec::new();
    for _ in 0..KILLS {
        let mut child = spawn_child(&path, &queues.prefix);
        let after = KILL_AFTER + Duration::from_millis(rng.below(KILL_SPREAD));
        tokio::time::sleep(after).await;
        child.kill().await.expect("SIGKILL");
        progress.push(resting(&store, &saga).await);
    }
    println!("checkouts at rest after each kill: {progress:?}");
    let mut child = spawn_child(&path, &queues.prefix);
    eventually(
        Duration::from_secs(300),
        "every checkout at rest",
        || async { resting(&store, &saga).await == CHECKOUTS },
    )
    .await;
    child.kill().await.expect("SIGKILL");
    participants.stop().await;

    let (mut timeouts, mut fired_once) = (0, 0);
    for i in 0..CHECKOUTS {
        let id = format!("o-{i}");
        let state = starter.state(&id).await.unwrap().unwrap();
        let effects = world.effects_of(&id);
        let n = |kind: &str| effects.get(kind).copied().unwrap_or(0);
        match scenario(i) {
            "happy" => {
                assert_eq!(state.status, Status::Completed, "{id}: {state:?}");
                assert_eq!(
                    (
                        n("payment.charge"),
                        n("inventory.reserve"),
                        n("shipping.book")
                    ),
                    (1, 1, 1),
                    "{id}"
                );
            }
            "declined" => {
                assert_eq!(state.status, Status::Compensated, "{id}");
                assert!(effects.is_empty(), "{id}: {effects:?}");
            }
            "out-of-stock" => {
                assert_eq!(state.status, Status::Compensated, "{id}");
                assert_eq!((n("payment.charge"), n("payment.refund")), (1, 1), "{id}");
            }
            _ => {
                assert_eq!(state.status, Status::Compensated, "{id}");
                assert_eq!(
                    (
                        n("payment.charge"),
                        n("inventory.reserve"),
                        n("inventory.release"),
                        n("payment.refund")
                    ),
                    (1, 1, 1, 1),
                    "{id}"
                );
            }
        }
        // Every timer fired once: no timer (name, due) fired twice, and a
        // deadline input never came sooner than the deadline after the
        // transition that set it.
        fired_once += common::timers_fired_once(&store, &id).await;
        let history = store.history("checkout", &id).await.unwrap();
        for pair in history.windows(2) {
            let is_timeout = pair[1]
                .input
                .as_ref()
                .and_then(|input| {
                    serde_json::from_value::<Input<surety_saga::steps::StepReply>>(input.clone())
                        .ok()
                })
                .is_some_and(|input| matches!(input, Input::Timeout { .. }));
            if is_timeout {
                timeouts += 1;
                let waited = pair[1].at - pair[0].at;
                assert!(
                    waited >= chrono::Duration::seconds(3),
                    "{id}: a deadline fired after {waited} at version {}",
                    pair[1].version
                );
            }
        }
    }
    assert!(
        world.applied_twice().is_empty(),
        "applied twice: {:?}",
        world.applied_twice()
    );
    let pending: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM surety_saga_timer")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(pending, 0, "no timer left behind");
    assert_eq!(
        fired_once, timeouts,
        "every firing names its timer's due time"
    );
    println!("{timeouts} deadlines fired over {CHECKOUTS} checkouts and {KILLS} kills");
    pool.close().await;
    std::fs::remove_dir_all(&dir).ok();
}
