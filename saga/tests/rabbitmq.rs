//! The checkout end to end on RabbitMQ (`SURETY_AMQP_URL`), with the SQLite
//! and the PostgreSQL (`SURETY_POSTGRES_URL`) saga store: the orchestrator
//! writes commands through the outbox, the relay sends them, participants
//! reply, the reply consumer and the timer task drive every instance to
//! rest.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use surety_core::host::Host;
use surety_outbox::OutboxStore;
use surety_saga::steps::{Status, StepState, actions};
use surety_saga::store::SagaStore;
use surety_saga::{Input, OperatorAction, Orchestrator, Outcome};
use surety_testkit::db::{TempSchema, TempSqlite};
use surety_testkit::rabbitmq::Cleanup;
use surety_testkit::services;
use surety_testkit::wait::eventually;

use common::{Queues, Running, WAIT, World, at_rest, checkout_host, definition, rabbit};

const SCENARIOS: [&str; 5] = [
    "happy",
    "declined",
    "out-of-stock",
    "ship-timeout",
    "refund-fails",
];

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect()
}

async fn checkouts_end_to_end<St, O>(url: &str, store: St, outbox: O)
where
    St: SagaStore + Clone + 'static,
    O: OutboxStore + Clone + 'static,
{
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let queues = Queues::unique();
    let _cleanup = Cleanup::new(url).prefix(queues.prefix.clone());
    let transport = rabbit(url, "e2e").await;
    let orchestrator =
        Arc::new(Orchestrator::new(definition(&queues), store).reply_to(queues.replies.clone()));
    let world = World::default();
    world.refunds_broken.store(true, Ordering::SeqCst);
    let host = checkout_host(
        Host::new(),
        &transport,
        &queues,
        Arc::clone(&orchestrator),
        outbox,
        &world,
        true,
    );
    let health = host.health();
    let running = Running::start(host);
    eventually(WAIT, "the host is ready", || async { health.is_ready() }).await;

    for scenario in SCENARIOS {
        let data = serde_json::json!({ "order": scenario, "scenario": scenario, "cents": 4200 });
        let start = orchestrator.saga().begin(data);
        let outcome = orchestrator.start(scenario, start).await.unwrap();
        assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    }
    let saga = definition(&queues);
    let mut ended: BTreeMap<&str, StepState> = BTreeMap::new();
    for scenario in SCENARIOS {
        let state = eventually(WAIT, &format!("checkout {scenario} at rest"), || async {
            let state = orchestrator.state(scenario).await.unwrap().unwrap();
            at_rest(&saga, &state).then_some(state)
        })
        .await;
        ended.insert(scenario, state);
    }

    // Happy path: every step once, nothing undone.
    assert_eq!(ended["happy"].status, Status::Completed);
    assert_eq!(
        world.effects_of("happy"),
        counts(&[
            ("payment.charge", 1),
            ("inventory.reserve", 1),
            ("shipping.book", 1)
        ])
    );
    // Payment declined: nothing to undo.
    assert_eq!(ended["declined"].status, Status::Compensated);
    assert!(world.effects_of("declined").is_empty());
    // Out of stock: the payment is refunded.
    assert_eq!(ended["out-of-stock"].status, Status::Compensated);
    assert_eq!(
        world.effects_of("out-of-stock"),
        counts(&[("payment.charge", 1), ("payment.refund", 1)])
    );
    // Shipping never answers: stock released, payment refunded.
    assert_eq!(ended["ship-timeout"].status, Status::Compensated);
    assert_eq!(
        world.effects_of("ship-timeout"),
        counts(&[
            ("payment.charge", 1),
            ("inventory.reserve", 1),
            ("inventory.release", 1),
            ("payment.refund", 1)
        ])
    );
    let (_, inputs) = orchestrator.history("ship-timeout").await.unwrap().unwrap();
    let timeouts = inputs
        .iter()
        .filter(|i| matches!(i, Input::Timeout { .. }))
        .count();
    assert_eq!(
        timeouts, 2,
        "two deadlines of the booking passed: {inputs:?}"
    );

    // The refund keeps failing: the saga waits for an operator...
    assert_eq!(
        ended["refund-fails"].status,
        Status::CompensationFailed { step: 0 }
    );
    assert_eq!(
        world.effects_of("refund-fails"),
        counts(&[("payment.charge", 1)])
    );
    // ...who fixes the provider and retries: the compensation completes.
    world.refunds_broken.store(false, Ordering::SeqCst);
    let retry = OperatorAction::new(actions::RETRY, "alice", "provider fixed");
    orchestrator
        .handle("refund-fails", Input::Operator(retry))
        .await
        .unwrap();
    let state = eventually(WAIT, "the retried refund", || async {
        let state = orchestrator.state("refund-fails").await.unwrap().unwrap();
        saga_finished(&state).then_some(state)
    })
    .await;
    assert_eq!(state.status, Status::Compensated);
    assert_eq!(world.effects_of("refund-fails")["payment.refund"], 1);

    assert!(
        world.applied_twice().is_empty(),
        "no participant applied a command twice: {:?}",
        world.applied_twice()
    );
    let report = running.stop().await;
    assert_eq!(report.total().rejected, 0, "{report:?}");
}

fn saga_finished(state: &StepState) -> bool {
    matches!(
        state.status,
        Status::Completed | Status::Compensated | Status::Resolved
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_on_rabbitmq_with_sqlite() {
    let Some(url) = services::require(services::amqp_url()) else {
        return;
    };
    let db = TempSqlite::new(4, Duration::from_secs(10)).await;
    surety_saga::sqlite::migrate(&db.pool).await.unwrap();
    let store = surety_saga::sqlite::SqliteSagaStore::new(db.pool.clone());
    let outbox = surety_outbox::SqliteOutbox::new(db.pool.clone());
    checkouts_end_to_end(&url, store, outbox).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_on_rabbitmq_with_postgres() {
    let Some(url) = services::require(services::amqp_url()) else {
        return;
    };
    let Some(schema) = TempSchema::new("surety_saga_e2e", 8).await else {
        return;
    };
    surety_saga::postgres::migrate(&schema.pool).await.unwrap();
    let store = surety_saga::postgres::PostgresSagaStore::new(schema.pool.clone());
    let outbox = surety_outbox::PostgresOutbox::new(schema.pool.clone());
    checkouts_end_to_end(&url, store, outbox).await;
    schema.drop_schema().await;
}
