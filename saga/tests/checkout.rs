//! The checkout saga (payment -> inventory -> shipping, compensating in
//! reverse) driven through the orchestrator and the in-memory store.

use std::time::Duration;

use chrono::Utc;
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use surety_saga::store::MemorySagaStore;
use surety_saga::{
    Command, Input, OperatorAction, Orchestrator, Outcome, Saga, Transition, replay,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Step {
    Paying,
    Reserving,
    Shipping,
    Refunding,
    Releasing,
    Completed,
    Cancelled,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct State {
    step: Step,
    order: String,
    failure: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Reply {
    Paid,
    PaymentDeclined,
    Reserved,
    OutOfStock,
    Shipped,
    ShippingFailed,
    Refunded,
    Released,
}

struct Checkout;

fn cmd(topic: &str, kind: &str, order: &str) -> Command {
    Command::new(topic, kind, serde_json::json!({ "order": order }))
}

impl Checkout {
    fn begin(order: &str) -> Transition<State> {
        Transition::to(State {
            step: Step::Paying,
            order: order.into(),
            failure: None,
        })
        .command(cmd("payments", "payment.charge", order))
        .set_timer("step", Duration::from_secs(30))
    }
}

impl Saga for Checkout {
    type State = State;
    type Message = Reply;
    fn name(&self) -> &str {
        "checkout"
    }

    fn state_name<'a>(&'a self, state: &'a State) -> &'a str {
        match state.step {
            Step::Paying => "paying",
            Step::Reserving => "reserving",
            Step::Shipping => "shipping",
            Step::Refunding => "refunding",
            Step::Releasing => "releasing",
            Step::Completed => "completed",
            Step::Cancelled => "cancelled",
        }
    }

    fn is_finished(&self, state: &State) -> bool {
        matches!(state.step, Step::Completed | Step::Cancelled)
    }

    fn apply(&self, state: &State, input: &Input<Reply>) -> Transition<State> {
        let order = state.order.as_str();
        let at = |step: Step| State {
            step,
            ..state.clone()
        };
        let failed = |step: Step, why: &str| State {
            step,
            failure: Some(why.into()),
            ..state.clone()
        };
        let step_timer = Duration::from_secs(30);
        match (state.step, input) {
            (Step::Paying, Input::Message(Reply::Paid)) => Transition::to(at(Step::Reserving))
                .command(cmd("inventory", "inventory.reserve", order))
                .set_timer("step", step_timer),
            (Step::Paying, Input::Message(Reply::PaymentDeclined)) => {
                Transition::to(failed(Step::Cancelled, "payment declined"))
            }
            (Step::Paying, Input::Timeout { .. }) => {
                // The charge may have happened: refund to be sure.
                Transition::to(failed(Step::Refunding, "payment timed out"))
                    .command(cmd("payments", "payment.refund", order))
                    .cancel_timer("step")
            }
            (Step::Reserving, Input::Message(Reply::Reserved)) => {
                Transition::to(at(Step::Shipping))
                    .command(cmd("shipping", "shipping.ship", order))
                    .set_timer("step", step_timer)
            }
            (Step::Reserving, Input::Message(Reply::OutOfStock) | Input::Timeout { .. }) => {
                Transition::to(failed(Step::Refunding, "out of stock"))
                    .command(cmd("payments", "payment.refund", order))
                    .cancel_timer("step")
            }
            (Step::Shipping, Input::Message(Reply::Shipped)) => {
                Transition::to(at(Step::Completed)).cancel_timer("step")
            }
            (Step::Shipping, Input::Message(Reply::ShippingFailed) | Input::Timeout { .. }) => {
                // Compensate in reverse: release the stock, then refund.
                Transition::to(failed(Step::Releasing, "shipping failed"))
                    .command(cmd("inventory", "inventory.release", order))
                    .cancel_timer("step")
            }
            (Step::Releasing, Input::Message(Reply::Released)) => Transition::to(at(
                Step::Refunding,
            ))
            .command(cmd("payments", "payment.refund", order)),
            (Step::Refunding, Input::Message(Reply::Refunded)) => {
                Transition::to(at(Step::Cancelled))
            }
            (_, Input::Operator(action)) if action.action == "abort" => {
                Transition::to(failed(Step::Cancelled, &action.reason))
            }
            _ => Transition::ignore(),
        }
    }
}

fn sent(store: &MemorySagaStore) -> Vec<(String, String)> {
    store
        .take_commands()
        .into_iter()
        .map(|(topic, envelope)| (topic, envelope.event_type))
        .collect()
}

fn pair(topic: &str, kind: &str) -> (String, String) {
    (topic.to_owned(), kind.to_owned())
}

#[tokio::test]
async fn happy_path_sends_each_step_and_finishes_without_pending_timers() {
    let store = MemorySagaStore::new();
    let saga = Orchestrator::new(Checkout, store.clone());
    saga.start("o-1", Checkout::begin("o-1")).await.unwrap();
    assert_eq!(sent(&store), vec![pair("payments", "payment.charge")]);

    saga.handle("o-1", Input::Message(Reply::Paid))
        .await
        .unwrap();
    assert_eq!(sent(&store), vec![pair("inventory", "inventory.reserve")]);
    saga.handle("o-1", Input::Message(Reply::Reserved))
        .await
        .unwrap();
    assert_eq!(sent(&store), vec![pair("shipping", "shipping.ship")]);
    let outcome = saga
        .handle("o-1", Input::Message(Reply::Shipped))
        .await
        .unwrap();

    assert_eq!(
        outcome,
        Outcome::Applied {
            version: 4,
            state_name: "completed".into(),
            finished: true,
            commands: 0
        }
    );
    assert!(store.timers().is_empty());
    // A late duplicate reply after the end changes nothing.
    assert_eq!(
        saga.handle("o-1", Input::Message(Reply::Shipped))
            .await
            .unwrap(),
        Outcome::Finished
    );
    assert!(sent(&store).is_empty());
}

#[tokio::test]
async fn shipping_failure_compensates_in_reverse_order() {
    let store = MemorySagaStore::new();
    let saga = Orchestrator::new(Checkout, store.clone());
    saga.start("o-2", Checkout::begin("o-2")).await.unwrap();
    for reply in [
        Reply::Paid,
        Reply::Reserved,
        Reply::ShippingFailed,
        Reply::Released,
        Reply::Refunded,
    ] {
        saga.handle("o-2", Input::Message(reply)).await.unwrap();
    }
    let commands: Vec<_> = sent(&store).into_iter().map(|(_, kind)| kind).collect();
    assert_eq!(
        commands,
        [
            "payment.charge",
            "inventory.reserve",
            "shipping.ship",
            "inventory.release",
            "payment.refund"
        ]
    );
    let state = saga.state("o-2").await.unwrap().unwrap();
    assert_eq!(state.step, Step::Cancelled);
    assert_eq!(state.failure.as_deref(), Some("shipping failed"));
}

#[tokio::test]
async fn commands_carry_deterministic_ids_and_the_saga_id_as_correlation() {
    let store = MemorySagaStore::new();
    let saga = Orchestrator::new(Checkout, store.clone()).source("/checkout");
    saga.start("o-3", Checkout::begin("o-3")).await.unwrap();
    let (_, charge) = store.take_commands().remove(0);
    assert_eq!(charge.id, "checkout:o-3:1:0");
    assert_eq!(charge.source, "/checkout");
    assert_eq!(charge.correlation_id.as_deref(), Some("o-3"));
    assert_eq!(charge.partition_key.as_deref(), Some("o-3"));
    let body: serde_json::Value = charge.decode().unwrap();
    assert_eq!(body, serde_json::json!({ "order": "o-3" }));

    // A redelivered start trigger writes and sends nothing.
    assert_eq!(
        saga.start("o-3", Checkout::begin("o-3")).await.unwrap(),
        Outcome::AlreadyStarted
    );
    assert!(store.take_commands().is_empty());
}

#[tokio::test]
async fn a_due_timer_fires_once_and_a_cancelled_one_never() {
    let store = MemorySagaStore::new();
    let saga = Orchestrator::new(Checkout, store.clone());
    saga.start("slow", Checkout::begin("slow")).await.unwrap();
    saga.start("fast", Checkout::begin("fast")).await.unwrap();
    saga.handle("fast", Input::Message(Reply::Paid))
        .await
        .unwrap();
    saga.handle("fast", Input::Message(Reply::Reserved))
        .await
        .unwrap();
    saga.handle("fast", Input::Message(Reply::Shipped))
        .await
        .unwrap();
    store.take_commands();

    // Nothing is due yet.
    assert!(
        saga.fire_due_timers(Utc::now(), 10)
            .await
            .unwrap()
            .is_empty()
    );

    let later = Utc::now() + chrono::Duration::seconds(31);
    let outcomes = saga.fire_due_timers(later, 10).await.unwrap();
    assert_eq!(outcomes.len(), 1, "only the slow order's timer is pending");
    assert_eq!(sent(&store), vec![pair("payments", "payment.refund")]);
    assert_eq!(
        saga.state("slow").await.unwrap().unwrap().step,
        Step::Refunding
    );
    // Fired timers are gone: polling again fires nothing.
    assert!(saga.fire_due_timers(later, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_timer_reset_after_polling_is_stale_when_fired() {
    let store = MemorySagaStore::new();
    let saga = Orchestrator::new(Checkout, store.clone());
    saga.start("o-4", Checkout::begin("o-4")).await.unwrap();
    let later = Utc::now() + chrono::Duration::seconds(31);
    // The reply resets the step timer; a poller that read the old due time
    // must not time out the new step. Simulate the race through the store.
    use surety_saga::store::SagaStore;
    let polled = store.due_timers("checkout", later, 10).await.unwrap();
    assert_eq!(polled.len(), 1);
    saga.handle("o-4", Input::Message(Reply::Paid))
        .await
        .unwrap();
    assert_eq!(store.timers().len(), 1);
    assert_ne!(store.timers()[0].due, polled[0].due);

    let outcome = saga.fire_timer(polled[0].clone(), later).await.unwrap();
    assert_eq!(outcome, Outcome::TimerStale);
    let kinds: Vec<_> = sent(&store).into_iter().map(|(_, kind)| kind).collect();
    assert_eq!(
        kinds,
        ["payment.charge", "inventory.reserve"],
        "no refund was sent"
    );
    assert_eq!(
        saga.state("o-4").await.unwrap().unwrap().step,
        Step::Reserving
    );
}

#[tokio::test]
async fn operator_abort_is_recorded_and_replays() {
    let store = MemorySagaStore::new();
    let saga = Orchestrator::new(Checkout, store.clone());
    saga.start("o-5", Checkout::begin("o-5")).await.unwrap();
    saga.handle("o-5", Input::Message(Reply::Paid))
        .await
        .unwrap();
    let abort = OperatorAction::new("abort", "alice", "customer called");
    saga.handle("o-5", Input::Operator(abort.clone()))
        .await
        .unwrap();

    let (initial, inputs) = saga.history("o-5").await.unwrap().unwrap();
    assert_eq!(
        inputs,
        vec![Input::Message(Reply::Paid), Input::Operator(abort)]
    );
    let replayed = replay(&Checkout, initial, inputs);
    assert_eq!(Some(replayed), saga.state("o-5").await.unwrap());
    assert!(store.timers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_delivered_twice_at_once_applies_once() {
    let store = MemorySagaStore::new();
    let saga = std::sync::Arc::new(Orchestrator::new(Checkout, store.clone()));
    saga.start("o-6", Checkout::begin("o-6")).await.unwrap();
    // The same reply delivered twice at once: exactly one applies.
    let a = tokio::spawn({
        let saga = saga.clone();
        async move { saga.handle("o-6", Input::Message(Reply::Paid)).await }
    });
    let b = tokio::spawn({
        let saga = saga.clone();
        async move { saga.handle("o-6", Input::Message(Reply::Paid)).await }
    });
    let outcomes = [a.await.unwrap().unwrap(), b.await.unwrap().unwrap()];
    let applied = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Applied { .. }))
        .count();
    assert_eq!(applied, 1, "{outcomes:?}");
    let kinds: Vec<_> = sent(&store).into_iter().map(|(_, kind)| kind).collect();
    assert_eq!(kinds, ["payment.charge", "inventory.reserve"]);
}

#[tokio::test]
async fn an_unknown_saga_id_writes_nothing() {
    let store = MemorySagaStore::new();
    let saga = Orchestrator::new(Checkout, store.clone());
    assert_eq!(
        saga.handle("nope", Input::Message(Reply::Paid))
            .await
            .unwrap(),
        Outcome::Unknown
    );
    assert!(store.take_commands().is_empty());
}

fn any_input() -> impl Strategy<Value = Input<Reply>> {
    prop_oneof![
        prop::sample::select(vec![
            Reply::Paid,
            Reply::PaymentDeclined,
            Reply::Reserved,
            Reply::OutOfStock,
            Reply::Shipped,
            Reply::ShippingFailed,
            Reply::Refunded,
            Reply::Released,
        ])
        .prop_map(Input::Message),
        Just(Input::Timeout {
            name: "step".into()
        }),
        Just(Input::Operator(OperatorAction::new("abort", "ops", "test"))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever inputs arrive, the stored state is the replay of the
    /// recorded history, and a finished saga holds no timers.
    #[test]
    fn stored_state_is_the_replay_of_its_history(inputs in prop::collection::vec(any_input(), 0..12)) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let store = MemorySagaStore::new();
            let saga = Orchestrator::new(Checkout, store.clone());
            saga.start("p", Checkout::begin("p")).await.unwrap();
            for input in &inputs {
                saga.handle("p", input.clone()).await.unwrap();
            }
            let stored = saga.state("p").await.unwrap().unwrap();
            let (initial, recorded) = saga.history("p").await.unwrap().unwrap();
            prop_assert_eq!(&replay(&Checkout, initial.clone(), recorded), &stored);
            prop_assert_eq!(&replay(&Checkout, initial, inputs), &stored);
            if Checkout.is_finished(&stored) {
                prop_assert!(store.timers().is_empty());
            }
            Ok(())
        })?;
    }
}

#[test]
fn public_types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Orchestrator<Checkout, MemorySagaStore>>();
    check::<MemorySagaStore>();
    check::<surety_saga::SagaError>();
    check::<Outcome>();
    check::<surety_saga::steps::Steps>();
    check::<surety_saga::steps::Versions>();
    check::<surety_saga::steps::StepState>();
    #[cfg(feature = "sqlite")]
    check::<surety_saga::sqlite::SqliteSagaStore>();
    #[cfg(feature = "postgres")]
    check::<surety_saga::postgres::PostgresSagaStore>();
    #[cfg(feature = "admin")]
    check::<surety_saga::admin::AdminApi<surety_saga::steps::Steps, MemorySagaStore>>();
    check::<surety_saga::metrics::SagaMetrics>();
    check::<surety_saga::store::InstanceSummary>();
}

/// A store in which another writer applies `race` to the instance just
/// before the first write lands.
struct RacingStore {
    inner: MemorySagaStore,
    race: std::sync::Mutex<Option<Reply>>,
}

impl surety_saga::store::SagaStore for RacingStore {
    async fn load(
        &self,
        saga: &str,
        id: &str,
    ) -> Result<Option<surety_saga::store::InstanceRecord>, surety_saga::store::StoreError> {
        self.inner.load(saga, id).await
    }

    async fn write(
        &self,
        write: surety_saga::store::Write,
    ) -> Result<(), surety_saga::store::StoreError> {
        let race = self.race.lock().unwrap().take();
        if let Some(reply) = race {
            let other = Orchestrator::new(Checkout, self.inner.clone());
            let id = write.instance.id.clone();
            other.handle(&id, Input::Message(reply)).await.unwrap();
        }
        self.inner.write(write).await
    }

    async fn due_timers(
        &self,
        saga: &str,
        now: chrono::DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<surety_saga::store::TimerRecord>, surety_saga::store::StoreError> {
        self.inner.due_timers(saga, now, limit).await
    }

    async fn history(
        &self,
        saga: &str,
        id: &str,
    ) -> Result<Vec<surety_saga::store::HistoryRecord>, surety_saga::store::StoreError> {
        self.inner.history(saga, id).await
    }

    async fn record_noop(
        &self,
        saga: &str,
        id: &str,
        noop: surety_saga::store::NoopRecord,
    ) -> Result<(), surety_saga::store::StoreError> {
        self.inner.record_noop(saga, id, noop).await
    }

    async fn noops(
        &self,
        saga: &str,
        id: &str,
    ) -> Result<Vec<surety_saga::store::NoopRecord>, surety_saga::store::StoreError> {
        self.inner.noops(saga, id).await
    }

    async fn list(
        &self,
        filter: &surety_saga::store::ListFilter,
    ) -> Result<Vec<surety_saga::store::InstanceSummary>, surety_saga::store::StoreError> {
        self.inner.list(filter).await
    }

    async fn delete_timer(
        &self,
        timer: &surety_saga::store::TimerRecord,
    ) -> Result<bool, surety_saga::store::StoreError> {
        self.inner.delete_timer(timer).await
    }

    async fn unfinished_counts(
        &self,
        saga: &str,
        idle_since: chrono::DateTime<Utc>,
    ) -> Result<Vec<(String, u64, u64)>, surety_saga::store::StoreError> {
        self.inner.unfinished_counts(saga, idle_since).await
    }

    async fn purge_finished(
        &self,
        saga: &str,
        before: chrono::DateTime<Utc>,
        limit: usize,
    ) -> Result<u64, surety_saga::store::StoreError> {
        self.inner.purge_finished(saga, before, limit).await
    }

    async fn audit(
        &self,
        entry: surety_saga::store::AuditRecord,
    ) -> Result<(), surety_saga::store::StoreError> {
        self.inner.audit(entry).await
    }

    async fn audit_log(
        &self,
        saga: &str,
        id: &str,
    ) -> Result<Vec<surety_saga::store::AuditRecord>, surety_saga::store::StoreError> {
        self.inner.audit_log(saga, id).await
    }
}

#[tokio::test]
async fn a_concurrent_write_makes_the_input_decide_again_on_the_fresh_state() {
    use surety_saga::store::SagaStore;
    let memory = MemorySagaStore::new();
    let setup = Orchestrator::new(Checkout, memory.clone());
    setup.start("o-7", Checkout::begin("o-7")).await.unwrap();
    setup
        .handle("o-7", Input::Message(Reply::Paid))
        .await
        .unwrap();
    memory.take_commands();

    let racing = RacingStore {
        inner: memory.clone(),
        race: std::sync::Mutex::new(Some(Reply::Reserved)),
    };
    let saga = Orchestrator::new(Checkout, racing);
    // Decided on `reserving` (refund), but `Reserved` won the race: on the
    // fresh state (`shipping`) a stale out-of-stock reply is ignored.
    let outcome = saga
        .handle("o-7", Input::Message(Reply::OutOfStock))
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Ignored);
    assert_eq!(
        saga.state("o-7").await.unwrap().unwrap().step,
        Step::Shipping
    );
    assert_eq!(sent(&memory), vec![pair("shipping", "shipping.ship")]);
    assert_eq!(memory.history("checkout", "o-7").await.unwrap().len(), 3);
}

#[tokio::test]
async fn metrics_count_inputs_by_outcome_and_progress_by_state() {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = surety_saga::metrics::SagaMetrics::register(&mut registry);
    let saga = Orchestrator::new(Checkout, MemorySagaStore::new()).metrics(metrics.clone());
    saga.start("m-1", Checkout::begin("m-1")).await.unwrap();
    saga.start("m-1", Checkout::begin("m-1")).await.unwrap();
    saga.handle("m-1", Input::Message(Reply::Paid))
        .await
        .unwrap();
    saga.handle("m-1", Input::Message(Reply::Paid))
        .await
        .unwrap();
    saga.handle(
        "m-1",
        Input::Operator(OperatorAction::new("abort", "ops", "test")),
    )
    .await
    .unwrap();
    saga.handle("m-1", Input::Message(Reply::Reserved))
        .await
        .unwrap();

    assert_eq!(metrics.inputs_count("checkout", "applied"), 3);
    assert_eq!(metrics.inputs_count("checkout", "already_started"), 1);
    assert_eq!(metrics.inputs_count("checkout", "ignored"), 1);
    assert_eq!(metrics.inputs_count("checkout", "finished"), 1);
    assert_eq!(metrics.transitions_count("checkout", "reserving"), 1);
    assert_eq!(metrics.transitions_count("checkout", "cancelled"), 1);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"surety_saga_transitions_total{saga="checkout",state="paying"} 1"#),
        "{text}"
    );
}

/// A saga that ignores every input, timeouts included.
struct Deaf;

impl Saga for Deaf {
    type State = u8;
    type Message = ();
    fn name(&self) -> &str {
        "deaf"
    }
    fn state_name<'a>(&'a self, _state: &'a u8) -> &'a str {
        "waiting"
    }
    fn is_finished(&self, _state: &u8) -> bool {
        false
    }
    fn apply(&self, _state: &u8, _input: &Input<()>) -> Transition<u8> {
        Transition::ignore()
    }
}

#[tokio::test]
async fn a_fired_timer_the_definition_ignores_is_dropped() {
    let store = MemorySagaStore::new();
    let saga = Orchestrator::new(Deaf, store.clone());
    saga.start("d-1", Transition::to(0).set_timer("nap", Duration::ZERO))
        .await
        .unwrap();
    let later = Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(
        saga.fire_due_timers(later, 10).await.unwrap(),
        vec![Outcome::Ignored]
    );
    assert!(store.timers().is_empty(), "it does not fall due again");
    assert!(saga.fire_due_timers(later, 10).await.unwrap().is_empty());
}
