//! The PostgreSQL store on the real server under concurrency: writers
//! racing on one instance, and a version conflict forced between two
//! orchestrators. The behaviour every store shares is the suite in
//! `stores.rs`.

use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPool;
use surety_saga::postgres::{self, PostgresSagaStore};
use surety_saga::store::{SagaStore, StoreError};
use surety_saga::{Command, Input, Orchestrator, Outcome, Saga, Transition, replay};
use surety_testkit::db::TempSchema;

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

/// A store whose first write waits, after the orchestrator loaded and
/// decided, until the test lets it go: another orchestrator writes in
/// between, deterministically.
struct PauseBeforeWrite {
    inner: PostgresSagaStore,
    gate: std::sync::Mutex<
        Option<(
            tokio::sync::oneshot::Sender<()>,
            tokio::sync::oneshot::Receiver<()>,
        )>,
    >,
}

impl SagaStore for PauseBeforeWrite {
    async fn load(
        &self,
        saga: &str,
        id: &str,
    ) -> Result<Option<surety_saga::store::InstanceRecord>, StoreError> {
        self.inner.load(saga, id).await
    }

    async fn write(&self, write: surety_saga::store::Write) -> Result<(), StoreError> {
        let gate = self.gate.lock().unwrap().take();
        if let Some((paused, go)) = gate {
            paused.send(()).unwrap();
            go.await.unwrap();
        }
        self.inner.write(write).await
    }

    async fn due_timers(
        &self,
        saga: &str,
        now: chrono::DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<surety_saga::store::TimerRecord>, StoreError> {
        self.inner.due_timers(saga, now, limit).await
    }

    async fn delete_timer(
        &self,
        timer: &surety_saga::store::TimerRecord,
    ) -> Result<bool, StoreError> {
        self.inner.delete_timer(timer).await
    }

    async fn history(
        &self,
        saga: &str,
        id: &str,
    ) -> Result<Vec<surety_saga::store::HistoryRecord>, StoreError> {
        self.inner.history(saga, id).await
    }

    async fn record_noop(
        &self,
        saga: &str,
        id: &str,
        noop: surety_saga::store::NoopRecord,
    ) -> Result<(), StoreError> {
        self.inner.record_noop(saga, id, noop).await
    }

    async fn noops(
        &self,
        saga: &str,
        id: &str,
    ) -> Result<Vec<surety_saga::store::NoopRecord>, StoreError> {
        self.inner.noops(saga, id).await
    }

    async fn list(
        &self,
        filter: &surety_saga::store::ListFilter,
    ) -> Result<Vec<surety_saga::store::InstanceSummary>, StoreError> {
        self.inner.list(filter).await
    }

    async fn unfinished_counts(
        &self,
        saga: &str,
        idle_since: chrono::DateTime<Utc>,
    ) -> Result<Vec<(String, u64, u64)>, StoreError> {
        self.inner.unfinished_counts(saga, idle_since).await
    }

    async fn purge_finished(
        &self,
        saga: &str,
        before: chrono::DateTime<Utc>,
        limit: usize,
    ) -> Result<u64, StoreError> {
        self.inner.purge_finished(saga, before, limit).await
    }

    async fn audit(&self, entry: surety_saga::store::AuditRecord) -> Result<(), StoreError> {
        self.inner.audit(entry).await
    }

    async fn audit_log(
        &self,
        saga: &str,
        id: &str,
    ) -> Result<Vec<surety_saga::store::AuditRecord>, StoreError> {
        self.inner.audit_log(saga, id).await
    }
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
            PauseBeforeWrite {
                inner: store.clone(),
                gate: std::sync::Mutex::new(Some((paused_tx, go_rx))),
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
