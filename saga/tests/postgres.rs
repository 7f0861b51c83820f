//! The PostgreSQL store on the real server under concurrency: writers
//! racing on one instance, and a version conflict forced between two
//! orchestrators. The behaviour every store shares is the suite in
//! `stores.rs`.

use chrono::Utc;
use sqlx::postgres::PgPool;
use surety_saga::postgres::{self, PostgresSagaStore};
use surety_saga::store::SagaStore;
use surety_saga::{Input, Orchestrator, Outcome, replay};
use surety_testkit::db::TempSchema;
use surety_testkit::saga_store::BeforeWrite;

mod pay;

use pay::{Pay, Reply, Step, begin};

async fn schema() -> Option<TempSchema> {
    let db = TempSchema::new("surety_saga", 4).await?;
    postgres::migrate(&db.pool).await.unwrap();
    postgres::migrate(&db.pool).await.unwrap();
    Some(db)
}

async fn outbox(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as("SELECT topic, message_id FROM surety_outbox ORDER BY seq")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn concurrent_writers_to_one_instance_apply_one_input_at_a_time() {
    let Some(db) = schema().await else { return };
    let saga = std::sync::Arc::new(Orchestrator::new(
        Pay,
        PostgresSagaStore::new(db.pool.clone()),
    ));
    // Concurrent starts of one id: exactly one writes.
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let saga = saga.clone();
            tokio::spawn(async move { saga.start("o-1", begin()).await.unwrap() })
        })
        .collect();
    let mut applied = 0;
    for start in starts {
        if matches!(start.await.unwrap(), Outcome::Applied { .. }) {
            applied += 1;
        }
    }
    assert_eq!(applied, 1);
    assert_eq!(outbox(&db.pool).await.len(), 1);

    // The same reply four times at once: one transition, the rest see a
    // finished saga (or decide again after a conflict).
    let replies: Vec<_> = (0..4)
        .map(|_| {
            let saga = saga.clone();
            tokio::spawn(async move {
                saga.handle("o-1", Input::Message(Reply::Paid))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut applied = 0;
    for reply in replies {
        if matches!(reply.await.unwrap(), Outcome::Applied { .. }) {
            applied += 1;
        }
    }
    assert_eq!(applied, 1);
    let (initial, inputs) = saga.history("o-1").await.unwrap().unwrap();
    assert_eq!(inputs.len(), 1);
    assert_eq!(
        Some(replay(&Pay, initial, inputs)),
        saga.state("o-1").await.unwrap()
    );
    db.drop_schema().await;
}

/// Two orchestrators on one PostgreSQL instance row, forced to meet: the
/// one that loaded first writes last, loses on the version, and decides
/// the reply again on the fresh state at once, counted as a conflict; the
/// reply's delivery is settled on its first attempt (no retry spent).
#[tokio::test]
async fn a_version_conflict_is_decided_again_on_the_fresh_state_without_a_delivery_retry() {
    use prometheus_client::registry::Registry;
    use surety_core::Envelope;
    use surety_core::consumer::{Incoming, Outcome as Settled};
    use surety_saga::metrics::SagaMetrics;

    let Some(db) = schema().await else { return };
    let store = PostgresSagaStore::new(db.pool.clone());
    let (paused_tx, paused) = tokio::sync::oneshot::channel();
    let (go, go_rx) = tokio::sync::oneshot::channel();
    let metrics = SagaMetrics::register(&mut Registry::default());
    let slow = std::sync::Arc::new(
        Orchestrator::new(
            Pay,
            // Its first write waits, after it loaded and decided, until the
            // test lets it go: the other orchestrator writes in between.
            {
                let gate = std::sync::Mutex::new(Some((paused_tx, go_rx)));
                BeforeWrite::new(store.clone(), move |_write| {
                    let gate = gate.lock().unwrap().take();
                    Box::pin(async move {
                        if let Some((paused, go)) = gate {
                            paused.send(()).unwrap();
                            go.await.unwrap();
                        }
                    })
                })
            },
        )
        .metrics(metrics.clone()),
    );
    let fast = Orchestrator::new(Pay, store.clone());
    fast.start("race", begin()).await.unwrap();

    // The slow one takes the payment reply: loads version 1, decides
    // paying -> done, and waits before its write.
    let reply = Incoming::new(
        Envelope::builder("/payments", "payment.charged")
            .correlation_id("race")
            .build(),
        Default::default(),
    );
    assert_eq!(reply.attempt, 1);
    let handler = {
        let slow = std::sync::Arc::clone(&slow);
        tokio::spawn(
            async move { surety_saga::consumer::apply_reply(&slow, &reply, Reply::Paid).await },
        )
    };
    paused.await.unwrap();
    // Meanwhile the fast one fires the payment deadline: refunding, v2.
    let later = Utc::now() + chrono::Duration::seconds(31);
    let fired = fast.fire_due_timers(later, 10).await.unwrap();
    assert!(matches!(fired[..], [Outcome::Applied { version: 2, .. }]));
    go.send(()).unwrap();

    // Decided again on the fresh state: a payment reply while refunding is
    // ignored, in this delivery, not in a retried one.
    let settled = handler
        .await
        .unwrap()
        .expect("no error: the delivery is not retried");
    assert_eq!(settled.outcome, Settled::Duplicate);
    assert_eq!(metrics.conflicts_count("pay"), 1);
    assert_eq!(metrics.inputs_count("pay", "ignored"), 1);
    assert_eq!(slow.state("race").await.unwrap(), Some(Step::Refunding));
    let history = store.history("pay", "race").await.unwrap();
    assert_eq!(
        history.len(),
        2,
        "the start and the deadline, no lost update"
    );
    assert!(history[1].timer_due.is_some());
    let sent: Vec<_> = outbox(&db.pool)
        .await
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(
        sent,
        ["pay:race:1:0", "pay:race:2:0"],
        "the charge, then the refund"
    );
    db.drop_schema().await;
}
