//! What only the SQLite store has: the commands in its outbox table reach
//! the broker through the outbox relay, its connection errors, states it
//! cannot read, and participant tombstones in its database. The behaviour
//! every store shares is the suite in `stores.rs`.

use std::time::Duration;

use chrono::Utc;
use sqlx::sqlite::{SqlitePool, SqlitePoolOptions};
use surety_saga::sqlite::{self, SqliteSagaStore};
use surety_saga::store::{SagaStore, StoreError};
use surety_saga::{Input, Orchestrator};

mod pay;

use pay::{Pay, Reply, Step, begin};

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

async fn timers(pool: &SqlitePool) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM surety_saga_timer")
        .fetch_one(pool)
        .await
        .unwrap()
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
async fn an_instance_that_cannot_be_read_does_not_hold_up_the_other_timers() {
    let pool = pool().await;
    let saga = Orchestrator::new(Pay, SqliteSagaStore::new(pool.clone()));
    saga.start("broken", begin()).await.unwrap();
    saga.start("fine", begin()).await.unwrap();
    // A state written by some other code (moving the version on, as every
    // writer does): it no longer decodes.
    sqlx::query(
        "UPDATE surety_saga_instance SET state = '\"Shipped\"', version = version + 1 \
         WHERE id = 'broken'",
    )
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
    // A newer orchestrator, deployed alongside, wrote schema version 2 (and
    // moved the version on, as every writer does).
    sqlx::query(
        "UPDATE surety_saga_instance SET state_version = 2, version = version + 1 \
         WHERE id = 'o-1'",
    )
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
