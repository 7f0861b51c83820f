//! The SQLite store: transitions, history, timers and the commands in the
//! outbox table, written together.

use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};
use surety_saga::sqlite::{self, SqliteSagaStore};
use surety_saga::store::{SagaStore, StoreError};
use surety_saga::{
    Command, Input, OperatorAction, Orchestrator, Outcome, Saga, Transition, replay,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Step {
    Paying,
    Refunding,
    Done,
    Cancelled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Reply {
    Paid,
    Refunded,
}

struct Pay;

impl Saga for Pay {
    type State = Step;
    type Message = Reply;
    fn name(&self) -> &str {
        "pay"
    }

    fn state_name<'a>(&'a self, state: &'a Step) -> &'a str {
        match state {
            Step::Paying => "paying",
            Step::Refunding => "refunding",
            Step::Done => "done",
            Step::Cancelled => "cancelled",
        }
    }

    fn is_finished(&self, state: &Step) -> bool {
        matches!(state, Step::Done | Step::Cancelled)
    }

    fn apply(&self, state: &Step, input: &Input<Reply>) -> Transition<Step> {
        match (state, input) {
            (Step::Paying, Input::Message(Reply::Paid)) => Transition::to(Step::Done),
            (Step::Paying, Input::Timeout { .. }) => Transition::to(Step::Refunding).command(
                Command::new("payments", "payment.refund", serde_json::json!({})),
            ),
            (Step::Refunding, Input::Message(Reply::Refunded)) => Transition::to(Step::Cancelled),
            (_, Input::Operator(action)) if action.action == "abort" => {
                Transition::to(Step::Cancelled)
            }
            _ => Transition::ignore(),
        }
    }
}

fn begin() -> Transition<Step> {
    Transition::to(Step::Paying)
        .command(Command::new(
            "payments",
            "payment.charge",
            serde_json::json!({ "cents": 4200 }),
        ))
        .set_timer("payment", Duration::from_secs(30))
}

async fn pool() -> SqlitePool {
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect("sqlite::memory:")
        .await
        .unwrap();
    sqlite::migrate(&pool).await.unwrap();
    // Migrating twice is harmless.
    sqlite::migrate(&pool).await.unwrap();
    pool
}

async fn outbox(pool: &SqlitePool) -> Vec<(String, String)> {
    sqlx::query_as("SELECT topic, message_id FROM surety_outbox ORDER BY seq")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn timers(pool: &SqlitePool) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM surety_saga_timer")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn commands_land_in_the_outbox_with_the_transition() {
    let pool = pool().await;
    let saga = Orchestrator::new(Pay, SqliteSagaStore::new(pool.clone()));
    saga.start("o-1", begin()).await.unwrap();
    assert_eq!(
        outbox(&pool).await,
        vec![("payments".to_owned(), "pay:o-1:1:0".to_owned())]
    );
    assert_eq!(
        saga.start("o-1", begin()).await.unwrap(),
        Outcome::AlreadyStarted
    );
    assert_eq!(outbox(&pool).await.len(), 1);

    let outcome = saga
        .handle("o-1", Input::Message(Reply::Paid))
        .await
        .unwrap();
    assert!(matches!(
        outcome,
        Outcome::Applied {
            version: 2,
            finished: true,
            ..
        }
    ));
    assert_eq!(saga.state("o-1").await.unwrap(), Some(Step::Done));
    assert_eq!(timers(&pool).await, 0, "a finished saga holds no timers");
}

#[tokio::test]
async fn a_due_timer_fires_once_and_a_stale_one_not_at_all() {
    let pool = pool().await;
    let store = SqliteSagaStore::new(pool.clone());
    let saga = Orchestrator::new(Pay, store.clone());
    saga.start("slow", begin()).await.unwrap();
    saga.start("paid", begin()).await.unwrap();
    let later = Utc::now() + chrono::Duration::seconds(31);
    let polled = store.due_timers("pay", later, 10).await.unwrap();
    assert_eq!(polled.len(), 2);

    // "paid" answers after its timer was polled: its firing is stale.
    saga.handle("paid", Input::Message(Reply::Paid))
        .await
        .unwrap();
    let mut outcomes = Vec::new();
    for timer in polled {
        outcomes.push(saga.fire_timer(timer, later).await.unwrap());
    }
    let stale = outcomes
        .iter()
        .filter(|o| **o == Outcome::Finished || **o == Outcome::TimerStale)
        .count();
    assert_eq!(stale, 1, "{outcomes:?}");
    assert_eq!(saga.state("slow").await.unwrap(), Some(Step::Refunding));
    assert_eq!(saga.state("paid").await.unwrap(), Some(Step::Done));
    let sent: Vec<_> = outbox(&pool).await.into_iter().map(|(_, id)| id).collect();
    assert_eq!(sent, ["pay:slow:1:0", "pay:paid:1:0", "pay:slow:2:0"]);
    assert!(saga.fire_due_timers(later, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_timer_fired_twice_writes_once() {
    let pool = pool().await;
    let store = SqliteSagaStore::new(pool.clone());
    let saga = Orchestrator::new(Pay, store.clone());
    saga.start("o-2", begin()).await.unwrap();
    let later = Utc::now() + chrono::Duration::seconds(31);
    let timer = store.due_timers("pay", later, 1).await.unwrap().remove(0);
    saga.fire_timer(timer.clone(), later).await.unwrap();
    let before = outbox(&pool).await;

    // The same firing again (another poller) writes and sends nothing.
    let again = saga.fire_timer(timer, later).await.unwrap();
    assert!(!matches!(again, Outcome::Applied { .. }), "{again:?}");
    assert_eq!(outbox(&pool).await, before);
    assert_eq!(store.history("pay", "o-2").await.unwrap().len(), 2);
    assert_eq!(store.load("pay", "o-2").await.unwrap().unwrap().version, 2);
}

#[tokio::test]
async fn the_history_replays_to_the_stored_state() {
    let pool = pool().await;
    let saga = Orchestrator::new(Pay, SqliteSagaStore::new(pool.clone()));
    saga.start("o-3", begin()).await.unwrap();
    let abort = OperatorAction::new("abort", "alice", "duplicate order");
    saga.handle("o-3", Input::Operator(abort.clone()))
        .await
        .unwrap();
    let (initial, inputs) = saga.history("o-3").await.unwrap().unwrap();
    assert_eq!(initial, Step::Paying);
    assert_eq!(inputs, vec![Input::Operator(abort)]);
    assert_eq!(
        Some(replay(&Pay, initial, inputs)),
        saga.state("o-3").await.unwrap()
    );
}

#[tokio::test]
async fn a_store_error_is_transient() {
    use surety_core::Classify;
    let pool = pool().await;
    let store = SqliteSagaStore::new(pool.clone());
    pool.close().await;
    let error = store.load("pay", "x").await.unwrap_err();
    assert!(matches!(error, StoreError::Backend(_)));
    assert!(error.class().is_retryable());
}

#[tokio::test]
async fn the_outbox_relay_sends_the_commands_to_the_broker() {
    use futures::StreamExt;
    use surety_core::Subscriber;
    use surety_core::memory::MemoryTransport;
    use surety_outbox::{Relay, SqliteOutbox};

    let pool = pool().await;
    let transport = MemoryTransport::new();
    let mut payments = transport
        .subscribe("payments", "payment-service")
        .await
        .unwrap();
    let saga = Orchestrator::new(Pay, SqliteSagaStore::new(pool.clone())).source("/checkout");
    saga.start("o-4", begin()).await.unwrap();

    let relay = Relay::new(SqliteOutbox::new(pool.clone()), transport.clone());
    let cycle = relay.run_once().await.unwrap();
    assert_eq!(cycle.sent, 1, "{cycle:?}");
    let delivery = tokio::time::timeout(Duration::from_secs(10), payments.next())
        .await
        .expect("the charge command arrives")
        .unwrap()
        .unwrap();
    let charge = delivery.envelope().clone();
    delivery.ack().await.unwrap();
    assert_eq!(charge.id, "pay:o-4:1:0");
    assert_eq!(charge.event_type, "payment.charge");
    assert_eq!(charge.source, "/checkout");
    assert_eq!(charge.correlation_id.as_deref(), Some("o-4"));
    let body: serde_json::Value = charge.decode().unwrap();
    assert_eq!(body, serde_json::json!({ "cents": 4200 }));

    // The payment service's reply correlates back to the instance.
    let id = charge.correlation_id.unwrap();
    saga.handle(&id, Input::Message(Reply::Paid)).await.unwrap();
    assert_eq!(saga.state("o-4").await.unwrap(), Some(Step::Done));
}

#[tokio::test]
async fn instances_list_by_state_age_and_stuck_and_audits_are_kept() {
    use surety_saga::store::{AuditRecord, ListFilter, SagaStore};
    let pool = pool().await;
    let store = SqliteSagaStore::new(pool.clone());
    let saga = Orchestrator::new(Pay, store.clone());
    saga.start("a", begin()).await.unwrap();
    saga.start("b", begin()).await.unwrap();
    saga.handle("b", Input::Message(Reply::Paid)).await.unwrap();

    let all = store.list(&ListFilter::new(10)).await.unwrap();
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|i| i.created_at <= i.updated_at));
    let mut stuck = ListFilter::new(10);
    stuck.idle_since = Some(Utc::now());
    let stuck = store.list(&stuck).await.unwrap();
    assert_eq!(stuck.len(), 1);
    assert_eq!(stuck[0].id, "a");
    let mut finished = ListFilter::new(10);
    finished.finished = Some(true);
    finished.saga = Some("pay".into());
    assert_eq!(store.list(&finished).await.unwrap()[0].id, "b");
    let mut old = ListFilter::new(10);
    old.started_before = Some(Utc::now() - chrono::Duration::hours(1));
    assert!(store.list(&old).await.unwrap().is_empty());

    store
        .audit(AuditRecord::new("pay", "a", "alice", "resolve", "by hand"))
        .await
        .unwrap();
    let audit = store.audit_log("pay", "a").await.unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].reason, "by hand");

    // Retention: finished instances go with their history; "a" runs on.
    let later = Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(store.purge_finished("pay", later, 10).await.unwrap(), 1);
    assert!(store.load("pay", "b").await.unwrap().is_none());
    assert!(store.history("pay", "b").await.unwrap().is_empty());
    assert!(store.load("pay", "a").await.unwrap().is_some());
    assert_eq!(store.purge_finished("pay", later, 10).await.unwrap(), 0);
}

#[tokio::test]
async fn an_instance_that_cannot_be_read_does_not_hold_up_the_other_timers() {
    let pool = pool().await;
    let saga = Orchestrator::new(Pay, SqliteSagaStore::new(pool.clone()));
    saga.start("broken", begin()).await.unwrap();
    saga.start("fine", begin()).await.unwrap();
    // A state written by some other code: it no longer decodes.
    sqlx::query("UPDATE surety_saga_instance SET state = '\"Shipped\"' WHERE id = 'broken'")
        .execute(&pool)
        .await
        .unwrap();
    let later = Utc::now() + chrono::Duration::seconds(31);
    let fired = saga.fire_due_timers(later, 10).await.unwrap();
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(saga.state("fine").await.unwrap(), Some(Step::Refunding));
    // The broken one's timer waits for an operator, and does not loop.
    assert_eq!(timers(&pool).await, 1);
    assert!(saga.fire_due_timers(later, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_state_from_a_newer_schema_is_refused_not_overwritten() {
    let pool = pool().await;
    let saga = Orchestrator::new(Pay, SqliteSagaStore::new(pool.clone()));
    saga.start("o-1", begin()).await.unwrap();
    // A newer orchestrator, deployed alongside, wrote schema version 2.
    sqlx::query("UPDATE surety_saga_instance SET state_version = 2 WHERE id = 'o-1'")
        .execute(&pool)
        .await
        .unwrap();
    let err = saga
        .handle("o-1", Input::Message(Reply::Paid))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            surety_saga::SagaError::UnknownStateVersion {
                found: 2,
                known: 1,
                ..
            }
        ),
        "{err}"
    );
    let version: i64 =
        sqlx::query_scalar("SELECT state_version FROM surety_saga_instance WHERE id = 'o-1'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(version, 2, "the row is left as the newer version wrote it");
}

#[tokio::test]
async fn unfinished_instances_are_counted_by_step_however_many() {
    let pool = pool().await;
    let store = SqliteSagaStore::new(pool.clone());
    let saga = Orchestrator::new(Pay, store.clone());
    for id in ["a", "b", "c"] {
        saga.start(id, begin()).await.unwrap();
    }
    saga.handle("c", Input::Message(Reply::Paid)).await.unwrap();
    let before = Utc::now() - chrono::Duration::hours(1);
    assert_eq!(
        store.unfinished_counts("pay", before).await.unwrap(),
        vec![("paying".to_owned(), 2, 0)]
    );
    let after = Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(
        store.unfinished_counts("pay", after).await.unwrap(),
        vec![("paying".to_owned(), 2, 2)]
    );
}

/// A step's command that reaches the participant after the step's
/// compensation is not applied: the compensation left a tombstone in the
/// participant's database.
#[tokio::test]
async fn a_command_after_its_compensation_is_not_applied_by_the_participant() {
    use std::sync::{Arc, Mutex};
    use surety_core::Envelope;
    use surety_core::consumer::{Incoming, Response};
    use surety_core::tower::Service as _;
    use surety_saga::COMMAND_KEY_HEADER;
    use surety_saga::participant::{Answer, participant};

    let pool = pool().await;
    let applied = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&applied);
    let mut payments = participant("/payments", move |incoming: Incoming| {
        let seen = Arc::clone(&seen);
        async move {
            let kind = incoming.envelope.event_type.clone();
            seen.lock().unwrap().push(kind.clone());
            let reply = if kind == "payment.charge" {
                "payment.charged"
            } else {
                "payment.refunded"
            };
            Ok::<_, surety_core::Permanent>(Answer::done(reply, serde_json::Value::Null))
        }
    })
    .tombstones(SqliteSagaStore::new(pool.clone()));
    let command = |kind: &str, key: &str| {
        Incoming::new(
            Envelope::builder("/saga/checkout", kind)
                .id(format!("checkout:o-1:{key}"))
                .correlation_id("o-1")
                .reply_to("checkout.replies")
                .header(COMMAND_KEY_HEADER, key)
                .build(),
            Default::default(),
        )
    };

    // Another instance's command runs as usual.
    let mut other = command("payment.charge", "do:payment:0");
    other.envelope.correlation_id = Some("o-2".to_owned());
    let response = payments.call(other).await.unwrap();
    assert_eq!(response.outputs.len(), 1);

    let refund = payments
        .call(command("payment.refund", "undo:payment:0"))
        .await
        .unwrap();
    assert_eq!(refund.outputs[0].envelope.event_type, "payment.refunded");
    // The late charge, seen by a participant restarted on the same database.
    let mut restarted = participant("/payments", |_: Incoming| async {
        Err::<Answer, _>(surety_core::Permanent::new("must not run"))
    })
    .tombstones(SqliteSagaStore::new(pool.clone()));
    let late = restarted
        .call(command("payment.charge", "do:payment:1"))
        .await
        .unwrap();
    assert_eq!(
        late,
        Response::handled(),
        "answered as already compensated, no reply"
    );
    assert_eq!(
        *applied.lock().unwrap(),
        ["payment.charge", "payment.refund"]
    );
}

/// History rows name the step they left and the commands they sent; a
/// reply storm after the end is one counted no-op, not a row each.
#[tokio::test]
async fn history_names_from_state_and_commands_and_duplicates_are_counted() {
    let pool = pool().await;
    let store = SqliteSagaStore::new(pool.clone());
    let saga = Orchestrator::new(Pay, store.clone());
    saga.start("dup", begin()).await.unwrap();
    saga.handle("dup", Input::Message(Reply::Paid))
        .await
        .unwrap();
    for _ in 0..20 {
        let outcome = saga
            .handle("dup", Input::Message(Reply::Paid))
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Finished);
    }
    let history = store.history("pay", "dup").await.unwrap();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].from_state, None);
    assert_eq!(history[0].commands.len(), 1);
    assert_eq!(history[0].commands[0].message_type, "payment.charge");
    assert_eq!(history[0].commands[0].id, "pay:dup:1:0");
    assert_eq!(history[1].from_state.as_deref(), Some("paying"));
    assert!(history[1].commands.is_empty());
    let noops = store.noops("pay", "dup").await.unwrap();
    assert_eq!(noops.len(), 1, "{noops:?}");
    assert_eq!((noops[0].version, noops[0].count), (2, 20));
    assert_eq!(
        (noops[0].input.as_str(), noops[0].outcome.as_str()),
        ("Paid", "finished")
    );
    assert!(noops[0].first_at <= noops[0].last_at);
}

/// A start delivered again after its instance was purged is a no-op: the
/// purge left a tombstone of the saga id.
#[tokio::test]
async fn a_start_redelivered_after_the_purge_does_not_recreate_the_instance() {
    let pool = pool().await;
    let store = SqliteSagaStore::new(pool.clone());
    let saga = Orchestrator::new(Pay, store.clone());
    saga.start("gone", begin()).await.unwrap();
    saga.handle("gone", Input::Message(Reply::Paid))
        .await
        .unwrap();
    let later = Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(store.purge_finished("pay", later, 10).await.unwrap(), 1);
    assert!(store.load("pay", "gone").await.unwrap().is_none());

    assert_eq!(
        saga.start("gone", begin()).await.unwrap(),
        Outcome::AlreadyStarted
    );
    assert!(store.load("pay", "gone").await.unwrap().is_none());
    assert!(store.history("pay", "gone").await.unwrap().is_empty());
    assert_eq!(outbox(&pool).await.len(), 1, "the charge, sent once");
    // Another id starts as usual.
    assert!(matches!(
        saga.start("new", begin()).await.unwrap(),
        Outcome::Applied { .. }
    ));
}
